"""Nothing silent: on 2 and 4 gloo ranks, what used to train wrong, overwrite state or
hang now raises a clear error on every rank, with parameters and state bitwise unchanged, well
within the process-group timeout."""

from __future__ import annotations

import failure_cases as fc
import pytest
from harness import COLLECTIVE_TIMEOUT_S, run_cases

CASES_2 = {
    "lr_ddp": (fc.lr_differs_at_step, {"mode": "ddp"}),
    "lr_fsdp": (fc.lr_differs_at_step, {"mode": "fsdp"}),
    "invalid_lr": (fc.invalid_lr_on_one_rank, {}),
    "no_grads": (fc.no_gradients_on_one_rank, {}),
    "comm_same_size": (fc.construction_differs, {"what": "communication_dtype_same_size"}),
    "comm_other_size": (fc.construction_differs, {"what": "communication_dtype_other_size"}),
    "lr_at_construction": (fc.construction_differs, {"what": "lr"}),
    "buckets": (fc.construction_differs, {"what": "exchange_buckets"}),
    "names_order": (fc.construction_differs, {"what": "names_order"}),
    "truncated": (fc.truncated_checkpoint, {}),
    "plain_dcp": (fc.plain_dcp_load_refused, {}),
    "other_model": (fc.other_model_checkpoint, {}),
    "group_steps": (fc.groups_at_different_steps, {}),
    "memory": (fc.per_layer_groups_memory, {}),
    "before_pg": (fc.built_before_process_group, {}),
    "copy": (fc.copy_refused, {}),
    "bad_at_construction": (fc.bad_option_on_one_rank, {"when": "construction"}),
    "bad_added_group": (fc.bad_option_on_one_rank, {"when": "add_param_group"}),
    "fsdp1": (fc.fsdp1, {}),
    "fault_ddp": (fc.fault_in_refresh, {"mode": "ddp", "delay": 0}),
    "fault_fsdp_background": (fc.fault_in_refresh, {"mode": "fsdp", "delay": 2}),
    "killed_in_step": (fc.rank_killed_in_step, {"mode": "fsdp"}),  # last: it breaks the group
}
CASES_4 = {
    "trainer_groups": (fc.trainer_groups_differ, {}),
    "lr_hsdp": (fc.lr_differs_at_step, {"mode": "hsdp", "odd_rank": 3}),
    "memory": (fc.per_layer_groups_memory, {}),
}
CHECKPOINT_CASES = {"truncated", "plain_dcp", "other_model", "group_steps"}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("failures"))
    cases = [
        (fn, {**kw, "root": root} if name in CHECKPOINT_CASES else kw)
        for name, (fn, kw) in CASES_2.items()
    ]
    return dict(zip(CASES_2, run_cases(2, cases), strict=True))


@pytest.fixture(scope="module")
def world4():
    return dict(zip(CASES_4, run_cases(4, list(CASES_4.values())), strict=True))


@pytest.mark.parametrize("case", ["lr_ddp", "lr_fsdp"])
def test_different_lr_per_rank_raises_everywhere_and_updates_nothing(world2, case):
    for r, (message, unchanged, works) in enumerate(world2[case].ok()):
        assert message.startswith("RuntimeError: ranks stepped with different options"), message
        assert "ReduceLROnPlateau" in message, message
        assert unchanged, f"rank {r} changed its parameters"
        assert works


def test_different_lr_under_hsdp_reaches_the_other_replica_group(world4):
    for r, (message, unchanged, works) in enumerate(world4["lr_hsdp"].ok()):
        assert message.startswith("RuntimeError: ranks stepped with different options"), (
            r,
            message,
        )
        assert unchanged and works


def test_invalid_options_on_one_rank_raise_everywhere(world2):
    (m0, params0, _, works0), (m1, params1, all1, works1) = world2["invalid_lr"].ok()
    assert m1.startswith("ValueError: param group 0: lr must be in [0.0, inf], got -1.0"), m1
    assert m0.startswith("RuntimeError: rank 1 failed in this step"), m0
    assert m0.endswith("ValueError: param group 0: lr must be in [0.0, inf], got -1.0"), m0
    assert params0 and params1 and works0 and works1
    assert all1  # the rank with the bad option changed nothing at all


@pytest.mark.parametrize("case", ["bad_at_construction", "bad_added_group"])
def test_an_option_bad_on_one_rank_raises_everywhere_at_once(world2, case):
    (m0, s0, works0), (m1, s1, works1) = world2[case].ok()
    assert "lr must be in [0.0, inf], got -1.0" in m1 and m1.startswith("ValueError"), m1
    assert m0.startswith("RankFailedError: rank 1 could not build the optimizer:"), m0
    assert "lr must be" in m0, m0
    assert max(s0, s1) < COLLECTIVE_TIMEOUT_S / 3, (s0, s1)
    assert works0 and works1


def test_a_rank_without_gradients_does_not_leave_the_others_waiting(world2):
    for message, unchanged, seconds in world2["no_grads"].ok():
        assert message.startswith("RuntimeError: ranks stepped with different options"), message
        assert unchanged
        assert seconds < COLLECTIVE_TIMEOUT_S / 3, seconds


@pytest.mark.parametrize(
    "case, expected",
    [
        (
            "comm_same_size",
            "communication_dtype differs (rank 0: torch.bfloat16; rank 1: torch.float16)",
        ),
        (
            "comm_other_size",
            "communication_dtype differs (rank 0: torch.float32; rank 1: torch.bfloat16)",
        ),
        (
            "lr_at_construction",
            "the options of param group 0 differ (rank 0: lr=0.01; rank 1: lr=0.02)",
        ),
        ("buckets", "exchange_buckets differs (rank 0: 4; rank 1: 2)"),
        ("names_order", "parameter #0 differs (rank 0: 0.weight (4, 4); rank 1: 1.weight (4, 4))"),
    ],
)
def test_ranks_that_built_different_optimizers_all_raise(world2, case, expected):
    for message, works in world2[case].ok():
        assert message.startswith("PlanMismatchError: ranks built different optimizers"), message
        assert expected in message, message
        assert works


def test_different_trainer_groups_raise_instead_of_hanging(world4):
    for message, seconds, works in world4["trainer_groups"].ok():
        assert message.startswith("PlanMismatchError"), message
        assert "number of ranks blocks are sharded over differs" in message, message
        assert "ranks 0, 1: 2; ranks 2, 3: 4" in message, message
        assert seconds < COLLECTIVE_TIMEOUT_S / 3, seconds
        assert works


@pytest.mark.fault
def test_truncated_checkpoint_changes_nothing(world2, fault_row):
    row = fault_row(
        "a .distcp file cut in half (DDP, 2 ranks)",
        "load_checkpoint raises on every rank; model and optimizer unchanged",
    )
    for message, unchanged, works in world2["truncated"].ok():
        assert message.startswith("CheckpointException"), message
        assert unchanged, "the failed load changed the model or the optimizer"
        assert works
    row["happened"] = "CheckpointException on both ranks; model and optimizer bitwise unchanged"


def test_refused_plain_dcp_load_changes_nothing(world2):
    for message, unchanged, works in world2["plain_dcp"].ok():
        assert message.startswith("ValueError"), message
        assert "grafting: adam saved, rmsprop here" in message, message
        assert unchanged, "dcp.load wrote into the live optimizer state"
        assert works


def test_checkpoint_of_a_bigger_model_is_refused(world2):
    for message, unchanged, works in world2["other_model"].ok():
        assert message.startswith("ValueError"), message
        assert "has model entries that this model lacks: 'extra.bias', 'extra.weight'" in message
        assert unchanged and works


def test_groups_saved_at_different_steps_are_refused(world2):
    for message, unchanged, works in world2["group_steps"].ok():
        assert message.startswith("ValueError"), message
        assert "saved at different steps [3, 9]" in message, message
        assert unchanged and works


@pytest.mark.parametrize("world", [2, 4])
def test_per_layer_groups_are_not_padded(world2, world4, world):
    values = (world2 if world == 2 else world4)["memory"].ok()
    owned = [blocks for _, blocks in values]
    assert sum(owned) == 8 and len(set(owned)) == 1, owned
    # One 64 x 64 block: a factor and a root per dim, packed (4 x 64 x 65 / 2), grafting and
    # filtered gradient (2 x 64 x 64), float32; a root-failure counter (int32).
    per_block = (4 * 64 * 65 // 2 + 2 * 64 * 64) * 4 + 4
    for state_bytes, blocks in values:
        assert state_bytes == blocks * per_block, (state_bytes, blocks)


def test_optimizer_built_before_the_process_group_warns(world2):
    for messages, owned in world2["before_pg"].ok():
        assert len(messages) == 1, messages  # at the first step only
        assert "does not shard" in messages[0]
        assert owned == 2  # every block, on every rank


def test_sharded_optimizer_cannot_be_copied(world2):
    for pickled, copied in world2["copy"].ok():
        for message in (pickled, copied):
            assert message.startswith(
                "TypeError: ShardedShampoo cannot be pickled or deep-copied"
            ), message


def test_fsdp1_is_refused_naming_fully_shard(world2):
    for message, works in world2["fsdp1"].ok():
        assert message.startswith("PlanMismatchError: ranks built different optimizers"), message
        assert "FSDP2's fully_shard" in message, message
        assert works


@pytest.mark.fault
@pytest.mark.parametrize("case", ["fault_ddp", "fault_fsdp_background"])
def test_a_rank_whose_refresh_raises_takes_every_rank_down_with_its_cause(world2, case, fault_row):
    """Inside the step, rank 1's refresh raises: it still takes part in the step's exchange
    with its failure in the status words, so every rank raises in the same step, at once,
    with rank 1's exception (before: the others hung until the process group's timeout)."""
    due = {"fault_ddp": 5, "fault_fsdp_background": 7}[case]  # installed 2 steps later
    where = {"fault_ddp": "DDP, in the step", "fault_fsdp_background": "FSDP2, in the background"}
    row = fault_row(
        f"rank 1's refresh raises ({where[case]}; 2 ranks)",
        "every rank raises in that step within 5 s, the others with rank 1's exception; no "
        "parameter changes",
    )
    outcomes = world2[case].ok()
    for r, (step, message, seconds, unchanged, works) in enumerate(outcomes):
        assert step == due, (r, step, message)
        if r == 1:
            assert message == "InjectedFault: injected: the refresh lost its device", message
        else:
            assert message.startswith("RuntimeError: rank 1 failed in this step"), message
            assert message.endswith("InjectedFault: injected: the refresh lost its device")
        assert seconds < 5 < COLLECTIVE_TIMEOUT_S, (r, seconds)
        assert unchanged and works
    slowest = max(seconds for _, _, seconds, _, _ in outcomes)
    row["happened"] = (
        f"both ranks raised at step {due} within {slowest:.2f} s, rank 0 naming rank 1's "
        "InjectedFault; parameters unchanged"
    )


@pytest.mark.fault
def test_a_rank_killed_inside_the_step_makes_the_others_raise_at_once(world2, fault_row):
    """Rank 1's process dies inside the optimizer's step: rank 0 raises in that step, within
    seconds, and changed nothing."""
    row = fault_row(
        "rank 1 of 2 killed inside the optimizer step (FSDP2)",
        "rank 0 raises in that step within 5 s, parameters unchanged: a restart from the last "
        "checkpoint loses nothing",
    )
    result = world2["killed_in_step"]
    assert "rank 1 exited" in result.errors[1], result.errors[1]
    message, seconds, unchanged = result.values[0]
    assert "Connection closed by peer" in message or "Connection reset" in message, message
    assert seconds < 5, seconds
    assert unchanged
    row["happened"] = (
        f"rank 0 raised after {seconds:.2f} s (gloo: connection reset by peer); parameters "
        "unchanged"
    )
