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
    cases.append((hf_cases.train_and_resume, {"root": root, "path": "cls", "callback": False}))
    return dict(zip([*PATHS, "no_callback"], run_cases(2, cases), strict=True))


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


def test_without_the_callback_every_rank_refuses_the_partial_checkpoint(ddp):
    """The Trainer saved rank 0's blocks only: both ranks raise (no hang), rank 0 naming
    rank 1's missing blocks."""
    errors = [v["error"] for v in ddp["no_callback"].ok()]
    assert errors[0].startswith("rank 1 refused it:") and "missing" in errors[0], errors
    assert "missing" in errors[1], errors
