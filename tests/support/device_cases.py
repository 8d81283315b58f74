"""Cases for test_devices.py: one optimizer step of each mode, observed (``audit``)."""

from __future__ import annotations

import torch
import tp_cases
from audit import Creations, HostReads, held_tensors

FREQUENCY = 4  # roots at step 4 (the start), then 8, ...: step 6 refreshes nothing

# What the audited step exercises besides the plain path.
VARIANTS = {
    "plain": {},
    # Weight decay applied by the DTensor holders (flags written and read on the device).
    "holder_decay": {"momentum": 0.0},
    "eigenvalue_corrected": {"preconditioner": "eigenvalue_corrected"},
    # Memory options: diagonal and one-sided blocks, 8-bit quantized roots and stochastically
    # rounded bfloat16 moving averages (index patterns cached on the device).
    "lean": {
        "max_factor_ratio": 4,
        "root_dtype": torch.int8,
        "grafting_dtype": torch.bfloat16,
        "first_moment_dtype": torch.bfloat16,
    },
    # The audited step installs the refresh computed in the background since the step before.
    "background": {"refresh_delay": 1},
    # Roots from QR eigenbases (the bases held beside them) computed in the background.
    "qr_roots": {"eigenbasis": "qr", "refresh_delay": 1},
}


def audit_step(rank, world, mode, variant="plain", drop=False):
    """Trains the small Llama in ``mode`` past its first roots, then takes one step that
    refreshes nothing under the audits (``drop``: some parameters have no gradient in it)."""
    overrides = {"precondition_frequency": FREQUENCY, **VARIANTS[variant]}
    if mode == "ddp":  # too few blocks to shard by default: shard anyway
        overrides["num_trainers_per_group"] = world
    model, wrapped, opt, data = tp_cases.build(mode, world, **overrides)
    tp_cases.train(model, wrapped, opt, data, 0, FREQUENCY)

    def step(t):
        opt.zero_grad()
        tp_cases.train_backward(wrapped, data, t)
        if drop:
            for p in model.layers[1].parameters():
                p.grad = None
        opt.step()

    step(FREQUENCY)  # a first step like the audited one (what it caches is then cached)
    with HostReads() as reads, Creations() as made:
        step(FREQUENCY + 1)
    device = next(model.parameters()).device
    held = held_tensors(opt)
    return {
        "device": str(device),
        "reads": reads.reads,
        "unplaced": made.unplaced,
        "copies": made.copies,
        "off_device": [(path, str(d)) for path, d in held if d != device],
        "held": len(held),
        "kinds": sorted(type(d).__name__ for d in opt.distributors),
    }


def refresh_reads(rank, world, mode):
    """Host reads of a step that refreshes every block's roots (for the record)."""
    model, wrapped, opt, data = tp_cases.build(mode, world, precondition_frequency=FREQUENCY)
    tp_cases.train(model, wrapped, opt, data, 0, FREQUENCY - 1)
    opt.zero_grad()
    tp_cases.train_backward(wrapped, data, FREQUENCY - 1)
    with HostReads() as reads:
        opt.step()
    return reads.reads


def cuda_sync_count(rank, world, mode):
    """On CUDA only: the synchronizations ``torch.cuda.set_sync_debug_mode`` reports in a step
    that refreshes nothing (warnings, one per synchronizing call)."""
    import warnings

    model, wrapped, opt, data = tp_cases.build(
        mode,
        world,
        precondition_frequency=FREQUENCY,
        **({"num_trainers_per_group": world} if mode == "ddp" else {}),
    )
    tp_cases.train(model, wrapped, opt, data, 0, FREQUENCY + 1)
    opt.zero_grad()
    tp_cases.train_backward(wrapped, data, FREQUENCY + 1)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
