"""A small ConvNet, its batches and a plain training loop, for the one-process tests of
training and of state dicts."""

from __future__ import annotations

import io

import torch

OPTS = dict(
    lr=0.02,
    betas=(0.9, 0.99),
    momentum=0.5,
    weight_decay=0.01,
    max_preconditioner_dim=16,
    precondition_frequency=4,
    epsilon=1e-6,
)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 20),
        torch.nn.ReLU(),
        torch.nn.Linear(20, 3),
    )


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train(model, opt, steps, start=0):
    """``steps`` steps on the batches from ``start``; the losses."""
    losses = []
    for s in range(start, start + steps):
        x, y = batch(s)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
