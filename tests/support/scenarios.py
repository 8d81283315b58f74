"""Training scenarios run both in one process (the reference) and on every rank of a group.

Everything is float64 (parameters, factors, gradients, communication): in float32, merely
splitting a batch differently moves the parameters by far more than a routing bug of small
magnitude would (rounding amplified by the inverse roots), so only float64 comparisons to about
1e-9 can tell exactness from approximation. Float32 and bfloat16 communication are separate
cases with their own tolerances.
"""

from __future__ import annotations

import torch
from harness import device, to_host

from sharded_shampoo import ShardedShampoo

# Float64 parameters, factors and communication: what differs from one process is float64
# rounding (batched products and eigh round by a matrix's place in a stack; DDP and FSDP2 sum
# per-rank gradients in another order), amplified by the inverse roots. Measured after 30-32
# steps at 2-4 ranks: 3e-16 with the same gradients everywhere, up to 3e-15 under FSDP2/HSDP
# with per-rank batches. A routing bug moves parameters by far more.
EXACT_TOLERANCE = 1e-10
# Float32 communication rounds every direction to float32 (6e-8 relative) before it is applied.
FP32_TOLERANCE = 1e-6
# bfloat16 keeps 8 bits of each direction (0.4% relative rounding of every update); measured
# after 32 steps at 2-4 ranks: 3.0e-4 relative to the parameters.
BF16_TOLERANCE = 2e-3
# The DDP case, the FSDP2 and the checkpoint tests compare float64 runs too.
DDP_TOLERANCE = EXACT_TOLERANCE

# Many blocks of several shapes (max_preconditioner_dim 8 in group 0, 6 in group 1), a 0-d and
# 1-d parameters, a 4-d one, and parameters that get no gradient on some steps.
GROUP_SHAPES = [
    [(40, 24), (24,), (16, 8, 3), (70,), (), (12, 12), (9, 5, 2, 2)],
    [(30, 20), (20,), (33,), (6, 6)],
]
GROUP_OPTIONS = [
    dict(
        factor_dtype=torch.float64,
        lr=0.02,
        betas=(0.9, 0.99),
        momentum=0.5,
        max_preconditioner_dim=8,
        precondition_frequency=5,
        epsilon=1e-4,
        grafting="adam",
        weight_decay=0.01,
    ),
    dict(
        factor_dtype=torch.float64,
        lr=0.01,
        betas=(0.0, 1.0),
        max_preconditioner_dim=6,
        precondition_frequency=4,
        epsilon=1e-3,
        grafting="adagrad",
        weight_decay=0.05,
        decoupled_weight_decay=False,
        nesterov=True,
        momentum=0.8,
    ),
]
# The same with staggered roots (each block in its phase of the period).
STAGGERED_OPTIONS = [dict(o, stagger_roots=True) for o in GROUP_OPTIONS]
# Eigenvalue-corrected (SOAP): group 0 with eigh eigenbases, group 1 with warm-started QR.
EC_OPTIONS = [
    dict(o, preconditioner="eigenvalue_corrected", eigenbasis=basis)
    for o, basis in zip(GROUP_OPTIONS, ("eigh", "qr"), strict=True)
]
# The same in the SOAP paper's conventions (the above: the reference implementation's).
EC_SOAP_OPTIONS = [dict(o, eigenbasis_convention="soap") for o in EC_OPTIONS]
# Refreshes computed in the background and installed d steps later: staggered root-inverse
# Shampoo, and eigenvalue-corrected with eigh and QR eigenbases.
BACKGROUND_OPTIONS = [dict(o, refresh_delay=2) for o in STAGGERED_OPTIONS]
EC_BACKGROUND_OPTIONS = [dict(o, refresh_delay=3) for o in EC_OPTIONS]
# Root-inverse Shampoo's roots from warm-started eigenbases: group 0 as is, group 1 staggered
# and in the background.
QR_ROOTS_OPTIONS = [
    dict(GROUP_OPTIONS[0], eigenbasis="qr"),
    dict(STAGGERED_OPTIONS[1], eigenbasis="qr", refresh_delay=1),
]
# Inverse roots by the coupled Newton iteration, group 1 in the background.
NEWTON_OPTIONS = [
    dict(GROUP_OPTIONS[0], newton_iterations=30),
    dict(GROUP_OPTIONS[1], newton_iterations=25, refresh_delay=2),
]
# The estimators: group 0 KL-Shampoo's pseudo-inverse roots of the first moment's factors,
# group 1 spectral descent (Polar Express) scaled to AdamW's RMS.
KL_PSEUDO_INVERSE = dict(
    kl_shampoo=True,
    epsilon=0.0,
    pseudo_inverse=True,
    rank_rtol=1e-10,
    factor_source="first_moment",
    first_moment_nesterov=True,
)
ESTIMATOR_OPTIONS = [
    dict(GROUP_OPTIONS[0], **KL_PSEUDO_INVERSE),
    dict(
        GROUP_OPTIONS[1],
        preconditioner="spectral",
        newton_schulz="polar_express",
        grafting="rms",
        nesterov=False,
        momentum=0.0,
    ),
]
# The option sets compared with one process, by name.
VARIANTS = {
    "qr_roots": QR_ROOTS_OPTIONS,
    "newton": NEWTON_OPTIONS,
    "staggered": STAGGERED_OPTIONS,
    "eigenvalue_corrected": EC_OPTIONS,
    "eigenvalue_corrected_soap": EC_SOAP_OPTIONS,
    "background": BACKGROUND_OPTIONS,
    "background_eigenvalue_corrected": EC_BACKGROUND_OPTIONS,
    "estimators": ESTIMATOR_OPTIONS,
}
TINY_SHAPES = [[(3, 2), (2,)]]  # two blocks: fewer than the ranks of a 3- or 4-rank group
TINY_OPTIONS = [dict(lr=0.05, precondition_frequency=3, epsilon=1e-4, factor_dtype=torch.float64)]


def make_params(shapes, seed=0, dtype=torch.float64):
    """Parameters on the tests' device (drawn on the CPU: the same values on any device)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=dtype).to(device()).requires_grad_() for s in group]
        for group in shapes
    ]


def set_grads(groups, step):
    """The same gradients on every rank; parameter i of a group skips steps (step + i) % 5 == 0."""
    gen = torch.Generator().manual_seed(10_000 + step)
    for group in groups:
        for i, p in enumerate(group):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            p.grad = None if (step + i) % 5 == 0 else g


def train_with_same_grads(steps=32, shapes=GROUP_SHAPES, options=GROUP_OPTIONS, **optimizer_kwargs):
    """Returns (parameters after ``steps``, on the CPU; the optimizer)."""
    groups = make_params(shapes)
    optimizer_kwargs.setdefault("communication_dtype", torch.float64)
    opt = ShardedShampoo(
        [{"params": ps, **o} for ps, o in zip(groups, options, strict=True)], **optimizer_kwargs
    )
    for step in range(steps):
        set_grads(groups, step)
        opt.step()
    return to_host([[p.detach().clone() for p in g] for g in groups]), opt


def max_rel_err(a, b):
    worst = 0.0
    for ga, gb in zip(a, b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return worst


# ---------------------------------------------------------------- a model for DDP


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(
            torch.nn.Linear(12, 40),
            torch.nn.Tanh(),
            torch.nn.Linear(40, 24),
            torch.nn.Tanh(),
            torch.nn.Linear(24, 3),
        )
        .double()
        .to(device())
    )


def global_batch(step, size=32):
    """A batch on the tests' device (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, 12, generator=gen, dtype=torch.float64)
    return x.to(device()), torch.randint(0, 3, (size,), generator=gen).to(device())


DDP_OPTIONS = dict(
    factor_dtype=torch.float64,
    communication_dtype=torch.float64,
    lr=0.01,
    betas=(0.9, 0.999),
    max_preconditioner_dim=16,
    precondition_frequency=5,
    epsilon=1e-4,
    momentum=0.5,
)
