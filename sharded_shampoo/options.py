"""Per-param-group options, validated once into a frozen dataclass.

Everything is checked before any state exists; each message names the option, the value given
and what is allowed. Options that decide which state a block has or how blocks are cut
(``STRUCTURAL``) cannot change after the optimizer is built; the others (lr, betas, ...) may be
changed between steps, by hand or by a scheduler, and are re-validated at every step.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

__all__ = [
    "GraftingType",
    "GroupOptions",
    "DEFAULTS",
    "STRUCTURAL",
    "check_group_keys",
    "check_dtype_range",
]

GRAFTING_TYPES = ("adam", "adagrad", "rmsprop", "sgd")
PRECONDITIONERS = ("shampoo", "eigenvalue_corrected")
EIGENBASES = ("eigh", "qr")
# See eigenbasis.py: the reference implementation's conventions, or the SOAP paper's.
EIGENBASIS_CONVENTIONS = ("reference", "soap")
# More QR iterations per refresh than this are refused: each is a QR decomposition and two
# products of every factor (10**4 took 0.43 s per refresh of one 6 x 5 block), and a few
# already converge from the warm start.
MAX_QR_ITERATIONS = 100
GraftingType = str | None

DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 1.0),
    epsilon=1e-12,
    weight_decay=0.0,
    decoupled_weight_decay=True,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    max_preconditioner_dim=1024,
    merge_dims=True,
    precondition_frequency=100,
    start_preconditioning_step=None,
    # "default": adam for root-inverse Shampoo, none for the eigenvalue-corrected preconditioner
    # (as the reference's SOAP configuration).
    grafting="default",
    grafting_beta2=0.999,
    grafting_epsilon=1e-8,
    use_bias_correction=True,
    inverse_exponent_override=None,
    factor_dtype=torch.float32,
    max_consecutive_root_failures=3,
    stagger_roots=False,
    preconditioner="shampoo",
    eigenbasis="eigh",
    qr_iterations=1,
    eigenbasis_convention="reference",
    eigenbasis_tolerance=0.0,
)


# Factor dtypes by name: param groups hold the name (torch's state-dict utilities traverse
# numbers, strings, lists and dicts, not torch.dtype); either form is accepted.
FACTOR_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def parse_factor_dtype(value: Any) -> torch.dtype:
    """``value`` (a torch.dtype, or its name with or without ``torch.``) as a factor dtype."""
    if isinstance(value, str):
        dtype = FACTOR_DTYPES.get(value.removeprefix("torch."))
    else:
        dtype = value if value in FACTOR_DTYPES.values() else None
    if dtype is None:
        raise ValueError(
            "factor_dtype must be one of torch.float32, torch.float64, torch.bfloat16, "
            f"torch.float16 (or their names, such as 'float64'), got {value!r}"
        )
    return dtype


def factor_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GroupOptions:
    lr: float
    beta1: float
    beta2: float
    epsilon: float
    weight_decay: float
    decoupled_weight_decay: bool
    momentum: float
    dampening: float
    nesterov: bool
    max_preconditioner_dim: int
    merge_dims: bool
    precondition_frequency: int
    start_preconditioning_step: int
    grafting: GraftingType
    grafting_beta2: float
    grafting_epsilon: float
    use_bias_correction: bool
    inverse_exponent_override: Mapping[int, float]
    factor_dtype: torch.dtype
    max_consecutive_root_failures: int
    stagger_roots: bool
    preconditioner: str
    eigenbasis: str
    qr_iterations: int
    eigenbasis_convention: str
    eigenbasis_tolerance: float

    @property
    def eigenvalue_corrected(self) -> bool:
        return self.preconditioner == "eigenvalue_corrected"

    @property
    def basis(self) -> str:
        """The state name of the per-dim matrices a refresh computes: ``root_i`` or
        ``eigenvectors_i``."""
        return "eigenvectors" if self.eigenvalue_corrected else "root"

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> "GroupOptions":
        """Validates a param group's options; raises ValueError naming the first bad one."""
        g = group
        lr = _real(g, "lr", lo=0.0)
        betas = g["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _real_value("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        beta2 = _real_value("betas[1]", betas[1], lo=0.0, hi=1.0, lo_open=True)
        epsilon = _real(g, "epsilon", lo=0.0, lo_open=True)
        weight_decay = _real(g, "weight_decay", lo=0.0)
        momentum = _real(g, "momentum", lo=0.0, hi=1.0, hi_open=True)
        dampening = _real(g, "dampening", lo=0.0, hi=1.0)
        nesterov = _bool(g, "nesterov")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0, "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )
        max_dim = _int(g, "max_preconditioner_dim", lo=1)
        freq = _int(g, "precondition_frequency", lo=1)
        start = g["start_preconditioning_step"]
        start = freq if start is None else _int_value("start_preconditioning_step", start, lo=1)
        preconditioner = g["preconditioner"]
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        eigenbasis = g["eigenbasis"]
        if eigenbasis not in EIGENBASES:
            raise ValueError(f"eigenbasis must be one of {EIGENBASES}, got {eigenbasis!r}")
        convention = g["eigenbasis_convention"]
        if convention not in EIGENBASIS_CONVENTIONS:
            raise ValueError(
                f"eigenbasis_convention must be one of {EIGENBASIS_CONVENTIONS}, got {convention!r}"
            )
        grafting = g["grafting"]
        if grafting == "default":
            grafting = "adam" if preconditioner == "shampoo" else None
        if grafting is not None and grafting not in GRAFTING_TYPES:
            raise ValueError(
                f"grafting must be one of {GRAFTING_TYPES}, None or 'default', got {grafting!r}"
            )
        grafting_beta2 = _real(g, "grafting_beta2", lo=0.0, hi=1.0, hi_open=True)
        grafting_epsilon = _real(g, "grafting_epsilon", lo=0.0, lo_open=True)
        override = g["inverse_exponent_override"] or {}
        if not isinstance(override, Mapping):
            raise ValueError(
                "inverse_exponent_override must be a dict {tensor order: exponent} or None, "
                f"got {override!r}"
            )
        for k, e in override.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(
                    f"inverse_exponent_override keys are tensor orders (ints >= 1), got {k!r}"
                )
            _real_value(f"inverse_exponent_override[{k}]", e, lo=0.0, lo_open=True)
        factor_dtype = parse_factor_dtype(g["factor_dtype"])
        return cls(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            decoupled_weight_decay=_bool(g, "decoupled_weight_decay"),
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            max_preconditioner_dim=max_dim,
            merge_dims=_bool(g, "merge_dims"),
            precondition_frequency=freq,
            start_preconditioning_step=start,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
            use_bias_correction=_bool(g, "use_bias_correction"),
            inverse_exponent_override={int(k): float(v) for k, v in override.items()},
            factor_dtype=factor_dtype,
            max_consecutive_root_failures=_int(g, "max_consecutive_root_failures", lo=1),
            stagger_roots=_bool(g, "stagger_roots"),
            preconditioner=preconditioner,
            eigenbasis=eigenbasis,
            qr_iterations=_int(g, "qr_iterations", lo=1, hi=MAX_QR_ITERATIONS),
            eigenbasis_convention=convention,
            eigenbasis_tolerance=_real(g, "eigenbasis_tolerance", lo=0.0, hi=1.0),
        )

    def fields_text(self) -> tuple[str, ...]:
        """Every option as ``name=value``, exactly (``repr`` of a float round-trips) and
        independent of dict order: what ranks compare to agree on the options."""
        values = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "inverse_exponent_override":
                v = sorted(v.items())
            values.append(f"{f.name}={v!r}")
        return tuple(values)

    def exponent(self, order: int) -> float:
        """The inverse-root exponent for a block with ``order`` dims."""
        return self.inverse_exponent_override.get(order, 1.0 / (2 * order))

    def is_amortized_step(self, t: int) -> bool:
        """Whether every block's roots are recomputed at step ``t`` (without staggering)."""
        start = self.start_preconditioning_step
        return t == start or (t > start and t % self.precondition_frequency == 0)


    def structure(self) -> tuple:
        """What decides the blocks and which state they carry: fixed once state exists."""
        return tuple(
            f(self) for f in STRUCTURAL.values()
        )


# Each entry maps an option name to what of it shapes the state.
STRUCTURAL: dict[str, Any] = {
    "max_preconditioner_dim": lambda o: o.max_preconditioner_dim,
    "merge_dims": lambda o: o.merge_dims,
    "factor_dtype": lambda o: o.factor_dtype,
    "grafting": lambda o: o.grafting,
    "betas[0] > 0": lambda o: o.beta1 > 0,
    "momentum > 0": lambda o: o.momentum > 0,
    "stagger_roots": lambda o: o.stagger_roots,
    "preconditioner": lambda o: o.preconditioner,
    "eigenbasis": lambda o: o.eigenbasis,
    "qr_iterations": lambda o: o.qr_iterations,
    # Which vector each corrected eigenvalue belongs to depends on it.
    "eigenbasis_convention": lambda o: o.eigenbasis_convention,
    # Blocks' phases are taken modulo the frequency they were assigned with.
    "precondition_frequency (with stagger_roots)": lambda o: (
        o.precondition_frequency if o.stagger_roots else None
    ),
}

OPTION_NAMES = tuple(DEFAULTS)
assert {f.name for f in fields(GroupOptions)} == (set(OPTION_NAMES) - {"betas"}) | {"beta1", "beta2"}


def _number(name: str, v: Any, kind: type) -> Any:
    """``v`` as a Python number if it is one of ``kind`` (``numbers.Real`` or ``Integral``):
    Python's and NumPy's numbers, and one-element tensors on the CPU, as torch's optimizers
    take them (not bools). A tensor on an accelerator is refused: options are read on the host
    at every step, which would wait for the device each time."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} must be a real number, got a tensor of shape {tuple(v.shape)}")
        if v.device.type != "cpu":
            raise ValueError(
                f"{name} must be a number or a CPU tensor, got a tensor on {v.device}: options "
                "are read on the host every step, which would wait for the device"
            )
        v = v.item()
        if kind is numbers.Integral and isinstance(v, float) and v.is_integer():
            v = int(v)
    if isinstance(v, bool) or not isinstance(v, kind) or type(v).__name__ == "bool_":
        what = "an int" if kind is numbers.Integral else "a real number"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return int(v) if kind is numbers.Integral else float(v)


def _real_value(
    name: str,
    v: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    v = _number(name, v, numbers.Real)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {v!r}")
    return v


def _real(g: Mapping[str, Any], name: str, **kw: Any) -> float:
    return _real_value(name, g[name], **kw)


# Integer options are recorded in int64 checkpoint records (state/record.py).
_INT_MAX = 2**63 - 1


def _int_value(name: str, v: Any, lo: int, hi: int = _INT_MAX) -> int:
    upper = "2**63 - 1" if hi == _INT_MAX else str(hi)
    try:
        v = _number(name, v, numbers.Integral)
    except ValueError:
        raise ValueError(f"{name} must be an int in [{lo}, {upper}], got {v!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {upper}], got {v!r}")
    return v


def _int(g: Mapping[str, Any], name: str, lo: int, hi: int = _INT_MAX) -> int:
    return _int_value(name, g[name], lo, hi)


def _bool(g: Mapping[str, Any], name: str) -> bool:
    v = g[name]
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


# Keys a param group may hold besides the options: torch's own, hints other optimizers take that
# mean nothing here (torchtitan puts ``fused`` and ``foreach`` in every group), and what torch's
# LR schedulers add (present when a group is rebuilt from another optimizer's param_groups).
_OTHER_KEYS = {
    "params", "param_names", "step", "fused", "foreach",
    "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum",
}
# Options of the whole optimizer, not of a group.
_CONSTRUCTOR_ONLY = ("mesh", "communication_dtype", "num_trainers_per_group")


def check_group_keys(group: Mapping[str, Any]) -> None:
    """Raises ValueError for a key that is neither an option nor a known harmless one, so that a
    misspelt option (``eps`` for ``epsilon``) is not silently ignored."""
    for key in group:
        if key in DEFAULTS or key in _OTHER_KEYS:
            continue
        if key in _CONSTRUCTOR_ONLY:
            raise ValueError(
                f"{key} is an option of the whole optimizer: pass it to ShardedShampoo(...), "
                "not in a param group"
            )
        close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1, cutoff=0.5)
        if key == "eps":
            close = ["epsilon"]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown option {key!r}{hint}; ShardedShampoo's options are {', '.join(DEFAULTS)}"
        )


def check_dtype_range(opts: GroupOptions, param_dtypes: Iterable[torch.dtype]) -> None:
    """Raises ValueError for an option that the dtypes it is used in cannot hold: ``lr`` scales
    updates in the parameter dtype and ``weight_decay`` in the math dtype (an overflow would
    raise in the middle of a step), ``epsilon`` is added in the root dtype and
    ``grafting_epsilon`` in the math dtype (a value that rounds to 0 there is no epsilon)."""
    for dtype in set(param_dtypes):
        math_dtype = torch.promote_types(dtype, torch.float32)
        root_dtype = torch.promote_types(opts.factor_dtype, torch.float32)
        for name, value, where, what in (
            ("lr", opts.lr, dtype, "parameter"),
            ("weight_decay", opts.weight_decay, math_dtype, "math"),
        ):
            if value > torch.finfo(where).max:
                raise ValueError(
                    f"{name}={value!r} overflows {where}, the {what} dtype of this group's "
                    f"{dtype} parameters (largest: {torch.finfo(where).max:.3g})"
                )
        for name, value, where, what in (
            ("epsilon", opts.epsilon, root_dtype, "dtype inverse roots are computed in"),
            ("grafting_epsilon", opts.grafting_epsilon, math_dtype, "math dtype"),
        ):
            # Below half the smallest subnormal, a value rounds to 0 (checked with float
            # arithmetic: this runs every step, and a tensor per check would cost more).
            info = torch.finfo(where)
            if value <= info.smallest_normal * info.eps / 2:
                raise ValueError(
                    f"{name}={value!r} rounds to 0 in {where}, the {what} (smallest: "
                    f"{torch.finfo(where).smallest_normal:.3g}); use a larger {name}"
                    + (" or factor_dtype=torch.float64" if name == "epsilon" else "")
                )
