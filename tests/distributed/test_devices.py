"""Device-correct by construction, and one host read per step, in every mode.

On the CPU a device mix or a host read costs nothing and raises nothing, so the audits watch
what the code asks for (``audit.py``): every tensor the optimizer holds is on the parameters'
device (host-side bookkeeping excepted by name), a step that refreshes no roots creates no
tensor without naming its device and copies nothing to a device, and it reads one value set
back to the host (its status), whatever the mode. In CUDA mode (``pytest --device cuda``) the
same tests run on GPUs, where ``held`` devices are real, and ``torch.cuda.set_sync_debug_mode``
counts the synchronizations themselves.
"""

from __future__ import annotations

import device_cases
import pytest
from harness import DEVICE_TYPE, run_cases

# (mode, world size): every way the parameters can be held.
MODES = [("single", 1), ("ddp", 2), ("fsdp", 2), ("tp", 2), ("hsdp", 4), ("fsdp_tp", 4)]
# Each distributed mode with each variant, and with parameters lacking gradients.
VARIANTS = (
    ("plain", False),
    ("plain", True),
    ("holder_decay", False),
    ("eigenvalue_corrected", False),
    ("lean", False),
    ("background", False),
    ("qr_roots", False),
)
# The 4-rank modes place pieces as the 2-rank ones do, on more dims: the variants whose state
# and buffers differ most.
WIDE = (("plain", False), ("lean", False), ("background", False))
RUNS = [
    (mode, world, variant, drop)
    for mode, world in MODES
    for variant, drop in (WIDE if world == 4 else VARIANTS)
]


@pytest.fixture(scope="module")
def audits():
    out = {}
    for world in sorted({w for _, w in MODES}):
        runs = [r for r in RUNS if r[1] == world]
        cases = [(device_cases.audit_step, dict(mode=m, variant=v, drop=d)) for m, _, v, d in runs]
        if world == 1:
            results = [device_cases.audit_step(0, 1, **kw) for _, kw in cases]
            out.update(zip(runs, ([r] for r in results), strict=True))
        else:
            out.update(zip(runs, (r.ok() for r in run_cases(world, cases)), strict=True))
    return out


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[2]}{'-dropped' if r[3] else ''}")
def test_a_step_reads_the_device_once_and_mixes_no_devices(audits, run):
    kinds = {"single": "LocalDistributor", "ddp": "ReplicatedDistributor"}
    for rank, got in enumerate(audits[run]):
        where = f"{run} rank {rank}"
        assert got["device"].startswith(DEVICE_TYPE), where
        assert kinds.get(run[0], "ShardedDistributor") in got["kinds"], (where, got["kinds"])
        # The step's one read back: the status (and whether a block was skipped here).
        assert [what for what, _ in got["reads"]] == ["tolist"], (where, got["reads"])
        assert got["unplaced"] == [], (where, "tensors created without a device", got["unplaced"])
        assert got["copies"] == [], (where, "copies to a device in a step", got["copies"])
        assert got["held"] > 10 and got["off_device"] == [], (where, got["off_device"])


def test_the_audit_sees_what_it_looks_for():
    """Host reads, unplaced tensors and device copies made from this package's code are
    counted (code compiled under a package file name stands in for it); the same from
    elsewhere is not."""
    import os

    import audit
    import torch

    code = compile(
        "x = torch.arange(3)\nx.tolist()\nbool(x.any())\nx.nonzero()\nx.to('cpu')\n"
        "x.to(torch.device('cpu'), torch.float64)\ntorch.zeros(2, device='cpu')\n",
        os.path.join(audit.PACKAGE, "optimizer.py"),
        "exec",
    )
    with audit.HostReads() as reads, audit.Creations() as made:
        torch.zeros(2).tolist()  # from the test itself: not counted
        exec(code, {"torch": torch})
    assert [r for r, _ in reads.reads] == [
        "tolist",
        "aten._local_scalar_dense",
        "aten.nonzero",
        "to",
        "to",
    ]
    assert [u for u, _ in made.unplaced] == ["arange"]
    assert [c for c, _ in made.copies] == ["to", "to"]


@pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="CUDA mode only (pytest --device cuda)")
@pytest.mark.parametrize("mode,world", MODES)
def test_cuda_synchronizes_once_per_step(mode, world):
    if world == 1:
        syncs = device_cases.cuda_sync_count(0, 1, mode)
        per_rank = [syncs]
    else:
        per_rank = run_cases(world, [(device_cases.cuda_sync_count, dict(mode=mode))])[0].ok()
    for rank, syncs in enumerate(per_rank):
        assert len(syncs) <= 1, (mode, rank, syncs)
