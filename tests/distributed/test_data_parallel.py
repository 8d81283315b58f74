"""Data-parallel ShardedShampoo on 2, 3 and 4 gloo ranks against the single-process optimizer.

Each world size runs all its cases in one spawned group (see harness.py).
"""

from __future__ import annotations

import dp_cases
import pytest
import scenarios
import torch
from harness import run_cases, to_host
from scenarios import BF16_TOLERANCE, DDP_TOLERANCE, EXACT_TOLERANCE, FP32_TOLERANCE

WORLD_SIZES = [2, 3, 4]
CASES = {
    "fp64": (dp_cases.same_grads, {}),
    "fp32": (dp_cases.same_grads, {"communication_dtype": torch.float32}),
    "bf16": (dp_cases.same_grads, {"communication_dtype": torch.bfloat16}),
    # Two blocks: too few to shard by default (see auto_shard_width); forced over every rank.
    "tiny": (dp_cases.same_grads, {"tiny": True, "num_trainers_per_group": "world"}),
    "tiny_auto": (dp_cases.same_grads, {"tiny": True}),
    "ddp": (dp_cases.ddp, {}),
    "mismatch": (dp_cases.plan_mismatch, {}),
    "root_failure": (dp_cases.root_failure, {}),
    "explicit_mesh": (dp_cases.same_grads, {"explicit_mesh": True}),
    "one_bucket": (dp_cases.same_grads, {"exchange_buckets": 1}),
    "added_group": (dp_cases.added_group, {}),
    **{v: (dp_cases.same_grads, {"variant": v}) for v in scenarios.VARIANTS},
    # Background refreshes: the failures surface at the install step, on every rank.
    "root_failure_background": (dp_cases.root_failure, {"refresh_delay": 1}),
}
TRAINER_GROUP_CASE = (dp_cases.same_grads, {"num_trainers_per_group": 2})


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group(request):
    world = request.param
    names = list(CASES)
    cases = [CASES[n] for n in names]
    if world == 4:
        names.append("trainer_groups")
        cases.append(TRAINER_GROUP_CASE)
    results = run_cases(world, cases)
    return world, dict(zip(names, results, strict=True))


@pytest.fixture(scope="module")
def reference():
    params, opt = scenarios.train_with_same_grads()
    tiny, _ = scenarios.train_with_same_grads(
        shapes=scenarios.TINY_SHAPES, options=scenarios.TINY_OPTIONS
    )
    return {
        "params": params,
        "state_bytes": opt.state_bytes(),
        "tiny": tiny,
        **{
            v: scenarios.train_with_same_grads(options=options)[0]
            for v, options in scenarios.VARIANTS.items()
        },
    }


def assert_replicas_identical(values):
    first = values[0]["params"] if isinstance(values[0], dict) else values[0]
    for r, v in enumerate(values[1:], start=1):
        other = v["params"] if isinstance(v, dict) else v
        flat_a = [p for g in first for p in (g if isinstance(g, list) else [g])]
        flat_b = [p for g in other for p in (g if isinstance(g, list) else [g])]
        for a, b in zip(flat_a, flat_b, strict=True):
            assert torch.equal(a, b), f"rank {r} differs from rank 0"


def test_fp64_matches_single_process(group, reference):
    """Not bitwise: MKL's batched products and LAPACK's eigh round differently depending on a
    matrix's byte alignment, i.e. on its position in a stack, which changes with the number of
    blocks a rank owns."""
    world, results = group
    values = results["fp64"].ok()
    assert_replicas_identical(values)
    err = scenarios.max_rel_err(values[0]["params"], reference["params"])
    assert err <= EXACT_TOLERANCE, f"world {world}: relative error {err:.2e}"
    fp32 = scenarios.max_rel_err(results["fp32"].ok()[0]["params"], reference["params"])
    assert fp32 <= FP32_TOLERANCE, f"world {world}: float32 communication: {fp32:.2e}"
    # Every block owned once: owned blocks add up to the single-process count.
    assert (
        sum(v["owned_blocks"] for v in values)
        == scenarios.train_with_same_grads(steps=0)[1].owned_blocks()
    )


def test_bf16_communication_keeps_replicas_identical(group, reference):
    world, results = group
    values = results["bf16"].ok()
    assert_replicas_identical(values)
    err = scenarios.max_rel_err(values[0]["params"], reference["params"])
    assert err <= BF16_TOLERANCE, f"world {world}: relative error {err:.2e}"
    fp32 = results["fp32"].ok()
    assert values[0]["bytes_sent"] * 2 == fp32[0]["bytes_sent"]


def test_too_few_blocks_are_not_sharded_by_default(group, reference):
    world, results = group
    values = results["tiny_auto"].ok()
    assert [v["owned_blocks"] for v in values] == [2] * world  # every rank computes both
    assert all(v["bytes_sent"] == 0 for v in values)
    assert scenarios.max_rel_err(values[0]["params"], reference["tiny"]) <= EXACT_TOLERANCE


def test_more_ranks_than_blocks(group, reference):
    world, results = group
    values = results["tiny"].ok()
    assert_replicas_identical(values)
    owned = [v["owned_blocks"] for v in values]
    assert sum(owned) == 2
    if world > 2:
        assert 0 in owned  # some rank owns nothing and still took part
    assert scenarios.max_rel_err(values[0]["params"], reference["tiny"]) <= EXACT_TOLERANCE


def test_ddp_with_different_batches_matches_single_process(group):
    world, results = group
    values = results["ddp"].ok()
    assert_replicas_identical(values)
    model = scenarios.make_mlp()
    opt = __import__("sharded_shampoo").ShardedShampoo(model.parameters(), **scenarios.DDP_OPTIONS)
    for step in range(30):
        x, y = scenarios.global_batch(step, 24)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ref = [to_host([p.detach() for p in model.parameters()])]
    err = scenarios.max_rel_err([values[0]], ref)
    assert err <= DDP_TOLERANCE, f"world {world}: relative error {err:.2e}"


def test_plan_mismatch_raises_on_every_rank(group):
    world, results = group
    messages = results["mismatch"].ok()
    for m in messages:
        assert m.startswith("PlanMismatchError"), m
        assert "parameter #9 differs" in m, m
        # Ranks with the same parameter are listed together.
        assert ("rank 0: " if world == 2 else "ranks 0, 2") in m, m
        assert "param_groups[1]['params'][2] (33,)" in m, m
        assert "rank 1: param_groups[1]['params'][2] (34,)" in m, m


@pytest.mark.parametrize("case", ["root_failure", "root_failure_background"])
def test_root_failure_on_one_rank_raises_on_every_rank(group, case):
    """Synchronous refreshes, and background ones (which fail in the worker and are counted,
    warned about and raised on at their install step)."""
    world, results = group
    values = results[case].ok()
    for r, (outcome, total) in enumerate(values):
        assert total == world  # the group still works after the error
        assert "unchanged=True" in outcome, outcome
        if r == 0:
            assert "failed 2 times in a row" in outcome, outcome
        else:
            assert "rank 0 failed in this step" in outcome, outcome
            assert "failed 2 times in a row" in outcome, outcome  # rank 0's cause
    steps = {o.split(":")[0] for o, _ in values}
    assert len(steps) == 1, steps  # all ranks raised in the same step


def test_trainer_groups_shard_within_groups(group, reference):
    world, results = group
    if world != 4:
        pytest.skip("num_trainers_per_group=2 is run at world size 4")
    values = results["trainer_groups"].ok()
    assert_replicas_identical(values)
    assert scenarios.max_rel_err(values[0]["params"], reference["params"]) <= EXACT_TOLERANCE
    # Ranks 0 and 2 (same position in their groups of 2) own the same blocks.
    assert values[0]["owned_blocks"] == values[2]["owned_blocks"]
    assert values[0]["owned_blocks"] + values[1]["owned_blocks"] == sum(
        v["owned_blocks"] for v in results["fp64"].ok()
    )
    fp32 = results["fp64"].ok()
    assert values[0]["bytes_sent"] < fp32[0]["bytes_sent"]


def test_state_bytes_fall_with_world_size(group, reference):
    world, results = group
    values = results["fp64"].ok()
    worst = max(v["state_bytes"] for v in values)
    ratio = worst / reference["state_bytes"]
    assert ratio <= {2: 0.6, 3: 0.42, 4: 0.3}[world], f"world {world}: {ratio:.3f}"


@pytest.mark.parametrize("case", ["explicit_mesh", "added_group"])
def test_explicit_mesh_and_added_group_match_single_process(group, reference, case):
    world, results = group
    values = results[case].ok()
    assert_replicas_identical(values)
    assert scenarios.max_rel_err(values[0]["params"], reference["params"]) <= EXACT_TOLERANCE
    assert sum(v["owned_blocks"] for v in values) == sum(
        v["owned_blocks"] for v in results["fp64"].ok()
    )


@pytest.mark.parametrize("variant", list(scenarios.VARIANTS))
def test_variant_matches_single_process(group, reference, variant):
    """Staggered roots (phases come from shapes alone), eigenvalue-corrected Shampoo (eigh
    and QR eigenbases, both conventions) and refreshes in the background: the result is one
    process's at every world size (float64, as test_fp64_matches_single_process)."""
    world, results = group
    values = results[variant].ok()
    assert_replicas_identical(values)
    err = scenarios.max_rel_err(values[0]["params"], reference[variant])
    assert err <= EXACT_TOLERANCE, f"world {world}: relative error {err:.2e}"
    # The variant changed the result: the comparison means something.
    assert scenarios.max_rel_err(reference["params"], reference[variant]) > 1e-3


def test_overlapped_allgathers_are_bitwise_one_allgather(group):
    """The directions gathered in buckets of stacks, each as soon as its stacks are computed
    (the default), are bitwise those of one AllGather after all the math."""
    world, results = group
    bucketed, single = results["fp64"].ok(), results["one_bucket"].ok()
    for a, b in zip(bucketed, single, strict=True):
        for x, y in zip(
            [p for g in a["params"] for p in g], [p for g in b["params"] for p in g], strict=True
        ):
            assert torch.equal(x, y), f"world {world}"
