"""Null spaces of rank-deficient factors, float64: the canonical basis of a cluster of smallest
eigenvalues depends on its span alone, and warm QR roots need no eigh for such factors."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from sharded_shampoo.algorithm import eigenbasis
from sharded_shampoo.algorithm.eigenbasis import canonical_ties, warm_roots
from sharded_shampoo.options import OPTION_DEFAULTS, GroupOptions


def factor(m: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    return g @ g.T / rank


def random_orthogonal(k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]


def test_canonical_basis_depends_on_the_span_alone():
    gen = torch.Generator().manual_seed(0)
    m, ranks = 12, (4, 12, 9, 1)  # the full-rank one has no cluster: left as it is
    a = torch.stack([factor(m, r, gen) for r in ranks])
    values, q = torch.linalg.eigh(a)
    # Another basis of each null space, as another LAPACK call (or stack position) might give.
    rotated = q.clone()
    for j, r in enumerate(ranks):
        k = m - r
        if k > 1:
            rotated[j, :, :k] = q[j, :, :k] @ random_orthogonal(k, gen)
    one, two = canonical_ties(values, q), canonical_ties(values, rotated)
    assert torch.allclose(one, two, atol=1e-12, rtol=0)
    eye = torch.eye(m, dtype=torch.float64)
    for j, r in enumerate(ranks):
        k = m - r if r < m else 0
        assert torch.allclose(one[j].T @ one[j], eye, atol=1e-13, rtol=0)  # orthonormal
        assert torch.equal(one[j, :, k:], q[j, :, k:])  # the range's columns as computed
        if k > 1:  # the same span as LAPACK's null space
            proj = q[j, :, :k] @ q[j, :, :k].T
            assert torch.allclose(proj @ one[j, :, :k], one[j, :, :k], atol=1e-12, rtol=0)
        else:
            assert torch.equal(one[j], q[j])


def test_warm_roots_of_rank_deficient_factors_match_eigh_and_ignore_the_null_basis(monkeypatch):
    """A factor of rank 3 of 10 that does not change: from eigh's basis, one warm QR step
    gives eigh's root; another basis of the null space gives the same root and keeps the
    range's columns, with no eigh call."""
    gen = torch.Generator().manual_seed(1)
    m, eps = 10, 1e-6
    a = torch.stack([factor(m, 3, gen), factor(m, 1, gen)])
    opts = GroupOptions.from_group({**OPTION_DEFAULTS, "eigenbasis": "qr", "epsilon": eps})
    values, q = torch.linalg.eigh(a)
    w = (values.clamp_min(0) + eps).pow(-0.25)
    expected = (q * w.unsqueeze(-2)) @ q.mT
    rotated = q.clone()
    for j, r in enumerate((3, 1)):
        rotated[j, :, : m - r] = q[j, :, : m - r] @ random_orthogonal(m - r, gen)

    def no_eigh(_):
        raise AssertionError("a warm refresh called eigh")

    monkeypatch.setattr(eigenbasis, "eigh", no_eigh)
    roots = []
    for basis in (q, rotated):
        state = TensorDict(
            {"factor_0": a, "eigenvectors_0": basis.flip(-1).contiguous()}, batch_size=[2]
        )
        new, ok = warm_roots(state, opts, 2, 1.0, 0.25, (0,))  # step 2: warm
        assert bool(ok.all())
        roots.append(new["root_0"])
    # The null space's estimated eigenvalues are rounding (~1e-16 ||A||), so its weights
    # differ from eigh's by about exponent x 1e-16 ||A|| / epsilon: 1e-10 here.
    scale = expected.abs().amax()
    assert torch.allclose(roots[0], expected, atol=1e-9 * scale, rtol=0)
    assert torch.allclose(roots[1], expected, atol=1e-9 * scale, rtol=0)
