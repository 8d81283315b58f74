"""Inverse roots by the coupled Newton iteration (``newton_iterations``) against eigh, float64.

The root is of ``A + s I``, ``s = max(epsilon, d u ||A||_F)`` (``u``: the work dtype's rounding
unit): below that floor an eigenvalue is rounding, which the iteration cannot clamp. The bound
per condition number: after 30 iterations the relative error (Frobenius) against eigh's root
of the same shifted matrix is within ``cond x 1e-15`` for exponents 1/2 to 1/6 from a condition
number of 1e2 to 1e8 (measured: about cond x 1e-17 to 1e-18). A rank-deficient factor's range
gets eigh's root; its null space, under-converged by a fixed count, a root between the
starting scale and eigh's.
"""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.algorithm.roots import newton_inverse_roots


def spd(d, cond, seed=0):
    """A random SPD matrix with eigenvalues log-spaced from 1 to 1 / cond, and its basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    values = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d).double()
    return (q * values) @ q.T, q, values


def newton(a, p, iterations=30, epsilon=0.0):
    roots, ok = newton_inverse_roots(
        a.unsqueeze(0),
        scale=1.0,
        epsilon=epsilon,
        p=p,
        iterations=iterations,
        out_dtype=torch.float64,
    )
    assert bool(ok.all())
    return roots[0]


def floor(a):
    """The shift the iteration adds at least: d rounding units of ``||a||_F`` (float64)."""
    return a.shape[-1] * torch.finfo(a.dtype).eps * torch.linalg.matrix_norm(a).item()


@pytest.mark.parametrize("p", [2, 3, 4, 6])
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, 1e8])
def test_error_within_the_bound_per_condition_number(cond, p):
    a, q, values = spd(24, cond)
    exact = (q * (values + floor(a)).pow(-1.0 / p)) @ q.T
    err = torch.linalg.matrix_norm(newton(a, p) - exact) / torch.linalg.matrix_norm(exact)
    assert err <= cond * 1e-15, f"cond {cond:.0e}, p {p}: relative error {err:.2e}"


def test_too_few_iterations_leave_small_eigenvalues_underconverged():
    """A fixed count is a fixed precision: 10 iterations of cond 1e6 are far off, and the
    error shrinks with the count (so the count is the user's to choose)."""
    a, q, values = spd(24, 1e6)
    exact = (q * (values + floor(a)).pow(-0.25)) @ q.T
    errs = [
        (torch.linalg.matrix_norm(newton(a, 4, n) - exact) / torch.linalg.matrix_norm(exact))
        for n in (5, 10, 20)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[1] > 0.1 and errs[2] < 1e-9, errs


@pytest.mark.parametrize("p", [2, 4])
def test_rank_deficient_factor(p):
    """``G G^T + epsilon I`` of rank 4 in 16 dims: in the range, eigh's root; in the null space,
    between the starting scale ``z^(1/p)`` and eigh's ``epsilon^(-1/p)``."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    epsilon = 1e-8
    a = g @ g.T + epsilon * torch.eye(16, dtype=torch.float64)
    root = newton(g @ g.T, p, iterations=30, epsilon=epsilon)
    values, vectors = torch.linalg.eigh(a)
    exact = (vectors * values.pow(-1.0 / p)) @ vectors.T
    rng, null = vectors[:, -4:], vectors[:, :-4]
    in_range = rng.T @ root @ rng
    assert torch.allclose(in_range, rng.T @ exact @ rng, rtol=1e-10, atol=1e-10)
    assert (rng.T @ root @ null).abs().max() < 1e-8  # no mixing of range and null space
    null_values = torch.linalg.eigvalsh(null.T @ root @ null)
    z = (1 + p) / (2 * torch.linalg.matrix_norm(a))
    assert (null_values >= z ** (1 / p) * (1 - 1e-12)).all()
    # (rounding of G G^T, about 1e-15, moves eigenvalues of 1e-8 by 1e-7 relative)
    assert (null_values <= epsilon ** (-1 / p) * (1 + 1e-6)).all()


def test_batched_equals_one_by_one_and_non_finite_fails_alone():
    stack = torch.stack([spd(12, 1e4, seed)[0] for seed in range(3)])
    stack[1, 0, 0] = float("nan")
    roots, ok = newton_inverse_roots(
        stack, scale=0.5, epsilon=1e-6, p=4, iterations=25, out_dtype=torch.float32
    )
    assert ok.tolist() == [True, False, True]
    assert roots.dtype == torch.float32
    for j in (0, 2):
        one, _ = newton_inverse_roots(
            stack[j : j + 1], scale=0.5, epsilon=1e-6, p=4, iterations=25, out_dtype=torch.float32
        )
        assert torch.equal(one[0], roots[j])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(preconditioner="eigenvalue_corrected"), "preconditioner='shampoo'"),
        (dict(eigenbasis="qr"), "eigenbasis='eigh'"),
        (dict(inverse_exponent_override={2: 0.3}), r"inverse_exponent_override\[2\]=0.3"),
        (dict(newton_iterations=0), "newton_iterations must be an int in"),
        (dict(newton_iterations=True), "newton_iterations must be an int in"),
    ],
)
def test_what_the_newton_iteration_cannot_do_is_refused(options, message):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=message):
        ShardedShampoo([p], **{"newton_iterations": 20, **options})


def test_float32_rank_one_factor_with_a_tiny_epsilon_stays_finite():
    """A float32 factor of rank 1 and epsilon 1e-12, far below float32's rounding of the
    factor: unshifted, rounding-negative eigenvalues grew without bound (NaN after 24
    iterations, seen in training). With the floor the roots are finite, and along the
    gradient they are eigh's."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(128, 1, generator=gen)
    a = (g @ g.T).unsqueeze(0)
    for p in (2, 4):
        roots, ok = newton_inverse_roots(
            a, scale=1.0, epsilon=1e-12, p=p, iterations=30, out_dtype=torch.float32
        )
        assert bool(ok.all()) and torch.isfinite(roots).all()
        u = (g / g.norm()).double()
        along = (u.T @ roots[0].double() @ u).item()
        expected = g.norm().double().item() ** (-2.0 / p)
        assert abs(along - expected) <= 1e-3 * expected, (p, along, expected)
