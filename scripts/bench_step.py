"""Per-step time of ShardedShampoo against torch.optim.AdamW on the reference LM, one process.

Splits each step into forward+backward and the optimizer step, reports Shampoo's amortized
step (all roots recomputed) apart from the ordinary one, and Shampoo's matrix-FLOP floor: its
factor Grams and preconditioning (4 * d_i * numel per block dim) at this machine's matrix-product
rate, measured in the same run.

    python scripts/bench_step.py [--steps 30] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.blocking import make_blocking
from workloads import GPT, GPTConfig, lm_batch, param_count


def matmul_rate(threads: int) -> float:
    """Float32 GFLOP/s of batched 256x256 products (the size of typical blocks' work)."""
    a = torch.randn(8, 256, 1024)
    b = torch.randn(8, 1024, 256)
    for _ in range(3):
        torch.bmm(a, b)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        torch.bmm(a, b)
    dt = (time.perf_counter() - t0) / reps
    return 2 * 8 * 256 * 1024 * 256 / dt / 1e9


def shampoo_flops(model: torch.nn.Module, max_dim: int) -> float:
    flops = 0
    for p in model.parameters():
        b = make_blocking(p.shape, max_dim, True)
        for bid in range(b.num_blocks):
            shape = b.block_shape(bid)
            numel = 1
            for d in shape:
                numel *= d
            flops += sum(4 * d * numel for d in shape)
    return flops


def time_steps(name, model, opt, data, args, gen):
    fwd_bwd, opt_times = [], []
    for step in range(args.warmup + args.steps):
        x, y = lm_batch(data, args.batch, args.context, gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if step >= args.warmup:
            fwd_bwd.append(t1 - t0)
            opt_times.append(t2 - t1)
    return fwd_bwd, opt_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-preconditioner-dim", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = torch.randint(0, 256, (1_000_000,))  # timing only: content does not matter
    cfg = GPTConfig(context=args.context, width=args.width, layers=args.layers)
    results = {"threads": args.threads, "batch": args.batch, "context": args.context}

    model = GPT(cfg)
    results["params"] = param_count(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fb_a, opt_a = time_steps("adamw", model, adamw, data, args, torch.Generator().manual_seed(0))

    model = GPT(cfg)
    # start far away, so the timed steps are ordinary ones; the amortized step is timed apart.
    shampoo = ShardedShampoo(
        model.parameters(),
        lr=1e-4,
        max_preconditioner_dim=args.max_preconditioner_dim,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=1,
    )
    gen = torch.Generator().manual_seed(0)
    x, y = lm_batch(data, args.batch, args.context, gen)
    model(x, y).backward()
    t0 = time.perf_counter()
    shampoo.step()  # t = 1 == start: every root is computed
    amortized = time.perf_counter() - t0
    fb_s, opt_s = time_steps("shampoo", model, shampoo, data, args, gen)

    rate = matmul_rate(args.threads)
    floor = shampoo_flops(model, args.max_preconditioner_dim) / (rate * 1e9)
    med = statistics.median
    step_a = med(fb_a) + med(opt_a)
    step_s = med(fb_s) + med(opt_s) + amortized / args.precondition_frequency
    results.update(
        adamw_fwd_bwd_ms=med(fb_a) * 1e3,
        adamw_opt_ms=med(opt_a) * 1e3,
        shampoo_fwd_bwd_ms=med(fb_s) * 1e3,
        shampoo_opt_ms=med(opt_s) * 1e3,
        shampoo_amortized_ms=amortized * 1e3,
        shampoo_amortized_share=amortized / args.precondition_frequency / step_s,
        shampoo_floor_ms=floor * 1e3,
        shampoo_opt_over_floor=med(opt_s) / floor,
        matmul_gflops=rate,
        whole_step_ratio=step_s / step_a,
        shampoo_state_mib=shampoo.state_bytes() / 2**20,
    )
    r = results
    print(f"model: GPT {args.layers} layers x {args.width} wide, {r['params']:,} parameters; "
          f"batch {args.batch} x {args.context} tokens; {args.threads} thread(s)")
    print(f"{'':10s} {'fwd+bwd ms':>11s} {'opt ms':>8s}")
    print(f"{'AdamW':10s} {r['adamw_fwd_bwd_ms']:11.2f} {r['adamw_opt_ms']:8.2f}")
    print(f"{'Shampoo':10s} {r['shampoo_fwd_bwd_ms']:11.2f} {r['shampoo_opt_ms']:8.2f}")
    print(f"Shampoo amortized step (all roots): {r['shampoo_amortized_ms']:.1f} ms, "
          f"{100 * r['shampoo_amortized_share']:.1f}% of the mean step at frequency "
          f"{args.precondition_frequency}")
    print(f"Shampoo optimizer step / its matmul floor ({r['shampoo_floor_ms']:.2f} ms at "
          f"{r['matmul_gflops']:.0f} GFLOP/s): {r['shampoo_opt_over_floor']:.2f}x")
    print(f"whole step Shampoo / AdamW (amortized step included): {r['whole_step_ratio']:.3f}")
    print(f"Shampoo state: {r['shampoo_state_mib']:.1f} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
