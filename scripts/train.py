"""Train a small byte-level GPT on the Python standard library's source with ShardedShampoo and
AdamW, one process, and print how both fare.

    python scripts/train.py                 # both optimizers, defaults
    python scripts/train.py --optimizer shampoo --steps 300
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sharded_shampoo import ShardedShampoo
from workloads import GPT, GPTConfig, lm_batch, param_count, stdlib_text


def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=args.weight_decay)
    return ShardedShampoo(
        model.parameters(),
        lr=args.shampoo_lr,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        weight_decay=args.weight_decay,
        max_preconditioner_dim=args.max_preconditioner_dim,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=args.precondition_frequency,
        grafting="adam",
    )


@torch.no_grad()
def evaluate(model, data, args) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [model(*lm_batch(data, args.batch, args.context, gen)).item() for _ in range(8)]
    return sum(losses) / len(losses)


def run(name: str, args, train_data, val_data) -> dict:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=args.heads)
    model = GPT(cfg)
    opt = make_optimizer(name, model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = lm_batch(train_data, args.batch, args.context, gen)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == 1:
            print(f"  {name:8s} step {step:5d}  loss {loss.item():.4f}  "
                  f"{(time.perf_counter() - start) / step * 1000:.0f} ms/step", flush=True)
    wall = time.perf_counter() - start
    return {"optimizer": name, "train_loss": loss.item(), "val_loss": evaluate(model, val_data, args),
            "seconds": wall, "params": param_count(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["shampoo", "adamw", "both"], default="both")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--shampoo-lr", type=float, default=3e-3)
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-preconditioner-dim", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train_data, val_data = stdlib_text()
    print(f"data: {train_data.numel():,} train bytes, {val_data.numel():,} validation bytes "
          "(Python standard library source)")
    names = ["shampoo", "adamw"] if args.optimizer == "both" else [args.optimizer]
    results = [run(n, args, train_data, val_data) for n in names]
    print(f"\n{'optimizer':10s} {'params':>9s} {'train loss':>11s} {'val loss':>9s} {'seconds':>8s}")
    for r in results:
        print(f"{r['optimizer']:10s} {r['params']:9,d} {r['train_loss']:11.4f} "
              f"{r['val_loss']:9.4f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
