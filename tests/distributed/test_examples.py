"""The torchrun-launchable DDP example trains and keeps replicas identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_ddp_example_under_torchrun():
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "ddp_example.py", "--steps", "6", "--width", "32", "--layers", "1", "--context", "16",
         "--precondition-frequency", "2", "--log-every", "3"],
        cwd=SCRIPTS, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replicas identical: True" in out.stdout, out.stdout
    losses = [float(l.split()[3]) for l in out.stdout.splitlines() if l.startswith("step")]
    assert len(losses) == 3 and all(0 < x < 6 for x in losses), out.stdout
    assert "2 ranks; blocks owned per rank: [" in out.stdout, out.stdout
