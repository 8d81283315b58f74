"""Cases for test_tensor_parallel.py: a small Llama parallelized as torchtitan does it.

Modes: ``single`` (one process, the reference), ``tp`` (tensor parallel over every rank),
``fsdp_tp`` (FSDP2 x TP on a (dp, tp) mesh of 2 x world/2), ``hsdp_tp`` (HSDP x TP on a
(replicate, shard, tp) mesh of 2 x 1 x world/2), the last two with their meshes unflattened from a
1-D world mesh (``fsdp_tp_unflattened``, ``hsdp_tp_unflattened``), ``fsdp`` (FSDP2 over every
rank) and ``ddp``.
Every mode trains on the same global batch, split over the data-parallel ranks only.
"""

from __future__ import annotations

import os

import scenarios
import torch
from harness import DEVICE_TYPE, device, to_host
from torch import nn
from workloads import Llama, LlamaConfig, parallelize_llama

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint

SEQ = 6
BATCH = 8
STEPS = 16  # four root refreshes at precondition_frequency 4
FIRST, THEN = 8, 8  # checkpoint: steps before, steps after

# float64 parameters, factors and communication (see the developers' guide: exactness needs
# all three). Blocks of 8 cut the 16- and 24-wide weights across the TP and FSDP2 shards.
OPTIONS = dict(
    lr=0.01,
    betas=(0.9, 0.999),
    epsilon=1e-4,
    momentum=0.5,
    weight_decay=0.01,
    max_preconditioner_dim=8,
    precondition_frequency=4,
    factor_dtype=torch.float64,
    communication_dtype=torch.float64,
)


CONFIG = LlamaConfig(vocab=37, width=16, layers=2, heads=4, hidden=24)


class ScaledLlama(Llama):
    """The Llama with a per-class logit scale that tensor parallelism leaves alone: under TP
    alone it stays a plain parameter beside the DTensors (a mixed optimizer); under FSDP2 x TP
    FSDP2 makes it a DTensor on the "dp" slice of the mesh, not on the 2-D mesh itself."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg)
        self.scale = nn.Parameter(torch.ones(cfg.vocab))

    def forward(self, idx, targets=None):
        logits = super().forward(idx) * self.scale
        if targets is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# Modes whose meshes are unflattened from a 1-D world mesh (torchtitan's way): meshes.tp_meshes.
UNFLATTENED = {"fsdp_tp_unflattened": "unflattened", "hsdp_tp_unflattened": "unflattened_hsdp"}


def make_llama(scaled: bool = True) -> Llama:
    """The test model (``scaled``: with the logit scale of ``ScaledLlama``)."""
    torch.manual_seed(0)
    model = (ScaledLlama if scaled else Llama)(CONFIG).double().to(device())
    with torch.no_grad():  # norms and scale away from 1, so that their blocks see real gradients
        for m in model.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
        if scaled:
            model.scale.uniform_(0.5, 1.5)
    return model


def parallelize(model: Llama, mode: str, world: int):
    """``(wrapped model, data-parallel size, data-parallel index)`` for ``mode``."""
    import torch.distributed as dist

    if mode == "single":
        return model, 1, 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model), world, rank
    if mode in ("fsdp", "hsdp"):
        if mode == "fsdp":
            mesh = init_device_mesh(DEVICE_TYPE, (world,))
        else:
            mesh = init_device_mesh(DEVICE_TYPE, (2, world // 2), mesh_dim_names=("rep", "shard"))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, world, rank
    if mode == "tp":
        mesh, dp_mesh = init_device_mesh(DEVICE_TYPE, (world,), mesh_dim_names=("tp",)), None
    elif mode == "fsdp_tp":
        mesh = init_device_mesh(DEVICE_TYPE, (2, world // 2), mesh_dim_names=("dp", "tp"))
        dp_mesh = mesh["dp"]
    elif mode == "hsdp_tp":
        mesh = init_device_mesh(
            DEVICE_TYPE, (2, 1, world // 2), mesh_dim_names=("rep", "shard", "tp")
        )
        dp_mesh = mesh["rep", "shard"]
    elif mode in UNFLATTENED:
        import meshes

        mesh, dp_mesh = meshes.tp_meshes(UNFLATTENED[mode], world)
    else:
        raise ValueError(mode)
    parallelize_llama(model, mesh["tp"] if mesh.ndim > 1 else mesh, dp_mesh)
    if dp_mesh is None:
        return model, 1, 0
    return model, 2, rank // (world // 2)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CONFIG.vocab, (BATCH, SEQ + 1), generator=g).to(device())
    return tokens[:, :-1], tokens[:, 1:]


def build(mode, world, **overrides):
    model = make_llama()
    wrapped, dp, index = parallelize(model, mode, world)
    opt = ShardedShampoo(list(model.named_parameters()), **{**OPTIONS, **overrides})
    return model, wrapped, opt, (dp, index)


def train_backward(wrapped, data, step: int) -> float:
    """Forward and backward of ``step``'s batch, this rank's data-parallel slice of it."""
    dp, index = data
    per = BATCH // dp
    x, y = batch(step)
    x, y = x[index * per : (index + 1) * per], y[index * per : (index + 1) * per]
    loss = wrapped(x, y)
    loss.backward()
    return loss.item()


def train(model, wrapped, opt, data, start, steps, nan_at=None):
    import warnings

    losses = []
    for step in range(start, start + steps):
        opt.zero_grad()
        losses.append(train_backward(wrapped, data, step))
        if step == nan_at:
            poison(model, NAN_ROW)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the NaN's warning
            opt.step()
    return losses


# A NaN at this row of layer 0's feed_forward.w1 gradient (24 x 16, blocks of 8 rows): under
# FSDP2 x TP (rows 0:6, 6:12 | 12:18, 18:24) its block, rows 8:16, spans two ranks' shards.
NAN_ROW = 9


def poison(model, row: int) -> None:
    """A NaN at ``row`` of feed_forward.w1's gradient in layer 0, wherever that row lives."""
    g = model.layers[0].feed_forward.w1.weight.grad
    if hasattr(g, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(g.shape, g.device_mesh, g.placements)
        if offset[0] <= row < offset[0] + shape[0] and shape[1]:
            g.to_local()[row - offset[0], 0] = float("nan")
    else:
        g[row, 0] = float("nan")


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU."""
    return to_host(
        {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()
        }
    )


def run(rank, world, mode, steps=STEPS, nan_at=None, **overrides):
    model, wrapped, opt, data = build(mode, world, **overrides)
    losses = train(model, wrapped, opt, data, 0, steps, nan_at)
    placements = {
        n: str(tuple(p.placements)) for n, p in model.named_parameters() if hasattr(p, "placements")
    }
    return {
        "params": full_params(model),
        "losses": losses,
        "placements": placements,
        "bytes": opt.bytes_sent_per_step(),
    }


def save(rank, world, mode, root, **overrides):
    model, wrapped, opt, data = build(mode, world, **overrides)
    train(model, wrapped, opt, data, 0, FIRST)
    save_checkpoint(os.path.join(root, mode), wrapped, opt, extra={"step": FIRST})


def resume(rank, world, mode, root, source, **overrides):
    model, wrapped, opt, data = build(mode, world, **overrides)
    extra = load_checkpoint(os.path.join(root, source), wrapped, opt, extra={"step": -1})
    assert extra["step"] == FIRST, extra
    losses = train(model, wrapped, opt, data, FIRST, THEN)
    return {"params": full_params(model), "losses": losses}


def failures(rank, world, mode="fsdp_tp"):
    """Rank 0's roots always fail (``fsdp_cases.fail_roots_on_rank0``), and a NaN reaches one
    gradient once: every rank raises in the same step, nothing changed, nothing non-finite."""
    from fsdp_cases import fail_roots_on_rank0

    model, wrapped, opt, data = build(
        mode, world, precondition_frequency=2, max_consecutive_root_failures=2
    )

    def backward(step):
        train_backward(wrapped, data, step)
        if step == 1:
            poison(model, NAN_ROW)

    return fail_roots_on_rank0(rank, model, opt, backward)


def partial_placement(rank, world):
    """A parameter whose placement is Partial: every rank raises, naming it and the placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh(DEVICE_TYPE, (world,))
    p = nn.Parameter(DTensor.from_local(torch.ones(4, 4, dtype=torch.float64), mesh, [Partial()]))
    try:
        ShardedShampoo([("encoder.weight", p)])
    except ValueError as e:
        return str(e)
    return "no error"


# Tensor parallelism that leaves a rank an empty shard on a dim FSDP2 does not shard: a (3, 1)
# weight sharded on dim 1 over TP 2 (rank 1 of each TP pair holds (3, 0)), and a (3, 3) one
# over TP 4 (the fourth rank holds (3, 0)); then FSDP2 over "dp".
EMPTY_SHAPES = {"narrow": (3, 1), "square": (3, 3)}
EMPTY_OPTIONS = dict(
    lr=0.05,
    betas=(0.9, 0.99),
    epsilon=1e-4,
    max_preconditioner_dim=2,
    precondition_frequency=3,
    factor_dtype=torch.float64,
    communication_dtype=torch.float64,
    momentum=0.5,
    weight_decay=0.01,
)
EMPTY_STEPS = 9


def empty_shard_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in EMPTY_SHAPES.items()}


class _Empty(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        for name, shape in EMPTY_SHAPES.items():
            setattr(self, name, nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)))


def empty_shards(rank, world, tp):
    """FSDP2 x TP (``world // tp`` x ``tp``) on the two weights, or one process (world 1): the
    parameters after EMPTY_STEPS steps, and each rank's local shapes. The gradients are set,
    not computed: FSDP2's own reduce-scatter refuses an empty shard (torch 2.13:
    "_chunk_cat expects non-empty tensor"), which is FSDP2's matter, not the optimizer's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _Empty().to(device())
    if world > 1:
        mesh = init_device_mesh(DEVICE_TYPE, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        for name in EMPTY_SHAPES:
            w = getattr(model, name)
            setattr(
                model,
                name,
                nn.Parameter(distribute_tensor(w.data, mesh["tp"], [Shard(1)], src_data_rank=None)),
            )
        fully_shard(model, mesh=mesh["dp"])
    opt = ShardedShampoo(list(model.named_parameters()), **EMPTY_OPTIONS)
    for step in range(EMPTY_STEPS):
        for name, g in empty_shard_grads(step).items():
            p = getattr(model, name)
            g = g.to(device())
            p.grad = (  # each rank slices its own part: no collective
                distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                if world > 1
                else g
            )
        opt.step()
    return {
        "params": _assembled(model) if world > 1 else full_params(model),
        "local": {
            n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
            for n, p in model.named_parameters()
        },
    }


def _assembled(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, from each rank's non-empty shard at DTensor's offset for it
    (``full_tensor()`` hangs here: DTensor's gather expects the empty shard where DTensor puts
    it, not where FSDP2 does)."""
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = {}
    for name, p in model.named_parameters():
        local = p.to_local().detach().cpu()
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, (tuple(offset), local))
        full = torch.full(tuple(p.shape), float("nan"), dtype=local.dtype)
        for offset, piece in pieces:
            if piece.numel():
                full[tuple(slice(o, o + n) for o, n in zip(offset, piece.shape, strict=True))] = (
                    piece
                )
        out[name] = full
    return out


def check(values, reference):
    """Every rank ends with the same full parameters, those of one process."""
    names = list(reference["params"])
    for r, v in enumerate(values):
        assert list(v["params"]) == names
        if r:
            assert all(v["params"][n].equal(values[0]["params"][n]) for n in names), r
    err = scenarios.max_rel_err(
        [[values[0]["params"][n] for n in names]], [[reference["params"][n] for n in names]]
    )
    assert err <= scenarios.DDP_TOLERANCE, f"relative error {err:.2e}"
