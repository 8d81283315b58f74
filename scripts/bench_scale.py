"""Rank 0 of a simulated job of thousands of ranks: what ShardedShampoo costs it per step.

torch's fake process group runs rank 0 of a job of any size in one process: collectives return
at once, so what is timed is host work (Python, copies, buffer set-up), the part that must not
grow with the world size. Models are built on the meta device with real shapes (Llama-3 8B and
70B, GPT-2 small), sharded with ``fully_shard`` (FSDP2), on a 2-D mesh (HSDP) or left whole
(DDP: every rank holds every parameter), then materialized so that rank 0 holds only its part.

Each (model, parallelism, world size) runs in a fresh process. Printed per run: construction
time, median step time, the rank's own block math alone (its stacks through the functional core,
timed apart), bytes sent per step against the minimum for the mode, state bytes per rank (max
and mean over ranks, from the plan), blocks per rank; then the figures that say whether host
work grows with the world size.

    python scripts/bench_scale.py                         # every model and mode (minutes)
    python scripts/bench_scale.py --model gpt2 --parallelism ddp --world-sizes 64,4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

MODELS = {
    # name: (vocab, width, layers, ffn, kv heads, head dim)
    "llama8b": (128256, 4096, 32, 14336, 8, 128),
    "llama70b": (128256, 8192, 80, 28672, 8, 128),
    "gpt2": (50257, 768, 12, 3072, None, None),
    # Llama's layout at small dims and many layers: what the test suite simulates at 512 ranks.
    "llama-mini": (4096, 256, 24, 768, 2, 32),
}
# Rank 0 holding more than this many parameters (params, gradients and state, ~8x in float32)
# would not fit this machine: such runs are reported as skipped.
MAX_LOCAL_PARAMS = 400_000_000


def build_model(name: str):
    """The model's parameter shapes as a module of Linear-free parameters (no forward: the
    benchmark sets gradients itself)."""
    import torch

    vocab, d, layers, ffn, kv, hd = MODELS[name]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            p = lambda *s: torch.nn.Parameter(torch.empty(*s))  # noqa: E731
            if kv is None:  # GPT-2: fused qkv, biases, LayerNorm with bias
                self.attn_qkv, self.attn_qkv_b = p(3 * d, d), p(3 * d)
                self.attn_proj, self.attn_proj_b = p(d, d), p(d)
                self.fc, self.fc_b, self.proj, self.proj_b = p(ffn, d), p(ffn), p(d, ffn), p(d)
                self.ln1, self.ln1_b, self.ln2, self.ln2_b = p(d), p(d), p(d), p(d)
            else:  # Llama: GQA attention, SwiGLU MLP, RMSNorm
                self.wq, self.wk, self.wv, self.wo = p(d, d), p(kv * hd, d), p(kv * hd, d), p(d, d)
                self.w1, self.w3, self.w2 = p(ffn, d), p(ffn, d), p(d, ffn)
                self.attn_norm, self.ffn_norm = p(d), p(d)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Parameter(torch.empty(vocab, d))
            if kv is None:
                self.pos = torch.nn.Parameter(torch.empty(1024, d))
            self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))
            self.norm = torch.nn.Parameter(torch.empty(d))
            self.output = torch.nn.Parameter(torch.empty(vocab, d))

    with torch.device("meta"):
        return Model()


# FSDP2 x TP: the tensor-parallel degree (torchtitan's within one 8-GPU host).
TP = 8


def tensor_parallel_params(model, world: int) -> list:
    """Rank 0's parameters as FSDP2 x TP (``fully_shard`` over "dp" after torchtitan's Llama
    plan over "tp") places them on a (world / TP, TP) mesh: column-parallel weights and the
    embedding ``(_StridedShard(0), Shard(0))``, row-parallel ones ``(Shard(0), Shard(1))``,
    norms ``(Shard(0), Replicate())``. Built directly (the benchmark's model has no modules to
    parallelize), rank 0 allocating only its local shards."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (world // TP, TP), mesh_dim_names=("dp", "tp"))
    params = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1:
            placements = (Shard(0), Replicate())
        elif leaf in ("wo", "w2"):
            placements = (Shard(0), Shard(1))
        else:
            placements = (_StridedShard(0, split_factor=TP), Shard(0))
        shape, _ = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        local = torch.empty(shape)
        params.append(
            torch.nn.Parameter(
                DTensor.from_local(
                    local,
                    mesh,
                    placements,
                    run_check=False,
                    shape=p.shape,
                    stride=torch.empty(p.shape, device="meta").stride(),
                )
            )
        )
    return params


def numel(model) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())


def one_run(model_name: str, parallelism: str, world: int, steps: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from sharded_shampoo import ShardedShampoo
    from sharded_shampoo.algorithm import stack_step
    from sharded_shampoo.options import GroupOptions

    torch.set_num_threads(1)
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    model = build_model(model_name)
    total = numel(model)
    local = total if parallelism == "ddp" else total / world * (2 if parallelism == "hsdp" else 1)
    r = {"model": model_name, "parallelism": parallelism, "world": world, "params": total}
    if parallelism == "fsdp2_tp" and world % TP:
        r["skipped"] = f"world size not a multiple of the tensor-parallel degree {TP}"
        return r
    if local > MAX_LOCAL_PARAMS:
        r["skipped"] = f"rank 0 would hold {local / 1e6:.0f}M parameters"
        return r
    if parallelism in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = (world,) if parallelism == "fsdp2" else (2, world // 2)
        names = ("shard",) if parallelism == "fsdp2" else ("replicate", "shard")
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if parallelism == "fsdp2_tp":
        params = tensor_parallel_params(model, world)
    else:
        model.to_empty(device="cpu")
        params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in params:
        local_p = p.to_local() if hasattr(p, "to_local") else p
        with torch.no_grad():
            local_p.normal_(generator=gen).mul_(0.02)

    t0 = time.perf_counter()
    opt = ShardedShampoo(params, lr=1e-4, precondition_frequency=100)
    r["construction_s"] = time.perf_counter() - t0
    pretend_peers_answered(opt)

    def set_grads():
        for p in params:
            if hasattr(p, "to_local"):
                g = torch.randn(p.to_local().shape, generator=gen)
                p.grad = torch.distributed.tensor.DTensor.from_local(
                    g,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
            else:
                p.grad = torch.randn(p.shape, generator=gen)

    times = []
    for _ in range(steps):
        set_grads()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    r["step_s"] = statistics.median(times[1:] if len(times) > 1 else times)
    set_grads()
    calls = count_calls(opt.step)
    r["torch_calls"] = sum(calls.values())
    r["copy_calls"] = sum(n for name, n in calls.items() if name in COPIES)

    # The rank's own block math alone, on copies of its stacks (the same work the step does);
    # the faster of two rounds, as the step's time is a median past the first step.
    rounds = []
    for _ in range(2):
        math_s = 0.0
        for gi, group_state in enumerate(opt.group_states):
            o = GroupOptions.from_group(opt.param_groups[gi])
            for stack in group_state.blocks.stacks:
                state = stack.state.clone()
                grad = torch.randn(stack.num_rows, *stack.block_shape, generator=gen)
                t0 = time.perf_counter()
                stack_step(state, grad, None, o, opt.param_groups[gi]["step"] + 1)
                math_s += time.perf_counter() - t0
        rounds.append(math_s)
    r["math_s"] = min(rounds)
    r.update(plan_figures(opt, parallelism, world))
    return r


# Calls that move data between parameters, gradients, stacks and buffers.
COPIES = {
    "copy_",
    "_foreach_copy_",
    "_foreach_add_",
    "_foreach_add",
    "index_copy_",
    "index_put_",
    "__setitem__",
    "add_",
    "cat",
    "clone",
    "to",
    "gather",
    "scatter_add_",
}


def count_calls(fn):
    """torch-level calls (functions and tensor methods) made by ``fn()``, by name: what
    Python does per step, counted rather than timed."""
    import collections

    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls[getattr(func, "__name__", str(func))] += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.calls


def pretend_peers_answered(opt) -> None:
    """Make what the "peers" sent look like a healthy step, so that rank 0 does all the work a
    real step does: every status word 0 with an options digest of 0 (this rank's digest is made
    0 too), no piece flagged as skipped. The fake process group's all_to_all_single would
    copy this rank's own chunk over the whole output, so here it zeroes the output instead (a
    receive buffer shares memory with a send buffer: what it held is not a healthy answer)."""
    import torch.distributed as dist

    import sharded_shampoo.work

    def all_to_all_single(output, *args, **kwargs):
        output.zero_()  # done at once: no handle to wait for

    dist.all_to_all_single = all_to_all_single
    sharded_shampoo.work.step_digest = lambda entries: 0


def minimum_bytes(plan, rank: int, itemsize: int) -> int:
    """What ``rank`` must send per step for its DTensor parameters, from every piece it holds
    or owns (not from the exchange's buffers): its gradient pieces of blocks whose owner does
    not hold them (when it is the owner's replica, as every scheme sends one copy), and its
    blocks' direction pieces to every other holder."""
    from sharded_shampoo.placement.sharding import pieces_of_block, shard_pieces

    mesh, total = plan.mesh, 0
    for g in plan.groups:
        for pi, blocking in enumerate(g.blockings):
            sharding = g.spec.sharding(pi)
            if sharding is None:
                continue
            replica = [mesh.coord(rank)[m] for m in sharding.replica_dims()]
            for bid, piece in shard_pieces(blocking, sharding, mesh.coord(rank)):
                owner = g.owners[pi][bid]
                # Counted where the owner's replica holds it (whichever copy one scheme sends).
                if owner not in mesh.holders(sharding, piece.shard) and replica == [
                    mesh.coord(owner)[m] for m in sharding.replica_dims()
                ]:
                    total += piece.numel * itemsize
            for bid in g.owned.get(rank, {}).get(pi, ()):
                for piece in pieces_of_block(blocking, sharding, bid):
                    others = [h for h in mesh.holders(sharding, piece.shard) if h != rank]
                    total += len(others) * piece.numel * itemsize
    return total


def plan_figures(opt, parallelism: str, world: int) -> dict:
    """Bytes sent by rank 0 against the minimum for the mode; state bytes and blocks per rank."""
    from sharded_shampoo.placement.cost import block_state_elements

    plan = opt.plan
    comm = 4  # float32 communication and gradients
    per_rank_state = [0] * plan.world_size
    per_rank_blocks = [0] * plan.world_size
    for g in plan.groups:
        o = g.spec.opts
        vectors = (o.grafting in ("adam", "rmsprop", "adagrad")) + (o.beta1 > 0) + (o.momentum > 0)
        for pi, blocking in enumerate(g.blockings):
            for bid in range(blocking.num_blocks):
                owner = g.owners[pi][bid]
                per_rank_state[owner] += (
                    block_state_elements(blocking.block_shape(bid), vectors) * 4
                )
                per_rank_blocks[owner] += 1
    minimum = minimum_bytes(plan, 0, comm) if plan.mesh is not None else 0
    if parallelism == "ddp":
        minimum = (
            (plan.world_size - 1)
            / plan.world_size
            * sum(math.prod(s) for g in plan.groups for s in g.spec.shapes)
            * comm
        )
    return {
        "bytes_sent": opt.bytes_sent_per_step(),
        "bytes_minimum": minimum,
        "state_max_bytes": max(per_rank_state),
        "state_mean_bytes": statistics.mean(per_rank_state),
        "blocks_min": min(per_rank_blocks),
        "blocks_max": max(per_rank_blocks),
        "blocks_rank0": opt.owned_blocks(),
    }


def report(rows: list[dict]) -> None:
    print(
        f"{'model':9s} {'mode':8s} {'W':>5s} {'build s':>8s} {'step ms':>9s} {'math ms':>8s} "
        f"{'sent MB':>9s} {'min MB':>8s} {'sent/min':>8s} {'state max/mean':>14s} "
        f"{'blocks r0 (min-max)':>19s}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:9s} {r['parallelism']:8s} {r['world']:5d}  skipped: {r['skipped']}")
            continue
        ratio = r["bytes_sent"] / r["bytes_minimum"] if r["bytes_minimum"] else float("nan")
        print(
            f"{r['model']:9s} {r['parallelism']:8s} {r['world']:5d} {r['construction_s']:8.2f} "
            f"{1e3 * r['step_s']:9.1f} {1e3 * r['math_s']:8.1f} {r['bytes_sent'] / 1e6:9.2f} "
            f"{r['bytes_minimum'] / 1e6:8.2f} {ratio:8.2f} "
            f"{r['state_max_bytes'] / r['state_mean_bytes']:14.2f} "
            f"{r['blocks_rank0']:6d} ({r['blocks_min']}-{r['blocks_max']})"
        )


def verdicts(rows: list[dict]) -> None:
    def find(model, mode, world):
        return next(
            (
                r
                for r in rows
                if (r["model"], r["parallelism"], r["world"]) == (model, mode, world)
                and "skipped" not in r
            ),
            None,
        )

    r = find("llama8b", "fsdp2", 4096)
    if r:
        # Copies between parameters, stacks and buffers are part of the rank's own work.
        print(
            f"Llama-8B FSDP2 at 4096 ranks: construction {r['construction_s']:.2f} s; step "
            f"{r['step_s'] / r['math_s']:.2f}x its own block math"
        )
    r = find("llama70b", "fsdp2", 4096)
    if r:
        print(f"Llama-70B FSDP2 at 4096 ranks: construction {r['construction_s']:.2f} s")
    a, b = find("gpt2", "ddp", 64), find("gpt2", "ddp", 4096)
    if a and b:
        print(
            f"GPT-2 DDP step at 4096 ranks / at 64: {1e3 * b['step_s']:.1f} / "
            f"{1e3 * a['step_s']:.1f} ms = {b['step_s'] / a['step_s']:.2f}"
        )
    worst = max(
        (
            r["bytes_sent"] / r["bytes_minimum"]
            for r in rows
            if "skipped" not in r and r["bytes_minimum"]
        ),
        default=float("nan"),
    )
    print(f"bytes sent / minimum, worst over the runs: {worst:.2f}x")
    enough = [r for r in rows if "skipped" not in r and r["blocks_min"] >= 8]
    if enough:
        mem = max(r["state_max_bytes"] / r["state_mean_bytes"] for r in enough)
        print(f"state max/mean where every rank owns >= 8 blocks, worst: {mem:.2f}")


def stagger_model(model_name: str, world: int, frequency: int, fsdp: bool) -> dict:
    """From the plan and the cost model alone (nothing timed): the slowest rank's step over a
    period, refreshes all at once, staggered, and staggered in the background
    (``refresh_delay`` 1 and ``frequency / 10``), in units of the slowest rank's ordinary
    optimizer step (``background_model``)."""
    import torch
    from torch.distributed.tensor import Shard

    from sharded_shampoo.options import OPTION_DEFAULTS, GroupOptions
    from sharded_shampoo.placement import GroupSpec, Plan, WorldMesh
    from sharded_shampoo.placement.cost import root_cost, step_cost
    from sharded_shampoo.topology import sharding_of

    shapes = tuple(tuple(p.shape) for p in build_model(model_name).parameters())
    out = {"model": model_name, "world": world, "frequency": frequency}
    d = max(1, frequency // 10)
    settings = {"all_at_once": (False, 0), "staggered": (True, 0)}
    settings.update({"background_d1": (True, 1), f"background_d{d}": (True, d)})
    for name, (stagger, delay) in settings.items():
        opts = GroupOptions.from_group(
            dict(OPTION_DEFAULTS, precondition_frequency=frequency, stagger_roots=stagger)
        )
        plan = Plan(world, WorldMesh(list(range(world)), (world,)) if fsdp else None)
        shardings = (
            tuple(sharding_of([Shard(0)], ((0,),), (world,), len(s), "p") for s in shapes)
            if fsdp
            else None
        )
        (g,) = [plan.add_group(GroupSpec(shapes, (torch.float32,) * len(shapes), opts, shardings))]
        per_step = [0.0] * world
        roots: dict[tuple[int, int], float] = {}
        for pi, blocking in enumerate(g.blockings):
            for bid in range(blocking.num_blocks):
                r, shape = g.owners[pi][bid], blocking.block_shape(bid)
                per_step[r] += step_cost(shape)
                phase = g.phases[pi][bid] if g.phases else 0
                roots[(r, phase)] = roots.get((r, phase), 0.0) + root_cost(shape)
        steps = background_model(per_step, roots, frequency, delay)
        unit = max(per_step)
        out[f"{name}_mean"] = statistics.mean(steps) / unit
        out[f"{name}_max"] = max(steps) / unit
    return out


def background_model(
    per_step: list[float], roots: dict[tuple[int, int], float], frequency: int, delay: int
) -> list[float]:
    """The optimizer steps of the third period of a run (the first two fill the queues), each
    the slowest rank's (ranks wait for each other every step): a rank's step is its per-step
    work, plus, without a delay, the root work of its blocks due in it (``roots``: per (rank,
    phase)); with ``delay`` d, that work goes to the rank's worker when the step's math is done,
    runs at the main thread's speed (a core of its own), one job after the other, and the step
    d steps later waits for it if it is not done."""
    by_rank: dict[int, dict[int, float]] = {}
    for (r, phase), work in roots.items():
        by_rank.setdefault(r, {})[phase] = work
    now, steps = 0.0, []
    free = dict.fromkeys(by_rank, 0.0)  # when each rank's worker is next idle
    done: dict[tuple[int, int], float] = {}  # (rank, install step) -> finish time
    for t in range(3 * frequency):
        step = max(per_step)
        for r, phases in by_rank.items():
            wait = max(0.0, done.pop((r, t), 0.0) - now)
            own = wait + per_step[r]
            work = phases.get(t % frequency, 0.0)
            if work and not delay:
                own += work
            elif work:
                free[r] = max(free[r], now + own) + work
                done[(r, t + delay)] = free[r]
            step = max(step, own)
        now += step
        if t >= 2 * frequency:
            steps.append(step)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument(
        "--parallelism", default="all", choices=["all", "fsdp2", "hsdp", "fsdp2_tp", "ddp"]
    )
    ap.add_argument("--world-sizes", default="8,64,512,4096")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # model,parallelism,world: run in-process
    ap.add_argument(
        "--stagger-model",
        action="store_true",
        help="instead: the cost model's step over a period, refreshes at once, staggered "
        "and in the background",
    )
    args = ap.parse_args()
    if args.stagger_model:
        print(
            "slowest rank's optimizer step over a period, in units of its ordinary step: mean / max"
            " (cost model, from the plan; nothing timed)"
        )
        names = None
        for model, worlds, f, fsdp in (
            ("gpt2", (1, 2, 8, 64), 50, False),
            ("llama8b", (64, 512, 4096), 100, True),
        ):
            for world in worlds:
                r = stagger_model(model, world, f, fsdp)
                settings = [k.removesuffix("_mean") for k in r if k.endswith("_mean")]
                if settings != names:
                    names = settings
                    print(
                        f"{'model':9s} {'W':>5s} {'f':>4s}" + "".join(f" {n:>16s}" for n in names)
                    )
                cells = "".join(f" {r[n + '_mean']:7.2f} / {r[n + '_max']:6.2f}" for n in names)
                print(f"{model:9s} {world:5d} {f:4d}{cells}")
        return
    if args.one:
        model, mode, world = args.one.split(",")
        print(json.dumps(one_run(model, mode, int(world), args.steps)))
        return
    if args.model == "all":
        runs = [
            ("llama8b", "fsdp2"),
            ("llama8b", "hsdp"),
            ("llama8b", "fsdp2_tp"),
            ("llama70b", "fsdp2"),
            ("gpt2", "ddp"),
        ]
    else:
        runs = [(args.model, "ddp" if args.model == "gpt2" else "fsdp2")]
    if args.parallelism != "all":
        runs = [(m, args.parallelism) for m, _ in runs]
    rows = []
    for model, mode in runs:
        for world in [int(w) for w in args.world_sizes.split(",")]:
            if model == "llama70b" and world < 4096:
                continue  # 70B at 4096 ranks only, to keep the run short
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{model},{mode},{world}",
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{model} {mode} {world}: failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done: {model} {mode} W={world}", flush=True)
    print()
    report(rows)
    verdicts(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
