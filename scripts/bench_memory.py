"""Optimizer memory per parameter: ShardedShampoo's settings next to AdamW's 8 bytes.

Every figure comes from ``ShardedShampoo.memory_report()`` (everything the optimizer keeps
between steps, state and buffers, counted once per storage; parameters and gradients excluded):

- the benchmark GPT (3.32M parameters, blocks up to 1024), one process, real tensors, after
  three steps; AdamW's figure is the bytes of its state after one step;
- Llama-3 8B and 70B shapes: rank 0 of a simulated FSDP2 job (torch's fake process group; the
  model is built on ``meta`` and rank 0 materializes only its shards), and the plan's total
  over all ranks (every block's state, counted once, from the block shapes alone).

Each (model, setting) runs in a fresh process.

    python scripts/bench_memory.py                     # GPT, 8B at 512 ranks, 70B at 4096
    python scripts/bench_memory.py --models gpt --settings defaults,lean
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

# name: ShardedShampoo options (beyond lr and precondition_frequency).
SETTINGS = {
    "defaults": {},
    "symmetric_packing=False": {"symmetric_packing": False},
    "root_dtype=bfloat16": {"root_dtype": "bfloat16"},
    "max_factor_ratio=4": {"max_factor_ratio": 4},
    "bfloat16 moving averages": {"grafting_dtype": "bfloat16", "first_moment_dtype": "bfloat16"},
    # The documented memory-lean setting (README, Memory): converges as the defaults do.
    "lean": {
        "max_factor_ratio": 4,
        "root_dtype": "bfloat16",
        "grafting_dtype": "bfloat16",
        "first_moment_dtype": "bfloat16",
    },
    "max_factor_ratio=2": {"max_factor_ratio": 2},
    # The lean setting with 8-bit quantized roots.
    "lean-int8": {
        "max_factor_ratio": 4,
        "root_dtype": "int8",
        "grafting_dtype": "bfloat16",
        "first_moment_dtype": "bfloat16",
    },
}
WORLD = {"llama8b": 512, "llama70b": 4096}


def gpt(setting: str) -> dict:
    import torch
    from workloads import GPT, GPTConfig

    from sharded_shampoo import ShardedShampoo

    torch.manual_seed(0)
    model = GPT(GPTConfig(context=128, width=256, layers=4))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if setting == "AdamW":
        opt = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        held = sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for k, t in s.items()
            if k != "step"
        )
        return {"model": "gpt", "setting": setting, "params": n, "total": held, "state": held}
    opt = ShardedShampoo(
        params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, precondition_frequency=2,
        **SETTINGS[setting],
    )  # fmt: skip
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    return _figures("gpt", setting, opt, n)


def llama(name: str, setting: str) -> dict:
    import torch.distributed as dist
    from bench_scale import build_model, numel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from sharded_shampoo import ShardedShampoo

    world = WORLD[name]
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    model = build_model(name)
    total = numel(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    opt = ShardedShampoo(
        list(model.parameters()), lr=1e-4, betas=(0.9, 0.999), precondition_frequency=100,
        **SETTINGS[setting],
    )  # fmt: skip
    local = sum(p.to_local().numel() for p in model.parameters())
    r = _figures(name, setting, opt, local)
    r["world"] = world
    r["plan_total"] = plan_state_bytes(opt)
    r["model_params"] = total
    return r


def plan_state_bytes(opt) -> int:
    """Every block's state, on whichever rank owns it, from the block shapes alone."""
    from sharded_shampoo.state.stacks import block_state_spec

    out = 0
    for g in opt.plan.groups:
        for pi, blocking in enumerate(g.blockings):
            for bid in range(blocking.num_blocks):
                for _, shape, dtype in block_state_spec(
                    blocking.block_shape(bid), g.spec.dtypes[pi], g.spec.opts
                ):
                    out += math.prod(shape) * dtype.itemsize
    return out


def _figures(model: str, setting: str, opt, params: int) -> dict:
    report = opt.memory_report()
    return {
        "model": model,
        "setting": setting,
        "params": params,
        "total": report.total,
        "state": report.state_bytes,
        "by_kind": {**report.state, **report.buffers},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt,llama8b,llama70b")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # (model, setting), in-process
    args = ap.parse_args()
    if args.one:
        model, setting = args.one
        row = gpt(setting) if model == "gpt" else llama(model, setting)
        print(json.dumps(row))
        return
    rows = []
    for model in args.models.split(","):
        settings = args.settings.split(",")
        if model == "gpt":
            settings = ["AdamW", *settings]
        for setting in settings:
            out = subprocess.run(
                [sys.executable, __file__, "--one", model, setting],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            report_row(rows[-1])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


def report_row(r: dict) -> None:
    mib = 2**20
    where = "one process" if r["model"] == "gpt" else f"rank 0 of {r['world']}"
    line = (
        f"{r['model']:9s} {r['setting']:24s} {where:16s} {r['total'] / mib:10.1f} MiB "
        f"{r['total'] / r['params']:6.1f} B/param (state {r['state'] / r['params']:5.1f})"
    )
    if "plan_total" in r:
        line += f"; all ranks: state {r['plan_total'] / r['model_params']:5.1f} B/param"
    print(line, flush=True)
    kinds = r.get("by_kind", {})
    if kinds:
        print(
            "    " + ", ".join(f"{k} {v / r['params']:.2f}" for k, v in kinds.items() if v),
            flush=True,
        )


if __name__ == "__main__":
    main()
