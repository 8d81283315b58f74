"""The cost of one refresh of a factor's preconditioner, per block size and method.

    python scripts/bench_refresh.py [--sizes 64,128,...] [--threads 2] [--device cpu]

Methods, as the optimizer runs them on a stack of same-size factors (root-inverse Shampoo,
exponent 1/4, float32 factors):

- ``eigh``: ``torch.linalg.eigh`` of the stack, then the roots (``algorithm.roots``);
- ``qr``: one warm-started step ``Q <- qr(F Q)`` from the previous basis, the eigenvalues
  ``diag(Q^T F Q)`` and the roots (``eigenbasis="qr"``, ``algorithm.eigenbasis.warm_roots``);
- ``newton20`` / ``newton30``: 20 or 30 coupled Newton iterations (``newton_iterations``).

Two kinds of factor per size: ``full``, an EMA (beta2 0.95) of 4 d gradient Grams (full rank);
``low-rank``, the Gram of d / 8 gradient columns (rank-deficient, as a 1-D block's or an early
factor is). ``eigh`` takes less on the second kind (LAPACK deflates); ``qr`` then pays its QR
and eigh's (a rank-deficient factor takes eigh's basis). Prints milliseconds per factor
(median of the repeats) and each method's cost against ``eigh``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256,512,1024,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"ms per factor (median of {args.repeats}); {args.threads} threads on {device}")
    print(f"{'d':>5} {'kind':>9} {'n':>3}  " + "  ".join(f"{m:>16}" for m in methods_names()))
    for d in (int(s) for s in args.sizes.split(",")):
        n = STACK.get(d, 1)
        for kind in ("full", "low-rank"):
            a = factors(d, n, kind, device)
            ms = {m: timed(f, args.repeats, device) * 1e3 / n for m, f in methods(a).items()}
            cells = [f"{ms[m]:8.2f} ({ms[m] / ms['eigh']:4.2f}x)" for m in methods_names()]
            print(f"{d:>5} {kind:>9} {n:>3}  " + "  ".join(f"{c:>16}" for c in cells))


def methods_names() -> list[str]:
    return ["eigh", "qr", "newton20", "newton30"]


if __name__ == "__main__":
    main()
