"""Every per-param-group option, declared once (``OPTIONS``), and the frozen ``GroupOptions`` made
from a param group.

An ``Option`` says its name, default, check (which raises ValueError naming the option, the
value given and what is allowed, and returns the value the math uses), what of it shapes the
state (``structure``: such options cannot change once state exists; the others, lr, betas,
..., may change between steps, by hand or by a scheduler, and are checked at every step),
how it is recorded in a checkpoint's blocking record (``record``), and how it is written back
into the param group (``stored``). The constructor's signature and documentation, option
checking, the agreement between ranks (``fields_text``), the structure check and the
checkpoint record all come from this table: adding an option touches it and the code that uses
the option, nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "GRAFTING_TYPES",
    "GroupOptions",
    "MAX_NEWTON_ROOT",
    "OPTIONS",
    "OPTION_DEFAULTS",
    "check_dtype_range",
    "check_group_keys",
    "constructor_options",
    "newton_root",
    "optimizer_signature",
    "options_doc",
    "parse_factor_dtype",
    "resolve_merge_dims",
]

# adam, adagrad and rmsprop keep a second moment; shape and rms are fixed norms
# (``algorithm/spectral.py``).
GRAFTING_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "shape", "rms")
PRECONDITIONERS = ("shampoo", "eigenvalue_corrected", "diagonal", "spectral")
# Newton-Schulz iterations for preconditioner="spectral" (algorithm/spectral.py).
NEWTON_SCHULZ = ("muon", "polar_express")
EIGENBASES = ("eigh", "qr")
QR_STARTS = ("eigh", "identity")
# See eigenbasis.py: the reference implementation's conventions, or the SOAP paper's.
EIGENBASIS_CONVENTIONS = ("reference", "soap")
# More QR iterations per refresh than this are refused: each is a QR decomposition and two
# products of every factor (10**4 took 0.43 s per refresh of one 6 x 5 block), and a few
# already converge from the warm start.
MAX_QR_ITERATIONS = 100
# Coupled Newton iterations per root (``roots.newton_inverse_roots``): 4 to 6 matrix products
# each; 30 reach float64's rounding from a condition number of 1e8 (exponent 1/4).
MAX_NEWTON_ITERATIONS = 1000
# The largest p of an exponent 1/p the Newton iteration takes (a product per bit of p).
MAX_NEWTON_ROOT = 16
# Integer options are recorded in int64 checkpoint records (state/record.py).
_INT_MAX = 2**63 - 1

# Factor dtypes by name: param groups hold the name (torch's state-dict utilities traverse
# numbers, strings, lists and dicts, not torch.dtype); either form is accepted.
FACTOR_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_RECORDED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- checks


def _number(name: str, v: Any, kind: type) -> Any:
    """``v`` as a Python number if it is one of ``kind`` (``numbers.Real`` or ``Integral``):
    Python's and NumPy's numbers, and one-element tensors on the CPU, as torch's optimizers
    take them (not bools). A tensor on an accelerator is refused: options are read on the host
    at every step, which would wait for the device each time."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise ValueError(
                f"{name} must be a real number, got a tensor of shape {tuple(v.shape)}"
            )
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


def real(lo=None, hi=None, lo_open=False, hi_open=False) -> Callable[[str, Any], float]:
    """A finite real number in the interval given."""

    def check(name: str, v: Any) -> float:
        v = _number(name, v, numbers.Real)
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else repr(lo)
            hi_s = "inf" if hi is None else repr(hi)
            raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {v!r}")
        return v

    return check


def integer(lo: int, hi: int = _INT_MAX) -> Callable[[str, Any], int]:
    """An int in [lo, hi]: Python's and NumPy's integers, not bools and not tensors (a count
    is set once, not computed on a device or scheduled)."""

    def check(name: str, v: Any) -> int:
        upper = "2**63 - 1" if hi == _INT_MAX else str(hi)
        try:
            if isinstance(v, torch.Tensor):
                raise ValueError
            value = _number(name, v, numbers.Integral)
        except ValueError:
            raise ValueError(
                f"{name} must be an int in [{lo}, {upper}] (Python's or NumPy's), got {v!r}"
            ) from None
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be an int in [{lo}, {upper}], got {v!r}")
        return value

    return check


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def choice(*values: Any) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if v not in values:
            raise ValueError(f"{name} must be one of {values}, got {v!r}")
        return v

    return check


def _betas(name: str, v: Any) -> tuple[float, float]:
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {v!r}")
    # betas[1] = 0: factors (and corrected eigenvalues) of the current step alone, as Muon's.
    return (
        real(0.0, 1.0, hi_open=True)("betas[0]", v[0]),
        real(0.0, 1.0)("betas[1]", v[1]),
    )


def _start(name: str, v: Any) -> int | None:
    return None if v is None else integer(1)(name, v)


def _optional_real(name: str, v: Any) -> float | None:
    return None if v is None else real(0.0)(name, v)


def _merge_dims(name: str, v: Any) -> bool | str:
    return v if v == "default" and isinstance(v, str) else boolean(name, v)


def resolve_merge_dims(value: Any, preconditioner: Any) -> Any:
    """``merge_dims`` with "default" resolved for ``preconditioner``."""
    return preconditioner != "spectral" if value == "default" else value


def _ratio(name: str, v: Any) -> int | None:
    return None if v is None else integer(1)(name, v)


def _newton(name: str, v: Any) -> int | None:
    return None if v is None else integer(1, MAX_NEWTON_ITERATIONS)(name, v)


def _grafting(name: str, v: Any) -> str | None:
    if v is not None and v != "default" and v not in GRAFTING_TYPES:
        raise ValueError(f"{name} must be one of {GRAFTING_TYPES}, None or 'default', got {v!r}")
    return v


def _override(name: str, v: Any) -> dict[int, float]:
    v = {} if v is None else v
    if not isinstance(v, Mapping):
        raise ValueError(f"{name} must be a dict {{tensor order: exponent}} or None, got {v!r}")
    # A param group saved by DCP comes back with its keys as strings ("2").
    v = {int(k) if isinstance(k, str) and k.isdigit() else k: e for k, e in v.items()}
    for k, e in v.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} keys are tensor orders (ints >= 1), got {k!r}")
        real(0.0, lo_open=True)(f"{name}[{k}]", e)
    return {int(k): float(e) for k, e in v.items()}


def parse_factor_dtype(value: Any, name: str = "factor_dtype") -> torch.dtype:
    """``value`` (a torch.dtype, or its name with or without ``torch.``) as a factor dtype."""
    if isinstance(value, str):
        dtype = FACTOR_DTYPES.get(value.removeprefix("torch."))
    else:
        dtype = value if value in FACTOR_DTYPES.values() else None
    if dtype is None:
        raise ValueError(
            f"{name} must be one of torch.float32, torch.float64, torch.bfloat16, "
            f"torch.float16 (or their names, such as 'float64'), got {value!r}"
        )
    return dtype


def _root_dtype(name: str, v: Any) -> torch.dtype | None:
    if v in ("int8", "torch.int8", torch.int8):  # 8-bit quantized (algorithm/quantize.py)
        return torch.int8
    try:
        return None if v is None else parse_factor_dtype(v, name)
    except ValueError:
        raise ValueError(
            f"{name} must be None, torch.float32, torch.float64, torch.bfloat16, "
            f"torch.float16 or torch.int8 (8-bit quantized), or their names, got {v!r}"
        ) from None


def _average_dtype(name: str, v: Any) -> torch.dtype | None:
    """A moving average's storage dtype: float16 is refused (stochastic rounding is written
    for bfloat16's layout), and so are integer types (an average kept in int8 stays zero)."""
    allowed = f"{name} must be None, torch.float32, torch.float64 or torch.bfloat16, got {v!r}"
    if v is None:
        return None
    try:
        dtype = parse_factor_dtype(v, name)
    except ValueError:
        raise ValueError(allowed) from None
    if dtype == torch.float16:
        raise ValueError(allowed)
    return dtype


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One per-param-group option (see the module docstring)."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    # What of it shapes the state, and the name to give it in messages (``name`` if None).
    structure: Callable[[Any], Any] | None = None
    structure_name: str | None = None
    # Its int in the blocking record (-1: nothing to record), when it is recorded there.
    record: Callable[[Any], int] | None = None
    # What the param group holds after the check, when not what was given.
    stored: Callable[[Any], Any] | None = None
    # How state is stored, not what it holds: a state dict saved under another value is
    # converted on load, and the loading optimizer keeps its own value.
    storage: bool = False


def _same(field: str) -> Callable[[Any], Any]:
    return lambda o: getattr(o, field)


def _storage_dtype(name: str, check: Callable[[str, Any], Any], doc: str) -> Option:
    """A state dtype option (None by default): fixed once state exists, held by name in the
    param group, converted on load."""
    return Option(
        name,
        None,
        check,
        doc,
        structure=_same(name),
        stored=lambda o: _dtype_name(getattr(o, name)),
        storage=True,
    )


OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-3, real(0.0), "step size"),
    Option(
        "betas",
        (0.9, 1.0),
        _betas,
        "beta1: EMA of the gradient (0: none); beta2: EMA of the factors (1: sums) and of the "
        "eigenvalue-corrected second moment",
        structure=lambda o: o.beta1 > 0,
        structure_name="betas[0] > 0",
        record=lambda o: int(o.beta1 > 0),
    ),
    Option(
        "epsilon",
        1e-12,
        real(0.0),
        "added to the factors' eigenvalues before the inverse root (> 0; 0 with pseudo_inverse)",
    ),
    Option(
        "pseudo_inverse",
        False,
        boolean,
        "drop the eigenvalues at most max(rank_atol, rank_rtol x the largest) from the roots "
        "(weight 0: a pseudo-inverse root) instead of adding epsilon, which must be 0; "
        "eigenvalue-corrected: the same with the corrected eigenvalues of each block",
    ),
    Option(
        "rank_atol",
        0.0,
        real(0.0),
        "pseudo_inverse: the absolute cutoff",
    ),
    Option(
        "rank_rtol",
        None,
        _optional_real,
        "pseudo_inverse: the cutoff relative to the largest eigenvalue (None: the matrix's "
        "size, its largest dim eigenvalue-corrected, times its dtype's rounding unit, as "
        "torch.linalg.matrix_rank)",
    ),
    Option("weight_decay", 0.0, real(0.0), "weight decay"),
    Option(
        "decoupled_weight_decay",
        True,
        boolean,
        "AdamW-style (added to the direction) instead of L2 (added to the gradient)",
    ),
    Option(
        "momentum",
        0.0,
        real(0.0, 1.0, hi_open=True),
        "heavy-ball momentum on the direction",
        structure=lambda o: o.momentum > 0,
        structure_name="momentum > 0",
        record=lambda o: int(o.momentum > 0),
    ),
    Option("dampening", 0.0, real(0.0, 1.0), "momentum dampening"),
    Option("nesterov", False, boolean, "Nesterov momentum"),
    Option(
        "max_preconditioner_dim",
        1024,
        integer(1),
        "largest block size per dim",
        structure=_same("max_preconditioner_dim"),
        record=_same("max_preconditioner_dim"),
    ),
    Option(
        "merge_dims",
        "default",
        _merge_dims,
        "merge small dims before blocking ('default': True, but False for spectral, whose "
        "blocks are matrices: rows by the product of the other dims)",
        structure=_same("merge_dims"),
        record=lambda o: int(o.merge_dims),
        stored=lambda o: o.merge_dims,
    ),
    Option(
        "precondition_frequency",
        100,
        integer(1),
        "steps between root refreshes",
        structure=lambda o: o.precondition_frequency if o.stagger_roots else None,
        structure_name="precondition_frequency (with stagger_roots)",
    ),
    Option(
        "start_preconditioning_step",
        None,
        _start,
        "first step with roots (None: precondition_frequency, resolved when the group is "
        "built and kept: a later change of the frequency does not move it)",
        stored=_same("start_preconditioning_step"),
    ),
    Option(
        "grafting",
        "default",
        _grafting,
        "the direction whose norm Shampoo's takes: adam, adagrad, rmsprop, sgd, or a fixed "
        "norm: shape (that of the block's polar factor times sqrt(max(1, rows / cols)), as "
        "Muon scales) or rms (root mean square 0.2, AdamW's); None: Shampoo's own. A block "
        "is (rows, the product of its other dims). 'default': adam for root-inverse Shampoo "
        "and diagonal, None for eigenvalue-corrected, shape for spectral",
        structure=_same("grafting"),
        record=lambda o: -1 if o.grafting is None else GRAFTING_TYPES.index(o.grafting),
        stored=lambda o: o.grafting,
    ),
    Option("grafting_beta2", 0.999, real(0.0, 1.0, hi_open=True), "grafting's second-moment EMA"),
    Option("grafting_epsilon", 1e-8, real(0.0, lo_open=True), "grafting's epsilon"),
    Option("use_bias_correction", True, boolean, "bias-correct the EMAs"),
    Option(
        "inverse_exponent_override",
        None,
        _override,
        "{tensor order: exponent} instead of 1 / (2 order) (1/2 eigenvalue-corrected)",
        stored=lambda o: o.inverse_exponent_override or None,  # int keys
    ),
    Option(
        "factor_dtype",
        torch.float32,
        lambda name, v: parse_factor_dtype(v),
        "dtype of the factors",
        structure=_same("factor_dtype"),
        record=lambda o: _RECORDED_DTYPES.index(o.factor_dtype),
        stored=lambda o: str(o.factor_dtype).removeprefix("torch."),
    ),
    Option(
        "max_consecutive_root_failures",
        3,
        integer(1),
        "root failures in a row a block may have before the step raises",
    ),
    Option(
        "refresh_delay",
        0,
        integer(0),
        "steps d after which a refresh is installed: computed in the background from the "
        "factors of the step it is due, used from d steps later (0: at once, in the step; "
        "less than precondition_frequency)",
        structure=_same("refresh_delay"),
    ),
    Option(
        "stagger_roots",
        False,
        boolean,
        "refresh each block in its own step of the period instead of all at once",
        structure=_same("stagger_roots"),
    ),
    Option(
        "preconditioner",
        "shampoo",
        choice(*PRECONDITIONERS),
        "root-inverse Shampoo, eigenvalue-corrected (SOAP), diagonal (no factors: the "
        "grafting direction alone, Adam by default: for embeddings, heads and 1-D "
        "parameters) or spectral (Muon: the first moment orthogonalized by Newton-Schulz)",
        structure=_same("preconditioner"),
        # -1: root-inverse (and records written before the other kinds).
        record=lambda o: {"eigenvalue_corrected": 1, "diagonal": 2, "spectral": 3}.get(
            o.preconditioner, -1
        ),
    ),
    Option(
        "kl_shampoo",
        False,
        boolean,
        "root-inverse Shampoo: KL-Shampoo's factors, each from the gradient preconditioned "
        "along the other dims by their current inverse roots",
    ),
    Option(
        "factor_source",
        "gradient",
        choice("gradient", "first_moment"),
        "root-inverse Shampoo: what the factors are Gram matrices of: the gradient, or the "
        "first moment the direction preconditions (betas[0] > 0; with betas[1] = 0, a "
        "refresh every step, exponent 1/4, pseudo_inverse and no grafting: Muon's exact "
        "polar factor)",
    ),
    Option(
        "first_moment_nesterov",
        False,
        boolean,
        "precondition (1 - beta1) g + beta1 m instead of the first moment m (Nesterov's "
        "look-ahead, as torch.optim.Muon's nesterov)",
    ),
    Option(
        "newton_schulz",
        "muon",
        choice(*NEWTON_SCHULZ),
        "spectral: the iteration's coefficients: muon (Keller Jordan's quintic, as "
        "torch.optim.Muon) or polar_express (Amsel et al.'s schedule, as modded-nanogpt)",
    ),
    Option(
        "newton_schulz_steps",
        5,
        integer(1, 100),
        "spectral: Newton-Schulz iterations (polar_express: at most 5, its schedule's length)",
    ),
    Option(
        "eigenbasis",
        "eigh",
        choice(*EIGENBASES),
        "how a refresh finds each factor's eigenbasis: eigh (an eigendecomposition) or qr "
        "(from the previous basis: a product with the factor and a QR decomposition per "
        "iteration); root-inverse Shampoo with qr keeps the basis beside the roots, which "
        "come from it and the eigenvalues diag(Q^T F Q)",
        structure=_same("eigenbasis"),
        # Root-inverse Shampoo keeps the basis with qr only. (-1: eigenvalue-corrected, whose
        # state is the same with either, and records written before the option was recorded.)
        record=lambda o: -1 if o.eigenvalue_corrected else EIGENBASES.index(o.eigenbasis),
    ),
    Option(
        "qr_iterations",
        1,
        integer(1, MAX_QR_ITERATIONS),
        "QR: iterations per refresh",
        structure=_same("qr_iterations"),
    ),
    Option(
        "qr_start",
        "default",
        choice("default", *QR_STARTS),
        "QR: the first basis, at start_preconditioning_step: eigh's, or the identity's (as the "
        "reference implementation starts; from it, eigenvalue-corrected Shampoo with one "
        "iteration spiked on small models). 'default': the identity with the reference "
        "convention's eigenvalue-corrected bases (whose QR algorithm, warm-started from an "
        "accurate basis in increasing order, amplifies rounding, so that modes would differ), "
        "else eigh",
        structure=_same("qr_start"),
        stored=lambda o: o.qr_start,
    ),
    Option(
        "newton_iterations",
        None,
        _newton,
        "root-inverse Shampoo: compute the inverse roots by this many iterations of the "
        "coupled Newton iteration (matrix products only, no host read) instead of from "
        "eigenbases; exponents 1/p for integer p up to 16 (None: eigenbases)",
    ),
    Option(
        "eigenbasis_convention",
        "reference",
        choice(*EIGENBASIS_CONVENTIONS),
        "eigenvalue-corrected: the reference implementation's conventions or SOAP's",
        # Which vector each corrected eigenvalue belongs to depends on it.
        structure=_same("eigenbasis_convention"),
        record=lambda o: (
            {"soap": 1, "reference": 2}[o.eigenbasis_convention] if o.eigenvalue_corrected else -1
        ),
    ),
    Option(
        "eigenbasis_tolerance",
        0.0,
        real(0.0, 1.0),
        "eigenvalue-corrected, reference convention: skip an eigh or stop QR when the old "
        "basis diagonalizes the factor within this",
    ),
    Option(
        "max_factor_ratio",
        None,
        _ratio,
        "precondition a block's dim only if its factor holds at most this many times the "
        "block's elements (1-D blocks of more: none; lopsided blocks: one side); a block "
        "left with no factor takes the grafting direction (None: every dim)",
        structure=_same("max_factor_ratio"),
        record=lambda o: -1 if o.max_factor_ratio is None else o.max_factor_ratio,
        stored=_same("max_factor_ratio"),  # an int, whatever integer was given
    ),
    _storage_dtype(
        "root_dtype",
        _root_dtype,
        "dtype roots and eigenvectors are kept in, e.g. torch.bfloat16, or torch.int8 for "
        "8-bit blockwise quantization (computed and applied in the math dtype; None: the "
        "math dtype)",
    ),
    _storage_dtype(
        "grafting_dtype",
        _average_dtype,
        "dtype the grafting second moment is kept in, e.g. torch.bfloat16 (updated in the math "
        "dtype, stored with stochastic rounding; None: the math dtype)",
    ),
    _storage_dtype(
        "first_moment_dtype",
        _average_dtype,
        "dtype the first moment (betas[0] > 0) is kept in, as grafting_dtype",
    ),
    Option(
        "symmetric_packing",
        True,
        boolean,
        "keep factors and roots as their upper triangles (half the memory, same math)",
        structure=_same("symmetric_packing"),
        storage=True,
    ),
)
OPTION_DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
STRUCTURAL = tuple(o for o in OPTIONS if o.structure is not None)
RECORDED = tuple(o for o in OPTIONS if o.record is not None)
STORAGE = tuple(o.name for o in OPTIONS if o.storage)


def newton_root(exponent: float) -> int | None:
    """The integer p of an exponent 1/p the Newton iteration takes, else None."""
    p = round(1.0 / exponent)
    return p if 1 <= p <= MAX_NEWTON_ROOT and abs(p * exponent - 1.0) < 1e-9 else None


def _check_newton(values: dict[str, Any]) -> None:
    """``newton_iterations`` computes inverse roots 1/p of root-inverse Shampoo's factors."""
    if values["preconditioner"] != "shampoo" or values["eigenbasis"] != "eigh":
        raise ValueError(
            "newton_iterations computes root-inverse Shampoo's inverse roots without "
            "eigenbases: it takes preconditioner='shampoo' and eigenbasis='eigh', got "
            f"preconditioner={values['preconditioner']!r}, eigenbasis={values['eigenbasis']!r}"
        )
    for order, exponent in values["inverse_exponent_override"].items():
        if newton_root(exponent) is None:
            raise ValueError(
                f"newton_iterations computes inverse roots 1/p for integer p in 1.."
                f"{MAX_NEWTON_ROOT}: inverse_exponent_override[{order}]={exponent!r} is not one"
            )


_DEFAULT_GRAFTING = {
    "shampoo": "adam",
    "eigenvalue_corrected": None,
    "diagonal": "adam",
    "spectral": "shape",
}


def _check_estimators(values: dict[str, Any]) -> None:
    """The estimators' options against each other (``pseudo_inverse``, ``kl_shampoo``,
    ``factor_source``, the spectral preconditioner's)."""
    kind = values["preconditioner"]
    if values["pseudo_inverse"]:
        if values["epsilon"] != 0.0:
            raise ValueError(
                "pseudo_inverse=True drops small eigenvalues instead of adding epsilon: it "
                f"takes epsilon=0, got epsilon={values['epsilon']!r}"
            )
        if values["newton_iterations"] is not None or kind in ("diagonal", "spectral"):
            raise ValueError(
                "pseudo_inverse=True needs eigenvalues: preconditioner='shampoo' (without "
                "newton_iterations) or 'eigenvalue_corrected', got "
                f"preconditioner={kind!r}, newton_iterations={values['newton_iterations']!r}"
            )
    else:
        if values["epsilon"] == 0.0 and kind in ("shampoo", "eigenvalue_corrected"):
            raise ValueError(
                "epsilon must be > 0 (or 0 with pseudo_inverse=True, which drops the "
                "eigenvalues at most the rank cutoff instead), got epsilon=0.0"
            )
        for name, default in (("rank_atol", 0.0), ("rank_rtol", None)):
            if values[name] != default:
                raise ValueError(
                    f"{name} is the cutoff of pseudo_inverse=True, which is off: got "
                    f"{name}={values[name]!r}"
                )
    for name, default in (("kl_shampoo", False), ("factor_source", "gradient")):
        if values[name] != default and kind != "shampoo":
            raise ValueError(
                f"{name}={values[name]!r} changes root-inverse Shampoo's factors: it takes "
                f"preconditioner='shampoo', got preconditioner={kind!r}"
            )
    if values["factor_source"] == "first_moment" and values["betas"][0] == 0.0:
        raise ValueError(
            "factor_source='first_moment' takes betas[0] > 0 (with betas[0] = 0 the first "
            "moment is the gradient), got betas[0]=0.0"
        )
    for name, default in (("newton_schulz", "muon"), ("newton_schulz_steps", 5)):
        if values[name] != default and kind != "spectral":
            raise ValueError(
                f"{name} sets the spectral preconditioner's iteration: it takes "
                f"preconditioner='spectral', got preconditioner={kind!r}"
            )
    if values["newton_schulz"] == "polar_express" and values["newton_schulz_steps"] > 5:
        raise ValueError(
            "newton_schulz='polar_express' has a schedule of 5 steps: newton_schulz_steps "
            f"must be at most 5, got {values['newton_schulz_steps']!r}"
        )


class _Options:
    """What the options imply, for ``GroupOptions`` (made from ``OPTIONS``)."""

    @property
    def beta1(self) -> float:
        return self.betas[0]

    @property
    def beta2(self) -> float:
        return self.betas[1]

    @property
    def eigenvalue_corrected(self) -> bool:
        return self.preconditioner == "eigenvalue_corrected"

    @property
    def bases(self) -> tuple[str, ...]:
        """The state names of the per-dim matrices a refresh computes (``<name>_i``): the
        eigenvectors with eigenvalue correction, else the roots, and with ``eigenbasis="qr"``
        the eigenvectors they come from too."""
        if self.eigenvalue_corrected:
            return ("eigenvectors",)
        return ("root", "eigenvectors") if self.eigenbasis == "qr" else ("root",)

    def preconditioned_dims(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The dims of a block of ``shape`` that get a factor (``max_factor_ratio``; none
        for the diagonal and spectral preconditioners)."""
        if self.preconditioner in ("diagonal", "spectral"):
            return ()
        if self.max_factor_ratio is None:
            return tuple(range(len(shape)))
        numel = math.prod(shape)
        return tuple(i for i, m in enumerate(shape) if m * m <= self.max_factor_ratio * numel)

    @property
    def rank_tolerance(self) -> tuple[float, float | None] | None:
        """``(rank_atol, rank_rtol)`` with ``pseudo_inverse``, else None."""
        return (self.rank_atol, self.rank_rtol) if self.pseudo_inverse else None

    def exponent(self, order: int) -> float:
        """The inverse-root exponent for a block with ``order`` dims."""
        return self.inverse_exponent_override.get(order, 1.0 / (2 * order))

    @property
    def first_preconditioned_step(self) -> int:
        """The first step whose direction uses roots (before it: grafting alone): the first
        refresh's step, plus ``refresh_delay``."""
        return self.start_preconditioning_step + self.refresh_delay

    def is_amortized_step(self, t: int) -> bool:
        """Whether every block's roots are recomputed at step ``t`` (without staggering)."""
        start = self.start_preconditioning_step
        return t == start or (t > start and t % self.precondition_frequency == 0)

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> GroupOptions:
        """Checks a param group's options; raises ValueError naming the first bad one."""
        values = {o.name: o.check(o.name, group[o.name]) for o in OPTIONS}
        if values["nesterov"] and (values["momentum"] <= 0.0 or values["dampening"] != 0.0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={values['momentum']!r}, dampening={values['dampening']!r}"
            )
        if values["refresh_delay"] >= values["precondition_frequency"]:
            raise ValueError(
                "refresh_delay must be less than precondition_frequency (a block's refresh "
                f"is installed before its next is due), got refresh_delay="
                f"{values['refresh_delay']!r}, precondition_frequency="
                f"{values['precondition_frequency']!r}"
            )
        if values["newton_iterations"] is not None:
            _check_newton(values)
        _check_estimators(values)
        reference_qr = (
            values["preconditioner"] == "eigenvalue_corrected"
            and values["eigenbasis_convention"] == "reference"
        )
        if values["qr_start"] == "default":
            values["qr_start"] = "identity" if reference_qr else "eigh"
        elif values["qr_start"] == "eigh" and reference_qr and values["eigenbasis"] == "qr":
            raise ValueError(
                "qr_start='eigh' does not go with eigenvalue-corrected Shampoo's reference "
                "convention: its QR algorithm, warm-started from an accurate basis in "
                "increasing order, amplifies rounding by up to the largest eigenvalue over "
                "epsilon per iteration, so that two modes or world sizes would end with other "
                "bases; use eigenbasis_convention='soap' (which starts from eigh by default), "
                "or qr_start='identity'"
            )
        if values["start_preconditioning_step"] is None:
            values["start_preconditioning_step"] = values["precondition_frequency"]
        if values["grafting"] == "default":
            values["grafting"] = _DEFAULT_GRAFTING[values["preconditioner"]]
        values["merge_dims"] = resolve_merge_dims(values["merge_dims"], values["preconditioner"])
        return cls(**values)

    def fields_text(self) -> tuple[str, ...]:
        """Every option as ``name=value``, exactly (``repr`` of a float round-trips) and
        independent of dict order: what ranks compare to agree on the options."""
        return tuple(
            f"{o.name}={sorted(v.items()) if isinstance(v, dict) else v!r}"
            for o in OPTIONS
            for v in [getattr(self, o.name)]
        )

    def structure(self) -> tuple:
        """What decides the blocks and which state they carry: fixed once state exists."""
        return tuple(o.structure(self) for o in STRUCTURAL)

    def structure_changes(self, before: tuple) -> str:
        """Names of the state-shaping options in which these differ from ``before``."""
        return ", ".join(
            o.structure_name or o.name
            for o, old, new in zip(STRUCTURAL, before, self.structure(), strict=True)
            if old != new
        )

    def stored(self) -> dict[str, Any]:
        """The options a param group holds after the check where they differ from what was
        given (``factor_dtype`` by name, ``grafting`` resolved)."""
        return {o.name: o.stored(self) for o in OPTIONS if o.stored is not None}

    def recorded(self) -> list[int]:
        """The options' part of the checkpoint record (``state/record.py``)."""
        return [o.record(self) for o in RECORDED]


GroupOptions = dataclasses.make_dataclass(
    "GroupOptions", [(o.name, Any) for o in OPTIONS], bases=(_Options,), frozen=True
)
GroupOptions.__module__ = __name__
GroupOptions.__doc__ = "One param group's options, checked (see ``OPTIONS``)."


# ---------------------------------------------------------------- the constructor's options


def optimizer_signature(extra: Iterable[inspect.Parameter]) -> inspect.Signature:
    """``ShardedShampoo.__init__``'s signature: params, every option with its default, then
    ``extra`` (keyword-only, the options of the whole optimizer)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [
            inspect.Parameter("self", kind),
            inspect.Parameter("params", kind),
            *(inspect.Parameter(o.name, kind, default=o.default) for o in OPTIONS),
            *extra,
        ]
    )


def constructor_options(args: tuple, options: dict[str, Any]) -> dict[str, Any]:
    """The constructor's options (positional after ``params``, in the table's order, or by
    name) over their defaults; an unknown name raises ValueError saying which exist."""
    names = list(OPTION_DEFAULTS)
    if len(args) > len(names):
        raise TypeError(f"ShardedShampoo takes at most {len(names) + 1} positional arguments")
    given = dict(zip(names, args, strict=False))  # fewer args than options
    for name in options:
        if name in given:
            raise TypeError(f"ShardedShampoo got multiple values for argument {name!r}")
    check_group_keys(options)
    return {**OPTION_DEFAULTS, **given, **options}


def options_doc() -> str:
    """The options, one line each, for the class docstring."""
    return "\n".join(f"    {o.name} (default {o.default!r}): {o.doc}" for o in OPTIONS)


# Keys a param group may hold besides the options: torch's own, hints other optimizers take that
# mean nothing here (torchtitan puts ``fused`` and ``foreach`` in every group), and what torch's
# LR schedulers add (present when a group is rebuilt from another optimizer's param_groups).
_OTHER_KEYS = {
    "params",
    "param_names",
    "step",
    "fused",
    "foreach",
    "initial_lr",
    "max_lr",
    "min_lr",
    "base_momentum",
    "max_momentum",
}
# Options of the whole optimizer, not of a group.
_CONSTRUCTOR_ONLY = ("mesh", "communication_dtype", "num_trainers_per_group", "exchange_buckets")


def check_group_keys(group: Mapping[str, Any]) -> None:
    """Raises ValueError for a key that is neither an option nor a known harmless one, so that a
    misspelt option (``eps`` for ``epsilon``) is not silently ignored."""
    for key in group:
        if key in OPTION_DEFAULTS or key in _OTHER_KEYS:
            continue
        if key in _CONSTRUCTOR_ONLY:
            raise ValueError(
                f"{key} is an option of the whole optimizer: pass it to ShardedShampoo(...), "
                "not in a param group"
            )
        close = difflib.get_close_matches(str(key), list(OPTION_DEFAULTS), n=1, cutoff=0.5)
        if key == "eps":
            close = ["epsilon"]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown option {key!r}{hint}; ShardedShampoo's options are "
            f"{', '.join(OPTION_DEFAULTS)}"
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
            if 0 < value <= info.smallest_normal * info.eps / 2:  # 0: pseudo_inverse
                raise ValueError(
                    f"{name}={value!r} rounds to 0 in {where}, the {what} (smallest: "
                    f"{torch.finfo(where).smallest_normal:.3g}); use a larger {name}"
                    + (" or factor_dtype=torch.float64" if name == "epsilon" else "")
                )
