"""Cases for test_hf.py: the Hugging Face Trainer with ShardedShampoo, a tiny GPT-2 whose input
and output embeddings are one parameter, built from a config (nothing downloaded)."""

from __future__ import annotations

import os

import torch
from harness import DEVICE_TYPE

from sharded_shampoo import ShardedShampoo

STEPS, SAVE = 6, 3
OPTIONS = dict(lr=0.01, precondition_frequency=2)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16, vocab=64):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter
    return model


def trainer(out, path, fsdp=False, callback=True):
    """``path``: "optimizers" (a built optimizer and scheduler) or "cls" (optimizer_cls_and_kwargs,
    built by the Trainer after wrapping: the path HF requires under FSDP)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_gpt2()
    extra = {}
    if fsdp:
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    args = TrainingArguments(
        output_dir=out,
        max_steps=STEPS,
        save_steps=SAVE,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=DEVICE_TYPE == "cpu",
        seed=0,
        lr_scheduler_type="linear",
        warmup_steps=2,
        disable_tqdm=True,
        **extra,
    )
    from sharded_shampoo.integrations.hf import FullOptimizerStateCallback

    kwargs = dict(
        model=model,
        args=args,
        train_dataset=Tokens(),
        callbacks=[FullOptimizerStateCallback()] if callback else [],
    )
    if path == "cls":
        kwargs["optimizer_cls_and_kwargs"] = (ShardedShampoo, OPTIONS)
    else:
        opt = ShardedShampoo(model.named_parameters(), **OPTIONS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
        kwargs["optimizers"] = (opt, sched)
    return Trainer(**kwargs)


def losses(t):
    return [h["loss"] for h in t.state.log_history if "loss" in h]


def train_and_resume(rank, world, root, path, fsdp=False, callback=True):
    """Trains STEPS steps (checkpoints every SAVE), then a new Trainer resumes from the first
    checkpoint: both runs' logged losses."""
    import warnings

    if world > 1:  # what torchrun would set: the Trainer (Accelerate) reads it
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
        )
    out = os.path.join(root, f"{path}{'-fsdp' if fsdp else ''}{world}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = trainer(out, path, fsdp, callback)
        first.train()
        second = trainer(out + "-resumed", path, fsdp, callback)
        try:
            second.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{SAVE}"))
        except ValueError as e:  # expected without the callback under DDP
            return {"error": str(e)}
    return {
        "losses": losses(first),
        "resumed": losses(second),
        "optimizer": type(second.optimizer).__name__,
        "files": sorted(os.listdir(os.path.join(out, f"checkpoint-{SAVE}"))),
    }
