"""ShardedShampoo against the plain float64 reference of tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from reference import ReferenceShampoo

from sharded_shampoo import ShardedShampoo

# Shapes that exercise every case of blocking with max_preconditioner_dim = 8: a 0-d tensor,
# 1-d tensors below and above the limit, a 2-d tensor split along both dims, size-1 dims,
# 3-d and 4-d (convolution) tensors, and one whose merged dims stay separate.
SHAPES = [(), (5,), (19,), (10, 12), (1, 6), (2, 3, 5), (4, 3, 3, 3), (3, 1, 4), (9, 2, 2)]
STEPS = 24


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def gradients(params, step, seed, skip):
    """Deterministic gradients; parameter i gets none on steps where (step + i) % skip == 0."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        out.append(None if skip and (step + i) % skip == 0 else g)
    return out


def run_pair(group_options, dtype=torch.float64, steps=STEPS, skip=0, seed=0):
    """Runs ShardedShampoo and the reference on the same gradients; yields both per step."""
    params = make_params(dtype, seed)
    # Split the parameters into as many groups as options were given.
    n = len(group_options)
    groups = [{"params": params[i::n], **opts} for i, opts in enumerate(group_options)]
    opt = ShardedShampoo(groups)
    ref = ReferenceShampoo(groups, phases_of(opt))
    for step in range(steps):
        per_group = []
        for g in groups:
            grads = gradients(g["params"], step, seed + len(per_group), skip)
            for p, gr in zip(g["params"], grads, strict=True):
                p.grad = gr
            per_group.append(grads)
        opt.step()
        ref.step(per_group)
        yield step, groups, ref


def phases_of(opt):
    """{(group, param, block): phase} of the staggered groups, as the plan gave them."""
    return {
        (gi, pi, bid): phase
        for gi, g in enumerate(opt.plan.groups)
        if g.phases is not None
        for pi, row in enumerate(g.phases)
        for bid, phase in enumerate(row)
    }


def max_rel_err(groups, ref):
    worst = 0.0
    for g, rg in zip(groups, ref.groups, strict=True):
        for p, rp in zip(g["params"], rg["params"], strict=True):
            err = (p.detach().double() - rp).abs().max().item()
            worst = max(worst, err / max(rp.abs().max().item(), 1e-12))
    return worst


BASE = dict(lr=0.05, epsilon=1e-4, max_preconditioner_dim=8, precondition_frequency=5)

CONFIGS = {
    "adam": dict(grafting="adam", betas=(0.9, 0.99)),
    "adagrad": dict(grafting="adagrad", betas=(0.0, 1.0)),
    "rmsprop": dict(grafting="rmsprop", betas=(0.9, 1.0), grafting_beta2=0.9),
    "sgd": dict(grafting="sgd", betas=(0.5, 0.95)),
    "none": dict(grafting=None, betas=(0.0, 0.99), epsilon=1e-2),
    "l2_wd_no_bias_correction": dict(
        weight_decay=0.1, decoupled_weight_decay=False, use_bias_correction=False
    ),
    "decoupled_wd_momentum": dict(weight_decay=0.1, momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.8, nesterov=True, betas=(0.0, 0.999)),
    "no_merge_dims": dict(merge_dims=False, start_preconditioning_step=3),
    "override_and_early_start": dict(
        inverse_exponent_override={1: 0.5, 2: 0.5}, start_preconditioning_step=1
    ),
    "large_blocks": dict(max_preconditioner_dim=64),
    # Staggered roots: 24 steps are almost 5 periods of 5 (every block's roots at the start,
    # then each in its phase), with a late start and without grafting too.
    "staggered": dict(stagger_roots=True),
    "staggered_late_start": dict(stagger_roots=True, start_preconditioning_step=7),
    "staggered_no_grafting": dict(stagger_roots=True, grafting=None, epsilon=1e-2),
    # Eigenvalue-corrected Shampoo: eigh and warm-started QR eigenbases, without grafting (its
    # default: used from step 1) and with it, betas[1] = 1 without bias correction, both kinds
    # of weight decay, staggered refreshes; in the reference implementation's conventions
    # (the default), with its tolerance, and in the SOAP paper's.
    "ec_eigh": dict(preconditioner="eigenvalue_corrected", betas=(0.9, 0.99)),
    "ec_qr": dict(preconditioner="eigenvalue_corrected", eigenbasis="qr", qr_iterations=2),
    "ec_qr_one_iteration": dict(preconditioner="eigenvalue_corrected", eigenbasis="qr"),
    "ec_grafting": dict(preconditioner="eigenvalue_corrected", grafting="adam"),
    "ec_sum_no_bias_correction": dict(
        preconditioner="eigenvalue_corrected",
        betas=(0.5, 1.0),
        use_bias_correction=False,
        eigenbasis="qr",
    ),
    "ec_l2_weight_decay": dict(
        preconditioner="eigenvalue_corrected", weight_decay=0.1, decoupled_weight_decay=False
    ),
    "ec_decoupled_wd_nesterov": dict(
        preconditioner="eigenvalue_corrected", weight_decay=0.1, momentum=0.8, nesterov=True
    ),
    "ec_staggered": dict(
        preconditioner="eigenvalue_corrected", eigenbasis="qr", stagger_roots=True
    ),
    "ec_eigh_tolerance": dict(preconditioner="eigenvalue_corrected", eigenbasis_tolerance=0.3),
    "ec_qr_tolerance": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis="qr",
        qr_iterations=4,
        eigenbasis_tolerance=0.05,
    ),
    "ec_soap_eigh": dict(
        preconditioner="eigenvalue_corrected", eigenbasis_convention="soap", betas=(0.9, 0.99)
    ),
    "ec_soap_qr": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis_convention="soap",
        eigenbasis="qr",
        qr_iterations=2,
    ),
    "ec_soap_staggered_grafting": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis_convention="soap",
        eigenbasis="qr",
        stagger_roots=True,
        grafting="adam",
    ),
    # Factors only where they hold at most 2x the block's elements: 1-D blocks of 3 or more
    # and lopsided blocks' long sides go without (one-sided), blocks with none take the
    # grafting direction; with and without grafting, eigenvalue-corrected too; and full
    # matrices instead of packed ones.
    "factor_ratio": dict(max_factor_ratio=2, betas=(0.9, 0.99)),
    "factor_ratio_no_grafting": dict(max_factor_ratio=2, grafting=None, epsilon=1e-2),
    "factor_ratio_staggered_momentum": dict(max_factor_ratio=1, stagger_roots=True, momentum=0.5),
    "ec_factor_ratio": dict(preconditioner="eigenvalue_corrected", max_factor_ratio=2),
    "ec_soap_factor_ratio": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis_convention="soap",
        eigenbasis="qr",
        max_factor_ratio=2,
    ),
    "unpacked": dict(symmetric_packing=False, betas=(0.9, 0.99)),
    "ec_unpacked": dict(preconditioner="eigenvalue_corrected", symmetric_packing=False),
    # Refreshes computed in the background from step t's factors and used from t + d: every
    # preconditioner and eigenbasis, staggered (the blocks whose phase comes within d steps of
    # the start skip it), started at step 1, one-sided blocks, a parameter without a gradient
    # at its install step (skip=7 below).
    "delayed": dict(refresh_delay=2, betas=(0.9, 0.99)),
    # Root-inverse Shampoo's roots from warm-started eigenbases (eigenbasis="qr"): one and two
    # iterations, every step, staggered, in the background, one-sided; from step 10, when the
    # factors (of blocks of up to 8) have full rank.
    "qr_roots": dict(eigenbasis="qr", betas=(0.9, 0.99), start_preconditioning_step=10),
    "qr_roots_every_step": dict(
        eigenbasis="qr", qr_iterations=2, precondition_frequency=1, start_preconditioning_step=10
    ),
    "qr_roots_staggered": dict(
        eigenbasis="qr", stagger_roots=True, momentum=0.5, start_preconditioning_step=10
    ),
    # Inverse roots by the coupled Newton iteration: every order's exponent (1/2 to 1/8),
    # overridden to 1/3 and 1/6, staggered, in the background.
    "newton": dict(newton_iterations=30, betas=(0.9, 0.99)),
    "newton_override": dict(newton_iterations=25, inverse_exponent_override={1: 1 / 3, 2: 1 / 6}),
    "newton_staggered_delayed": dict(newton_iterations=30, stagger_roots=True, refresh_delay=2),
    # From step 1, every step: rank-deficient factors take eigh's bases until they have full
    # rank.
    "qr_roots_rank_deficient": dict(
        eigenbasis="qr", precondition_frequency=1, start_preconditioning_step=1
    ),
    "qr_roots_delayed_factor_ratio": dict(
        eigenbasis="qr", refresh_delay=2, max_factor_ratio=2, start_preconditioning_step=10
    ),
    "delayed_staggered": dict(refresh_delay=3, stagger_roots=True),
    "delayed_early_start": dict(refresh_delay=1, start_preconditioning_step=1, grafting=None),
    "delayed_factor_ratio": dict(refresh_delay=4, max_factor_ratio=2, momentum=0.5),
    "ec_eigh_delayed": dict(preconditioner="eigenvalue_corrected", refresh_delay=2),
    "ec_qr_delayed_staggered_grafting": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis="qr",
        stagger_roots=True,
        grafting="adam",
        refresh_delay=2,
    ),
    # QR from the identity at the first refresh, as the reference implementation starts.
    "qr_roots_identity_start": dict(eigenbasis="qr", qr_start="identity", betas=(0.9, 0.99)),
    "ec_soap_qr_identity_start": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis_convention="soap",
        eigenbasis="qr",
        qr_start="identity",
    ),
    "ec_soap_qr_delayed": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis_convention="soap",
        eigenbasis="qr",
        refresh_delay=1,
    ),
}


# The estimators: pseudo-inverse roots (a relative cutoff well above float64's rounding: the
# package's factors and the reference's differ at rounding level, and a null eigenvalue on
# either side of a cutoff at rounding level changes its root by orders), KL-Shampoo, factors of
# the first moment, betas[1] = 0, fixed norms instead of grafting, the diagonal and spectral
# preconditioners.
CONFIGS.update(
    pseudo_inverse=dict(epsilon=0.0, pseudo_inverse=True, rank_rtol=1e-10, betas=(0.9, 0.99)),
    pseudo_inverse_qr_atol=dict(
        epsilon=0.0,
        pseudo_inverse=True,
        rank_rtol=1e-9,
        rank_atol=1e-8,
        eigenbasis="qr",
        # Full-rank factors: an unconverged QR column mixing range and null space has a small
        # estimate, whose pseudo-inverse power amplifies rounding.
        start_preconditioning_step=12,
    ),
    ec_pseudo_inverse=dict(
        preconditioner="eigenvalue_corrected", epsilon=0.0, pseudo_inverse=True, rank_rtol=1e-10
    ),
    kl=dict(kl_shampoo=True, betas=(0.9, 0.99)),
    kl_qr_staggered_delayed=dict(
        kl_shampoo=True, eigenbasis="qr", stagger_roots=True, refresh_delay=1
    ),
    first_moment_factors_nesterov=dict(
        factor_source="first_moment", first_moment_nesterov=True, betas=(0.9, 0.95)
    ),
    beta2_zero_every_step=dict(
        betas=(0.8, 0.0), precondition_frequency=1, start_preconditioning_step=1
    ),
    fixed_norm_third_exponent=dict(
        grafting="rms", inverse_exponent_override={2: 1 / 3}, betas=(0.9, 0.95)
    ),
    ec_nesterov_shape_norm=dict(
        preconditioner="eigenvalue_corrected", first_moment_nesterov=True, grafting="shape"
    ),
    diagonal_adam=dict(preconditioner="diagonal", betas=(0.9, 0.99), weight_decay=0.1),
    diagonal_rmsprop=dict(preconditioner="diagonal", grafting="rmsprop", momentum=0.5),
    spectral=dict(preconditioner="spectral", betas=(0.95, 1.0), first_moment_nesterov=True),
    spectral_polar_express_rms=dict(
        preconditioner="spectral",
        newton_schulz="polar_express",
        grafting="rms",
        weight_decay=0.1,
        betas=(0.9, 1.0),
    ),
    spectral_adam_norm=dict(preconditioner="spectral", grafting="adam", newton_schulz_steps=3),
)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_float64(name):
    opts = {**BASE, "factor_dtype": torch.float64, **CONFIGS[name]}
    for step, groups, ref in run_pair([opts], dtype=torch.float64, skip=7):
        err = max_rel_err(groups, ref)
        assert err < 1e-9, f"step {step}: relative error {err:.3e}"


def test_two_groups_with_different_options():
    a = {**BASE, "grafting": "adam", "momentum": 0.9, "betas": (0.9, 0.999)}
    b = {
        **BASE,
        "grafting": "adagrad",
        "max_preconditioner_dim": 4,
        "precondition_frequency": 3,
        "lr": 0.01,
        "weight_decay": 0.05,
    }
    a["factor_dtype"] = b["factor_dtype"] = torch.float64
    for step, groups, ref in run_pair([a, b], dtype=torch.float64, skip=5):
        err = max_rel_err(groups, ref)
        assert err < 1e-9, f"step {step}: relative error {err:.3e}"


@pytest.mark.parametrize("name", ["adam", "decoupled_wd_momentum", "no_merge_dims"])
def test_matches_reference_float32(name):
    # float32 roots of factors with condition numbers near 1/epsilon lose about
    # cond * 1e-7: with epsilon = 1e-4 the error reaches 7e-4, with 1e-2 it stays below 1e-5.
    opts = {**BASE, **CONFIGS[name], "epsilon": 1e-2}
    for step, groups, ref in run_pair([opts], dtype=torch.float32, skip=7):
        err = max_rel_err(groups, ref)
        assert err < 5e-5, f"step {step}: relative error {err:.3e}"


def test_group_step_counts_only_steps_with_gradients():
    """A group whose parameters get no gradient does not advance its step count."""
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    opt = ShardedShampoo([{"params": [p]}, {"params": [q]}], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.step()
    assert [g["step"] for g in opt.param_groups] == [2, 0]
    assert torch.equal(q, torch.zeros(3))


def test_parameter_without_gradient_is_untouched():
    p = torch.randn(6, 5, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    opt = ShardedShampoo([p, q], lr=0.1, weight_decay=0.1, momentum=0.9)
    p.grad = torch.randn(6, 5)
    q.grad = torch.randn(4)
    opt.step()
    q_before = q.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[q].items()}
    q.grad = None
    for _ in range(3):
        p.grad = torch.randn(6, 5)
        opt.step()
    assert torch.equal(q, q_before)
    for k, v in opt.state[q].items():
        if k != "step":  # the group's step count, shared by its parameters
            assert torch.equal(v, state_before[k]), k


def test_staggered_blocks_compute_roots_in_their_phase_only():
    """Every block gets its phase, the phases spread the blocks' eigendecompositions over the
    period, and a block's roots change exactly at the start and at the steps of its phase."""
    opts = {**BASE, "factor_dtype": torch.float64, "stagger_roots": True}
    params = make_params(torch.float64)
    opt = ShardedShampoo([{"params": params, **opts}])
    phases = phases_of(opt)
    f = opts["precondition_frequency"]
    assert len(set(phases.values())) == f  # 20 blocks over 5 phases: every phase used
    roots = {}
    for step in range(1, 13):
        for p, g in zip(params, gradients(params, step, 0, 0), strict=True):
            p.grad = g
        opt.step()
        for (_, pi, bid), phase in phases.items():
            state = opt.state[params[pi]]
            now = state[f"blocks.{bid}.root_0"].clone()
            before = roots.get((pi, bid))
            if before is not None:
                due = step == 5 or (step > 5 and step % f == phase)
                assert (not torch.equal(now, before)) == due, (step, pi, bid, phase)
            roots[(pi, bid)] = now


def test_eigenvalue_corrected_and_root_inverse_groups_together():
    """One group of each preconditioner in one optimizer, the second added later."""
    a = {
        **BASE,
        "factor_dtype": torch.float64,
        "preconditioner": "eigenvalue_corrected",
        "eigenbasis": "qr",
    }
    b = {**BASE, "factor_dtype": torch.float64, "grafting": "adagrad", "max_preconditioner_dim": 4}
    params = make_params(torch.float64)
    groups = [{"params": params[0::2], **a}, {"params": params[1::2], **b}]
    opt = ShardedShampoo([groups[0]])
    opt.add_param_group(groups[1])
    ref = ReferenceShampoo(groups)
    for step in range(STEPS):
        per_group = []
        for i, g in enumerate(groups):
            grads = gradients(g["params"], step, i, 7)
            for p, gr in zip(g["params"], grads, strict=True):
                p.grad = gr
            per_group.append(grads)
        opt.step()
        ref.step(per_group)
        err = max_rel_err(groups, ref)
        assert err < 1e-9, f"step {step}: relative error {err:.3e}"


@pytest.mark.parametrize(
    "extra", [{}, {"refresh_delay": 2}], ids=["synchronous", "refresh_in_flight"]
)
def test_a_hand_change_of_the_frequency_keeps_the_start(extra):
    """start_preconditioning_step=None resolves to the frequency once, when the group is
    built, as in the reference: raising the frequency from 4 to 9 at step 10 (a schedule or a
    callback) keeps preconditioning (was: the start followed the frequency every step, and the
    run went back to grafting until step 9's multiples, 18-32% off the reference). With a
    delay, the change lands while the refresh of step 8 is in flight."""
    opts = {**BASE, "factor_dtype": torch.float64, "precondition_frequency": 4, **extra}
    params = make_params(torch.float64)
    opt = ShardedShampoo(params, **opts)
    ref = ReferenceShampoo([{"params": params, **opts}])
    assert opt.state_dict()["param_groups"][0]["start_preconditioning_step"] == 4
    for step in range(20):
        if step == 9:
            opt.param_groups[0]["precondition_frequency"] = 9
            ref.groups[0]["opts"]["precondition_frequency"] = 9
        grads = gradients(params, step, 0, 0)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        ref.step([grads])
        err = max_rel_err([{"params": params}], ref)
        assert err < 1e-9, f"step {step}: relative error {err:.3e}"
