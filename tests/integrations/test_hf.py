"""Hugging Face Trainer: a tiny GPT-2 with tied embeddings trains with ShardedShampoo, saves
checkpoints and resumes with the same losses, in one process and under DDP at 2 ranks, by
both ways the Trainer takes an optimizer (built, or ``optimizer_cls_and_kwargs``)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the hf extra is absent")
pytest.importorskip("accelerate", reason="the hf extra is absent")

import hf_cases  # noqa: E402
from harness import run_cases  # noqa: E402

PATHS = ["optimizers", "cls"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    cases = [(hf_cases.train_and_resume, {"root": root, "path": p}) for p in PATHS]
    cases.append((hf_cases.accelerate_save_state, {"root": root}))
    # Last: rank 0 raises in the Trainer's save, rank 1 goes on alone.
    cases.append((hf_cases.save_without_callback, {"root": root}))
    names = [*PATHS, "accelerate", "no_callback"]
    return dict(zip(names, run_cases(2, cases), strict=True))


def check(result):
    assert len(result["losses"]) == hf_cases.STEPS
    # The resumed Trainer's history: the checkpoint's SAVE steps, then its own.
    assert result["resumed"] == result["losses"], (result["resumed"], result["losses"])
    assert "optimizer.pt" in result["files"]


@pytest.mark.parametrize("path", PATHS)
def test_one_process_resumes_with_the_same_losses(tmp_path, path):
    check(hf_cases.train_and_resume(0, 1, str(tmp_path), path))


@pytest.mark.parametrize("path", PATHS)
def test_ddp_resumes_with_the_same_losses(ddp, path):
    values = ddp[path].ok()
    for v in values:
        check(v)
    assert values[0]["losses"] == values[1]["losses"]


def test_without_the_callback_the_save_is_refused_naming_the_fix(ddp):
    """The Trainer saves rank 0's state_dict() alone: rank 0's save raises, naming the
    callback, before an optimizer file with rank 0's blocks only is written. (The other rank
    never saves the optimizer; under torchrun the agent stops it when rank 0 fails.)"""
    main = ddp["no_callback"].ok()[0]
    assert main["ended"].startswith("StateDictRequestError:"), main["ended"]
    assert "FullOptimizerStateCallback" in main["ended"], main["ended"]
    assert "optimizer.pt" not in main["files"], main["files"]


def test_accelerate_save_state_is_complete_and_resumes(ddp):
    """Accelerate's ``save_state`` writes the main process's ``state_dict()``: it holds every
    rank's blocks, and a job resumed from it continues as the uninterrupted one."""
    values = ddp["accelerate"].ok()
    single = hf_cases.accelerate_blocks()
    for v in values:
        assert v["blocks_saved"] == single
        assert v["resumed"] == v["whole"][hf_cases.SAVE :]
