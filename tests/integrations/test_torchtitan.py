"""torchtitan integration: ShardedShampoo selected by name in torchtitan's optimizer config,
with torchtitan's LR schedulers, gradient clipping and checkpoint manager (sync and async DCP),
under FSDP2 at 2 ranks and FSDP2 x TP at 2 x 2. A job resumed from torchtitan's checkpoint
continues exactly as the uninterrupted one (same world size: bitwise)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchtitan.components.optimizer", reason="the torchtitan extra is absent")

import titan_cases  # noqa: E402
from harness import run_cases  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("titan"))
    two = run_cases(
        2,
        [
            (titan_cases.run, {"mode": "fsdp", "root": root}),
            (titan_cases.run, {"mode": "fsdp", "root": root, "async_mode": "async"}),
        ],
    )
    four = run_cases(4, [(titan_cases.run, {"mode": "fsdp_tp", "root": root})])
    return {"fsdp": two[0], "fsdp-async": two[1], "fsdp_tp": four[0]}


@pytest.mark.parametrize("case", ["fsdp", "fsdp-async", "fsdp_tp"])
def test_resumed_job_continues_exactly(results, case):
    values = results[case].ok()
    first = titan_cases.FIRST
    for v in values:
        assert "step-5" in v["saved"] and "step-10" in v["saved"], v["saved"]
        assert v["resumed"] == v["losses"][first:]  # bitwise: same world size, same layout
        assert v["resumed_lrs"] == v["lrs"][first:]
        assert all(v["resumed_params"][n].equal(p) for n, p in v["params"].items())
    losses = values[0]["losses"]
    assert losses[-1] < losses[0], losses  # it trained
    lrs = values[0]["lrs"]
    assert lrs[0] < lrs[2], lrs  # the warmup ran through the optimizer's param groups
