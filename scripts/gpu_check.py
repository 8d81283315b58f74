"""Checks ShardedShampoo where its users train: on one GPU (or, with ``--device cpu``, here).

One line per check, then a non-zero exit if any failed. Nothing is downloaded.

- ``exact``: 12 steps of a small float64 model (two param groups, grafting, weight decay,
  momentum; the eigenvalue-corrected preconditioner; refreshes in the background, on a side
  stream on CUDA; KL-Shampoo's pseudo-inverse roots beside spectral descent) on the device
  against the same run on the CPU, same gradients: max relative parameter difference <= 1e-10.
- ``fsdp2``: the same model under FSDP2 on a one-rank process group (NCCL for CUDA tensors,
  gloo for CPU ones) against the single-device run (1e-10).
- ``dcp``: a DCP checkpoint of the FSDP2 run after 6 steps, loaded into a fresh model and
  optimizer, 6 more steps: equal to the uninterrupted run.
- ``full_state_dict``: torch's full state dicts (cpu_offload), loaded with
  ``broadcast_from_rank0``, 6 more steps: equal to the uninterrupted run.
- ``syncs``: host synchronizations in a step that refreshes no roots (CUDA:
  ``torch.cuda.set_sync_debug_mode``; CPU: the synchronizing calls the step makes), one
  process and FSDP2: at most 1; and in a refresh step, for the record.
- ``speed``: a GPT of about 100M parameters (``--small``: a tiny one) in float32: AdamW's
  optimizer step, ShardedShampoo's (defaults, full matrices, the memory-lean setting,
  staggered refreshes, staggered in the background) in a step without a refresh and the
  slowest refresh step, each one's peak memory over a training step and
  what it keeps (``memory_report``), in the same run.
- ``refresh``: one refresh per factor by ``eigh``, warm QR and Newton iterations, per block
  size (``scripts/bench_refresh.py``), against ``eigh``; fails on non-finite roots.

    python scripts/gpu_check.py                     # CUDA, the whole check (minutes)
    python scripts/gpu_check.py --device cpu --small   # the same checks here, in seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

STEPS, HALF = 12, 6
OPTIONS = [  # two groups, as the tests' scenarios (float64 factors, well-conditioned)
    dict(
        lr=0.02,
        betas=(0.9, 0.99),
        momentum=0.5,
        max_preconditioner_dim=8,
        precondition_frequency=4,
        epsilon=1e-4,
        grafting="adam",
        weight_decay=0.01,
        factor_dtype=torch.float64,
    ),
    dict(
        lr=0.01,
        betas=(0.0, 1.0),
        max_preconditioner_dim=6,
        precondition_frequency=3,
        epsilon=1e-3,
        grafting="adagrad",
        weight_decay=0.05,
        decoupled_weight_decay=False,
        momentum=0.8,
        nesterov=True,
        factor_dtype=torch.float64,
    ),
]
EC = [
    dict(o, preconditioner="eigenvalue_corrected", eigenbasis=b)
    for o, b in zip(OPTIONS, ("eigh", "qr"), strict=True)
]
# Refreshes in the background (a side stream on CUDA), installed a step later, staggered.
BACKGROUND = [dict(o, refresh_delay=1, stagger_roots=True) for o in OPTIONS]
# The estimators: KL-Shampoo's pseudo-inverse roots of the first moment's factors; spectral
# descent (Polar Express) at AdamW's RMS.
ESTIMATORS = [
    dict(
        OPTIONS[0],
        kl_shampoo=True,
        epsilon=0.0,
        pseudo_inverse=True,
        rank_rtol=1e-10,
        factor_source="first_moment",
        first_moment_nesterov=True,
    ),
    dict(
        OPTIONS[1],
        preconditioner="spectral",
        newton_schulz="polar_express",
        grafting="rms",
        momentum=0.0,
        nesterov=False,
    ),
]

failures: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name:16s} {detail}", flush=True)
    if not ok:
        failures.append(name)


class Net(torch.nn.Module):
    """Uneven shapes (blocks of several shapes, a row count FSDP2 splits unevenly)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(12, 33)
        self.mid = torch.nn.Linear(33, 20)
        self.mix = torch.nn.Parameter(torch.randn(5, 4, 4) * 0.1)
        self.out = torch.nn.Linear(20, 3)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        h = h + torch.einsum("bi,kij->bj", h[:, :4], self.mix).sum(1, keepdim=True)
        return self.out(h)


def make_net(device):
    torch.manual_seed(0)
    return Net().double().to(device)


def groups_of(model, options):
    params = list(model.named_parameters())
    first = [(n, p) for n, p in params if not n.startswith("out.")]
    return [{"params": first, **options[0]}, {"params": params[len(first) :], **options[1]}]


def batch(step, device):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=g, dtype=torch.float64)
    return x.to(device), torch.randint(0, 3, (16,), generator=g).to(device)


def train(model, opt, device, start, stop):
    for step in range(start, stop):
        opt.zero_grad()
        x, y = batch(step, device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def full(model):
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().cpu()
        for p in model.parameters()
    ]


def rel_err(a, b) -> float:
    return max(
        float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))
        for x, y in zip(a, b, strict=True)
    )


def single_run(device, options, steps=STEPS):
    from sharded_shampoo import ShardedShampoo

    model = make_net(device)
    opt = ShardedShampoo(groups_of(model, options), communication_dtype=torch.float64)
    train(model, opt, device, 0, steps)
    return full(model)


def fsdp_build(device, options):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sharded_shampoo import ShardedShampoo

    model = make_net(device)
    mesh = init_device_mesh(device.type, (1,))
    for name in ("inp", "mid"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(groups_of(model, options), communication_dtype=torch.float64)
    return model, opt


def check_exact(device) -> dict:
    references = {}
    for name, options in (
        ("shampoo", OPTIONS),
        ("eigenvalue_corr", EC),
        ("background", BACKGROUND),
        ("estimators", ESTIMATORS),
    ):
        here = single_run(device, options)
        cpu = single_run(torch.device("cpu"), options)
        err = rel_err(here, cpu)
        report(
            f"exact {name}",
            err <= 1e-10,
            f"{device} vs cpu, {STEPS} steps, float64: "
            f"max relative difference {err:.1e} (bound 1e-10)",
        )
        references[name] = here
    return references


def check_fsdp(device, references) -> None:
    for name, options in (("shampoo", OPTIONS), ("eigenvalue_corr", EC)):
        model, opt = fsdp_build(device, options)
        train(model, opt, device, 0, STEPS)
        err = rel_err(full(model), references[name])
        report(
            f"fsdp2 {name}",
            err <= 1e-10,
            f"FSDP2 on one rank vs one {device.type} process: {err:.1e} (bound 1e-10)",
        )


def check_checkpoints(device, references) -> None:
    import torch.distributed.checkpoint as dcp  # noqa: F401 - imported by checkpoint too
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as root:
        model, opt = fsdp_build(device, OPTIONS)
        train(model, opt, device, 0, HALF)
        save_checkpoint(os.path.join(root, "ckpt"), model, opt)
        full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(model, opt, options=full_options)
        msd = get_model_state_dict(model, options=full_options)
        on_cpu = all(
            t.device.type == "cpu"
            for t in osd["state"][next(iter(osd["state"]))].values()
            if isinstance(t, torch.Tensor)
        )

        model, opt = fsdp_build(device, OPTIONS)
        load_checkpoint(os.path.join(root, "ckpt"), model, opt)
        train(model, opt, device, HALF, STEPS)
        err = rel_err(full(model), references["shampoo"])
        report(
            "dcp",
            err <= 1e-12,
            f"saved after {HALF} steps, loaded, {STEPS - HALF} more: "
            f"{err:.1e} from uninterrupted (bound 1e-12)",
        )

        model, opt = fsdp_build(device, OPTIONS)
        load_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, msd, options=load_options)
        set_optimizer_state_dict(model, opt, osd, options=load_options)
        train(model, opt, device, HALF, STEPS)
        err = rel_err(full(model), references["shampoo"])
        report(
            "full_state_dict",
            err <= 1e-12 and on_cpu,
            f"cpu_offload dict on the CPU: {on_cpu}; broadcast_from_rank0 load, "
            f"{STEPS - HALF} more steps: {err:.1e} from uninterrupted (bound 1e-12)",
        )


def count_syncs(device, step) -> list[str] | None:
    """The synchronizations ``step()`` makes, as CUDA reports them; None on the CPU, where
    nothing synchronizes (the test suite counts the host reads a step asks for there:
    tests/distributed/test_devices.py)."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:80] for w in caught if "synchroniz" in str(w.message)]


def check_syncs(device) -> None:
    from sharded_shampoo import ShardedShampoo

    for mode in ("single", "fsdp2"):
        if mode == "single":
            model = make_net(device)
            opt = ShardedShampoo(groups_of(model, OPTIONS), communication_dtype=torch.float64)
        else:
            model, opt = fsdp_build(device, OPTIONS)
        train(model, opt, device, 0, 4)  # past the first roots (step 4; group 1: 3)
        opt.zero_grad()
        x, y = batch(4, device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        syncs = count_syncs(device, opt.step)  # step 5: no refresh in either group
        if syncs is None:
            report(f"syncs {mode}", True, "not counted on the CPU (nothing synchronizes)")
            continue
        report(
            f"syncs {mode}",
            len(syncs) <= 1,
            f"{len(syncs)} in a step without a refresh (budget 1): {syncs}",
        )
        opt.zero_grad()
        x, y = batch(5, device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        refresh = count_syncs(device, opt.step)  # step 6: group 1 refreshes its roots
        report(
            f"syncs {mode} ref",
            True,
            f"{len(refresh)} in a step that refreshes roots "
            "(the decompositions' own and one root check): for the record",
        )


def check_speed(device, small: bool) -> None:
    from workloads import GPT, GPTConfig

    from sharded_shampoo import ShardedShampoo

    cfg = (
        GPTConfig(context=64, width=64, layers=2)
        if small
        else GPTConfig(context=256, width=768, layers=12, heads=12)
    )
    batch_size, frequency = (4, 5) if small else (16, 10)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = torch.randint(
        0, cfg.vocab, (batch_size, cfg.context + 1), generator=torch.Generator().manual_seed(0)
    ).to(device)
    # Shampoo at its defaults, with full matrices (what packing costs here) and in the
    # memory-lean setting (README, Memory).
    configs = {
        "adamw": None,
        "shampoo": {},
        "shampoo unpacked": {"symmetric_packing": False},
        "shampoo lean": {
            "max_factor_ratio": 4,
            "root_dtype": torch.int8,
            "grafting_dtype": torch.bfloat16,
            "first_moment_dtype": torch.bfloat16,
        },
        # Staggered, and the same with the refreshes on a side stream (installed a step later).
        "shampoo staggered": {"stagger_roots": True},
        "shampoo background": {"stagger_roots": True, "refresh_delay": 1},
    }
    figures = {}
    for name, options in configs.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        params = sum(p.numel() for p in model.parameters())
        if options is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            opt = ShardedShampoo(
                model.parameters(),
                lr=1e-4,
                precondition_frequency=frequency,
                max_preconditioner_dim=1024,
                **options,
            )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        plain, refresh = [], []
        for step in range(1, 3 * frequency + 1):
            opt.zero_grad(set_to_none=False)
            model(data[:, :-1], data[:, 1:]).backward()
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            elapsed = time.perf_counter() - t0
            if step > 2:  # warm
                # A refresh step: every block's at once, or (staggered) the slowest step.
                due = options is not None and (step % frequency == 0 or "stagger_roots" in options)
                (refresh if due else plain).append(elapsed)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
        kept = 8.0 if options is None else opt.memory_report().per_param()
        if not plain:  # staggered: every step refreshes some blocks; the median is ordinary
            plain = refresh
        figures[name] = (statistics.median(plain), max(refresh, default=float("nan")), peak, kept)
    a_step, _, a_peak, _ = figures["adamw"]
    gib = 2**30
    lines = [
        f"{name} optimizer step {step * 1e3:.1f} ms ({step / a_step:.1f}x AdamW), slowest "
        f"refresh step {refresh * 1e3:.0f} ms, peak memory {peak / gib:.2f} GiB, "
        f"kept {kept:.1f} B/param"
        for name, (step, refresh, peak, kept) in figures.items()
        if name != "adamw"
    ]
    report(
        "speed",
        True,
        f"GPT {params / 1e6:.1f}M params, float32, batch {batch_size}x{cfg.context}, roots "
        f"every {frequency}: AdamW {a_step * 1e3:.1f} ms, peak {a_peak / gib:.2f} GiB; "
        + "; ".join(lines),
    )


def check_refresh(device, small: bool) -> None:
    """One refresh per factor by each method (``bench_refresh.py``) on the device: ms per factor
    and against ``eigh``, full-rank and rank-deficient factors; fails if a method's roots come
    out non-finite."""
    import bench_refresh

    for d in (16, 32) if small else (128, 256, 512, 1024, 2048):
        n = bench_refresh.STACK.get(d, 1)
        for kind in ("full", "low-rank"):
            a = bench_refresh.factors(d, n, kind, device)
            runs = bench_refresh.methods(a)
            # (roots, ok), or for QR ({"root_0": roots, "eigenvectors_0": basis}, ok)
            outs = [fn()[0] for fn in runs.values()]
            roots = [o["root_0"] if isinstance(o, dict) else o for o in outs]
            finite = all(bool(torch.isfinite(r).all()) for r in roots)
            ms = {m: bench_refresh.timed(f, 3, device) * 1e3 / n for m, f in runs.items()}
            cells = ", ".join(f"{m} {ms[m]:.2f} ms ({ms[m] / ms['eigh']:.2f}x)" for m in ms)
            report(f"refresh d={d} {kind}", finite, f"per factor, {n} stacked: {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu")
    )
    parser.add_argument("--small", action="store_true", help="tiny speed model (CI)")
    args = parser.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # float64 checks; float32 speed
        torch.backends.cudnn.allow_tf32 = False
        print(
            f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}",
            flush=True,
        )
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        print(f"device: cpu, torch {torch.__version__}", flush=True)

    import torch.distributed as dist

    started = time.perf_counter()
    references = check_exact(device)
    with tempfile.TemporaryDirectory() as tmp:
        # One rank, as users start it: NCCL for CUDA tensors, gloo for CPU ones.
        dist.init_process_group(
            "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo",
            store=dist.FileStore(os.path.join(tmp, "store"), 1),
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            check_fsdp(device, references)
            check_checkpoints(device, references)
            check_syncs(device)
        finally:
            dist.destroy_process_group()
    check_speed(device, args.small)
    check_refresh(device, args.small)
    print(
        f"{len(failures)} failed ({', '.join(failures) or 'none'}) in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
