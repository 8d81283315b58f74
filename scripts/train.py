"""The main job: train a real model with ShardedShampoo and AdamW on several processes.

Workloads (nothing is downloaded):
  lm      a byte-level GPT on the Python standard library's own source, split by file
  digits  a small ConvNet on scikit-learn's bundled 8x8 digits, with a held-out split
  autoencoder  a deep MLP autoencoder (64-512-256-128-16 and back) on the same digits,
          trained to reconstruct its input (binary cross-entropy on the pixels)

Each optimizer of the run trains the same model from the same seed; per step the script logs
train loss, learning rate and step time (JSON lines), evaluates on the validation split every
--eval-every steps, checkpoints through DCP every --checkpoint-every steps (--resume continues
bitwise from the newest complete checkpoint), and ends with a PNG of train and validation loss
against steps and wall-clock, and a summary table.

    python scripts/train.py                      # lm, shampoo and adamw, 2 processes, DDP
    python scripts/train.py --workload digits --parallelism fsdp2
    torchrun --standalone --nproc-per-node 2 scripts/train.py --parallelism hsdp
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from launch import launch, wrap
from workloads import GPT, GPTConfig, lm_batch, param_count, stdlib_text

from sharded_shampoo import ShardedShampoo, hidden_matrix_groups
from sharded_shampoo.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_directory,
)
from sharded_shampoo.options import OPTION_DEFAULTS

# ---------------------------------------------------------------- workloads


class DigitsNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.head = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return torch.nn.functional.cross_entropy(self.head(h.flatten(1)), y)


class Autoencoder(torch.nn.Module):
    """Hinton and Salakhutdinov's deep autoencoder, at the scale of 8x8 digits: a 16-unit
    bottleneck between layers of very different widths, the classic hard case for first-order
    methods and the usual test of second-order ones."""

    WIDTHS = (64, 512, 256, 128, 16, 128, 256, 512, 64)

    def __init__(self) -> None:
        super().__init__()
        w = self.WIDTHS
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(w[:-1], w[1:], strict=True)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < len(self.layers) and i != len(self.layers) // 2 - 1:
                h = torch.tanh(h)
        return torch.nn.functional.binary_cross_entropy_with_logits(h, x.flatten(1))


class Workload:
    """A model factory, the data, and batches fixed by (seed, rank, step)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.workload == "lm":
            self.train_data, self.val_data = stdlib_text(args.data_bytes)
        else:
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            y = torch.tensor(digits.target, dtype=torch.long)
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
            split = int(0.8 * len(y))
            self.train_data = (x[order[:split]], y[order[:split]])
            self.val_data = (x[order[split:]], y[order[split:]])

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.args.seed)
        if self.args.workload == "lm":
            a = self.args
            return GPT(GPTConfig(context=a.context, width=a.width, layers=a.layers, heads=a.heads))
        return DigitsNet() if self.args.workload == "digits" else Autoencoder()

    def batch(self, split: str, rank: int, step: int):
        data = self.train_data if split == "train" else self.val_data
        seed = self.args.seed
        if split == "val" and self.args.eval_seed >= 0:
            seed = self.args.eval_seed
        gen = torch.Generator().manual_seed(
            seed * 1_000_003 + rank * 10_007 + step + (0 if split == "train" else 7**9)
        )
        if self.args.workload == "lm":
            return lm_batch(data, self.args.batch, self.args.context, gen)
        idx = torch.randint(0, len(data[1]), (self.args.batch,), generator=gen)
        return data[0][idx], data[1][idx]


# ---------------------------------------------------------------- one rank


def hidden_weights(model: torch.nn.Module) -> set[int]:
    """The ids of the hidden layers' weights: every Linear and Conv2d but the last."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return {id(m.weight) for m in layers[:-1]}


def muon_params(model: torch.nn.Module) -> tuple[list, list]:
    """(for Muon, for AdamW): Muon takes the weights of the hidden layers, as its documentation
    advises, AdamW the rest (embeddings, the output layer, biases, norms). A conv filter goes to
    Muon as a matrix (out channels x the rest), as in Muon's CIFAR-10 runs: a 2-D parameter that
    shares its storage, given the filter's gradient by a hook after each backward."""
    hidden = hidden_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = []
    for p in params:
        if id(p) in hidden and p.dim() > 2:
            flat = torch.nn.Parameter(p.detach().view(p.shape[0], -1))

            def hand_over(p: torch.Tensor, flat: torch.nn.Parameter = flat) -> None:
                flat.grad = p.grad.view(flat.shape)

            p.register_post_accumulate_grad_hook(hand_over)
            matrices.append(flat)
        elif id(p) in hidden:
            matrices.append(p)
    return matrices, [p for p in params if id(p) not in hidden]


def make_optimizers(name: str, model: torch.nn.Module, args: argparse.Namespace):
    """(the optimizers, their base learning rate): one optimizer, or Muon and AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        adamw = torch.optim.AdamW(
            params, lr=args.adamw_lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay
        )
        return [adamw], args.adamw_lr
    if name == "heavyball":
        # A peer from the package index (pip install heavyball), run eagerly: its
        # torch.compile of the update failed in inductor on this CPU build.
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None
        make = getattr(heavyball, args.heavyball_class)
        return [make(params, lr=args.heavyball_lr, weight_decay=args.weight_decay)], (
            args.heavyball_lr
        )
    if name == "muon":
        # match_rms_adamw scales each matrix's update to AdamW's RMS, so that one learning
        # rate (and weight decay) serves both parts (Moonshot's "Muon is scalable").
        matrices, rest = muon_params(model)
        muon = torch.optim.Muon(
            matrices,
            lr=args.muon_lr,
            weight_decay=args.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        adamw = torch.optim.AdamW(
            rest, lr=args.muon_lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay
        )
        return [muon, adamw], args.muon_lr
    common = dict(
        lr=args.shampoo_lr,
        betas=(0.9, args.beta2),
        grafting_beta2=args.beta2,
        weight_decay=args.weight_decay,
        max_preconditioner_dim=args.max_preconditioner_dim,
    )
    options = dict(
        epsilon=args.epsilon,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=args.start_preconditioning_step or args.precondition_frequency,
        grafting=args.grafting if args.grafting != "none" else None,
        stagger_roots=args.stagger_roots,
        preconditioner=args.preconditioner,
        eigenbasis=args.eigenbasis,
        eigenbasis_convention=args.eigenbasis_convention,
    )
    options = {**common, **options, **dict(args.shampoo_option)}  # the last given wins
    if args.hidden_only:
        # The options above for the hidden matrices (Muon's, as --optimizer muon splits the
        # model); the library's defaults and Adam for the rest, with AdamW's lr, weight decay
        # and betas.
        rest = {**OPTION_DEFAULTS, **common, "preconditioner": "diagonal"}
        hidden = hidden_weights(model)
        others = [n for n, p in model.named_parameters() if id(p) not in hidden]
        params = hidden_matrix_groups(model, other=rest, exclude=others)
    return [ShardedShampoo(params, **options)], args.shampoo_lr


def parse_option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` as (name, value): a Python literal, else the string."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay; a function of the step, so resuming needs no state."""
    warm = min(1.0, step / max(1, args.warmup))
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))


def mean_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model, workload: Workload, rank: int, batches: int) -> float:
    losses = [model(*workload.batch("val", rank, i)).item() for i in range(batches)]
    return mean_over_ranks(sum(losses) / len(losses))


def train_one(
    name: str, args: argparse.Namespace, workload: Workload, rank: int, world: int
) -> None:
    model = wrap(workload.model(), args.parallelism, world)
    opts, base_lr = make_optimizers(name, model, args)
    # Muon comes with a second optimizer; the checkpoint takes one (refused in parse_args).
    opt = opts[0]
    if isinstance(opt, ShardedShampoo) and world > 1:
        placement_summary(opt, args.parallelism, rank, world)
    log_path = os.path.join(args.out_dir, f"{name}.jsonl")
    ckpt_root = os.path.join(args.out_dir, "checkpoints", name)
    first, wall = 1, 0.0
    if args.resume:
        path = latest_checkpoint(ckpt_root)
        if path is not None:
            extra = load_checkpoint(path, model, opt, extra={"step": 0, "wall": 0.0})
            first, wall = extra["step"] + 1, extra["wall"]
            if rank == 0:
                print(f"{name}: resumed from {path}", flush=True)
    if rank == 0:
        # Keep the log of the steps the checkpoint covers; drop what came after it.
        kept = []
        if first > 1 and os.path.exists(log_path):
            with open(log_path) as fh:
                kept = [line for line in fh if json.loads(line)["step"] < first]
        with open(log_path, "w") as fh:
            fh.writelines(kept)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: nothing to leak
        bar = tqdm(total=args.steps, initial=first - 1, desc=name, file=sys.stdout, leave=True)
    last = min(args.steps, args.stop_after or args.steps)
    for step in range(first, last + 1):
        for group in (g for o in opts for g in o.param_groups):
            group["lr"] = base_lr * lr_factor(step, args)
        t0 = time.perf_counter()
        x, y = workload.batch("train", rank, step)
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        dt = time.perf_counter() - t0
        wall += dt
        row = {
            "step": step,
            "loss": mean_over_ranks(loss.item()),
            "lr": opt.param_groups[0]["lr"],
            "step_time": dt,
            "wall": wall,
        }
        if step % args.eval_every == 0 or step == last:
            row["val_loss"] = evaluate(model, workload, rank, args.eval_batches)
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", ms=f"{dt * 1000:.0f}")
                bar.update(1)
            elif args.print_losses:
                print(f"{name} step {step} loss {row['loss']:.6f}", flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save_checkpoint(
                step_directory(ckpt_root, step), model, opt, extra={"step": step, "wall": wall}
            )
    if bar is not None:
        bar.close()
    if world > 1:
        same = replicas_identical(model)
        if rank == 0:
            print(f"{name}: replicas identical: {same}", flush=True)


def placement_summary(opt: ShardedShampoo, parallelism: str, rank: int, world: int) -> None:
    """What each rank owns and sends (rank 0 prints: lines of several processes interleave)."""
    owned = [None] * world
    dist.all_gather_object(owned, (opt.owned_blocks(), opt.state_bytes() / 2**20))
    if rank == 0:
        print(
            f"shampoo: {parallelism}, {world} ranks; bytes sent per rank per optimizer step: "
            f"{opt.bytes_sent_per_step() / 1e6:.3f} MB; blocks owned per rank: "
            f"{[o[0] for o in owned]} of {opt.plan.num_blocks}; optimizer state per rank: "
            f"{', '.join(f'{o[1]:.1f}' for o in owned)} MiB",
            flush=True,
        )


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters (each rank's full parameters, checksummed
    in float64; DTensors gathered whole)."""
    total = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += full.detach().double().square().sum().cpu() + full.detach().double().sum().cpu()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, total.item())
    return len(set(sums)) == 1


def run_rank(args: argparse.Namespace) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = Workload(args)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        print(
            f"{args.workload}: {param_count(workload.model()):,} parameters; {world} "
            f"process(es), parallelism {args.parallelism}; logs in {args.out_dir}",
            flush=True,
        )
    for name in optimizers(args):
        train_one(name, args, workload, rank, world)
    if rank == 0:
        report(args)


def optimizers(args: argparse.Namespace) -> list[str]:
    return ["shampoo", "adamw"] if args.optimizer == "both" else [args.optimizer]


# ---------------------------------------------------------------- report


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def report(args: argparse.Namespace) -> None:
    logs = {n: read_log(os.path.join(args.out_dir, f"{n}.jsonl")) for n in optimizers(args)}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color, (name, rows) in zip(
        ("tab:blue", "tab:red", "tab:green"), logs.items(), strict=False
    ):
        for ax, x in zip(axes, ("step", "wall"), strict=True):
            ax.plot(
                [r[x] for r in rows],
                [r["loss"] for r in rows],
                color=color,
                alpha=0.3,
                label=f"{name} train",
            )
            val = [r for r in rows if "val_loss" in r]
            ax.plot(
                [r[x] for r in val],
                [r["val_loss"] for r in val],
                color=color,
                marker="o",
                label=f"{name} validation",
            )
    for ax, label in zip(axes, ("step", "wall-clock seconds (training)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.workload}: ShardedShampoo and AdamW ({args.parallelism})")
    fig.tight_layout()
    png = os.path.join(args.out_dir, "loss.png")
    fig.savefig(png, dpi=100)
    print(
        f"\n{'optimizer':10s} {'steps':>6s} {'train loss':>11s} {'val loss':>9s} "
        f"{'ms/step':>8s} {'seconds':>8s}"
    )
    for name, rows in logs.items():
        last = rows[-1]
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        ms = 1000 * sum(r["step_time"] for r in rows) / len(rows)
        print(
            f"{name:10s} {last['step']:6d} {last['loss']:11.4f} "
            f"{val[-1] if val else float('nan'):9.4f} "
            f"{ms:8.1f} {last['wall']:8.1f}"
        )
    print(f"plot: {png}")


# ---------------------------------------------------------------- launch


# --recommended: what the study (scripts/bench_converge.py, arm shampoo-half) tuned.
RECOMMENDED = dict(
    hidden_only=True,
    epsilon=0.0,
    grafting="rms",
    shampoo_option=[("pseudo_inverse", True), ("inverse_exponent_override", {2: 0.5})],
    precondition_frequency=1,
    start_preconditioning_step=1,
    beta2=0.95,
    max_preconditioner_dim=128,
    shampoo_lr=1e-2,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workload", choices=["lm", "digits", "autoencoder"], default="lm")
    ap.add_argument(
        "--optimizer",
        choices=["shampoo", "adamw", "muon", "heavyball", "both"],
        default="both",
        help="muon: torch.optim.Muon for the hidden layers' weights, AdamW for the rest; "
        "heavyball: --heavyball-class from the heavyball package, at its defaults",
    )
    ap.add_argument("--heavyball-class", default="SOAP", help="e.g. SOAP, KLSOAP, PSGDKron")
    ap.add_argument("--nproc", type=int, default=2, help="processes to start (not under torchrun)")
    ap.add_argument("--parallelism", choices=["none", "ddp", "fsdp2", "hsdp"], default="ddp")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--data-bytes", type=int, default=8_000_000)
    ap.add_argument("--shampoo-lr", type=float, default=3e-3)
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    ap.add_argument("--muon-lr", type=float, default=3e-3, help="of both its parts")
    ap.add_argument("--heavyball-lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument(
        "--beta2",
        type=float,
        default=0.999,
        help="every optimizer's second-moment EMA (Shampoo: factors and grafting)",
    )
    ap.add_argument("--epsilon", type=float, default=1e-10)
    ap.add_argument("--grafting", default="adam")
    ap.add_argument("--max-preconditioner-dim", type=int, default=1024)
    ap.add_argument("--precondition-frequency", type=int, default=20)
    ap.add_argument(
        "--start-preconditioning-step",
        type=int,
        default=0,
        help="the first step with roots (default: --precondition-frequency)",
    )
    ap.add_argument(
        "--hidden-only",
        action="store_true",
        help="Shampoo's options for the hidden matrices only; embeddings, the head, biases and "
        "norms get Adam in a diagonal group (sharded_shampoo.hidden_matrix_groups)",
    )
    ap.add_argument(
        "--preconditioner",
        choices=["shampoo", "eigenvalue_corrected", "diagonal", "spectral"],
        default="shampoo",
        help="for --optimizer shampoo",
    )
    ap.add_argument(
        "--eigenbasis",
        choices=["eigh", "qr"],
        default="eigh",
        help="with --preconditioner eigenvalue_corrected",
    )
    ap.add_argument(
        "--eigenbasis-convention",
        choices=["reference", "soap"],
        default="reference",
        help="with --preconditioner eigenvalue_corrected (sharded_shampoo.algorithm.eigenbasis)",
    )
    ap.add_argument(
        "--stagger-roots",
        action="store_true",
        help="each block computes its roots in its own step of the period",
    )
    ap.add_argument(
        "--shampoo-option",
        action="append",
        default=[],
        type=parse_option,
        metavar="NAME=VALUE",
        help="any other ShardedShampoo option, e.g. max_factor_ratio=4 or root_dtype=bfloat16 "
        "(a Python literal, else a string); repeatable",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument(
        "--eval-seed",
        type=int,
        default=-1,
        help="draw the validation batches from this seed, the same for every --seed (default: "
        "from --seed)",
    )
    ap.add_argument(
        "--out-dir", default="", help="logs, plot and checkpoints (default runs/WORKLOAD)"
    )
    ap.add_argument("--checkpoint-every", type=int, default=100, help="0: no checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoints")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after this step, as an interrupted job would (the schedule still spans --steps)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--print-losses", action="store_true", help="with --no-progress: a line per step"
    )
    ap.add_argument(
        "--recommended",
        action="store_true",
        help="Shampoo as docs/benchmarks.md found best against tuned Muon (lm, autoencoder, "
        "digits): Shampoo^(1/2) with pseudo-inverse roots on the hidden matrices, refreshed "
        "every step, at AdamW's update RMS; Adam for the rest (flags given override it)",
    )
    if "--recommended" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(**RECOMMENDED)
    args = ap.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", args.workload)
    if args.workload != "lm" and args.batch == 16:
        args.batch = 32
    if args.optimizer == "muon" and (args.checkpoint_every or args.resume):
        ap.error("--optimizer muon is two optimizers, which the checkpoints do not take: "
                 "give --checkpoint-every 0 and no --resume")  # fmt: skip
    if args.optimizer == "muon" and args.parallelism not in ("none", "ddp"):
        ap.error("--optimizer muon: torch.optim.Muon takes plain tensors: --parallelism none or "
                 "ddp")  # fmt: skip
    return args


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ and (args.parallelism == "none" or args.nproc == 1):
        args.parallelism = "none"
        run_rank(args)
    else:
        launch(run_rank, args, args.nproc, threads=args.threads or 1)


if __name__ == "__main__":
    main()
