"""Cases run on every rank of a spawned group by test_fsdp.py."""

from __future__ import annotations

import scenarios
import torch
import torch.distributed as dist
from harness import DEVICE_TYPE, device, to_host

from sharded_shampoo import ShardedShampoo

STEPS = 32
BATCH = 24


class Net(torch.nn.Module):
    """Uneven shards on purpose: 33 rows (not divisible by 2 or 4), a weight with one row, a
    weight with 3 rows (fewer than 4 ranks: empty shards), a frozen layer, a 3-d parameter."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(12, 33)
        self.squeeze = torch.nn.Linear(33, 1)
        self.expand = torch.nn.Linear(1, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.mix = torch.nn.Parameter(torch.randn(5, 3, 4) * 0.1)
        self.out = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        s = torch.tanh(self.expand(torch.tanh(self.squeeze(h))))
        s = self.frozen(s)
        m = torch.einsum("bi,kij->bj", s, self.mix)  # (b, 4)
        return self.out(torch.cat([h[:, :8], m], dim=1))


# float64 throughout, as in scenarios.py.
OPTIONS = dict(
    factor_dtype=torch.float64,
    communication_dtype=torch.float64,
    lr=0.01,
    betas=(0.9, 0.999),
    max_preconditioner_dim=8,
    precondition_frequency=5,
    epsilon=1e-4,
    momentum=0.5,
    weight_decay=0.01,
)


def batch(step, size=BATCH):
    """A learnable task: labels from a fixed linear teacher."""
    x, _ = scenarios.global_batch(step, size)
    teacher = torch.randn(12, 3, generator=torch.Generator().manual_seed(99), dtype=x.dtype)
    return x, (x @ teacher.to(x.device)).argmax(1)


def make_net():
    torch.manual_seed(0)
    return Net().double().to(device())


def world_mesh(world):
    """FSDP2's mesh over every rank, on the tests' device (``fully_shard`` without one takes
    torch's default accelerator, a GPU whenever one is visible)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(DEVICE_TYPE, (world,))


# A NaN put into the gradient of inp.weight (33 x 12, blocks of 8 rows) at this row: its block,
# rows 16:24, straddles the shards at 2 ranks (rows 0:17, 17:33) and at 4 (9:18, 18:27), so
# the block's owner skips it and the holders of its other rows must not apply it either.
NAN_ROW = 16


def drop_some_grads(model, step):
    """Every 7th step from step 3 some parameters have no gradient (as when a branch of the
    model is not used): their pieces must neither be sent nor applied."""
    if step % 7 == 3:
        model.out.weight.grad = None
        model.inp.bias.grad = None


def train_reference(steps=STEPS, nan_step=None, drop_grads=False, **overrides):
    import warnings

    model = make_net()
    opt = ShardedShampoo(
        [p for p in model.parameters() if p.requires_grad], **{**OPTIONS, **overrides}
    )
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == nan_step:
            model.inp.weight.grad[NAN_ROW, 0] = float("nan")
        if drop_grads:
            drop_some_grads(model, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return to_host([p.detach().clone() for p in model.parameters()]), opt.state_bytes()


def fsdp(
    rank,
    world,
    hsdp=False,
    mixed=False,
    mixed_precision=False,
    steps=STEPS,
    nan_step=None,
    drop_grads=False,
    meshes=None,
    **overrides,
):
    """``meshes``: a kind of ``meshes.fsdp_meshes`` (each layer's mesh made that way)."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_net()
    kwargs = {"mesh": world_mesh(world)}
    by_layer = {}
    if meshes is not None:
        import meshes as mesh_kinds

        by_layer = mesh_kinds.fsdp_meshes(meshes, world)
    if hsdp:
        kwargs["mesh"] = init_device_mesh(
            DEVICE_TYPE, (2, world // 2), mesh_dim_names=("rep", "shard")
        )
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    plain = []
    if mixed:
        # Only some layers sharded; the rest stay plain, replicated tensors whose gradients
        # this loop averages itself.
        for name in ("inp", "squeeze"):
            fully_shard(getattr(model, name), **kwargs)
        plain = [
            p
            for n, p in model.named_parameters()
            if not n.startswith(("inp.", "squeeze.")) and p.requires_grad
        ]
    else:
        for name in ("inp", "squeeze", "expand", "out"):
            fully_shard(
                getattr(model, name), **{**kwargs, "mesh": by_layer.get(name, kwargs["mesh"])}
            )
        fully_shard(model, **{**kwargs, "mesh": by_layer.get("", kwargs["mesh"])})
    opt = ShardedShampoo(
        [p for p in model.parameters() if p.requires_grad], **{**OPTIONS, **overrides}
    )
    per = BATCH // world
    losses = []
    for step in range(steps):
        x, y = batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in plain:
            dist.all_reduce(p.grad)
            p.grad /= world
        if drop_grads:
            drop_some_grads(model, step)
        if step == nan_step:  # on every holder of the row (one per replica group)
            shards = world // 2 if hsdp else world
            chunk = -(-33 // shards)
            if rank % shards == NAN_ROW // chunk:
                model.inp.weight.grad.to_local()[NAN_ROW % chunk, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        losses.append(loss.item())
    full = [
        p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in model.parameters()
    ]
    return {
        "params": full,
        "losses": losses,
        "state_bytes": opt.state_bytes(),
        "owned_blocks": opt.owned_blocks(),
        "bytes_sent": opt.bytes_sent_per_step(),
        "allgather_bytes": sum(
            d.bytes_sent_per_step()
            for d in opt.distributors
            if type(d).__name__ == "ReplicatedDistributor"
        ),
    }


def failures(rank, world, hsdp=True):
    """Rank 0's roots always fail, and rank 1 sees a NaN gradient once: every rank must raise
    together on the root failure (no hang), and the NaN must not reach any parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_net()
    mesh = (
        init_device_mesh(DEVICE_TYPE, (2, world // 2), mesh_dim_names=("rep", "shard"))
        if hsdp
        else world_mesh(world)
    )
    kwargs = {"mesh": mesh}
    for name in ("inp", "squeeze", "expand", "out"):
        fully_shard(getattr(model, name), **kwargs)
    fully_shard(model, **kwargs)
    opt = ShardedShampoo(
        [p for p in model.parameters() if p.requires_grad],
        **{**OPTIONS, "precondition_frequency": 2},
        max_consecutive_root_failures=2,
    )

    def backward(step):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 1 and rank == 1:
            model.inp.weight.grad.to_local()[0, 0] = float("nan")

    return fail_roots_on_rank0(rank, model, opt, backward)


def fail_roots_on_rank0(rank, model, opt, backward, steps=12):
    """Trains with ``backward(step)`` while every root computation of rank 0 fails: returns
    ``(how the step that raised ended, whether every parameter is finite)``."""
    import warnings

    import sharded_shampoo.algorithm.roots as roots_module

    original = roots_module.eigh
    if rank == 0:

        def broken(a):
            raise torch.linalg.LinAlgError("injected failure")

        roots_module.eigh = broken
    outcome = "no error"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(steps):
                opt.zero_grad()
                backward(step)
                before = [p.to_local().clone() for p in model.parameters()]
                try:
                    opt.step()
                except RuntimeError as e:
                    unchanged = all(
                        torch.equal(p.to_local(), b)
                        for p, b in zip(model.parameters(), before, strict=True)
                    )
                    outcome = f"step {step}: unchanged={unchanged}: {e}"
                    break
    finally:
        roots_module.eigh = original
    finite = all(torch.isfinite(p.to_local()).all().item() for p in model.parameters())
    return outcome, finite


def fsdp_single_rank(rank, world):
    """FSDP2 on one rank (and a model mixing sharded and plain parameters): the row exchange
    runs with nothing to send."""
    out = fsdp(rank, world, mixed=True)
    out2 = fsdp(rank, world)
    return out, out2


def check_against_reference(values, reference, tolerance=scenarios.DDP_TOLERANCE):
    """Every rank ends with the same full parameters, within ``tolerance`` of one process's
    (``reference``: ``train_reference()``)."""
    ref_params, _ = reference
    for r, v in enumerate(values[1:], start=1):
        for a, b in zip(v["params"], values[0]["params"], strict=True):
            assert torch.equal(a, b), f"rank {r} ends with other parameters than rank 0"
    err = scenarios.max_rel_err([values[0]["params"]], [ref_params])
    assert err <= tolerance, f"relative error {err:.2e}"
    return err
