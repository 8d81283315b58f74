"""A torchtitan job config for its own trainer (``torchtitan.train``): its Llama 3 debug model
with ShardedShampoo, a byte tokenizer and the Python standard library's source as data.

torchtitan finds this module by name (``--module titan_job --config shampoo_debugmodel``; the
tests' support folder must be on ``PYTHONPATH``); ``titan_train.py`` runs the trainer on CPUs.
Everything else (meshes, parallelisms, the model, its initialization, the optimizer container,
LR schedulers, gradient clipping, the checkpointer) is torchtitan's own; command-line flags
override the config as usual (``--parallelism.tensor_parallel_degree 2``, ...).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from sharded_shampoo.integrations.torchtitan import sharded_shampoo_config

# Enough source for the few steps a test runs, read in a fixed order.
SOURCE_FILES = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py")


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens (256 of the debug model's 2048), BOS 256 and EOS 257."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, *, tokenizer_path: str | None = None) -> None:
        super().__init__()
        self.bos_id, self.eos_id = 256, 257

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 258


class SourceWindows(IterableDataset):
    """Consecutive windows of ``seq_len`` tokens of the standard library's source, every
    ``dp_world_size``-th one from ``dp_rank``; its position is its state (resumable)."""

    def __init__(self, tokens: list[int], seq_len: int, dp_rank: int, dp_world_size: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.rank, self.ranks = dp_rank, dp_world_size
        self.index = 0

    def __iter__(self):
        count = (len(self.tokens) - 1) // self.seq_len
        while True:
            w = (self.index * self.ranks + self.rank) % count
            self.index += 1
            window = torch.tensor(self.tokens[w * self.seq_len : (w + 1) * self.seq_len + 1])
            # Positions as torchtitan's own loaders give them (its attention masks need them).
            yield {"input": window[:-1], "positions": torch.arange(self.seq_len)}, window[1:]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


class SourceDataLoader(ParallelAwareDataloader):
    """torchtitan's data-parallel, stateful loader over ``SourceWindows``."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        pass

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ) -> None:
        folder = sysconfig.get_paths()["stdlib"]
        text = "".join(open(os.path.join(folder, f), encoding="utf-8").read() for f in SOURCE_FILES)
        dataset = SourceWindows(
            tokenizer.encode(text, add_bos=False, add_eos=False),
            seq_len,
            dp_rank,
            dp_world_size,
        )
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=local_batch_size,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )


def shampoo_debugmodel():
    """torchtitan's ``llama3_debugmodel`` with ShardedShampoo instead of AdamW, causal SDPA
    attention, short windows, float32 throughout, a checkpoint every 5 steps, no validation."""
    config = llama3_debugmodel()
    # FlexAttention has no backward on CPUs. Each window is one piece of one document, so
    # its block-causal mask is the causal mask: torch's SDPA computes the same attention.
    for layer in config.model_spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config.optimizer = sharded_shampoo_config(
        lr=3e-3,
        betas=(0.9, 0.95),
        epsilon=1e-10,
        weight_decay=0.01,
        max_preconditioner_dim=256,
        precondition_frequency=2,
        start_preconditioning_step=2,
    )
    config.tokenizer = ByteTokenizer.Config()
    config.dataloader = SourceDataLoader.Config()
    config.validator.enable = False
    # torchtitan 0.3.0's default "spmd_types" backend needs a newer torch than 2.13: its FSDP
    # setup fails there before any optimizer is built (AdamW too). Its DTensor backends work.
    config.parallelism.spmd_backend = "partial_dtensor"
    config.training.seq_len = 64
    config.training.local_batch_size = 2
    config.training.mixed_precision_param = "float32"
    config.training.disable_cuda_graphs = True
    config.checkpoint.enable = True
    config.checkpoint.interval = 5
    config.checkpoint.folder = "checkpoint"
    return config
