"""DTensor parameters (FSDP2, HSDP, tensor parallel, FSDP2 x TP): pieces travel by all_to_all.

Whatever the placements, per step (``placement.routes``):

1. each piece of a block's gradient goes from one rank holding it to the block's owner, by
   ``all_to_all_single`` over the world;
2. each piece of the direction (``communication_dtype``) goes from the owner to every rank
   holding it, by ``all_to_all_single`` again.

Each is split into buckets of stacks (``placement.routes.stack_buckets``; ``exchange_buckets``
of the optimizer), issued asynchronously: every bucket's gradients at once, then a bucket's
math starts as soon as its gradients are in, and its directions leave as soon as its stacks
are computed, while the next bucket computes. The same elements travel to the same places as
with one collective each way, so the result is bitwise the same.

Exactly the pieces that must move are sent, with ``all_to_all_single``'s split sizes: the routes
are computed once. A rank's own pieces of its own blocks take the same path through its own
chunk, so they are rounded to ``communication_dtype`` like everyone else's: every copy of an
element applies the same values.

Host work per step does not depend on the world size: every buffer is allocated once, the views
of the buffers' pieces are computed once, and each phase is one ``torch._foreach_copy_`` (or
``_foreach_add_``) over the pieces of the active parameters. Only the gradients' views are
taken anew each step (one slice per piece this rank sends, which falls as the world grows):
autograd hands out new gradient tensors, and holding views of last step's would keep them
alive.

Every chunk of the last bucket's direction exchange, issued once all the math is done, ends
with status words (``communication``): a failure or a disagreement anywhere reaches every rank
before any rank applies anything. A block skipped for a non-finite gradient
has a zero direction, which changes nothing where it is added; only weight decay applied by the
holders must also know, so every direction piece carries a flag, set when its block was
skipped, written and read on the device in the steps that apply such weight decay.

Weight decay of a DTensor parameter is applied where the weights already are, so that they
travel only when they must: L2 (``G + wd W`` is elementwise) by the sending holder;
decoupled without momentum (``W - lr (D + wd W)``) by every holder when applying; decoupled
with momentum feeds ``D + wd W`` into the owner's momentum buffer, so then the weights travel
with the gradient (whenever a DTensor group has momentum: sized from what cannot change after
construction, so every rank sends the same amount even in a step in which ranks disagree on
the options, which the status words then report).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.distributed as dist

from ..options import GroupOptions
from ..placement import Plan
from ..placement.routes import PieceRoutes, Route
from ..placement.sharding import block_box, shard_pieces
from ..state import GroupBlocks
from ..status import FAILED, STATUS_WORDS, Status, StatusWords, read_status
from .base import Distributor, StackWork, Step

__all__ = ["ShardedDistributor", "weight_decay_place"]


def weight_decay_place(opts: GroupOptions) -> str:
    """Where weight decay of a DTensor parameter is applied (see the module docstring):
    ``"holder-grad"``, ``"holder-step"``, ``"owner"`` or ``"none"``."""
    if opts.weight_decay == 0:
        return "none"
    if not opts.decoupled_weight_decay:
        return "holder-grad"
    return "holder-step" if opts.momentum == 0 else "owner"


def _slices(piece, box) -> tuple[slice, ...]:
    """Where ``piece`` sits in a tensor holding ``box`` of the parameter."""
    return tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(piece.box, box, strict=True))


def _piece_view(flat: torch.Tensor, offset: int, route: Route) -> torch.Tensor:
    return flat[offset : offset + route.numel].view(route.piece.shape)


@dataclasses.dataclass
class _Param:
    """One DTensor parameter's part in the exchange, on this rank: the pieces of its local
    shard, and the pieces of its blocks this rank owns. Views of the persistent buffers,
    computed once."""

    # Per local piece: where it sits in the local shard; where its direction arrives; and its
    # flag (position in the flat dir_recv).
    index: list[tuple[slice, ...]] = field(default_factory=list)
    dir_src: list[torch.Tensor] = field(default_factory=list)
    dir_flag: list[int] = field(default_factory=list)
    # The local pieces whose gradient I send: their positions among the local pieces, and where
    # their gradient and weights go.
    send_at: list[int] = field(default_factory=list)
    grad_dst: list[torch.Tensor] = field(default_factory=list)
    weight_dst: list[torch.Tensor] = field(default_factory=list)
    # Per bucket, per piece of the blocks I own: where it sits in the stack's gradient buffer
    # (which holds the direction after the math) and in its weight buffer; where its gradient
    # and weights arrive.
    stack_piece: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    weight_piece: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    grad_src: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    weight_src: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # Per bucket, per (piece of a block I own, holder): the direction's source in the stack and
    # where it goes.
    dir_out_src: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    dir_out_dst: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # Per (piece of a block I own, holder): (stack index, row, flag position in dir_send).
    owned: list[tuple[int, int, int]] = field(default_factory=list)
    # Per local piece: 1 when its block stepped, 0 when it was skipped (0-d views of a buffer
    # filled from the flags in the steps that need it).
    kept: list[torch.Tensor] = field(default_factory=list)
    # (key of the local shard's memory, views of its pieces).
    views: tuple | None = None


def _add(lists: dict[int, list], bucket: int, *values) -> None:
    lists.setdefault(bucket, []).extend(values)


class ShardedDistributor(Distributor):
    """The stacks of blocks of DTensor parameters, and their pieces' routes."""

    collective = True

    def __init__(
        self,
        blocks: list[GroupBlocks],
        plan: Plan,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        buckets: int = 1,
    ) -> None:
        super().__init__(blocks, sharded=True)
        self.dtype = dtype
        sharded = {
            (gi, pi)
            for gi, g in enumerate(plan.groups)
            for pi in range(len(g.blockings))
            if g.spec.sharding(pi) is not None
        }
        self.grad_dtype = torch.float32
        for gi, pi in sharded:
            self.grad_dtype = torch.promote_types(self.grad_dtype, plan.groups[gi].spec.dtypes[pi])
        self.with_weights = any(plan.groups[gi].spec.opts.momentum > 0 for gi, _ in sharded)
        self.rank = rank
        self.routes = routes = PieceRoutes(plan, rank, 2 if self.with_weights else 1, buckets)
        self.num_buckets = len(routes.grad_send)
        # Two pairs of buffers share memory, bucket by bucket: a bucket's gradient pieces are
        # sent (grad_send) before its directions come back (dir_recv, read until the update),
        # and its received pieces are in the stacks (grad_recv) before its directions are sent
        # (dir_send). Flat views of each (``flat``) index flags across buckets.
        self._bufs, self._base, flat = {}, {}, {}
        for a, b in (("grad_send", "dir_recv"), ("grad_recv", "dir_send")):
            sizes = [
                (ga.total, db.total)
                for ga, db in zip(getattr(routes, a), getattr(routes, b), strict=True)
            ]
            views, bases, flats = _sharing(sizes, (self.grad_dtype, dtype), device)
            self._bufs[a], self._bufs[b] = [v[0] for v in views], [v[1] for v in views]
            self._base[a], self._base[b] = [x[0] for x in bases], [x[1] for x in bases]
            flat[a], flat[b] = flats
        self._flat = flat
        # all_to_all_single's split sizes per bucket, as the lists it takes.
        self._splits = {
            "grad": [
                (list(r.sizes), list(s.sizes))
                for r, s in zip(routes.grad_recv, routes.grad_send, strict=True)
            ],
            "dir": [
                (list(r.sizes), list(s.sizes))
                for r, s in zip(routes.dir_recv, routes.dir_send, strict=True)
            ],
        }
        for gi, si, stack in self.stacks:
            self._buffer(self._grads, gi, si, stack)
            if self.with_weights:
                self._buffer(self._weights, gi, si, stack)
        self._bucket = {
            (gi, si): routes.buckets[(gi, stack.layout.param_dtype, stack.block_shape)]
            for gi, si, stack in self.stacks
        }
        self.params = self._param_routes(plan)
        self._words = StatusWords(dtype, device)
        # Where status words sit (the last bucket's direction chunks), to write them and read
        # them with one operation each.
        long = lambda xs: torch.tensor(list(xs), dtype=torch.long, device=device)  # noqa: E731
        peers = range(plan.world_size)
        self._word_index = {
            name: long(c[-1].status_at[j] + w for j in peers for w in range(STATUS_WORDS)).view(
                -1, STATUS_WORDS
            )
            for name, c in (("dir_send", routes.dir_send), ("dir_recv", routes.dir_recv))
        }
        # Flags: per stack, the flag positions in its bucket's dir_send of its routes and their
        # rows; per local piece (params in order, pieces in order), its flag's position in the
        # flat dir_recv.
        flags: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        local_flags = []
        for (gi, _), prm in self.params.items():
            for si, row, flag in prm.owned:
                at, rows = flags.setdefault((gi, si), ([], []))
                at.append(flag)
                rows.append(row)
            local_flags += prm.dir_flag
        self._send_flags = {key: (long(at), long(rows)) for key, (at, rows) in flags.items()}
        self._groups = {gi for gi, _ in self.params}
        self._recv_flags = long(local_flags)
        self._kept = torch.zeros(len(local_flags), dtype=dtype, device=device)
        start = 0
        for prm in self.params.values():
            prm.kept = [self._kept[start + i] for i in range(len(prm.dir_flag))]
            start += len(prm.dir_flag)
        # This step's collectives in flight (``collect`` to ``exchange``).
        self._inflight: _Inflight | None = None

    def _param_routes(self, plan: Plan) -> dict[tuple[int, int], _Param]:
        routes, bufs = self.routes, self._bufs
        mesh = plan.mesh
        out: dict[tuple[int, int], _Param] = {}
        local_pos: dict[tuple[int, int, int], int] = {}
        coord = mesh.coord(self.rank) if mesh is not None else ()
        for gi, group in enumerate(plan.groups):
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                prm = out[(gi, pi)] = _Param()
                mine = sharding.box(blocking.shape, coord)
                for i, (bid, piece) in enumerate(shard_pieces(blocking, sharding, coord)):
                    local_pos[(gi, pi, bid)] = i
                    prm.index.append(_slices(piece, mine))
                prm.dir_src = [None] * len(prm.index)
                prm.dir_flag = [None] * len(prm.index)

        for b in range(self.num_buckets):
            send, grad_send = routes.grad_send[b], bufs["grad_send"][b]
            for j, entries in enumerate(send.entries):
                for off, r in entries:
                    prm = out[(r.group, r.param)]
                    prm.send_at.append(local_pos[(r.group, r.param, r.block)])
                    prm.grad_dst.append(_piece_view(grad_send, off, r))
                    if self.with_weights:
                        prm.weight_dst.append(_piece_view(grad_send, off + send.data[j], r))
            recv, base = routes.dir_recv[b], self._base["dir_recv"][b]
            for j, entries in enumerate(recv.entries):
                for (off, r), flag in zip(entries, recv.flag_at[j], strict=True):
                    prm = out[(r.group, r.param)]
                    i = local_pos[(r.group, r.param, r.block)]
                    prm.dir_src[i] = _piece_view(bufs["dir_recv"][b], off, r)
                    prm.dir_flag[i] = base + flag

        def block_piece(buf: torch.Tensor, r: Route, row: int) -> torch.Tensor:
            blocking = plan.groups[r.group].blockings[r.param]
            box = block_box(blocking, r.block)
            return buf[row].view([hi - lo for lo, hi in box])[_slices(r.piece, box)]

        for b in range(self.num_buckets):
            recv, grad_recv = routes.grad_recv[b], bufs["grad_recv"][b]
            for j, entries in enumerate(recv.entries):
                for off, r in entries:
                    prm = out[(r.group, r.param)]
                    si, row = self.blocks[r.group].where[(r.param, r.block)]
                    _add(prm.stack_piece, b, block_piece(self._grads[(r.group, si)], r, row))
                    _add(prm.grad_src, b, _piece_view(grad_recv, off, r))
                    if self.with_weights:
                        weights = self._weights[(r.group, si)]
                        _add(prm.weight_piece, b, block_piece(weights, r, row))
                        _add(prm.weight_src, b, _piece_view(grad_recv, off + recv.data[j], r))
            dirs = routes.dir_send[b]
            for j, entries in enumerate(dirs.entries):
                for (off, r), flag in zip(entries, dirs.flag_at[j], strict=True):
                    prm = out[(r.group, r.param)]
                    si, row = self.blocks[r.group].where[(r.param, r.block)]
                    _add(prm.dir_out_src, b, block_piece(self._grads[(r.group, si)], r, row))
                    _add(prm.dir_out_dst, b, _piece_view(bufs["dir_send"][b], off, r))
                    prm.owned.append((si, row, flag))
        return out

    persistent_stacks = True

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {**super().buffers(), "all_to_all": list(self._flat.values())}

    def bytes_sent_per_step(self) -> int:
        """Exactly what this rank sends to other ranks in one step."""
        return self.routes.bytes_sent(
            torch.empty((), dtype=self.grad_dtype).element_size(),
            torch.empty((), dtype=self.dtype).element_size(),
        )

    # ------------------------------------------------------------------ per step

    def _active(self, step: Step):
        """(group, parameter index, _Param, options) of the active DTensor parameters."""
        for (gi, pi), prm in self.params.items():
            active = step.active.get(gi)
            if active is not None and active[pi]:
                yield gi, pi, prm, step.options[gi]

    def _param_views(self, prm: _Param, p: torch.Tensor) -> list[torch.Tensor]:
        """Views of the pieces of parameter ``p``'s local shard, kept while it is the same
        memory (a parameter's shard is not reallocated by training; a load may swap it)."""
        local = p.to_local()
        key = (local.data_ptr(), tuple(local.shape), tuple(local.stride()))
        if prm.views is None or prm.views[0] != key:
            prm.views = (key, [local[ix] for ix in prm.index])
        return prm.views[1]

    def collect(self, step: Step) -> list[StackWork]:
        """Sends every bucket's gradient pieces (asynchronously); returns the work in bucket
        order, each stack's gradient arriving with ``arrive``."""

        def math_options(opts: GroupOptions):
            place = weight_decay_place(opts)
            if place in ("holder-grad", "holder-step"):
                opts = dataclasses.replace(opts, weight_decay=0.0)
            return opts, place == "owner"

        work = self._stack_work(step, math_options)
        work.sort(key=lambda w: self._bucket[(w.group, w.stack_index)])  # stable
        dst, src = [], []
        decay: dict[int, tuple[list, list]] = {}
        for gi, pi, prm, opts in self._active(step):
            p = step.params[gi][pi]
            grad = p.grad
            if grad.placements != p.placements:
                # Tensor parallelism hands out gradients of other placements: Partial for the
                # sequence-parallel norms (a collective: every rank takes it, in the same
                # order, whether it sends or not), Replicate for a row-parallel embedding.
                grad = grad.redistribute(p.device_mesh, p.placements)
            if not prm.send_at:
                continue
            local = grad.to_local()
            dst += prm.grad_dst
            src += [local[prm.index[i]] for i in prm.send_at]
            place = weight_decay_place(opts)
            if place in ("holder-grad", "owner"):
                views = self._param_views(prm, p)
                mine = [views[i] for i in prm.send_at]
                if place == "holder-grad":  # G + wd W, elementwise, before sending
                    d = decay.setdefault(gi, ([], []))
                    d[0].extend(prm.grad_dst)
                    d[1].extend(mine)
                else:  # the owner needs the weights
                    dst += prm.weight_dst
                    src += mine
        if dst:
            torch._foreach_copy_(dst, src)
        for gi, (d, w) in decay.items():
            torch._foreach_add_(d, w, alpha=step.options[gi].weight_decay)
        left = [0] * self.num_buckets
        for w in work:
            left[self._bucket[(w.group, w.stack_index)]] += 1
        self._inflight = _Inflight(
            step,
            [self._all_to_all("grad", b) for b in range(self.num_buckets)],
            [False] * self.num_buckets,
            left,
        )
        return work

    def arrive(self, w: StackWork) -> None:
        """Waits for the gradients of ``w``'s bucket and copies them into its stacks (once per
        bucket)."""
        self._receive(self._bucket[(w.group, w.stack_index)])

    def _receive(self, b: int) -> None:
        inflight = self._inflight
        if inflight.received[b]:
            return
        _wait(inflight.grads, b)
        dst, src = [], []
        for _, _, prm, opts in self._active(inflight.step):
            dst += prm.stack_piece.get(b, [])
            src += prm.grad_src.get(b, [])
            if weight_decay_place(opts) == "owner":
                dst += prm.weight_piece.get(b, [])
                src += prm.weight_src.get(b, [])
        if dst:
            torch._foreach_copy_(dst, src)
        inflight.received[b] = True

    def computed(self, w: StackWork) -> None:
        """``w``'s direction is ready; once its bucket's are, they leave (but the last
        bucket's, which carries the status words: ``exchange``)."""
        if w.direction is not w.grad:  # the gradient is spent: its buffer takes the direction
            w.grad.copy_(w.direction)
        self._inflight.left[self._bucket[(w.group, w.stack_index)]] -= 1
        self._send_done_buckets()

    def _send_done_buckets(self) -> None:
        """Sends, in bucket order, the directions of the buckets whose stacks are computed,
        but the last."""
        inflight = self._inflight
        while len(inflight.dirs) < self.num_buckets - 1 and not inflight.left[len(inflight.dirs)]:
            inflight.dirs.append(self._send_directions(len(inflight.dirs)))

    def flush(self) -> None:
        self._send_done_buckets()

    def _send_directions(self, b: int):
        """Copies bucket ``b``'s directions (and flags) into its chunks and sends them; its
        gradients must have arrived first (their buffers share memory)."""
        inflight = self._inflight
        self._receive(b)
        step, send = inflight.step, self._bufs["dir_send"][b]
        dst, src = [], []
        for _, _, prm, _ in self._active(step):
            dst += prm.dir_out_dst.get(b, [])
            src += prm.dir_out_src.get(b, [])
        if dst:
            torch._foreach_copy_(dst, src)
        if self._holders_decay(step):
            for w in self._work:
                at = self._send_flags.get((w.group, w.stack_index))
                if at is not None and self._bucket[(w.group, w.stack_index)] == b:
                    send[at[0]] = (~w.keep)[at[1]].to(send.dtype)
        if b == self.num_buckets - 1:
            mine = self._words.write(FAILED if inflight.failed else 0, step.digest)
            inflight.mine = mine
            send[self._word_index["dir_send"]] = mine
        return self._all_to_all("dir", b)

    def exchange(self, step: Step, failed: bool) -> torch.Tensor:
        inflight = self._inflight
        inflight.failed = failed
        while len(inflight.dirs) < self.num_buckets:
            inflight.dirs.append(self._send_directions(len(inflight.dirs)))
        for b in range(self.num_buckets):
            _wait(inflight.dirs, b)
        recv = self._bufs["dir_recv"][-1]
        status = read_status(recv[self._word_index["dir_recv"]], inflight.mine)
        # Anyone failed; anyone saw a disagreement, or stepped with another digest.
        return torch.stack([status[:, 0].any(), status[:, 1:].any()])

    def status(self, summary: list[float]) -> Status:
        return Status(bool(summary[0]), bool(summary[1]))

    def _holders_decay(self, step: Step) -> bool:
        """Whether a stepping DTensor group's weight decay is applied by the holders."""
        return any(
            weight_decay_place(step.options[gi]) == "holder-step"
            for gi in step.active
            if gi in self._groups
        )

    def apply(self, step: Step) -> None:
        if self._holders_decay(step):  # 1 where a piece's block stepped, 0 where skipped
            torch.index_select(self._flat["dir_recv"], 0, self._recv_flags, out=self._kept)
            self._kept.neg_().add_(1.0)
        by_group: dict[int, tuple[list, list, list]] = {}
        for gi, pi, prm, _ in self._active(step):
            dst, src, kept = by_group.setdefault(gi, ([], [], []))
            dst += self._param_views(prm, step.params[gi][pi])
            src += prm.dir_src
            kept += prm.kept
        for gi, (dst, src, kept) in by_group.items():
            opts = step.options[gi]
            if weight_decay_place(opts) == "holder-step":
                # W <- W - lr (D + wd W), not for a skipped block (whose D is 0).
                src = torch._foreach_add(
                    src, torch._foreach_mul(dst, kept), alpha=opts.weight_decay
                )
            if dst:
                torch._foreach_add_(dst, src, alpha=-opts.lr)

    def release(self) -> None:
        # Nothing may still be writing into the buffers (a step that raised midway).
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            for handles in (inflight.grads, inflight.dirs):
                for b in range(len(handles)):
                    _wait(handles, b)
        super().release()

    def _all_to_all(self, kind: str, b: int):
        """Starts bucket ``b``'s exchange of ``kind``; returns its handle (None: done)."""
        recv, send = self._bufs[f"{kind}_recv"][b], self._bufs[f"{kind}_send"][b]
        recv_sizes, send_sizes = self._splits[kind][b]
        if len(send_sizes) == 1:  # a world of one rank: its chunk to itself
            recv.copy_(send)
            return None
        return dist.all_to_all_single(recv, send, recv_sizes, send_sizes, async_op=True)


@dataclasses.dataclass
class _Inflight:
    """One step's exchange in progress: per bucket, the gradient exchange's handle, whether
    its pieces are in the stacks, how many of its stacks are still computing, and the handles
    of the direction exchanges sent so far (in bucket order)."""

    step: Step
    grads: list
    received: list[bool]
    left: list[int]
    dirs: list = field(default_factory=list)
    failed: bool = False
    mine: torch.Tensor | None = None


def _wait(handles: list, b: int) -> None:
    """Waits for bucket ``b``'s collective (once)."""
    handle, handles[b] = handles[b], None
    if handle is not None:
        handle.wait()


def _sharing(
    sizes: list[tuple[int, int]], dtypes: tuple[torch.dtype, torch.dtype], device: torch.device
):
    """Per bucket, two buffers of ``sizes[b]`` elements of ``dtypes`` over one piece of
    memory (zeroed), the buckets' pieces one after the other (8-byte aligned). Returns the
    per-bucket pairs, their starts (in elements of each dtype) in flat views of the whole
    memory, and those two flat views."""
    starts, total = [], 0
    for na, nb in sizes:
        starts.append(total)
        nbytes = max(na * dtypes[0].itemsize, nb * dtypes[1].itemsize)
        total += -(-nbytes // 8) * 8
    raw = torch.zeros(total, dtype=torch.uint8, device=device)
    flats = (raw.view(dtypes[0]), raw.view(dtypes[1]))
    views, bases = [], []
    for start, (na, nb) in zip(starts, sizes, strict=True):
        base = (start // dtypes[0].itemsize, start // dtypes[1].itemsize)
        views.append((flats[0][base[0] : base[0] + na], flats[1][base[1] : base[1] + nb]))
        bases.append(base)
    return views, bases, flats
