"""Workloads for the demo and the benchmarks: nothing is downloaded.

The language model reads the Python standard library's own source files as bytes (every machine
with Python has them), split into train and validation by file.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def stdlib_text(max_bytes: int = 8_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's .py files: (train, validation), split by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            data = fh.read()
        (val if i % 10 == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    return as_tensor(train), as_tensor(val)


def lm_batch(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    context: int = 128
    width: int = 256
    layers: int = 4
    heads: int = 4


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)
        self.heads = cfg.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A byte-level pre-LN transformer."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.layers) if "out." in name else 1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    width: int = 256
    layers: int = 4
    heads: int = 4
    hidden: int = 768  # SwiGLU: about 8/3 of the width, as Llama's


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.width // cfg.heads
        self.wq, self.wk, self.wv, self.wo = (
            nn.Linear(cfg.width, cfg.width, bias=False) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds heads / tp of them.
        q, k, v = (
            w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.width, bias=False)
        self.w3 = nn.Linear(cfg.width, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.width)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.width)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """A Llama-style transformer (RMSNorm, SwiGLU, untied embedding; no rotary embedding, which
    has no parameters), with torchtitan's module names so that its tensor-parallel plan
    (``llama_tp_plan``) applies as it is."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width)
        self.output = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def llama_tp_plan() -> tuple[dict, dict]:
    """torchtitan's tensor-parallel plan for Llama, (top level, per block): sequence-parallel
    norms; column-wise q/k/v/w1/w3 and output; row-wise wo, w2 and the embedding."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    to_replicated = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    block = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(**to_replicated),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(**to_replicated),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    return top, block


def parallelize_llama(model: Llama, tp_mesh, dp_mesh=None) -> Llama:
    """Tensor parallel over ``tp_mesh`` (torchtitan's plan), then FSDP2 (or HSDP, with a 2-D
    ``dp_mesh``) over ``dp_mesh`` per block and at the root, as torchtitan does."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    top, block = llama_tp_plan()
    parallelize_module(model, tp_mesh, top)
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, block)
    if dp_mesh is not None:
        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
