"""Bad input in one process: a clear error before anything changes, or
the correct result; never a silently wrong one."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sharded_shampoo import NonFiniteGradientWarning, RootFailureWarning, ShardedShampoo

OPTS = dict(lr=0.05, max_preconditioner_dim=4, precondition_frequency=2, epsilon=1e-4)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def state_of(opt):
    return [
        v.clone()
        for g in opt.param_groups
        for p in g["params"]
        for _, v in sorted(opt.state[p].items())
    ]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- item 1


@pytest.mark.parametrize("kind", ["generator", "filter"])
def test_an_iterator_inside_a_param_group_trains_like_a_list(kind):
    reference, model = make_model(), make_model()
    ref_opt = ShardedShampoo([{"params": list(reference.parameters())}], **OPTS)
    params = (
        model.parameters() if kind == "generator" else filter(lambda p: True, model.parameters())
    )
    opt = ShardedShampoo([{"params": params}], **OPTS)
    assert len(opt.param_groups[0]["params"]) == 4
    start = params_of(model)
    train(reference, ref_opt, 3)
    train(model, opt, 3)
    assert not same(params_of(model), start)
    assert same(params_of(model), params_of(reference))


def test_a_tensor_as_params_is_refused_as_torch_does():
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        ShardedShampoo(torch.zeros(3, requires_grad=True))


# ---------------------------------------------------------------- item 5: steps per group


def test_groups_saved_at_different_steps_do_not_load_into_one_group():
    """A flattened state dict gives a group the options of its first parameter only: the step
    of each parameter decides, and parameters saved at 9 and 3 cannot share a group."""
    model = make_model()
    first, last = model[0], model[2]
    opt = ShardedShampoo([{"params": first.parameters()}, {"params": last.parameters()}], **OPTS)
    gen = torch.Generator().manual_seed(0)
    for step in range(9):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen)).sum().backward()
        if step % 3:
            for p in last.parameters():
                p.grad = None
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [9, 3]
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=options)

    other = ShardedShampoo(model.parameters(), **OPTS)
    train(model, other, 1)
    before_params, before_state = params_of(model), state_of(other)
    with pytest.raises(ValueError, match=r"saved at different steps \[3, 9\]"):
        set_optimizer_state_dict(model, other, saved, options=options)
    assert same(params_of(model), before_params) and same(state_of(other), before_state)
    assert other.param_groups[0]["step"] == 1


def test_state_dict_is_a_copy_except_while_saving():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 2)
    before = state_of(opt)
    sd = opt.state_dict()
    for s in sd["state"].values():
        for v in s.values():
            v.fill_(7)  # what dcp.load does to the tensors it is given
    assert same(state_of(opt), before)
    with opt.saving():
        views = opt.state_dict()
    key = next(k for k in views["state"][0] if k.endswith("factor_0"))
    assert views["state"][0][key].data_ptr() == opt.state[model[0].weight][key].data_ptr()
    assert opt.state_dict()["state"][0][key].data_ptr() != views["state"][0][key].data_ptr()


# ---------------------------------------------------------------- item 6


def test_an_int_option_too_large_is_named_and_leaves_no_half_added_group():
    model = make_model()
    with pytest.raises(
        ValueError, match=r"max_preconditioner_dim must be an int in \[1, 2\*\*63 - 1\], got 10{30}"
    ):
        ShardedShampoo(model.parameters(), max_preconditioner_dim=10**30)
    opt = ShardedShampoo(model[0].parameters(), **OPTS)
    train(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="param group 1: max_preconditioner_dim"):
        opt.add_param_group({"params": model[2].parameters(), "max_preconditioner_dim": 10**30})
    assert len(opt.param_groups) == 1 and len(opt.state) == 2
    opt.load_state_dict(sd)  # the state dict still fits
    train(model, opt, 1)
    # And a good group can be added afterwards.
    opt.add_param_group({"params": model[2].parameters()})
    train(model, opt, 1)
    assert opt.param_groups[1]["step"] == 1


def test_an_lr_that_overflows_the_parameter_dtype_is_refused_before_the_step():
    model = make_model()
    with pytest.raises(ValueError, match=r"lr=1e\+300 overflows torch.float32"):
        ShardedShampoo(model.parameters(), lr=1e300)
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 2)
    opt.param_groups[0]["lr"] = 1e300  # as a runaway scheduler would
    before_params, before_state = params_of(model), state_of(opt)
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(ValueError, match=r"param group 0: lr=1e\+300 overflows torch.float32"):
        opt.step()
    assert same(params_of(model), before_params) and same(state_of(opt), before_state)
    half = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="lr=100000.0 overflows torch.float16"):
        ShardedShampoo([half], lr=1e5)


def test_an_epsilon_that_vanishes_is_refused_and_roots_that_overflow_are_not_used():
    with pytest.raises(ValueError, match=r"epsilon=1e-160 rounds to 0 in torch.float32"):
        ShardedShampoo(make_model().parameters(), epsilon=1e-160)
    # float64 factors hold 1e-160, but the roots (up to 1e40) do not fit the float32
    # parameters: those roots count as failed instead of turning the parameters into NaN.
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = ShardedShampoo(
        [w],
        lr=0.1,
        epsilon=1e-160,
        factor_dtype=torch.float64,
        max_preconditioner_dim=4,
        precondition_frequency=1,
        max_consecutive_root_failures=2,
    )
    failures = 0
    for _ in range(4):
        w.grad = torch.ones(4, 4)  # rank 1: a zero eigenvalue, whose root is 1e40
        before = w.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step()
            except RuntimeError as e:
                assert "epsilon is too small" in str(e)
                assert torch.equal(w.detach(), before)
                break
        failures += sum(issubclass(c.category, RootFailureWarning) for c in caught)
        assert torch.isfinite(w).all()
    else:
        pytest.fail("repeated root failures did not raise")
    assert failures >= 1


def test_a_tensor_twice_in_a_group_is_refused():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter params\[1\] \(3,\) appears more than once"):
        ShardedShampoo([w, w])
    model = make_model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="parameter '0.bias' .* appears more than once"):
        ShardedShampoo(named + [named[1]])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        ShardedShampoo([{"params": [w]}, {"params": [w]}])


def test_a_huge_but_finite_gradient_is_said_to_overflow():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = ShardedShampoo([w, b], **OPTS)
    w.grad, b.grad = torch.full((4, 4), 1e20), torch.ones(4)
    before = w.detach().clone()
    with pytest.warns(
        NonFiniteGradientWarning,
        match=r"an infinite gradient, or one too large for its squared norm in torch.float32",
    ):
        opt.step()
    assert torch.equal(w.detach(), before)  # skipped
    assert not torch.equal(b.detach(), torch.ones(4))  # the other block stepped
    w.grad = torch.full((4, 4), float("nan"))
    with pytest.warns(NonFiniteGradientWarning, match=r"a non-finite gradient \(NaN or Inf\)"):
        opt.step()


def _step_with_nan(opt, w):
    w.grad = torch.full_like(w, float("nan"))
    opt.step()


def test_warnings_do_not_grow_the_registry_step_after_step():
    """The step is an attribute of the warning, not part of its text: Python's registry keeps
    one entry per text, so it stays at one entry per block however many steps fail."""
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = ShardedShampoo([w], **OPTS)
    registry = globals().setdefault("__warningregistry__", {})
    registry.clear()
    caught = []
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *a, **k: caught.append(message)
        for _ in range(10):
            _step_with_nan(opt, w)
    entries = [k for k in registry if isinstance(k, tuple)]
    assert len(entries) == 1, entries
    assert len(caught) == 1 and caught[0].step == 1


# ---------------------------------------------------------------- item 7


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_is_a_working_optimizer(how):
    model = make_model()
    opt = ShardedShampoo(model.named_parameters(), **OPTS)
    train(model, opt, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    assert opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    train(model, opt, 3, seed=1)
    train(model2, opt2, 3, seed=1)
    assert same(params_of(model2), params_of(model))
    assert same(state_of(opt2), state_of(opt))


def test_unknown_group_keys_are_refused_and_framework_hints_tolerated():
    model = make_model()
    with pytest.raises(ValueError, match="unknown option 'eps' \\(did you mean 'epsilon'\\?\\)"):
        ShardedShampoo([{"params": model.parameters(), "eps": 1e-8}])
    with pytest.raises(
        ValueError, match="unknown option 'weight_decy' \\(did you mean 'weight_decay'\\?\\)"
    ):
        ShardedShampoo(model.parameters(), **OPTS).add_param_group(
            {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decy": 0.1}
        )
    # Every keyword-only argument of the constructor is an option of the whole optimizer.
    whole = [
        name
        for name, p in inspect.signature(ShardedShampoo).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert {"mesh", "communication_dtype", "num_trainers_per_group", "exchange_buckets"} <= set(
        whole
    )
    for name in whole:
        with pytest.raises(ValueError, match=f"{name} is an option of the whole optimizer"):
            ShardedShampoo([{"params": model.parameters(), name: None}])
    # torchtitan's hints, and what LR schedulers add, are accepted (and mean nothing here).
    opt = ShardedShampoo(
        [{"params": model.parameters(), "fused": False, "foreach": True, "initial_lr": 0.1}], **OPTS
    )
    train(model, opt, 1)


def test_sparse_gradients_are_refused_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ShardedShampoo(emb.named_parameters(), **OPTS)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradients \(weight \(10, 4\)\)"):
        opt.step()
    assert torch.equal(emb.weight, before)
    assert opt.param_groups[0]["step"] == 0


def test_parameters_on_two_devices_are_refused():
    """One device per optimizer (its buffers, masks and status live there)."""
    cpu = torch.nn.Parameter(torch.ones(2, 2))
    other = torch.nn.Parameter(torch.ones(2, 2, device="meta"))
    with pytest.raises(
        ValueError, match=r"all parameters must be on one device: this group has \['meta'\]"
    ):
        ShardedShampoo([{"params": [cpu]}, {"params": [other]}])
    opt = ShardedShampoo([cpu])
    with pytest.raises(ValueError, match="the optimizer's are on cpu"):
        opt.add_param_group({"params": [other]})
    assert len(opt.param_groups) == 1


def test_a_process_group_without_a_backend_for_the_parameters_device_is_refused(monkeypatch):
    """FSDP2's CPU offload keeps parameters on the CPU: a group started with "nccl" alone
    cannot move them, and the error says how to start one that can."""
    import torch.distributed as dist

    from sharded_shampoo.topology import check_backend

    class NcclOnly:
        _device_types = [torch.device("cuda")]

    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: NcclOnly())
    with pytest.raises(
        ValueError, match=r'parameters are on cpu .*init_process_group\("cuda:nccl,cpu:gloo"\)'
    ):
        check_backend(torch.device("cpu"))
    check_backend(torch.device("cuda"))  # the group has a backend for it
