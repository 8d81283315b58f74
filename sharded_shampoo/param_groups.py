"""Param groups for a model: Shampoo for the hidden matrices, a diagonal preconditioner for the
rest, as Muon's documentation splits a model (and the optimizer tracks' Shampoo entries do):
embeddings, the output head, biases and norms' gains are not preconditioned with matrices."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["hidden_matrix_groups"]


def _last_linear(model: torch.nn.Module) -> tuple[str, ...]:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return tuple(names[-1:])


def hidden_matrix_groups(
    model: torch.nn.Module,
    *,
    hidden: Mapping[str, Any] | None = None,
    other: Mapping[str, Any] | None = None,
    head: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Two param groups of ``model``'s trainable parameters, each listed once:

    - the hidden matrices: parameters of two dims or more, except embeddings' (modules of
      ``torch.nn.Embedding`` or ``EmbeddingBag``) and the head's, with the options ``hidden``;
    - the rest, ``preconditioner="diagonal"`` (Adam unless ``other`` says otherwise) and the
      options ``other``, e.g. their own ``lr`` and ``weight_decay``.

    ``head``: the names of the output modules (``model.named_modules()``); by default the last
    ``torch.nn.Linear`` registered. ``exclude``: names of more parameters for the rest
    (``model.named_parameters()``), such as a positional embedding held as a bare parameter.
    A name the model does not have raises ValueError. Parameters shared between modules (tied
    embeddings) are listed once.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    head = _last_linear(model) if head is None else tuple(head)
    for name in head:
        if name not in modules:
            raise ValueError(f"head: model has no module {name!r}")
    for name in exclude:
        if name not in params:
            raise ValueError(f"exclude: model has no parameter {name!r}")
    excluded = {id(params[name]) for name in exclude}
    for name, module in modules.items():
        if name in head or isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            excluded.update(id(p) for p in module.parameters())
    matrices, rest = [], []
    for p in model.parameters():  # each parameter once, tied ones included
        if not p.requires_grad:
            continue
        (matrices if p.dim() >= 2 and id(p) not in excluded else rest).append(p)
    return [
        {"params": matrices, **(hidden or {})},
        {"params": rest, "preconditioner": "diagonal", **(other or {})},
    ]
