"""ShardedShampoo's eigenvalue-corrected and root-inverse preconditioners (pseudo-inverse roots
and KL-Shampoo included) against the reference implementation.

The reference is facebookresearch/optimizers (``distributed_shampoo``): give a checkout of it
with ``--reference PATH`` (or ``$SHAMPOO_REFERENCE``); it is imported from there, never
copied. Both optimizers train the same small float64 MLP on the same batches, with float64
factors, eigenvectors and corrected eigenvalues, for ``--steps`` steps with refreshes every
4 steps; printed per option set: the largest relative parameter difference.

Blocks of at most 4, refreshes every 4 steps and a regression loss keep every factor full rank
at its first refresh: a rank-deficient factor's null-space eigenvectors are whatever LAPACK's
rounding gives, in both implementations, and no two runs need agree there. The reference's QR
algorithm is more sensitive still: warm-started from a basis sorted by increasing eigenvalue,
each unshifted iteration amplifies rounding along a null direction by about
lambda_max / epsilon, so with several iterations a factor with a null direction (the output
layer's, under cross-entropy, whose logit gradients sum to zero) comes out different for
inputs that differ in the 17th digit.

The reference computes its bias corrections in the default dtype (its step counter is a
tensor: ``1 - beta2 ** step`` comes out in float32, 1.3e-5 off at step 1 for beta2 = 0.999)
and keeps ``lr`` as a float32 tensor. The comparison runs it with float64 as the default dtype
and with learning rates float32 holds exactly, so that what is compared is the algorithm,
not those roundings; ``--float32-defaults`` shows the difference they make.

    python scripts/compare_reference.py --reference /path/to/optimizers
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from sharded_shampoo import ShardedShampoo

STEPS = 20
LR = 2.0**-7  # exact in float32 (the reference's lr tensor)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),
    ).double()


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(16, 3, generator=g, dtype=torch.float64)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    # A regression loss: cross-entropy's logit gradients sum to zero, which leaves the output
    # layer's factor a null direction forever (see the module docstring).
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


# Option sets: (name, ours, the reference's keyword arguments built by ``reference_kwargs``).
CASES = {
    "eigh": {},
    "eigh beta2=1": {"betas": (0.9, 1.0)},
    "eigh beta1=0": {"betas": (0.0, 0.95)},
    "eigh no bias correction": {"use_bias_correction": False},
    "eigh decoupled wd": {"weight_decay": 0.01},
    "eigh L2 wd": {"weight_decay": 0.01, "decoupled_weight_decay": False},
    "eigh momentum": {"momentum": 0.5},
    "eigh nesterov": {"momentum": 0.5, "nesterov": True},
    "eigh adam grafting": {"grafting": "adam"},
    "eigh adagrad grafting": {"grafting": "adagrad"},
    "eigh rmsprop grafting": {"grafting": "rmsprop"},
    "eigh later start grafting": {"start_preconditioning_step": 8, "grafting": "adam"},
    "eigh exponent override": {"inverse_exponent_override": {2: 0.25, 1: 0.5}},
    "qr": {"eigenbasis": "qr"},
    "qr 3 iterations": {"eigenbasis": "qr", "qr_iterations": 3},
    "qr tolerance": {"eigenbasis": "qr", "qr_iterations": 5, "qr_tolerance": 0.01},
    "qr adam grafting wd": {"eigenbasis": "qr", "grafting": "adam", "weight_decay": 0.01},
    "eigh tolerance": {"eigh_tolerance": 0.01},
    # Root-inverse Shampoo (``"roots"``: the reference's RootInvShampooPreconditionerConfig;
    # ``"eigendecomposed"``: its EigendecomposedShampooPreconditionerConfig, which keeps the
    # eigendecomposition and forms the roots from it every step; the same math here).
    "roots": {"roots": "root_inv"},
    "roots pseudo-inverse": {"roots": "root_inv", "pseudo_inverse": True, "rank_rtol": 1e-10},
    "roots pseudo-inverse atol": {"roots": "root_inv", "pseudo_inverse": True, "rank_atol": 1e-3},
    "eigendecomposed pseudo-inverse": {
        "roots": "eigendecomposed",
        "pseudo_inverse": True,
        "rank_rtol": 1e-10,
    },
    "kl roots": {"roots": "root_inv", "kl_shampoo": True},
    "kl roots adam grafting": {"roots": "root_inv", "kl_shampoo": True, "grafting": "adam"},
    "kl eigendecomposed pseudo-inverse": {
        "roots": "eigendecomposed",
        "kl_shampoo": True,
        "pseudo_inverse": True,
        "rank_rtol": 1e-10,
    },
}
BASE = dict(
    lr=LR,
    betas=(0.9, 0.999),
    epsilon=1e-8,
    max_preconditioner_dim=4,
    precondition_frequency=4,
    factor_dtype=torch.float64,
)


def reference_kwargs(options: dict) -> dict:
    """The reference's constructor arguments for our ``options``."""
    from distributed_shampoo.preconditioner.matrix_functions_types import (
        EighEigendecompositionConfig,
        QREigendecompositionConfig,
    )
    from distributed_shampoo.shampoo_types import (
        AdaGradPreconditionerConfig,
        AdamPreconditionerConfig,
        ClassicMomentumConfig,
        RMSpropPreconditionerConfig,
        WeightDecayType,
    )

    o = {**BASE, **options}
    if o.get("pseudo_inverse"):
        o["epsilon"] = 0.0
    if o.get("eigenbasis", "eigh") == "qr":
        basis = QREigendecompositionConfig(
            max_iterations=o.get("qr_iterations", 1), tolerance=o.get("qr_tolerance", 0.0)
        )
    else:
        basis = EighEigendecompositionConfig(tolerance=o.get("eigh_tolerance", 0.0))
    grafting = {
        None: None,
        "adam": AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
        "adagrad": AdaGradPreconditionerConfig(epsilon=1e-8),
        "rmsprop": RMSpropPreconditionerConfig(beta2=0.999, epsilon=1e-8),
    }[o.get("grafting")]
    momentum = None
    if o.get("momentum", 0.0) > 0:
        momentum = ClassicMomentumConfig(
            momentum=o["momentum"], dampening=0.0, use_nesterov=o.get("nesterov", False)
        )
    return dict(
        lr=o["lr"],
        betas=o["betas"],
        epsilon=o["epsilon"],
        weight_decay=o.get("weight_decay", 0.0),
        weight_decay_type=(
            WeightDecayType.DECOUPLED
            if o.get("decoupled_weight_decay", True)
            else WeightDecayType.L2
        ),
        max_preconditioner_dim=o["max_preconditioner_dim"],
        precondition_frequency=o["precondition_frequency"],
        start_preconditioning_step=o.get("start_preconditioning_step", o["precondition_frequency"]),
        use_bias_correction=o.get("use_bias_correction", True),
        grafting_config=grafting,
        iterate_averaging_config=momentum,
        preconditioner_config=_preconditioner_config(o, basis),
    )


def _preconditioner_config(o: dict, basis):
    from distributed_shampoo.preconditioner.matrix_functions_types import (
        EigenConfig,
        EighEigendecompositionConfig,
        PseudoInverseConfig,
    )
    from distributed_shampoo.shampoo_types import (
        EigendecomposedKLShampooPreconditionerConfig,
        EigendecomposedShampooPreconditionerConfig,
        EigenvalueCorrectedShampooPreconditionerConfig,
        RootInvKLShampooPreconditionerConfig,
        RootInvShampooPreconditionerConfig,
    )

    override = o.get("inverse_exponent_override", {})
    if "roots" not in o:
        return EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=basis,
            factor_matrix_dtype=torch.float64,
            factor_matrix_eigenvectors_dtype=torch.float64,
            corrected_eigenvalues_dtype=torch.float64,
            inverse_exponent_override=override,
        )
    stability = {}
    if o.get("pseudo_inverse"):
        stability["rank_deficient_stability_config"] = PseudoInverseConfig(
            rank_atol=o.get("rank_atol", 0.0), rank_rtol=o.get("rank_rtol")
        )
    kl = o.get("kl_shampoo", False)
    if o["roots"] == "root_inv":
        config = RootInvKLShampooPreconditionerConfig if kl else RootInvShampooPreconditionerConfig
        return config(
            amortized_computation_config=EigenConfig(**stability),
            factor_matrix_dtype=torch.float64,
            inv_factor_matrix_dtype=torch.float64,
            inverse_exponent_override=override,
        )
    config = (
        EigendecomposedKLShampooPreconditionerConfig
        if kl
        else EigendecomposedShampooPreconditionerConfig
    )
    return config(
        amortized_computation_config=EighEigendecompositionConfig(**stability),
        factor_matrix_dtype=torch.float64,
        factor_matrix_eigenvectors_dtype=torch.float64,
        factor_matrix_eigenvalues_dtype=torch.float64,
        inverse_exponent_override=override,
    )


def ours(options: dict, convention: str) -> list[torch.Tensor]:
    o = {**BASE, **options}
    tolerance = o.pop("eigh_tolerance", 0.0) or o.pop("qr_tolerance", 0.0)
    o.pop("qr_tolerance", None)
    if o.pop("roots", None) is None:
        o["preconditioner"] = "eigenvalue_corrected"
        o["eigenbasis_tolerance"] = tolerance
        if convention:
            o["eigenbasis_convention"] = convention
    if o.get("pseudo_inverse"):
        o["epsilon"] = 0.0
    model = mlp()
    opt = ShardedShampoo(model.parameters(), grafting=o.pop("grafting", None), **o)
    return train(model, opt, STEPS)


def reference(options: dict, float32_defaults: bool) -> list[torch.Tensor]:
    from distributed_shampoo import DistributedShampoo

    model = mlp()  # before the default dtype changes: the same initial weights
    previous = torch.get_default_dtype()
    if not float32_defaults:
        torch.set_default_dtype(torch.float64)
    try:
        opt = DistributedShampoo(model.parameters(), **reference_kwargs(options))
        return train(model, opt, STEPS)
    finally:
        torch.set_default_dtype(previous)


def rel_err(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference",
        default=os.environ.get("SHAMPOO_REFERENCE"),
        help="a checkout of facebookresearch/optimizers",
    )
    parser.add_argument(
        "--convention",
        default="reference",
        help="eigenbasis_convention to compare ('' for the default)",
    )
    parser.add_argument(
        "--float32-defaults",
        action="store_true",
        help="run the reference with float32 as the default dtype",
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--bound", type=float, default=1e-9)
    args = parser.parse_args()
    if not args.reference:
        parser.error("give --reference (a checkout of facebookresearch/optimizers)")
    sys.path.insert(0, args.reference)
    torch.set_num_threads(1)
    worst = 0.0
    for name in args.cases.split(","):
        options = CASES[name]
        err = rel_err(ours(options, args.convention), reference(options, args.float32_defaults))
        worst = max(worst, err)
        print(
            f"{name:28s} max relative parameter difference after {STEPS} steps: {err:.2e}",
            flush=True,
        )
    print(f"worst {worst:.2e} (bound {args.bound:.0e})")
    return 0 if worst <= args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
