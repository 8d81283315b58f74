"""The torchrun-launchable example trains under DDP, FSDP2 and HSDP and keeps replicas identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TINY = ["--steps", "6", "--width", "32", "--layers", "1", "--context", "16",
        "--precondition-frequency", "2", "--log-every", "3"]


def check_output(out, parallelism, world):
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replicas identical: True" in out.stdout, out.stdout
    losses = [float(l.split()[3]) for l in out.stdout.splitlines() if l.startswith("step")]
    assert len(losses) == 3 and all(0 < x < 6 for x in losses), out.stdout
    assert f"{parallelism}, {world} ranks; bytes sent per rank" in out.stdout, out.stdout


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_example_under_torchrun(parallelism):
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "distributed_example.py", "--parallelism", parallelism, *TINY],
        cwd=SCRIPTS, capture_output=True, text=True, timeout=240,
    )
    check_output(out, parallelism, 2)


def test_example_self_spawned_hsdp():
    out = subprocess.run(
        [sys.executable, "distributed_example.py", "--nproc", "4", "--parallelism", "hsdp", *TINY],
        cwd=SCRIPTS, capture_output=True, text=True, timeout=240,
    )
    check_output(out, "hsdp", 4)


def test_example_checkpoints_and_resumes_exactly(tmp_path):
    """Stop after 4 steps (checkpoints at 2 and 4), resume to 6: steps 5 and 6 log the same
    losses as a run that never stopped. Then resume the same checkpoint under FSDP2."""

    def run(ckpt, steps, *extra, parallelism="ddp"):
        out = subprocess.run(
            [sys.executable, "distributed_example.py", "--nproc", "2", "--parallelism",
             parallelism, "--steps", str(steps), "--width", "32", "--layers", "1", "--context",
             "16", "--precondition-frequency", "2", "--log-every", "1", "--checkpoint-dir",
             str(ckpt), "--checkpoint-every", "2", *extra],
            cwd=SCRIPTS, capture_output=True, text=True, timeout=240,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return {int(l.split()[1]): l.split()[3] for l in out.stdout.splitlines()
                if l.startswith("step")}, out.stdout

    whole, _ = run(tmp_path / "a", 6)
    run(tmp_path / "b", 4)
    resumed, stdout = run(tmp_path / "b", 6, "--resume")
    assert "resumed from" in stdout and "step-00000004" in stdout, stdout
    assert sorted(resumed) == [5, 6]
    assert resumed == {5: whole[5], 6: whole[6]}
    resharded, stdout = run(tmp_path / "b", 8, "--resume", parallelism="fsdp2")
    assert "step-00000006" in stdout and sorted(resharded) == [7, 8], stdout
