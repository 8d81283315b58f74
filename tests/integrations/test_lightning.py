"""Lightning: ShardedShampoo from ``configure_optimizers`` under the DDP strategy (sharded over
both ranks; Lightning consolidates it through ``consolidate_state_dict`` before rank 0 writes
the checkpoint) and under ModelParallelStrategy (FSDP2; a DCP checkpoint). A fit resumed from
the checkpoint continues bitwise like the uninterrupted one."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning", reason="the lightning extra is absent")

import lightning_cases  # noqa: E402
from harness import run_cases  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lightning"))
    ddp, fsdp = run_cases(
        2,
        [
            (lightning_cases.train_and_resume, {"root": root}),
            (lightning_cases.train_and_resume, {"root": root, "fsdp": True}),
        ],
    )
    return {"ddp": ddp, "fsdp": fsdp}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resumed_fit_continues_exactly(results, strategy):
    for v in results[strategy].ok():
        assert len(v["losses"]) == lightning_cases.STEPS
        assert v["resumed"] == v["losses"][lightning_cases.SAVE :]
        assert v["same_params"]


def test_ddp_checkpoint_holds_every_ranks_blocks(results):
    values = results["ddp"].ok()
    own = [v["own_blocks"] for v in values]
    assert all(0 < n < values[0]["saved_blocks"] for n in own), own  # sharded
    assert sum(own) == values[0]["saved_blocks"]  # rank 0's file holds them all
