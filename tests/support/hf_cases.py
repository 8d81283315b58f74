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


def trainer(out, path, fsdp=False, callback=True, steps=STEPS):
    """``path``: "optimizers" (a built optimizer and scheduler) or "cls" (optimizer_cls_and_kwargs,
    built by the Trainer after wrapping: the path HF requires under FSDP)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_gpt2()
    extra = {}
    if fsdp:
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
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
        second.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{SAVE}"))
    return {
        "losses": losses(first),
        "resumed": losses(second),
        "optimizer": type(second.optimizer).__name__,
        "files": sorted(os.listdir(os.path.join(out, f"checkpoint-{SAVE}"))),
    }


def save_without_callback(rank, world, root):
    """DDP without ``FullOptimizerStateCallback``, trained up to its first save: how each
    rank's ``train()`` ended, and what the checkpoint folder holds. Rank 0 raises in the save;
    rank 1, which does not save the optimizer, goes on alone (the group's last case)."""
    import warnings

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    out = os.path.join(root, "no-callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(out, "cls", callback=False, steps=SAVE)
        try:
            t.train()
            ended = "trained"
        except Exception as e:
            ended = f"{type(e).__name__}: {e}"
    folder = os.path.join(out, f"checkpoint-{SAVE}")
    return {"ended": ended, "files": sorted(os.listdir(folder)) if os.path.isdir(folder) else []}


def accelerate_save_state(rank, world, root):
    """Accelerate's own loop under DDP: ``save_state`` after SAVE steps (every rank calls the
    optimizer's ``state_dict()``, the main process writes it), a new Accelerator that
    ``load_state``s it and trains the rest: both runs' losses, and the blocks in the file."""
    from accelerate import Accelerator

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    folder = os.path.join(root, "accelerate")
    data = Tokens()

    def run(start, stop, load=False):
        accelerator = Accelerator(cpu=DEVICE_TYPE == "cpu")
        model = tiny_gpt2()
        opt = ShardedShampoo(model.named_parameters(), **OPTIONS)
        model, opt = accelerator.prepare(model, opt)
        if load:
            accelerator.load_state(folder)
        losses = []
        for step in range(start, stop):
            batch = data[[(step * world + rank) % len(data)]]
            opt.zero_grad()
            loss = model(**batch).loss
            accelerator.backward(loss)
            opt.step()
            losses.append(loss.item())
            if step + 1 == SAVE and not load:
                accelerator.save_state(folder)
        return losses

    whole = run(0, STEPS)
    resumed = run(SAVE, STEPS, load=True)
    saved = torch.load(os.path.join(folder, "optimizer.bin"), weights_only=False)
    blocks = sum(1 for s in saved["state"].values() for k in s if k.startswith("blocks."))
    return {"whole": whole, "resumed": resumed, "blocks_saved": blocks}


def accelerate_blocks() -> int:
    """How many blocks the tiny GPT-2's optimizer state holds in one process."""
    model = tiny_gpt2()
    opt = ShardedShampoo(model.named_parameters(), **OPTIONS)
    return sum(1 for s in opt.state_dict()["state"].values() for k in s if k.startswith("blocks."))
