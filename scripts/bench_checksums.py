"""What the per-block checksums of a checkpoint cost: the benchmark GPT (4 layers x 256, 3.3M
parameters) and ShardedShampoo at its defaults, one process, after 3 steps (state filled, roots
refreshed at step 1).

    python scripts/bench_checksums.py [--repeats 7] [--threads 2]

Prints the median of ``--repeats`` runs of: a DCP save (``save_checkpoint``, checksums
included), computing every block's checksum of the optimizer's state dict alone (the part of
the save they add), a DCP load (``load_checkpoint``, verification included) and verifying
alone; and the checksums' share of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from workloads import GPT, GPTConfig, lm_batch, stdlib_text

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint
from sharded_shampoo.state.checksums import add_checksums, verify_checksums


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=128, width=256, layers=4))
    opt = ShardedShampoo(model.parameters(), lr=1e-3, start_preconditioning_step=1)
    data, _ = stdlib_text(2_000_000)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = lm_batch(data, 8, 128, gen)
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    sd = opt.state_dict()
    blocks = sum(1 for s in sd["state"].values() for k in s if k.endswith(".checksum"))
    state_mb = (
        sum(
            v.numel() * v.element_size()
            for s in sd["state"].values()
            for k, v in s.items()
            if isinstance(v, torch.Tensor) and k.startswith("blocks.")
        )
        / 2**20
    )

    def checksums():
        for state in sd["state"].values():
            add_checksums(state)

    def verify():
        verify_checksums(
            [
                (str(k), s, {key.split(".")[1] for key in s if key.startswith("blocks.")})
                for k, s in sd["state"].items()
            ]
        )

    with tempfile.TemporaryDirectory() as root:
        saves = iter(range(10**6))
        save_ms = _median_ms(
            lambda: save_checkpoint(f"{root}/c{next(saves)}", model, opt), args.repeats
        )
        load_ms = _median_ms(lambda: load_checkpoint(f"{root}/c0", model, opt), args.repeats)
    sum_ms = _median_ms(checksums, args.repeats)
    verify_ms = _median_ms(verify, args.repeats)
    print(f"benchmark GPT, {blocks} blocks, {state_mb:.1f} MiB of block state, defaults")
    print(f"DCP save (save_checkpoint)   {save_ms:8.1f} ms")
    share = 100 * sum_ms / save_ms
    print(f"  checksums alone            {sum_ms:8.1f} ms  ({share:.2f}% of the save)")
    print(f"DCP load (load_checkpoint)   {load_ms:8.1f} ms")
    share = 100 * verify_ms / load_ms
    print(f"  verification alone         {verify_ms:8.1f} ms  ({share:.2f}% of the load)")


if __name__ == "__main__":
    main()
