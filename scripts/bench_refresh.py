"""The cost of one refresh of a factor's preconditioner, per block size and method, and of
the optimizer step refreshed every step, against AdamW and torch.optim.Muon.

    python scripts/bench_refresh.py [--sizes 64,128,...] [--workloads lm,autoencoder]
                                    [--threads 2] [--device cpu]

Methods, as the optimizer runs them on a stack of same-size factors (root-inverse Shampoo,
exponent 1/4, float32 factors):

- ``eigh``: ``torch.linalg.eigh`` of the stack, then the roots (``algorithm.roots``);
- ``qr``: one warm-started step ``Q <- qr((F + s I) Q)`` from the previous basis, the
  eigenvalues ``diag(Q^T F Q)`` and the roots (``eigenbasis="qr"``,
  ``algorithm.eigenbasis.warm_roots``);
- ``newton20`` / ``newton30``: 20 or 30 coupled Newton iterations (``newton_iterations``).

Two kinds of factor per size: ``full``, an EMA (beta2 0.95) of 4 d gradient Grams (full rank);
``low-rank``, the Gram of d / 8 gradient columns (rank-deficient, as a 1-D block's or an early
factor is). ``eigh`` takes less on the second kind (LAPACK deflates). Prints milliseconds per
factor (median of the repeats) and each method's cost against ``eigh``.

Then, per workload of ``train.py`` (its model, batch and options as ``--parallelism none
--beta2 0.95 --max-preconditioner-dim 128 --precondition-frequency 1
--start-preconditioning-step 1``), in one process: the median forward+backward and optimizer
step over ``--step-count`` steps (the first 10 left out) for AdamW, Muon (``torch.optim.Muon``
for the hidden weights, AdamW for the rest) and ShardedShampoo by each method, from the same
initial model, and each whole step against Muon's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sharded_shampoo.algorithm.eigenbasis import warm_roots
from sharded_shampoo.algorithm.roots import inverse_roots, newton_inverse_roots
from sharded_shampoo.options import OPTION_DEFAULTS, GroupOptions

# Factors per stack at each size: about as many as a model of a few million parameters has.
STACK = {64: 64, 128: 32, 256: 16, 512: 4, 1024: 2, 2048: 1}


def factors(d: int, n: int, kind: str, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(d)
    if kind == "low-rank":
        g = torch.randn(n, d, max(d // 8, 1), generator=gen)
        return (g @ g.mT / g.shape[-1]).to(device)
    a = torch.zeros(n, d, d)
    for _ in range(4):
        g = torch.randn(n, d, d, generator=gen)
        a = 0.95 * a + 0.05 * (g @ g.mT) / d
    return a.to(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def methods(a: torch.Tensor) -> dict:
    """The refresh of the stack ``a`` by each method, as a function of nothing."""
    opts = GroupOptions.from_group({**OPTION_DEFAULTS, "eigenbasis": "qr"})
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    # The previous basis: eigh's of a nearby factor (a step of beta2 0.95 before).
    _, q = torch.linalg.eigh(a + 0.05 * a.diagonal(dim1=-2, dim2=-1).mean() * eye)
    state = {"factor_0": a, "eigenvectors_0": q.contiguous()}
    common = dict(scale=1.0, epsilon=1e-12, out_dtype=a.dtype)
    return {
        "eigh": lambda: inverse_roots(a, exponent=0.25, **common),
        "qr": lambda: warm_roots(state, opts, 2, 1.0, 0.25, (0,)),  # step 2: warm
        "newton20": lambda: newton_inverse_roots(a, p=4, iterations=20, **common),
        "newton30": lambda: newton_inverse_roots(a, p=4, iterations=30, **common),
    }


# ShardedShampoo by each method, refreshed every step: train.py options for each.
STEP_METHODS = {
    "shampoo eigh": [],
    "shampoo qr": ["--eigenbasis", "qr"],
    "shampoo newton30": ["--shampoo-option", "newton_iterations=30"],
    "EC eigh": ["--preconditioner", "eigenvalue_corrected"],
    "EC qr (soap)": ["--preconditioner", "eigenvalue_corrected", "--eigenbasis", "qr",
                     "--eigenbasis-convention", "soap"],
}  # fmt: skip


def step_times(workload: str, steps: int) -> dict[str, tuple[float, float]]:
    """{optimizer: (forward+backward ms, optimizer step ms)}, medians over steps 11..``steps``
    of ``train.py``'s ``workload`` refreshed every step, each from the same initial model."""
    import train

    base = ["--workload", workload, "--parallelism", "none", "--nproc", "1", "--beta2", "0.95",
            "--max-preconditioner-dim", "128", "--precondition-frequency", "1",
            "--start-preconditioning-step", "1", "--checkpoint-every", "0"]  # fmt: skip
    runs = {"adamw": ("adamw", []), "muon": ("muon", [])}
    runs.update({m: ("shampoo", extra) for m, extra in STEP_METHODS.items()})
    out = {}
    for label, (name, extra) in runs.items():
        args = train.parse_args(base + extra)
        work = train.Workload(args)
        torch.manual_seed(0)
        model = work.model()
        opts, _ = train.make_optimizers(name, model, args)
        fb, st = [], []
        for step in range(1, steps + 1):
            x, y = work.batch("train", 0, step)
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model(x, y).backward()
            t1 = time.perf_counter()
            for o in opts:
                o.step()
            t2 = time.perf_counter()
            if step > 10:
                fb.append(t1 - t0)
                st.append(t2 - t1)
        out[label] = (statistics.median(fb) * 1e3, statistics.median(st) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256,512,1024,2048", help="'' for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default="lm,autoencoder", help="'' for none")
    ap.add_argument("--step-count", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"ms per factor (median of {args.repeats}); {args.threads} threads on {device}")
    print(f"{'d':>5} {'kind':>9} {'n':>3}  " + "  ".join(f"{m:>16}" for m in methods_names()))
    for d in (int(s) for s in filter(None, args.sizes.split(","))):
        n = STACK.get(d, 1)
        for kind in ("full", "low-rank"):
            a = factors(d, n, kind, device)
            ms = {m: timed(f, args.repeats, device) * 1e3 / n for m, f in methods(a).items()}
            cells = [f"{ms[m]:8.2f} ({ms[m] / ms['eigh']:4.2f}x)" for m in methods_names()]
            print(f"{d:>5} {kind:>9} {n:>3}  " + "  ".join(f"{c:>16}" for c in cells))
    for workload in filter(None, args.workloads.split(",")):
        times = step_times(workload, args.step_count)
        muon = sum(times["muon"])
        print(f"\n{workload}, refreshed every step (ms, median of steps 11-{args.step_count}):")
        print(f"{'optimizer':>18} {'fwd+bwd':>8} {'opt step':>9} {'step':>7} {'vs Muon':>8}")
        for label, (fb, st) in times.items():
            print(f"{label:>18} {fb:8.1f} {st:9.1f} {fb + st:7.1f} {(fb + st) / muon:7.2f}x")


def methods_names() -> list[str]:
    return ["eigh", "qr", "newton20", "newton30"]


if __name__ == "__main__":
    main()
