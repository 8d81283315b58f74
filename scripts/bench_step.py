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


def measure(rank: int, world: int, args) -> dict:
    """Runs AdamW and ShardedShampoo on this rank (DDP when world > 1); rank 0's figures."""
    from torch.nn.parallel import DistributedDataParallel

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

    def wrap(m):
        if world == 1:
            return m
        if args.parallelism == "ddp":
            return DistributedDataParallel(m)
        if tensor_parallel:
            return parallelize_llama(m, mesh["tp"], mesh["dp"])
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fsdp_mesh = init_device_mesh("cpu", (world,))  # named: not torch's default accelerator
        for block in m.blocks:
            fully_shard(block, mesh=fsdp_mesh)
        fully_shard(m, mesh=fsdp_mesh)
        return m

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
    ddp = wrap(model)
    adamw = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    fb_a, opt_a = time_steps(ddp, adamw, data, args, torch.Generator().manual_seed(data_rank))

    torch.manual_seed(0)
    model = make()
    ddp = wrap(model)
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
    # optimizer); inside saving() it gives views, for a save.
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


def spikes(rank: int, world: int, args) -> dict:
    """Per-step optimizer time over the two periods after the first root computation (at step
    ``freq``, where every block computes its roots, staggered or not: timed apart), with and
    without staggered roots, at each of ``args.spike_frequencies``. Gradients are random and
    the same on every rank (as after DDP's averaging; FSDP2: each rank's shard of them), so
    what is timed is the optimizer alone."""
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(args.threads)
    cfg = GPTConfig(context=args.context, width=args.width, layers=args.layers)
    out = {}
    for freq in [int(f) for f in args.spike_frequencies.split(",")]:
        for stagger in (False, True):
            torch.manual_seed(0)
            model = GPT(cfg)
            if world > 1 and args.parallelism == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                fsdp_mesh = init_device_mesh("cpu", (world,))
                for block in model.blocks:
                    fully_shard(block, mesh=fsdp_mesh)
                fully_shard(model, mesh=fsdp_mesh)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = ShardedShampoo(
                params,
                lr=1e-4,
                max_preconditioner_dim=args.max_preconditioner_dim,
                precondition_frequency=freq,
                stagger_roots=stagger,
                communication_dtype=getattr(torch, args.communication_dtype),
            )
            times, first = [], 0.0
            for step in range(1, 3 * freq + 1):
                gen = torch.Generator().manual_seed(step)
                for p in params:
                    g = torch.randn(p.shape, generator=gen) * 1e-2
                    if isinstance(p, DTensor):  # this rank's rows (torch.chunk layout)
                        lo = -(-p.shape[0] // world) * rank
                        g = DTensor.from_local(
                            g[lo : lo + p.to_local().shape[0]],
                            p.device_mesh,
                            p.placements,
                            run_check=False,
                            shape=p.shape,
                            stride=p.stride(),
                        )
                    p.grad = g
                t0 = time.perf_counter()
                opt.step()
                if step == freq:
                    first = time.perf_counter() - t0
                elif step > freq:
                    times.append(time.perf_counter() - t0)
            times.sort()
            out[f"f{freq}_{'staggered' if stagger else 'all_at_once'}"] = {
                "median_ms": statistics.median(times) * 1e3,
                "p95_ms": times[int(0.95 * (len(times) - 1))] * 1e3,
                "max_ms": times[-1] * 1e3,
                "mean_ms": statistics.mean(times) * 1e3,
                "steps": len(times),
                "first_roots_ms": first * 1e3,
            }
    return {"world": world, "parallelism": args.parallelism if world > 1 else "none", "spikes": out}


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
        f"world size {r['world']} ({r['parallelism']}): optimizer step (ms) over the two "
        "periods after the first roots (every block's, once, at the start: timed apart)"
    )
    print(
        f"  {'':24s} {'median':>8s} {'p95':>8s} {'max':>8s} {'mean':>8s} {'max/median':>11s} "
        f"{'first roots':>12s}"
    )
    rows = r["spikes"]
    for name, s in rows.items():
        print(
            f"  {name:24s} {s['median_ms']:8.1f} {s['p95_ms']:8.1f} {s['max_ms']:8.1f} "
            f"{s['mean_ms']:8.1f} {s['max_ms'] / s['median_ms']:11.2f} "
            f"{s['first_roots_ms']:12.1f}"
        )
    for name, s in rows.items():
        if name.endswith("staggered"):
            base = rows[name.replace("staggered", "all_at_once")]
            print(
                f"  {name}: mean {s['mean_ms']:.1f} ms against {base['mean_ms']:.1f} ms "
                f"without staggering ({s['mean_ms'] / base['mean_ms']:.2f}x)"
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
        help="per-step optimizer time (median, p95, max) over two periods, with and "
        "without stagger_roots, instead of the default figures",
    )
    ap.add_argument("--spike-frequencies", default="50,100")
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
