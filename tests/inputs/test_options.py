"""Option validation: every bad value raises ValueError naming the option, before any state."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from paths import REPO

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.options import OPTIONS

BAD = [
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("lr", "0.1"),
    ("betas", (0.9,)),
    ("betas", (1.0, 0.99)),
    ("betas", (-0.1, 0.99)),
    ("betas", (0.9, -0.1)),
    ("betas", (0.9, 1.5)),
    ("epsilon", 0.0),
    ("epsilon", -1e-12),
    ("weight_decay", -0.1),
    ("decoupled_weight_decay", 1),
    ("momentum", -0.5),
    ("momentum", 1.0),
    ("dampening", 1.5),
    ("nesterov", "yes"),
    ("max_preconditioner_dim", 0),
    ("max_preconditioner_dim", 8.0),
    ("merge_dims", None),
    ("merge_dims", "auto"),
    ("pseudo_inverse", "yes"),
    ("rank_atol", -1e-3),
    ("rank_rtol", float("inf")),
    ("kl_shampoo", 1),
    ("factor_source", "momentum"),
    ("first_moment_nesterov", None),
    ("newton_schulz", "newton"),
    ("newton_schulz_steps", 0),
    ("precondition_frequency", 0),
    ("start_preconditioning_step", 0),
    ("start_preconditioning_step", 2.5),
    ("grafting", "adamw"),
    ("grafting_beta2", 1.0),
    ("grafting_dtype", torch.int8),
    ("grafting_dtype", "int8"),
    ("grafting_dtype", torch.float16),
    ("first_moment_dtype", torch.int8),
    ("first_moment_dtype", torch.complex64),
    ("grafting_epsilon", 0.0),
    ("use_bias_correction", "true"),
    ("inverse_exponent_override", {0: 0.5}),
    ("inverse_exponent_override", {2: -0.5}),
    ("inverse_exponent_override", [0.5]),
    ("factor_dtype", torch.int32),
    ("factor_dtype", "float8"),
    ("factor_dtype", "int32"),
    ("max_consecutive_root_failures", 0),
    ("stagger_roots", 1),
    ("preconditioner", "soap"),
    ("preconditioner", "muon"),
    ("eigenbasis", "power"),
    ("qr_iterations", 0),
    ("qr_iterations", 1.5),
    ("qr_iterations", 101),
    ("eigenbasis_convention", "paper"),
    ("eigenbasis_tolerance", 1.5),
    ("max_factor_ratio", 0),
    ("max_factor_ratio", 2.5),
    ("root_dtype", torch.int16),
    ("root_dtype", "float8"),
    ("symmetric_packing", "no"),
    ("lr", True),
    ("lr", torch.ones(2)),
    ("max_preconditioner_dim", torch.tensor(2.5)),
]


def option_label(name):
    return "betas" if name == "betas" else name


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_option_raises_naming_it(name, value):
    p = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=option_label(name).split("[")[0]):
        ShardedShampoo([p], **{name: value})


@pytest.mark.parametrize("name, value", BAD[:6], ids=[f"{n}={v!r}" for n, v in BAD[:6]])
def test_bad_option_in_a_group_names_the_group(name, value):
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param group 1: .*" + name.split("[")[0]):
        ShardedShampoo([{"params": [p]}, {"params": [q], name: value}])


def test_nesterov_needs_momentum():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="nesterov"):
        ShardedShampoo([p], nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        ShardedShampoo([p], nesterov=True, momentum=0.9, dampening=0.1)


def test_qr_start_resolves_per_group_and_refuses_eigh_with_the_reference_qr_algorithm():
    p, q, r = (torch.zeros(3, requires_grad=True) for _ in range(3))
    ec = dict(preconditioner="eigenvalue_corrected", eigenbasis="qr")
    opt = ShardedShampoo(
        [
            {"params": [p]},
            {"params": [q], **ec},
            {"params": [r], **ec, "eigenbasis_convention": "soap"},
        ]
    )
    assert [g["qr_start"] for g in opt.param_groups] == ["eigh", "identity", "eigh"]
    assert opt.defaults["qr_start"] == "default"  # each group resolves its own
    with pytest.raises(ValueError, match="qr_start='eigh' does not go with"):
        ShardedShampoo([p], **ec, qr_start="eigh")
    with pytest.raises(ValueError, match="qr_start must be one of"):
        ShardedShampoo([p], qr_start="random")
    # Without QR bases the first basis is eigh's anyway: nothing to refuse.
    ShardedShampoo([p], preconditioner="eigenvalue_corrected", qr_start="eigh")


def test_message_gives_the_allowed_range():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\), got -0.5"):
        ShardedShampoo([p], momentum=-0.5)


def test_parameters_of_unsupported_dtypes_are_refused_naming_them():
    """Integers, and float8 (it would fail inside the math: no promotion to float32)."""
    with pytest.raises(
        ValueError, match=r"\(3,\): .*float16, bfloat16, float32 and float64 .*torch.int64"
    ):
        ShardedShampoo([torch.zeros(3, dtype=torch.int64)])
    w = torch.zeros(2, 2, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"w \(2, 2\): .*got torch.float8_e4m3fn"):
        ShardedShampoo([("w", w)])


def test_numbers_are_accepted_as_torch_takes_them():
    """NumPy numbers for real and int options alike, and one-element CPU tensors for real ones
    (torch's optimizers take a tensor lr); a tensor count is refused."""
    np = pytest.importorskip("numpy")
    p = torch.nn.Parameter(torch.ones(4, 3))
    p.grad = torch.ones(4, 3)
    for lr, freq, betas in [
        (np.float32(0.1), np.int64(2), (np.float32(0.5), np.float64(0.9))),
        (torch.tensor(0.1), 2, (torch.tensor(0.5), 0.9)),
    ]:
        opt = ShardedShampoo([p], lr=lr, precondition_frequency=freq, betas=betas)
        opt.step()
        assert opt.param_groups[0]["step"] == 1
    assert torch.isfinite(p).all()
    with pytest.raises(ValueError, match=r"precondition_frequency must be an int .*NumPy"):
        ShardedShampoo([p], precondition_frequency=torch.tensor(2))


def test_failed_add_param_group_leaves_the_optimizer_unchanged():
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(4, requires_grad=True)
    opt = ShardedShampoo([p])
    with pytest.raises(ValueError, match="grafting"):
        opt.add_param_group({"params": [q], "grafting": "bogus"})
    assert len(opt.param_groups) == 1 and q not in opt.state
    opt.add_param_group({"params": [q], "lr": 0.5})
    q.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(q, torch.zeros(4))
    assert opt.param_groups[1]["step"] == 1


def test_options_may_change_between_steps_but_structure_may_not():
    p = torch.randn(4, 4, requires_grad=True)
    opt = ShardedShampoo([p], lr=0.1)
    p.grad = torch.randn(4, 4)
    opt.param_groups[0]["betas"] = (0.5, 0.99)
    opt.param_groups[0]["weight_decay"] = 0.1
    opt.step()
    opt.param_groups[0]["max_preconditioner_dim"] = 2
    with pytest.raises(ValueError, match="max_preconditioner_dim cannot change"):
        opt.step()
    opt.param_groups[0]["max_preconditioner_dim"] = 1024
    opt.param_groups[0]["betas"] = (0.0, 0.99)
    with pytest.raises(ValueError, match=r"betas\[0\] > 0 cannot change"):
        opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.99)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()


def test_default_grafting_follows_each_groups_preconditioner():
    """grafting="default" is adam for root-inverse groups and none for eigenvalue-corrected
    ones, whatever the optimizer's defaults (was: a group inherited the defaults' resolved
    value)."""
    a, b = torch.zeros(3, 3, requires_grad=True), torch.zeros(4, 4, requires_grad=True)
    opt = ShardedShampoo(
        [{"params": [a]}, {"params": [b], "preconditioner": "eigenvalue_corrected"}]
    )
    assert [g["grafting"] for g in opt.param_groups] == ["adam", None]
    opt = ShardedShampoo([{"params": [a], "preconditioner": "shampoo"}, {"params": [b]}],
                         preconditioner="eigenvalue_corrected")  # fmt: skip
    assert [g["grafting"] for g in opt.param_groups] == ["adam", None]
    assert "graft_v" not in " ".join(opt.state[b]) and "graft_v" in " ".join(opt.state[a])


def test_distribution_options_are_validated():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="communication_dtype"):
        ShardedShampoo([p], communication_dtype=torch.int8)
    with pytest.raises(ValueError, match="num_trainers_per_group .* world size 1, got 2"):
        ShardedShampoo([p], num_trainers_per_group=2)
    for bad in (0, 2.0, True):
        with pytest.raises(
            ValueError, match=rf"exchange_buckets must be an int in \[1, 2\*\*63 - 1\].*, got {bad}"
        ):
            ShardedShampoo([p], exchange_buckets=bad)
    # Without a process group the optimizer computes everything itself.
    opt = ShardedShampoo([p], num_trainers_per_group=1)
    assert opt.bytes_sent_per_step() == 0 and opt.owned_blocks() == 1
    assert [type(d).__name__ for d in opt.distributors] == ["LocalDistributor"]


def test_frequency_is_frozen_only_with_staggered_roots():
    """Staggered blocks hold phases modulo the frequency: it cannot change after construction
    then; without staggering, schedulers may change it."""
    p = torch.zeros(3, 4, requires_grad=True)
    plain = ShardedShampoo([p], precondition_frequency=5)
    plain.param_groups[0]["precondition_frequency"] = 7
    p.grad = torch.ones(3, 4)
    plain.step()
    staggered = ShardedShampoo([p], precondition_frequency=5, stagger_roots=True)
    staggered.param_groups[0]["precondition_frequency"] = 7
    with pytest.raises(
        ValueError,
        match=r"precondition_frequency \(with stagger_roots\) cannot "
        "change",
    ):
        staggered.step()


def test_readme_documents_every_option_with_its_default():
    """The README's option tables name every constructor option, and no option that is gone."""
    text = (REPO / "README.md").read_text()
    tables = text[text.index("## Options") : text.index("## The algorithm")]
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", tables, flags=re.M))
    signature = inspect.signature(ShardedShampoo.__init__).parameters
    options = {n: p.default for n, p in signature.items() if n not in ("self", "params")}
    assert sorted(documented) == sorted(options)
    for name, default in options.items():
        shown = documented[name].strip('"')
        if isinstance(default, torch.dtype):
            assert shown == str(default), name
        else:
            assert shown == str(default) or float(shown) == default, name


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(pseudo_inverse=True), "pseudo_inverse=True drops small eigenvalues .* epsilon=0"),
        (dict(epsilon=0.0), r"epsilon must be > 0 \(or 0 with pseudo_inverse=True"),
        (dict(rank_rtol=1e-6), "rank_rtol is the cutoff of pseudo_inverse=True, which is off"),
        (
            dict(pseudo_inverse=True, epsilon=0.0, newton_iterations=20),
            "pseudo_inverse=True needs eigenvalues",
        ),
        (
            dict(pseudo_inverse=True, epsilon=0.0, preconditioner="spectral"),
            "pseudo_inverse=True needs eigenvalues",
        ),
        (
            dict(kl_shampoo=True, preconditioner="eigenvalue_corrected"),
            "kl_shampoo=True changes root-inverse Shampoo's factors",
        ),
        (
            dict(factor_source="first_moment", preconditioner="diagonal"),
            "factor_source='first_moment' changes root-inverse",
        ),
        (dict(factor_source="first_moment", betas=(0.0, 1.0)), r"takes betas\[0\] > 0"),
        (dict(newton_schulz="polar_express"), "takes preconditioner='spectral'"),
        (
            dict(preconditioner="spectral", newton_schulz="polar_express", newton_schulz_steps=6),
            "schedule of 5 steps",
        ),
    ],
)
def test_estimator_options_that_do_not_go_together_are_refused(options, message):
    p = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        ShardedShampoo([p], **options)


def test_merge_dims_default_keeps_spectral_blocks_matrices():
    """'default' merge_dims resolves per group: True for Shampoo, False for spectral."""
    a, b = torch.zeros(6, 4, requires_grad=True), torch.zeros(6, 4, requires_grad=True)
    opt = ShardedShampoo([{"params": [a]}, {"params": [b], "preconditioner": "spectral"}])
    assert [g["merge_dims"] for g in opt.param_groups] == [True, False]
    assert opt.defaults["merge_dims"] == "default"


def test_exponent_override_keys_come_back_from_a_checkpoint_as_strings():
    """DCP saves a param group's dict keys as strings: "2" is the order 2."""
    p = torch.zeros(3, 4, requires_grad=True)
    opt = ShardedShampoo([p], inverse_exponent_override={"2": 0.5, 1: 0.25})
    assert opt.param_groups[0]["inverse_exponent_override"] == {2: 0.5, 1: 0.25}
    with pytest.raises(ValueError, match="tensor orders"):
        ShardedShampoo([p], inverse_exponent_override={"two": 0.5})


# Values no option of one kind takes, run against every option of the table (and the options
# of the whole optimizer): each either raises ValueError naming the option, or is one the
# option documents (ACCEPTED, by label).
COMMON = {
    "True": True,
    "False": False,
    "np.bool_": "numpy.bool_(True)",
    "None": None,
    "-1": -1,
    "0": 0,
    "2": 2,
    "np.int64(3)": "numpy.int64(3)",
    "1.5": 1.5,
    "nan": float("nan"),
    "inf": float("inf"),
    "-0.5": -0.5,
    "tensor(2)": torch.tensor(2),
    "tensor([1, 2])": torch.tensor([1, 2]),
    "'nonsense'": "nonsense",
    "''": "",
    "[1]": [1],
    "{}": {},
    "object()": object(),
    "int8": torch.int8,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float16": torch.float16,
    "float64": torch.float64,
}
NUMBERS = {"0", "2", "np.int64(3)", "1.5", "tensor(2)"}
COUNTS = {"2", "np.int64(3)"}
FLAGS = {"True", "False"}
ACCEPTED = {
    "lr": NUMBERS,
    "epsilon": NUMBERS - {"0"},  # 0 only with pseudo_inverse
    "weight_decay": NUMBERS,
    "grafting_epsilon": NUMBERS - {"0"},
    "rank_atol": {"0"},  # any other value only with pseudo_inverse
    "momentum": {"0"},
    "dampening": {"0"},
    "grafting_beta2": {"0"},
    "eigenbasis_tolerance": {"0"},
    "refresh_delay": {"0"} | COUNTS,
    "rank_rtol": {"None"},
    "start_preconditioning_step": {"None"} | COUNTS,
    "newton_iterations": {"None"} | COUNTS,
    "max_factor_ratio": {"None"} | COUNTS,
    "max_preconditioner_dim": COUNTS,
    "precondition_frequency": COUNTS,
    "max_consecutive_root_failures": COUNTS,
    "qr_iterations": COUNTS,
    "decoupled_weight_decay": FLAGS,
    "merge_dims": FLAGS,
    "use_bias_correction": FLAGS,
    "stagger_roots": FLAGS,
    "symmetric_packing": FLAGS,
    "pseudo_inverse": {"False"},  # True only with epsilon 0
    "nesterov": {"False"},  # True only with momentum
    "kl_shampoo": FLAGS,
    "first_moment_nesterov": FLAGS,
    "grafting": {"None"},
    "inverse_exponent_override": {"None", "{}"},
    "factor_dtype": {"float16", "float64"},
    "root_dtype": {"None", "int8", "float16", "float64"},  # int8: 8-bit quantized
    "grafting_dtype": {"None", "float64"},
    "first_moment_dtype": {"None", "float64"},
    "exchange_buckets": COUNTS,
    "num_trainers_per_group": {"None"},  # 2 and 3 do not divide a world of 1
    "communication_dtype": {"float16", "float64"},
}
WHOLE_OPTIMIZER = ("exchange_buckets", "num_trainers_per_group", "communication_dtype")


def _common_value(label):
    value = COMMON[label]
    if isinstance(value, str) and value.startswith("numpy."):
        np = pytest.importorskip("numpy")
        return eval(value, {"numpy": np})  # the NumPy scalar named
    return value


@pytest.mark.parametrize("name", [o.name for o in OPTIONS] + list(WHOLE_OPTIMIZER))
def test_every_option_against_a_common_list_of_bad_values(name):
    """No option takes a value of the wrong kind silently: bools for numbers, integer, complex
    or float8 dtypes for state dtypes, tensors for counts (was: int8 averages accepted)."""
    p = torch.zeros(6, 4, requires_grad=True)
    accepted = set()
    for label in COMMON:
        value = _common_value(label)
        try:
            ShardedShampoo([p], **{name: value})
        except ValueError as e:
            assert name in str(e), f"{name}={label}: {e}"
        else:
            accepted.add(label)
    assert accepted == ACCEPTED.get(name, set()), name


def test_integer_options_store_python_ints():
    """exchange_buckets takes a NumPy integer as the group options do; max_factor_ratio given
    as a NumPy integer is held as an int."""
    import numpy as np

    p = torch.zeros(6, 4, requires_grad=True)
    opt = ShardedShampoo([p], exchange_buckets=np.int64(2), max_factor_ratio=np.int64(4))
    assert opt.param_groups[0]["max_factor_ratio"] == 4
    assert type(opt.param_groups[0]["max_factor_ratio"]) is int
