"""torchtitan's command-line training entry point under torchrun, as its users start it:
``titan_train.py`` (torchtitan.train's ``main`` behind the CPU shims) with ``titan_job``'s
config: its Llama 3 debug model, ShardedShampoo, FSDP2 over 2 processes, 10 steps, an
asynchronous checkpoint every 5. A second job resumed from step 5 (synchronous saves) writes
a step-10 checkpoint equal to the first job's in every tensor: model, optimizer, schedulers,
data loader and step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan.components.optimizer", reason="the torchtitan extra is absent")
pytest.importorskip("torchdata", reason="torchtitan's trainer needs torchdata")

import torch  # noqa: E402

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def torchrun(folder: Path, *flags: str) -> str:
    """The job's output; it must succeed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SUPPORT / "titan_train.py"),
        "--module",
        "titan_job",
        "--config",
        "shampoo_debugmodel",
        "--dump_folder",
        str(folder),
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(SUPPORT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def losses(log: str) -> dict[int, str]:
    """The loss torchtitan's metrics logged at each step (rank 0's line), as printed."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    return dict((int(s), v) for s, v in re.findall(r"step:\s+(\d+)\s+loss:\s+([0-9.]+)", plain))


def checkpoint(folder: Path) -> dict:
    """Every entry of a DCP checkpoint, read in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}{k}.")
    else:
        yield prefix, tree


def test_entry_point_trains_and_resumes_into_the_same_checkpoint(tmp_path):
    job = tmp_path / "job"
    first = torchrun(job, "--checkpoint.async_mode", "async")
    saved = job / "checkpoint"
    assert {"step-5", "step-10"} <= set(os.listdir(saved))
    shutil.copytree(saved / "step-10", tmp_path / "uninterrupted")
    shutil.rmtree(saved / "step-10")
    resumed = torchrun(job, "--checkpoint.load_step", "5")

    a, b = losses(first), losses(resumed)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == list(range(6, 11)), (a, b)
    assert all(a[s] == b[s] for s in b), (a, b)
    assert float(a[10]) < float(a[1]) - 2.0, a  # it trained (from about 8.3)

    whole = dict(flatten(checkpoint(tmp_path / "uninterrupted")))
    again = dict(flatten(checkpoint(saved / "step-10")))
    assert whole.keys() == again.keys()
    assert any(".state." in k or "optimizer" in k for k in whole), sorted(whole)[:20]
    for key, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
        else:
            assert value == again[key], key
