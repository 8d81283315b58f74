"""Per-step time of ShardedShampoo against torch.optim.AdamW on the reference LM, one process.

Splits each step into forward+backward and the optimizer step, reports Shampoo's amortized
step (all roots recomputed) apart from the ordinary one, and Shampoo's matrix-FLOP floor: its
factor Grams and preconditioning (4 * d_i * numel per block dim) at this machine's matrix-product
rate, measured in the same run.

    python scripts/bench_step.py [--world-sizes 1,2] [--steps 30] [--json out.json]

With world size 2 and more, ranks are spawned (gloo, CPU), the model is wrapped in DDP, and the
bytes each rank sends in the optimizer step are measured on the loopback interface.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from bench_scale import minimum_bytes
from train import parse_option
from workloads import GPT, GPTConfig, lm_batch, param_count

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.algorithm.packing import packed_order


def packing_bytes(opt: ShardedShampoo) -> int:
    """Bytes an ordinary step writes to convert packed matrices (``symmetric_packing``): each
    root unpacked (m x m) and each factor's Gram packed (m (m + 1) / 2), per block and dim."""
    out = 0
    for g in opt.group_states:
        for stack in g.blocks.stacks:
            for key, t in stack.state.items():
                if t.dim() != 2 or not key.startswith(("factor_", "root_")) or "scale" in key:
                    continue  # full matrices (n, m, m), or not a matrix
                m = packed_order(t.shape[1])
                written = m * m if key.startswith("root_") else t.shape[1]
                # Quantized roots are unpacked after dequantizing, in float32.
                out += t.shape[0] * written * (4 if t.dtype == torch.int8 else t.element_size())
    return out


def matmul_rate() -> float:
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


def shampoo_flops(opt: ShardedShampoo) -> float:
    """Matrix FLOPs of this rank's blocks per step: Grams and preconditioning."""
    flops = 0
    for group_state in opt.group_states:
        for stack in group_state.blocks.stacks:
            numel = math.prod(stack.block_shape)
            flops += stack.num_rows * sum(4 * d * numel for d in stack.block_shape)
    return flops


def time_steps(model, opt, data, args, gen):
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


def loopback_tx_bytes() -> int | None:
    """Bytes sent so far on the loopback interface (gloo on one machine talks over it)."""
    try:
        with open("/proc/net/dev") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
    except OSError:
        pass
    return None


def optimizer_bytes_per_step(model, opt, data, args, gen, world) -> float | None:
    """Loopback bytes the optimizer step sends, per rank and step (barriers fence it off from
    the gradient all-reduce; their own few bytes are included)."""
    import torch.distributed as dist

    total, steps = 0, 5
    for _ in range(steps):
        x, y = lm_batch(data, args.batch, args.context, gen)
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        dist.barrier()
        before = loopback_tx_bytes()
        opt.step()
        dist.barrier()
        after = loopback_tx_bytes()
        if before is None or after is None:
            return None
        total += after - before
    return total / steps / world


OTHERS = (  # (package, class names tried in order): other Shampoo/SOAP implementations
    ("pytorch_optimizer", ("Shampoo", "SOAP")),
    ("heavyball", ("SOAP", "Shampoo", "ForeachSOAP")),
)


def other_optimizers(model: torch.nn.Module):
    """(label, optimizer) for each other implementation installed; none are dependencies."""
    import importlib

    for package, names in OTHERS:
        try:
            module = importlib.import_module(package)
        except Exception:  # absent, or broken against this torch
            print(f"  {package}: not installed, skipped")
            continue
        for name in names:
            cls = getattr(module, name, None)
            if cls is None:
                continue
            try:
                yield f"{package}.{name}", cls(model.parameters(), lr=1e-4)
            except Exception as e:  # an API this script does not know
                print(f"  {package}.{name}: could not be built ({type(e).__name__}: {e})")


def wrap(model: torch.nn.Module, world: int, args) -> torch.nn.Module:
    """The GPT as ``args.parallelism`` shares it over ``world`` ranks (DDP or FSDP2)."""
    if world == 1:
        return model
    if args.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fsdp_mesh = init_device_mesh("cpu", (world,))  # named: not torch's default accelerator
    for block in model.blocks:
        fully_shard(block, mesh=fsdp_mesh)
    fully_shard(model, mesh=fsdp_mesh)
    return model


def measure(rank: int, world: int, args) -> dict:
    """Runs AdamW and ShardedShampoo on this rank (DDP when world > 1); rank 0's figures."""
    torch.set_num_threads(args.threads)
    data = torch.randint(0, 256, (1_000_000,))  # timing only: content does not matter
    tensor_parallel = world > 1 and args.parallelism == "fsdp2_tp"
    if tensor_parallel:
        # FSDP2 x TP on a (world / 2, 2) mesh: a Llama of the GPT's width and depth (the GPT's
        # fused q/k/v does not split by heads), torchtitan's plan.
        from torch.distributed.device_mesh import init_device_mesh
        from workloads import Llama, LlamaConfig, parallelize_llama

        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        config = LlamaConfig(width=args.width, layers=args.layers, hidden=8 * args.width // 3)
        make = lambda: Llama(config)  # noqa: E731
        data_rank = rank // 2  # the two ranks of a TP group read the same batch
    else:
        make = lambda: GPT(GPTConfig(context=args.context, width=args.width, layers=args.layers))  # noqa: E731
        data_rank = rank

    def wrap_model(m):
        if tensor_parallel:
            return parallelize_llama(m, mesh["tp"], mesh["dp"])
        return wrap(m, world, args)

    r = {
        "world": world,
        "threads": args.threads,
        "batch": args.batch,
        "context": args.context,
        "parallelism": args.parallelism if world > 1 else "none",
    }

    torch.manual_seed(0)
    model = make()
    r["params"] = param_count(model)
    ddp = wrap_model(model)
    adamw = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    fb_a, opt_a = time_steps(ddp, adamw, data, args, torch.Generator().manual_seed(data_rank))

    torch.manual_seed(0)
    model = make()
    ddp = wrap_model(model)
    # Preconditioning starts at step 1, so the timed steps are ordinary ones; the amortized
    # step (every root computed) is timed apart.
    shampoo = ShardedShampoo(
        ddp.parameters(),
        lr=1e-4,
        max_preconditioner_dim=args.max_preconditioner_dim,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=1,
        communication_dtype=getattr(torch, args.communication_dtype),
        **dict(args.shampoo_option),
    )
    gen = torch.Generator().manual_seed(data_rank)
    x, y = lm_batch(data, args.batch, args.context, gen)
    ddp(x, y).backward()
    t0 = time.perf_counter()
    shampoo.step()
    amortized = time.perf_counter() - t0
    fb_s, opt_s = time_steps(ddp, shampoo, data, args, gen)

    # state_dict() copies the state (so that a refused or failed load cannot change the live
    # optimizer); inside saving() it gives views, for a save. This rank's blocks, as DCP's
    # sharded save asks.
    with shampoo.sharded_state():
        t0 = time.perf_counter()
        shampoo.state_dict()
        copy_s = time.perf_counter() - t0
        with shampoo.saving():
            t0 = time.perf_counter()
            shampoo.state_dict()
            views_s = time.perf_counter() - t0

    rate = matmul_rate()
    floor = shampoo_flops(shampoo) / (rate * 1e9)
    med = statistics.median
    step_a = med(fb_a) + med(opt_a)
    step_s = med(fb_s) + med(opt_s) + amortized / args.precondition_frequency
    r.update(
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
        # forward + backward of a transformer: about 6 FLOPs per parameter and token
        model_over_shampoo_flops=6
        * r["params"]
        * args.batch
        * args.context
        / shampoo_flops(shampoo),  # both per rank
        shampoo_state_mib=shampoo.state_bytes() / 2**20,
        shampoo_memory_per_param=shampoo.memory_report().per_param(),
        packing_mb_per_step=packing_bytes(shampoo) / 1e6,
        blocks_owned=shampoo.owned_blocks(),
        blocks_total=shampoo.plan.num_blocks,
        allgather_minimum_bytes=(world - 1)
        / world
        * r["params"]
        * torch.tensor([], dtype=getattr(torch, args.communication_dtype)).element_size(),
        buffer_bytes_sent=shampoo.bytes_sent_per_step(),
        # DTensor parameters: what this rank must send, from its pieces (bench_scale.py).
        minimum_bytes_sent=minimum_bytes(shampoo.plan, rank, 4) if shampoo.plan.mesh else None,
        state_dict_copy_ms=copy_s * 1e3,
        state_dict_views_ms=views_s * 1e3,
    )
    if world > 1:
        r["measured_bytes_sent"] = optimizer_bytes_per_step(ddp, shampoo, data, args, gen, world)
    elif not args.no_others:
        r["others_opt_ms"] = {}
        torch.manual_seed(0)
        model = make()
        for label, opt in other_optimizers(model):
            _, times = time_steps(model, opt, data, args, torch.Generator().manual_seed(0))
            r["others_opt_ms"][label] = med(times) * 1e3
    return r


def spike_settings(freq: int, world: int) -> dict[str, dict]:
    """What ``spikes`` compares at refresh period ``freq``: every refresh in one step, each
    block in its phase, the same in the background (``refresh_delay`` 1 and ``freq / 10``;
    all at once too), and no refresh after the first (the floor; with several ranks, also
    without overlapping the exchanges with the math)."""
    d = max(1, freq // 10)
    settings = {
        "all_at_once": {},
        "staggered": {"stagger_roots": True},
        "background_d1": {"stagger_roots": True, "refresh_delay": 1},
        f"background_d{d}": {"stagger_roots": True, "refresh_delay": d},
        f"background_all_at_once_d{d}": {"refresh_delay": d},
        "no_refresh": {"precondition_frequency": 10**9, "start_preconditioning_step": freq},
    }
    if world > 1:  # exchanges in one collective each way, after all the math (no overlap)
        settings["no_refresh_one_bucket"] = {**settings["no_refresh"], "exchange_buckets": 1}
    return settings


class MathTimer:
    """Accumulates the time spent in the stacks' math (``sharded_shampoo.work``'s per-stack
    gate and update), by wrapping it while active."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        import sharded_shampoo.work as work

        self._work, self._saved = work, (work.gate, work._compute)

        def timed(fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0

            return wrapper

        work.gate, work._compute = (timed(f) for f in self._saved)
        return self

    def __exit__(self, *exc) -> None:
        self._work.gate, self._work._compute = self._saved


def collectives_ms(opt: ShardedShampoo, reps: int = 10) -> float:
    """The optimizer step's collectives alone (every bucket's, issued at once, then waited
    for), on the distributors' own buffers: median over ``reps`` (ms)."""
    from sharded_shampoo.distributors import ReplicatedDistributor, ShardedDistributor

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        handles = []
        for d in opt.distributors:
            if isinstance(d, ShardedDistributor):
                for kind in ("grad", "dir"):
                    handles += [d._all_to_all(kind, b) for b in range(d.num_buckets)]
            elif isinstance(d, ReplicatedDistributor):
                handles += [d._gather(lo, hi) for lo, hi in d._slices]
        for h in handles:
            if h is not None:
                h.wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def spikes(rank: int, world: int, args) -> dict:
    """Per-step times, whole step (forward, backward, optimizer) and optimizer step alone, over
    the two periods after the first refresh (at step ``freq``, where every block refreshes,
    staggered or not: timed apart), for each of ``spike_settings`` at each of
    ``args.spike_frequencies``; DDP or FSDP2 when ``world > 1`` (rank 0's figures: a step
    there waits for the slowest rank in its collectives)."""
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(context=args.context, width=args.width, layers=args.layers)
    data = torch.randint(0, 256, (1_000_000,))  # timing only: content does not matter
    out = {}
    for freq in [int(f) for f in args.spike_frequencies.split(",")]:
        for name, setting in spike_settings(freq, world).items():
            if args.spike_settings and name not in args.spike_settings.split(","):
                continue
            torch.manual_seed(0)
            model = GPT(cfg)
            wrapped = wrap(model, world, args)
            opt = ShardedShampoo(
                [p for p in model.parameters() if p.requires_grad],
                lr=1e-4,
                max_preconditioner_dim=args.max_preconditioner_dim,
                **{"precondition_frequency": freq, **dict(args.shampoo_option), **setting},
                communication_dtype=getattr(torch, args.communication_dtype),
            )
            gen = torch.Generator().manual_seed(rank)
            whole, step_only, math_only, first = [], [], [], 0.0
            for step in range(1, 3 * freq + 1):
                x, y = lm_batch(data, args.batch, args.context, gen)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                wrapped(x, y).backward()
                t1 = time.perf_counter()
                with MathTimer() as timer:
                    opt.step()
                t2 = time.perf_counter()
                if step == freq:
                    first = t2 - t1
                elif step > freq:
                    whole.append(t2 - t0)
                    step_only.append(t2 - t1)
                    math_only.append(timer.seconds)
            out[f"f{freq}_{name}"] = {
                "whole": _summary(whole),
                "optimizer": _summary(step_only),
                "math_median_ms": statistics.median(math_only) * 1e3,
                "collectives_ms": collectives_ms(opt) if world > 1 else 0.0,
                "steps": len(whole),
                "first_refresh_ms": first * 1e3,
            }
    return {"world": world, "parallelism": args.parallelism if world > 1 else "none", "spikes": out}


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p95_ms": times[int(0.95 * (len(times) - 1))] * 1e3,
        "max_ms": times[-1] * 1e3,
        "mean_ms": statistics.mean(times) * 1e3,
    }


PRECONDITIONERS = {
    "root_inverse": {},
    "eigenvalue_corrected_eigh": {"preconditioner": "eigenvalue_corrected"},
    "eigenvalue_corrected_qr": {"preconditioner": "eigenvalue_corrected", "eigenbasis": "qr"},
}


def preconditioner_costs(args) -> dict:
    """One process, random gradients: each preconditioner's ordinary optimizer step (median
    of ``args.steps``) and its amortized step (every block's roots or eigenbasis: the
    refresh at step 2, after one step of statistics)."""
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(context=args.context, width=args.width, layers=args.layers)
    out = {}
    for name, options in PRECONDITIONERS.items():
        torch.manual_seed(0)
        model = GPT(cfg)
        params = list(model.parameters())
        opt = ShardedShampoo(
            params,
            lr=1e-4,
            max_preconditioner_dim=args.max_preconditioner_dim,
            precondition_frequency=10**6,
            start_preconditioning_step=2,
            **options,
        )
        times = []
        for step in range(1, args.steps + 3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = {"step_ms": statistics.median(times[2:]) * 1e3, "refresh_ms": times[1] * 1e3}
    return {"world": 1, "preconditioners": out}


def report_preconditioners(r: dict) -> None:
    rows = r["preconditioners"]
    print(
        "optimizer step by preconditioner (one process, ms): ordinary step (median), refresh step"
    )
    for name, x in rows.items():
        print(f"  {name:28s} {x['step_ms']:8.1f} {x['refresh_ms']:9.1f}")
    base = rows["root_inverse"]["step_ms"]
    for name in ("eigenvalue_corrected_eigh", "eigenvalue_corrected_qr"):
        print(f"  {name}: step {rows[name]['step_ms'] / base:.2f}x root-inverse")

    def extra(name):  # what the refresh adds to an ordinary step
        return rows[name]["refresh_ms"] - rows[name]["step_ms"]

    cheaper = extra("eigenvalue_corrected_eigh") / extra("eigenvalue_corrected_qr")
    print(
        f"  the refresh's extra time: QR {extra('eigenvalue_corrected_qr'):.0f} ms, eigh "
        f"{extra('eigenvalue_corrected_eigh'):.0f} ms ({cheaper:.2f}x)"
    )


def report_spikes(r: dict) -> None:
    print(
        f"world size {r['world']} ({r['parallelism']}): per-step times (ms) over the two "
        "periods after the first refresh (every block's, at once: timed apart)"
    )
    print(
        f"  {'':34s} {'whole step':>35s}   {'optimizer step':>26s}\n"
        f"  {'':34s} {'median':>8s} {'p95':>7s} {'max':>7s} {'mean':>7s} {'max/med':>7s}"
        f"   {'median':>8s} {'p95':>7s} {'max':>7s} {'mean':>7s}"
    )
    rows = r["spikes"]
    for name, s in rows.items():
        w, o = s["whole"], s["optimizer"]
        print(
            f"  {name:34s} {w['median_ms']:8.1f} {w['p95_ms']:7.1f} {w['max_ms']:7.1f} "
            f"{w['mean_ms']:7.1f} {w['max_ms'] / w['median_ms']:7.2f}   {o['median_ms']:8.1f} "
            f"{o['p95_ms']:7.1f} {o['max_ms']:7.1f} {o['mean_ms']:7.1f}"
        )
    for name, s in rows.items():
        floor = rows.get(name.split("_", 1)[0] + "_no_refresh")
        if floor is not None and "no_refresh" not in name:
            ratio = s["whole"]["mean_ms"] / floor["whole"]["mean_ms"]
            print(f"  {name}: mean whole step {ratio:.3f}x that without refreshes")
    if r["world"] > 1:
        print("  optimizer step (median) against its math and its collectives alone (medians):")
        for name, s in rows.items():
            if "no_refresh" in name:
                step, math_ms, comm = (
                    s["optimizer"]["median_ms"],
                    s["math_median_ms"],
                    s["collectives_ms"],
                )
                print(
                    f"  {name}: step {step:.1f} ms, math {math_ms:.1f} ms, collectives "
                    f"{comm:.1f} ms: {step / max(math_ms, comm):.2f}x the larger, "
                    f"{step / (math_ms + comm):.2f}x their sum"
                )


def _rank_main(rank: int, world: int, store: str, args, out: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    result = spikes(rank, world, args) if args.spikes else measure(rank, world, args)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see launch.finish: skip a teardown that can abort on gloo


def report(r: dict, args) -> None:
    w = r["world"]
    arch = "Llama" if r["parallelism"] == "fsdp2_tp" else "GPT"
    print(
        f"world size {w} ({r['parallelism']}): {arch} {args.layers} layers x {args.width} wide, "
        f"{r['params']:,} "
        f"parameters; batch {args.batch} x {args.context} tokens per rank; "
        f"{r['threads']} thread(s) per rank"
    )
    print(f"  {'':10s} {'fwd+bwd ms':>11s} {'opt ms':>8s}")
    print(f"  {'AdamW':10s} {r['adamw_fwd_bwd_ms']:11.2f} {r['adamw_opt_ms']:8.2f}")
    print(f"  {'Shampoo':10s} {r['shampoo_fwd_bwd_ms']:11.2f} {r['shampoo_opt_ms']:8.2f}")
    print(
        f"  Shampoo amortized step (all roots of this rank): {r['shampoo_amortized_ms']:.1f} ms,"
        f" {100 * r['shampoo_amortized_share']:.1f}% of the mean step at frequency "
        f"{args.precondition_frequency}"
    )
    print(
        f"  Shampoo optimizer step / its matmul floor ({r['shampoo_floor_ms']:.2f} ms at "
        f"{r['matmul_gflops']:.0f} GFLOP/s): {r['shampoo_opt_over_floor']:.2f}x"
    )
    print(
        f"  whole step Shampoo / AdamW (amortized step included): {r['whole_step_ratio']:.3f}; "
        f"model FLOPs are {r['model_over_shampoo_flops']:.1f}x Shampoo's (the paper's regime: "
        ">= 10x)"
    )
    for label, ms in r.get("others_opt_ms", {}).items():
        print(f"  {label}: optimizer step {ms:.2f} ms (same model, defaults, lr 1e-4)")
    print(
        f"  Shampoo memory on rank 0: {r['shampoo_memory_per_param']:.1f} B per parameter "
        f"(memory_report); packing writes {r['packing_mb_per_step']:.1f} MB per step"
    )
    print(
        f"  Shampoo state on rank 0: {r['shampoo_state_mib']:.1f} MiB; blocks owned "
        f"{r['blocks_owned']} of {r['blocks_total']}; state_dict() {r['state_dict_copy_ms']:.1f} "
        f"ms (a copy), {r['state_dict_views_ms']:.1f} ms inside saving() (views)"
    )
    if w > 1:
        measured = r.get("measured_bytes_sent")
        m = f"{measured / 1e6:.2f} MB measured on loopback" if measured else "not measurable here"
        print(
            f"  bytes sent per rank per optimizer step: {m}; "
            f"{r['buffer_bytes_sent'] / 1e6:.3f} MB in rank 0's buffers; parameter "
            f"bytes / W: {4 * r['params'] / w / 1e6:.2f} MB"
        )
        if r.get("minimum_bytes_sent"):
            ratio = r["buffer_bytes_sent"] / r["minimum_bytes_sent"]
            print(
                f"  rank 0 must send {r['minimum_bytes_sent'] / 1e6:.3f} MB (its pieces: "
                f"gradients to owners elsewhere, its blocks' directions to their other "
                f"holders): sent / minimum {ratio:.4f}"
            )
        else:
            print(
                f"  AllGather minimum (W-1)/W x parameter bytes: "
                f"{r['allgather_minimum_bytes'] / 1e6:.2f} MB"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-preconditioner-dim", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=100)
    ap.add_argument("--communication-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="per rank")
    ap.add_argument("--world-sizes", default="1", help="comma-separated, e.g. 1,2")
    ap.add_argument(
        "--parallelism",
        choices=["ddp", "fsdp2", "fsdp2_tp"],
        default="ddp",
        help="how ranks share the model when the world size is above 1",
    )
    ap.add_argument(
        "--shampoo-option",
        action="append",
        default=[],
        type=parse_option,
        metavar="NAME=VALUE",
        help="another ShardedShampoo option, e.g. symmetric_packing=False; repeatable",
    )
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--no-others",
        action="store_true",
        help="skip other Shampoo/SOAP implementations even when installed",
    )
    ap.add_argument(
        "--spikes",
        action="store_true",
        help="instead: per-step times (median, p95, max), whole step and optimizer step, "
        "refreshes at once, staggered, in the background and none",
    )
    ap.add_argument("--spike-frequencies", default="50")
    ap.add_argument(
        "--spike-settings", default="", help="with --spikes: only these (comma-separated)"
    )
    ap.add_argument(
        "--preconditioners",
        action="store_true",
        help="instead: root-inverse vs eigenvalue-corrected (eigh, QR) step times",
    )
    args = ap.parse_args()
    if args.preconditioners:
        result = preconditioner_costs(args)
        report_preconditioners(result)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([result], fh, indent=2)
        return

    import tempfile

    import torch.multiprocessing as mp

    results = []
    for world in [int(w) for w in args.world_sizes.split(",")]:
        if world == 1:
            results.append(spikes(0, 1, args) if args.spikes else measure(0, 1, args))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.json")
                mp.start_processes(
                    _rank_main,
                    args=(world, os.path.join(tmp, "store"), args, out),
                    nprocs=world,
                    start_method="spawn",
                )
                with open(out) as fh:
                    results.append(json.load(fh))
        (report_spikes if args.spikes else lambda r: report(r, args))(results[-1])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
