"""Distributed training with ShardedShampoo under DDP, FSDP2 or HSDP.

Each rank computes the Shampoo update of the blocks it owns: under DDP one AllGather per step
shares the directions; under FSDP2/HSDP pieces of gradients travel to block owners and pieces of
directions back to the ranks holding them (all_to_all), so nothing is ever gathered whole.

Checkpoints (DCP) every K steps with --checkpoint-dir DIR --checkpoint-every K; --resume continues
from the newest complete one, at any world size and in any mode.

Launch with torchrun:
    torchrun --standalone --nproc-per-node 2 scripts/distributed_example.py --parallelism fsdp2
or let the script start its own processes (gloo, CPU):
    python scripts/distributed_example.py --nproc 4 --parallelism hsdp
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_directory,
)
from launch import launch, wrap
from workloads import GPT, GPTConfig, lm_batch, stdlib_text


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = GPT(GPTConfig(context=args.context, width=args.width, layers=args.layers))
    ddp = wrap(model, args.parallelism, world)
    opt = ShardedShampoo(
        ddp.parameters(),
        lr=args.lr,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        weight_decay=0.01,
        precondition_frequency=args.precondition_frequency,
        communication_dtype=torch.bfloat16 if args.bf16_communication else torch.float32,
    )
    owned = [None] * world
    dist.all_gather_object(owned, (opt.owned_blocks(), opt.state_bytes() / 2**20))
    if rank == 0:  # one process prints: lines of several processes would interleave
        print(f"{args.parallelism}, {world} ranks; bytes sent per rank per optimizer step: "
              f"{opt.bytes_sent_per_step() / 1e6:.3f} MB; blocks owned per rank: {[o[0] for o in owned]} of "
              f"{opt.plan.num_blocks}; optimizer state per rank: "
              f"{', '.join(f'{o[1]:.1f}' for o in owned)} MiB", flush=True)
    first = 1
    if args.resume and args.checkpoint_dir:
        path = latest_checkpoint(args.checkpoint_dir)
        if path is not None:
            first = load_checkpoint(path, ddp, opt, extra={"step": 0})["step"] + 1
            if rank == 0:
                print(f"resumed from {path}", flush=True)
    train_data, _ = stdlib_text(2_000_000)
    start = time.perf_counter()
    for step in range(first, args.steps + 1):
        # A different batch on each rank, fixed by (seed, rank, step): a resumed run sees the
        # same batches as one that never stopped.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
        x, y = lm_batch(train_data, args.batch, args.context, gen)
        opt.zero_grad(set_to_none=True)
        loss = ddp(x, y)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # for the log only
        if rank == 0 and (step % args.log_every == 0 or step == first):
            print(f"step {step:5d}  loss {mean.item() / world:.6f}  "
                  f"{(time.perf_counter() - start) / (step - first + 1) * 1000:.0f} ms/step",
                  flush=True)
        if args.checkpoint_dir and args.checkpoint_every and step % args.checkpoint_every == 0:
            save_checkpoint(step_directory(args.checkpoint_dir, step), ddp, opt, extra={"step": step})
    # Replicas must agree exactly: compare a checksum of the (full) parameters across ranks.
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    check = torch.stack([p.detach().double().sum() for p in full]).sum().view(1)
    everyone = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(everyone, check)
    if rank == 0:
        same = all(torch.equal(e, everyone[0]) for e in everyone)
        print(f"replicas identical: {same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes to start when not under torchrun")
    ap.add_argument("--parallelism", choices=["ddp", "fsdp2", "hsdp"], default="ddp")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8, help="per rank")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--precondition-frequency", type=int, default=20)
    ap.add_argument("--bf16-communication", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--checkpoint-dir", default="", help="save checkpoints under this directory")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in --checkpoint-dir")
    args = ap.parse_args()
    launch(train, args, args.nproc)


if __name__ == "__main__":
    main()
