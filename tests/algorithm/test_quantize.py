"""8-bit quantized roots and eigenvectors (root_dtype="int8"): bounded error, rectified
eigenvectors, and an optimizer that stays near its float32 self."""

from __future__ import annotations

import torch

from sharded_shampoo.algorithm.quantize import GROUP, dequantize, quantize


def test_each_entry_is_within_half_a_step_of_its_run():
    """Per run of 64 entries (flattened, last run short), every entry is off by at most half
    of the run's largest magnitude / 127."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 130, generator=gen) * torch.logspace(-3, 3, 130)
    codes, scales = quantize(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.shape == (3, 3)  # 130 entries: runs of 64, 64, 2
    back = dequantize(codes, scales, torch.float32)
    for n in range(3):
        for r, start in enumerate(range(0, 130, GROUP)):
            run = x[n, start : start + GROUP]
            step = run.abs().max() / 127
            assert (back[n, start : start + GROUP] - run).abs().max() <= step / 2 + 1e-7
            assert torch.isclose(scales[n, r], step)


def test_rectification_brings_eigenvectors_back_toward_orthogonality():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 96, 96, generator=gen, dtype=torch.float64))
    codes, scales = quantize(q)
    raw = dequantize(codes, scales, torch.float64)
    fixed = dequantize(codes, scales, torch.float64, rectify=True)
    eye = torch.eye(96, dtype=torch.float64)
    before = torch.linalg.matrix_norm(raw.mT @ raw - eye).max()
    after = torch.linalg.matrix_norm(fixed.mT @ fixed - eye).max()
    assert after < 0.2 * before, (before, after)


def test_zero_runs_and_the_identity_survive():
    codes, scales = quantize(torch.zeros(2, 70))
    assert torch.equal(dequantize(codes, scales, torch.float32), torch.zeros(2, 70))
    eye = torch.eye(40).expand(2, 40, 40)
    codes, scales = quantize(eye)
    assert torch.equal(dequantize(codes, scales, torch.float32), eye)
