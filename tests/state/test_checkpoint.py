"""DCP checkpoints: exact resume at the same world size, resharding across world sizes and
modes, mismatch errors, and interrupted saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import ckpt_cases
import fsdp_cases
import pytest
import scenarios
import torch
from harness import run_cases
from paths import SUPPORT
from scenarios import DDP_TOLERANCE

from sharded_shampoo.checkpoint import IncompleteCheckpointError, latest_checkpoint, load_checkpoint

SAVES = {2: ["ddp", "fsdp"], 4: ["fsdp", "hsdp"]}
# (world, mode, source checkpoint): the same world size and mode resume exactly; the others
# reshard (saved at 1, 2, 4; loaded at 1, 2, 3, 4) and cross modes.
LOADS = {
    2: [
        ("ddp", "ddp2"),
        ("fsdp", "fsdp2"),
        ("ddp", "single1"),
        ("fsdp", "fsdp4"),
        ("fsdp", "fsdp2-nested"),
        ("ddp", "ddp2-staggered"),
        ("ddp", "ddp2-ec"),
        ("ddp", "ddp2-background"),
        ("ddp", "ddp2-kl"),
        ("ddp", "ddp2-async"),
    ],
    3: [
        ("fsdp", "ddp2"),
        ("ddp", "single1"),
        ("ddp", "fsdp4"),
        ("ddp", "fsdp2-nested"),
        ("fsdp", "ddp2-staggered"),
        ("fsdp", "ddp2-ec"),
        ("fsdp", "ddp2-background"),
    ],
    4: [
        ("fsdp", "fsdp4"),
        ("hsdp", "hsdp4"),
        ("ddp", "hsdp4"),
        ("fsdp", "ddp2"),
        ("hsdp", "single1"),
        ("hsdp", "ddp2-staggered"),
        ("hsdp", "ddp2-ec"),
        ("hsdp", "ddp2-background"),
        ("hsdp", "ddp2-kl"),
        ("fsdp", "ddp2-async"),
    ],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def saved(root):
    """Checkpoints at 1, 2 and 4 ranks, with each mode's uninterrupted run."""
    out = {"single1": [ckpt_cases.save(0, 1, "single", root)]}
    for world, modes in SAVES.items():
        cases = [(ckpt_cases.save, {"mode": m, "root": root}) for m in modes]
        if world == 2:  # also with flatten_optimizer_state_dict off, and staggered roots
            cases.append((ckpt_cases.save, {"mode": "fsdp", "root": root, "flatten": False}))
            for variant in ckpt_cases.VARIANTS:
                cases.append((ckpt_cases.save, {"mode": "ddp", "root": root, "variant": variant}))
        results = run_cases(world, cases)
        for mode, res in zip(modes, results[: len(modes)], strict=True):
            out[f"{mode}{world}"] = res.ok()  # per rank
        if world == 2:
            out["fsdp2-nested"] = results[len(modes)].ok()
            for variant, res in zip(ckpt_cases.VARIANTS, results[len(modes) + 1 :], strict=True):
                out[f"ddp2{variant}"] = res.ok()
    return out


@pytest.fixture(scope="module")
def loaded(root, saved):
    out = {}
    for world, loads in LOADS.items():
        cases = [(ckpt_cases.resume, {"mode": m, "root": root, "source": s}) for m, s in loads]
        if world == 2:
            cases.append((ckpt_cases.mismatch, {"mode": "fsdp", "root": root, "source": "fsdp2"}))
        results = run_cases(world, cases)
        for (mode, source), res in zip(loads, results[: len(loads)], strict=True):
            out[(f"{mode}{world}", source)] = res
        if world == 2:
            out["mismatch"] = results[-1]
    return out


@pytest.fixture(scope="module")
def reference():
    """One process, the whole batch, FIRST + THEN steps without a break."""
    params, _ = fsdp_cases.train_reference(steps=ckpt_cases.FIRST + ckpt_cases.THEN)
    return params


SAME = [
    ("ddp2", "ddp2"),
    ("fsdp2", "fsdp2"),
    ("fsdp4", "fsdp4"),
    ("hsdp4", "hsdp4"),
    ("fsdp2", "fsdp2-nested"),
]


@pytest.mark.parametrize("target, source", SAME)
def test_resume_at_the_same_world_size_is_bitwise(saved, loaded, target, source):
    values = loaded[(target, source)].ok()
    for r, (v, expected) in enumerate(zip(values, saved[source], strict=True)):
        assert v["losses"] == expected["losses"], f"rank {r}"
        for a, b in zip(v["params"], expected["params"], strict=True):
            assert torch.equal(a, b), f"rank {r}"


def test_resume_in_one_process_is_bitwise(root, saved):
    out = ckpt_cases.resume(0, 1, "single", root, "single1")
    expected = saved["single1"][0]
    assert out["losses"] == expected["losses"]
    assert all(torch.equal(a, b) for a, b in zip(out["params"], expected["params"], strict=True))


RESHARDED = [
    (k, s)
    for w, loads in LOADS.items()
    for m, s in loads
    if (k := f"{m}{w}") != s.removesuffix("-nested") and not ckpt_cases.variant_of(s)
]
VARIANT_LOADS = [
    (f"{m}{w}", s) for w, loads in LOADS.items() for m, s in loads if ckpt_cases.variant_of(s)
]


@pytest.mark.parametrize("target, source", RESHARDED)
def test_resharded_resume_continues_training(loaded, reference, target, source):
    values = loaded[(target, source)].ok()
    for v in values[1:]:
        assert all(torch.equal(a, b) for a, b in zip(v["params"], values[0]["params"], strict=True))
    err = scenarios.max_rel_err([values[0]["params"]], [reference])
    assert err <= DDP_TOLERANCE, f"{source} -> {target}: relative error {err:.2e}"


@pytest.mark.parametrize("target, source", VARIANT_LOADS)
def test_staggered_and_eigenvalue_corrected_checkpoints_reshard(loaded, saved, target, source):
    """Saved at 2 ranks (DDP) with staggered roots, with the eigenvalue-corrected
    preconditioner (QR eigenbases), or with both and a refresh in flight, or with KL-Shampoo's
    pseudo-inverse roots of the first moment's factors, loaded at 2 (DDP:
    bitwise the uninterrupted run), 3 (FSDP2) and 4 (HSDP): training continues as one process
    would."""
    values = loaded[(target, source)].ok()
    if target == source.split("-")[0]:
        for r, (v, expected) in enumerate(zip(values, saved[source], strict=True)):
            assert v["losses"] == expected["losses"], f"rank {r}"
            assert all(
                torch.equal(a, b) for a, b in zip(v["params"], expected["params"], strict=True)
            )
    reference, _ = fsdp_cases.train_reference(
        steps=ckpt_cases.FIRST + ckpt_cases.THEN, **ckpt_cases.variant_of(source)
    )
    err = scenarios.max_rel_err([values[0]["params"]], [reference])
    assert err <= DDP_TOLERANCE, f"{source} -> {target}: relative error {err:.2e}"


@pytest.mark.parametrize("source", ["fsdp2", "hsdp4", "ddp2"])
def test_load_without_a_process_group(root, saved, reference, source):
    out = ckpt_cases.resume(0, 1, "single", root, source)
    err = scenarios.max_rel_err([out["params"]], [reference])
    assert err <= DDP_TOLERANCE, f"{source}: relative error {err:.2e}"


def test_mismatched_checkpoint_raises_on_every_rank_and_changes_nothing(loaded):
    for message, unchanged in loaded["mismatch"].ok():
        assert unchanged
        assert "does not fit parameter" in message, message
        assert "max_preconditioner_dim: 8 saved, 4 here" in message, message


SLOW_SAVE = r"""
import os, sys, time, torch
import torch.distributed.checkpoint.filesystem as fs
from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import save_checkpoint
sys.path.insert(0, sys.argv[2])
import ckpt_cases
original = fs._write_item
def slow_write(*args, **kwargs):
    out = original(*args, **kwargs)
    print("wrote", flush=True)
    time.sleep(0.2)
    return out
fs._write_item = slow_write
model, wrapped, opt = ckpt_cases.build("single", 1)
ckpt_cases.train(model, wrapped, opt, 0, ckpt_cases.FIRST + 2, 0, 1)
step, asynchronous = ckpt_cases.FIRST + 2, sys.argv[3] == "async"
future = save_checkpoint(sys.argv[1], wrapped, opt, extra={"step": step}, asynchronous=asynchronous)
if future is not None:  # an asynchronous save returned before writing: training goes on
    print("returned", flush=True)
    future.result()
print("finished", flush=True)
"""


@pytest.mark.fault
@pytest.mark.parametrize("how", ["sync", "async"])
def test_killed_save_leaves_the_previous_checkpoint_and_is_refused(
    root, saved, tmp_path, how, fault_row
):
    """The saving process killed once part of the checkpoint is written (by the background
    thread of an asynchronous save, after save_checkpoint returned)."""
    row = fault_row(
        f"{'a synchronous' if how == 'sync' else 'an asynchronous'} save killed midway",
        "the partial checkpoint is refused and skipped; the previous one loads",
    )
    ckpt_root = tmp_path / "run"
    good = ckpt_root / "step-00000006"
    import shutil

    shutil.copytree(os.path.join(root, "single1"), good)
    partial = ckpt_root / "step-00000008"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(partial), str(SUPPORT), how],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    said = []
    for line in proc.stdout:  # kill it once it has written part of the checkpoint
        said.append(line.strip())
        if line.startswith("wrote") or time.time() > deadline:
            break
    assert ("returned" in said) == (how == "async"), said
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert partial.exists() and any(partial.iterdir())
    assert latest_checkpoint(str(ckpt_root)) == str(good)
    model, wrapped, opt = ckpt_cases.build("single", 1)
    with pytest.raises(IncompleteCheckpointError, match="not a complete checkpoint"):
        load_checkpoint(str(partial), wrapped, opt)
    extra = load_checkpoint(str(good), wrapped, opt, extra={"step": -1})
    assert extra["step"] == ckpt_cases.FIRST
    row["happened"] = (
        "partial directory refused (IncompleteCheckpointError), skipped by latest_checkpoint; "
        f"the previous checkpoint (step {ckpt_cases.FIRST}) loaded"
    )


def test_saving_over_a_checkpoint_first_unmarks_it(root, saved, tmp_path, monkeypatch):
    """An interrupted save over an existing checkpoint must not leave it marked complete."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from sharded_shampoo.checkpoint import is_complete, save_checkpoint

    target = tmp_path / "step-00000006"
    shutil.copytree(os.path.join(root, "single1"), target)
    assert is_complete(str(target))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(dcp, "save", interrupted)
    model, wrapped, opt = ckpt_cases.build("single", 1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(target), wrapped, opt)
    assert not is_complete(str(target))
