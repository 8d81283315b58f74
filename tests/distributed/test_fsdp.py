"""ShardedShampoo on FSDP2 (2 and 4 ranks) and HSDP (2 x 2) against the single-process optimizer.

Blocks come from the full parameter shapes, so the result does not depend on how FSDP2 shards
the rows. Each rank trains on its own slice of the global batch; FSDP2 averages gradients with
a reduce-scatter, whose summation order differs from one process summing the whole batch, so
the comparison uses the DDP tests' float64 tolerance (same reasoning).
"""

from __future__ import annotations

import fsdp_cases
import pytest
import scenarios
import torch
from harness import run_cases


@pytest.fixture(scope="module")
def reference():
    return fsdp_cases.train_reference()


# Weight decay of row-sharded parameters is applied where it needs the least traffic (see
# optimizer._weight_decay_place); each placement is checked against one process.
WEIGHT_DECAY_VARIANTS = {
    "l2": dict(decoupled_weight_decay=False),  # by the holder, into the gradient rows
    "decoupled_no_momentum": dict(momentum=0.0),  # by the holder, with the direction
}


# A NaN gradient in one block at step 3 (fsdp_cases.NAN_ROW). Without momentum, holders apply
# decoupled weight decay with the direction (W - lr (D + wd W)): a skipped block's rows would
# still change if its holders were not told it was skipped.
NAN_CASE = dict(nan_step=3, momentum=0.0)
EC_CASE = dict(preconditioner="eigenvalue_corrected")
SOAP_CASE = dict(EC_CASE, eigenbasis_convention="soap")
# Root-inverse Shampoo's roots from warm-started eigenbases, every step from step 1 (rank-
# deficient factors: their null spaces' bases must not depend on the world size either).
QR_ROOTS_CASE = dict(eigenbasis="qr", precondition_frequency=1, start_preconditioning_step=1)
# Inverse roots by the coupled Newton iteration.
NEWTON_CASE = dict(newton_iterations=30)
# KL-Shampoo's pseudo-inverse roots of factors of the first moment; Muon's spectral descent.
ESTIMATORS_CASE = scenarios.KL_PSEUDO_INVERSE
SPECTRAL_CASE = dict(preconditioner="spectral", newton_schulz="polar_express", grafting="rms")
# Memory options: one-sided and diagonal blocks (max_factor_ratio), full matrices, bfloat16
# moving averages, 8-bit quantized roots and eigenvectors.
LEAN_CASE = dict(
    max_factor_ratio=2,
    symmetric_packing=False,
    grafting_dtype="bfloat16",
    first_moment_dtype="bfloat16",
    root_dtype="int8",
)


@pytest.fixture(scope="module")
def world2():
    names = ["fsdp", "mixed", "nan", "drop_grads", "staggered", *WEIGHT_DECAY_VARIANTS]
    cases = [
        (fsdp_cases.fsdp, {}),
        (fsdp_cases.fsdp, {"mixed": True}),
        (fsdp_cases.fsdp, NAN_CASE),
        (fsdp_cases.fsdp, {"drop_grads": True}),
        (fsdp_cases.fsdp, {"stagger_roots": True}),
    ]
    cases += [(fsdp_cases.fsdp, kw) for kw in WEIGHT_DECAY_VARIANTS.values()]
    names += ["eigenvalue_corrected", "mixed_eigenvalue_corrected", "soap_eigenvalue_corrected"]
    cases += [
        (fsdp_cases.fsdp, EC_CASE),
        (fsdp_cases.fsdp, {"mixed": True, **EC_CASE}),
        (fsdp_cases.fsdp, {**SOAP_CASE, "eigenbasis": "qr"}),
    ]
    # One collective each way instead of overlapped buckets (the default).
    names += ["one_bucket", "mixed_one_bucket"]
    cases += [
        (fsdp_cases.fsdp, {"exchange_buckets": 1}),
        (fsdp_cases.fsdp, {"mixed": True, "exchange_buckets": 1}),
    ]
    return dict(zip(names, run_cases(2, cases), strict=True))


@pytest.fixture(scope="module")
def world3():
    """3 ranks: 33 rows split 11/11/11 and 12 into 4/4/4, so peers send each other different
    amounts (all_to_all_single with uneven split sizes)."""
    return {"fsdp": run_cases(3, [(fsdp_cases.fsdp, {})])[0]}


@pytest.fixture(scope="module")
def world4():
    names = [
        "fsdp",
        "hsdp",
        "mixed_precision",
        "failures",
        "hsdp_nan",
        "hsdp_eigenvalue_corrected",
        "lean",
        "lean_eigenvalue_corrected",
        "qr_roots",
        "newton",
        "estimators",
        "hsdp_spectral",
    ]
    cases = [
        (fsdp_cases.fsdp, {}),
        (fsdp_cases.fsdp, {"hsdp": True}),
        (fsdp_cases.fsdp, {"mixed_precision": True}),
        (fsdp_cases.failures, {}),
        (fsdp_cases.fsdp, {"hsdp": True, **NAN_CASE}),
        (fsdp_cases.fsdp, {"hsdp": True, **EC_CASE, "eigenbasis": "qr"}),
        (fsdp_cases.fsdp, LEAN_CASE),
        (fsdp_cases.fsdp, {**LEAN_CASE, **EC_CASE}),
        (fsdp_cases.fsdp, QR_ROOTS_CASE),
        (fsdp_cases.fsdp, NEWTON_CASE),
        (fsdp_cases.fsdp, ESTIMATORS_CASE),
        (fsdp_cases.fsdp, {"hsdp": True, **SPECTRAL_CASE}),
    ]
    return dict(zip(names, run_cases(4, cases), strict=True))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp_matches_single_process(world, request, reference):
    results = request.getfixturevalue(f"world{world}")
    values = results["fsdp"].ok()
    fsdp_cases.check_against_reference(values, reference)


def test_hsdp_matches_single_process_and_splits_work_over_all_ranks(world4, reference):
    values = world4["hsdp"].ok()
    fsdp_cases.check_against_reference(values, reference)
    owned = [v["owned_blocks"] for v in values]
    assert all(n > 0 for n in owned), owned  # the replicate dimension shares the work too


def test_mixed_sharded_and_replicated_parameters(world2, reference):
    values = world2["mixed"].ok()
    fsdp_cases.check_against_reference(values, reference)
    assert values[0]["allgather_bytes"] > 0 and values[0]["bytes_sent"] > 0


def test_mixed_precision_policy_trains(world4):
    values = world4["mixed_precision"].ok()
    losses = values[0]["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_state_bytes_per_rank_fall(world4, reference):
    _, ref_bytes = reference
    worst = max(v["state_bytes"] for v in world4["fsdp"].ok())
    assert worst <= 0.3 * ref_bytes, f"{worst / ref_bytes:.3f}"


@pytest.mark.parametrize("variant", list(WEIGHT_DECAY_VARIANTS))
def test_weight_decay_placements_match_single_process(world2, variant):
    values = world2[variant].ok()
    fsdp_cases.check_against_reference(
        values, fsdp_cases.train_reference(**WEIGHT_DECAY_VARIANTS[variant])
    )


def test_failures_under_hsdp_raise_everywhere_and_nan_stays_out(world4):
    values = world4["failures"].ok()
    steps = set()
    for r, (outcome, finite) in enumerate(values):
        assert finite, f"rank {r} has non-finite parameters"
        assert "unchanged=True" in outcome, outcome
        steps.add(outcome.split(":")[0])
        if r == 0:
            assert "failed 2 times in a row" in outcome, outcome
        else:
            assert "rank 0 failed in this step" in outcome, outcome
            assert "failed 2 times in a row" in outcome, outcome  # rank 0's cause
    assert len(steps) == 1, steps  # every rank raised in the same step


def test_fsdp_on_a_single_rank(reference):
    ((mixed, full),) = [v for v in run_cases(1, [(fsdp_cases.fsdp_single_rank, {})])[0].ok()]
    for values in (mixed, full):
        fsdp_cases.check_against_reference([values], reference)


@pytest.mark.parametrize("world, case", [(2, "nan"), (4, "hsdp_nan")])
def test_a_block_with_a_nan_gradient_is_skipped_on_every_holder(world2, world4, world, case):
    """The block's owner skips it; the holders of its rows on other ranks (and, under HSDP, in
    the other replica group) must leave them unchanged too: the result is one process's, in
    which the block is skipped in that step."""
    values = {2: world2, 4: world4}[world][case].ok()
    reference = fsdp_cases.train_reference(**NAN_CASE)
    fsdp_cases.check_against_reference(values, reference)
    plain = fsdp_cases.train_reference(momentum=0.0)
    assert not torch.allclose(reference[0][0], plain[0][0], atol=1e-6)  # the skip mattered


def test_parameters_without_a_gradient_in_some_steps(world2):
    values = world2["drop_grads"].ok()
    fsdp_cases.check_against_reference(values, fsdp_cases.train_reference(drop_grads=True))


def test_staggered_roots_match_single_process(world2):
    values = world2["staggered"].ok()
    fsdp_cases.check_against_reference(values, fsdp_cases.train_reference(stagger_roots=True))


@pytest.mark.parametrize(
    "world, case",
    [
        (2, "eigenvalue_corrected"),
        (4, "hsdp_eigenvalue_corrected"),
        (2, "mixed_eigenvalue_corrected"),
        (2, "soap_eigenvalue_corrected"),
    ],
)
def test_eigenvalue_corrected_matches_single_process(world2, world4, world, case):
    values = {2: world2, 4: world4}[world][case].ok()
    basis = "qr" if case.startswith(("hsdp", "soap")) else "eigh"
    options = SOAP_CASE if case.startswith("soap") else EC_CASE
    fsdp_cases.check_against_reference(
        values, fsdp_cases.train_reference(**options, eigenbasis=basis)
    )


@pytest.mark.parametrize("case, options", [("lean", {}), ("lean_eigenvalue_corrected", EC_CASE)])
def test_memory_options_match_single_process(world4, case, options):
    values = world4[case].ok()
    fsdp_cases.check_against_reference(values, fsdp_cases.train_reference(**LEAN_CASE, **options))


@pytest.mark.parametrize("case", ["fsdp", "mixed"])
def test_overlapped_buckets_are_bitwise_one_collective(world2, case):
    """The exchanges split into buckets of stacks and overlapped with the math (the default)
    move the same elements to the same places as one all_to_all (and one AllGather for the
    plain parameters of the mixed model) each way: bitwise the same parameters and losses."""
    bucketed = world2[case].ok()
    single = world2[{"fsdp": "one_bucket", "mixed": "mixed_one_bucket"}[case]].ok()
    for a, b in zip(bucketed, single, strict=True):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
        assert a["bytes_sent"] == b["bytes_sent"]  # status words once either way


@pytest.mark.parametrize(
    "case, options",
    [
        ("qr_roots", QR_ROOTS_CASE),
        ("newton", NEWTON_CASE),
        ("estimators", ESTIMATORS_CASE),
        ("hsdp_spectral", SPECTRAL_CASE),
    ],
)
def test_root_methods_match_single_process(world4, case, options):
    """Roots from warm-started eigenbases, refreshed every step from step 1; roots by the
    coupled Newton iteration; KL-Shampoo's pseudo-inverse roots of the first moment's
    factors (FSDP2); spectral descent (HSDP)."""
    values = world4[case].ok()
    fsdp_cases.check_against_reference(values, fsdp_cases.train_reference(**options))
