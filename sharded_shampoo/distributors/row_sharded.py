"""FSDP2 and HSDP row shards: gradient rows to the blocks' owners, direction rows back.

Under FSDP2 (one replica group) and HSDP (R replica groups of S shards) alike, per step:

1. gradient rows go from the rank holding them to the block's owner, by one
   ``all_to_all_single`` inside the owner's replica group (the shard group): the holder in the
   owner's own group is the source, so gradients never cross replica groups;
2. direction rows (``communication_dtype``) go from the owner to the holders of those rows in
   its group, by one more ``all_to_all_single`` over the shard group;
3. under HSDP only, every rank forwards the direction rows of its shard that its group computed
   to the same shard's holders in the other groups, by one ``all_to_all_single`` over the
   replicate group: the work is split over all R x S ranks, and each row crosses replica
   groups once.

Exactly the rows that must move are sent, with ``all_to_all_single``'s split sizes: the routes
(``placement.routes``) are computed once. A rank's own rows of its own blocks take the same
path through its own chunk, so they are rounded to ``communication_dtype`` like everyone
else's: every replica of a row applies the same values.

Host work per step does not depend on the world size: every buffer is allocated once, the views
of the buffers' pieces are computed once, and each phase is one ``torch._foreach_copy_`` (or
``_foreach_add_``) over the pieces of the active parameters. Only the gradients' views are
taken anew each step (one slice per piece of the rows this rank holds, which falls as the
world grows): autograd hands out new gradient tensors, and holding views of last step's would
keep them alive.

Every direction piece carries a flag, set when its block was skipped (a non-finite gradient),
and every chunk ends with status words (``communication``): a failure or a disagreement
anywhere reaches every rank before any rank applies anything.

Weight decay of row-sharded parameters is applied where the weight rows already are, so that
they travel only when they must: L2 (``G + wd W`` is elementwise) by the holder before sending;
decoupled without momentum (``W - lr (D + wd W)``) by the holder when applying; decoupled with
momentum feeds ``D + wd W`` into the owner's momentum buffer, so then the weight rows travel
with the gradient rows (whenever a row-sharded group has momentum: sized from what cannot
change after construction, so every rank sends the same amount even in a step in which ranks
disagree on the options, which the status words then report).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.distributed as dist

from ..blocking import ParamBlocking
from ..communication import DISAGREED, FAILED, STATUS_WORDS, read_status, status_words
from ..options import GroupOptions
from ..placement import Plan
from ..placement.routes import Chunks, Route, RowRoutes
from ..placement.sharding import band_pieces
from ..state import GroupBlocks
from .base import Distributor, Status, StackWork, Step

__all__ = ["RowShardedDistributor", "weight_decay_place"]


def weight_decay_place(opts: GroupOptions) -> str:
    """Where weight decay of a row-sharded parameter is applied (see the module docstring):
    ``"holder-grad"``, ``"holder-step"``, ``"owner"`` or ``"none"``."""
    if opts.weight_decay == 0:
        return "none"
    if not opts.decoupled_weight_decay:
        return "holder-grad"
    return "holder-step" if opts.momentum == 0 else "owner"


def _band(local: torch.Tensor, blocking: ParamBlocking) -> torch.Tensor:
    """A shard's local tensor as its band of merged rows (a view: a shard is a band)."""
    trailing = blocking.merged[1:]
    return local.view(-1, *trailing) if local.numel() else local.reshape(0, *trailing)


def _index(blocking: ParamBlocking, bid: int, piece) -> tuple[slice, ...]:
    """Where a piece of block ``bid`` sits in the holder's band."""
    return (slice(piece.band_lo, piece.band_hi), *blocking.block_slices(bid)[1:])


def _piece_view(flat: torch.Tensor, offset: int, blocking: ParamBlocking, route: Route):
    shape = (route.piece.rows, *blocking.block_shape(route.block)[1:])
    return flat[offset : offset + route.numel].view(shape)


@dataclasses.dataclass
class _Param:
    """One row-sharded parameter's part in the exchange, on this rank: the pieces of its band
    (the rows this rank holds), and the pieces of its blocks this rank owns. Views of the
    persistent buffers, computed once."""

    blocking: ParamBlocking
    # Per band piece: where it sits in the band; where its direction rows arrive; and its flag
    # (buffer name, position).
    index: list[tuple[slice, ...]] = field(default_factory=list)
    dir_src: list[torch.Tensor] = field(default_factory=list)
    dir_flag: list[tuple[str, int]] = field(default_factory=list)
    # The band pieces whose owner is in my replica group (I send their gradient rows): their
    # positions among the band pieces, and where their gradient and weight rows go.
    send_at: list[int] = field(default_factory=list)
    grad_dst: list[torch.Tensor] = field(default_factory=list)
    weight_dst: list[torch.Tensor] = field(default_factory=list)
    # Per piece of the blocks I own: its rows in the stack's gradient buffer (which holds the
    # direction after the math), and in its weight buffer; where its gradient and weight rows
    # arrive; where its direction rows go; (stack index, row, flag position in dir_send).
    stack_rows: list[torch.Tensor] = field(default_factory=list)
    weight_rows: list[torch.Tensor] = field(default_factory=list)
    grad_src: list[torch.Tensor] = field(default_factory=list)
    weight_src: list[torch.Tensor] = field(default_factory=list)
    dir_dst: list[torch.Tensor] = field(default_factory=list)
    owned: list[tuple[int, int, int]] = field(default_factory=list)
    # (key of the local shard's memory, views of its band pieces).
    views: tuple | None = None


class RowShardedDistributor(Distributor):
    """The stacks of blocks of row-sharded parameters, and their rows' routes."""

    collective = True

    def __init__(
        self, blocks: list[GroupBlocks], plan: Plan, rank: int, fsdp, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(blocks, row_sharded=True)
        mesh = fsdp.mesh
        self.shard_group = mesh.get_group(mesh.ndim - 1)
        self.replicate_group = mesh.get_group(0) if mesh.ndim == 2 else None
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
        sections = 2 if self.with_weights else 1
        self.routes = routes = RowRoutes(plan, rank, fsdp.coords, sections)
        self.num_shards, self.num_replicas = routes.num_shards, routes.num_replicas
        self.shard, self.replica = routes.shard, routes.replica
        zeros = lambda n, dtype: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self._bufs = {
            "grad_send": zeros(routes.grad_send.total, self.grad_dtype),
            "grad_recv": zeros(routes.grad_recv.total, self.grad_dtype),
            "dir_send": zeros(routes.dir_send.total, dtype),
            "dir_recv": zeros(routes.dir_recv.total, dtype),
        }
        fwd = routes.forward
        if fwd is not None:
            size = fwd.sizes[self.replica]
            self._bufs["fwd_send"] = zeros(self.num_replicas * size, dtype)
            self._bufs["fwd_recv"] = zeros(fwd.total, dtype)
        for gi, si, stack in self.stacks:
            self._buffer(self._grads, gi, si, stack)
            if self.with_weights:
                self._buffer(self._weights, gi, si, stack)
        self.params = self._param_routes(plan)
        self._flags_set = False  # some flag of dir_send is set (from an earlier step)
        self._skipped = False  # some piece that arrived in this step is flagged
        # Where status words and flags sit, to write them and read them with one operation.
        long = lambda xs: torch.tensor(list(xs), dtype=torch.long, device=device)  # noqa: E731

        def words(chunks: Chunks, peers) -> torch.Tensor:
            return long(chunks.status_at[j] + w for j in peers for w in range(STATUS_WORDS))

        def flags(chunks: Chunks, peers) -> torch.Tensor:
            return long(f for j in peers for f in chunks.flag_at[j])

        shards = range(self.num_shards)
        self._words = {"dir_send": words(routes.dir_send, shards),
                       "dir_recv": words(routes.dir_recv, shards)}
        self._flags = {"dir_send": flags(routes.dir_send, shards),
                       "dir_recv": flags(routes.dir_recv, shards)}
        if fwd is not None:
            q, start = self.replica, fwd.starts[self.replica]
            others = [j for j in range(self.num_replicas) if j != q]
            self._words["fwd_send"] = long(fwd.status_at[q] - start + w for w in range(STATUS_WORDS))
            self._words["fwd_recv"] = words(fwd, others)
            self._flags["fwd_recv"] = flags(fwd, others)
            self._flags["fwd_send"] = long(f - start for f in fwd.flag_at[q])
            self._flags["fwd_from"] = long(self._forward_flags)

    def _param_routes(self, plan: Plan) -> dict[tuple[int, int], _Param]:
        routes, bufs = self.routes, self._bufs
        out: dict[tuple[int, int], _Param] = {}
        band_pos: dict[tuple[int, int, int], int] = {}
        for gi, group in enumerate(plan.groups):
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                prm = out[(gi, pi)] = _Param(blocking)
                for i, (bid, piece) in enumerate(band_pieces(blocking, sharding, self.shard)):
                    band_pos[(gi, pi, bid)] = i
                    prm.index.append(_index(blocking, bid, piece))
                prm.dir_src = [None] * len(prm.index)
                prm.dir_flag = [None] * len(prm.index)

        def view(name: str, offset: int, r: Route) -> torch.Tensor:
            return _piece_view(bufs[name], offset, out[(r.group, r.param)].blocking, r)

        send = routes.grad_send
        for j, entries in enumerate(send.entries):
            for off, r in entries:
                prm = out[(r.group, r.param)]
                prm.send_at.append(band_pos[(r.group, r.param, r.block)])
                prm.grad_dst.append(view("grad_send", off, r))
                if self.with_weights:
                    prm.weight_dst.append(view("grad_send", off + send.data[j], r))
        for name, chunks in (("dir_recv", routes.dir_recv), ("fwd_recv", routes.forward)):
            for j, entries in enumerate(chunks.entries if chunks is not None else ()):
                if name == "fwd_recv" and j == self.replica:
                    continue  # rows computed in my own group arrive in dir_recv
                for (off, r), flag in zip(entries, chunks.flag_at[j]):
                    prm = out[(r.group, r.param)]
                    i = band_pos[(r.group, r.param, r.block)]
                    prm.dir_src[i] = view(name, off, r)
                    prm.dir_flag[i] = (name, flag)
        recv, dirs = routes.grad_recv, routes.dir_send
        for j, entries in enumerate(recv.entries):
            for (off, r), (off_d, _), flag in zip(entries, dirs.entries[j], dirs.flag_at[j]):
                prm = out[(r.group, r.param)]
                si, row = self.blocks[r.group].where[(r.param, r.block)]
                rows = (row, slice(r.piece.block_lo, r.piece.block_hi))
                prm.stack_rows.append(self._grads[(r.group, si)][rows])
                prm.grad_src.append(view("grad_recv", off, r))
                if self.with_weights:
                    prm.weight_rows.append(self._weights[(r.group, si)][rows])
                    prm.weight_src.append(view("grad_recv", off + recv.data[j], r))
                prm.dir_dst.append(view("dir_send", off_d, r))
                prm.owned.append((si, row, flag))
        # HSDP: what I forward to the other groups, the rows of my band computed in my group,
        # is copied from where those rows arrived; so are their flags.
        self._forward_dst, self._forward_src, self._forward_flags = [], [], []
        fwd = routes.forward
        if fwd is not None:
            q, start = self.replica, fwd.starts[self.replica]
            payload = bufs["fwd_send"][: fwd.sizes[q]]
            for off, r in fwd.entries[q]:
                prm = out[(r.group, r.param)]
                i = band_pos[(r.group, r.param, r.block)]
                self._forward_dst.append(_piece_view(payload, off - start, prm.blocking, r))
                self._forward_src.append(prm.dir_src[i])
                self._forward_flags.append(prm.dir_flag[i][1])
        return out

    def bytes_sent_per_step(self) -> int:
        """Exactly what this rank sends to other ranks in one step."""
        return self.routes.bytes_sent(
            torch.empty((), dtype=self.grad_dtype).element_size(),
            torch.empty((), dtype=self.dtype).element_size(),
        )

    # ------------------------------------------------------------------ per step

    def _active(self, step: Step):
        """(group, parameter index, _Param, options) of the active row-sharded parameters."""
        for (gi, pi), prm in self.params.items():
            active = step.active.get(gi)
            if active is not None and active[pi]:
                yield gi, pi, prm, step.options[gi]

    def _param_views(self, gi: int, pi: int, prm: _Param, p: torch.Tensor) -> list[torch.Tensor]:
        """Views of the band pieces of parameter ``p``'s local shard, kept while it is the same
        memory (a parameter's shard is not reallocated by training; a load may swap it)."""
        local = p.to_local()
        key = (local.data_ptr(), tuple(local.shape), tuple(local.stride()))
        if prm.views is None or prm.views[0] != key:
            band = _band(local, prm.blocking)
            prm.views = (key, [band[ix] for ix in prm.index])
        return prm.views[1]

    def collect(self, step: Step) -> list[StackWork]:
        def math_options(opts: GroupOptions):
            place = weight_decay_place(opts)
            if place in ("holder-grad", "holder-step"):
                opts = dataclasses.replace(opts, weight_decay=0.0)
            return opts, place == "owner"

        work = self._stack_work(step, math_options)
        dst, src = [], []
        decay: dict[int, tuple[list, list]] = {}
        for gi, pi, prm, opts in self._active(step):
            if not prm.send_at:
                continue
            p = step.params[gi][pi]
            band = _band(p.grad.to_local(), prm.blocking)
            dst += prm.grad_dst
            src += [band[prm.index[i]] for i in prm.send_at]
            place = weight_decay_place(opts)
            if place in ("holder-grad", "owner"):
                views = self._param_views(gi, pi, prm, p)
                mine = [views[i] for i in prm.send_at]
                if place == "holder-grad":  # G + wd W, elementwise, before sending
                    d = decay.setdefault(gi, ([], []))
                    d[0].extend(prm.grad_dst)
                    d[1].extend(mine)
                else:  # the owner needs the weight rows
                    dst += prm.weight_dst
                    src += mine
        if dst:
            torch._foreach_copy_(dst, src)
        for gi, (d, w) in decay.items():
            torch._foreach_add_(d, w, alpha=step.options[gi].weight_decay)
        self._all_to_all("grad", self.routes.grad_recv, self.routes.grad_send, self.shard_group)
        dst, src = [], []
        for gi, pi, prm, opts in self._active(step):
            dst += prm.stack_rows
            src += prm.grad_src
            if weight_decay_place(opts) == "owner":
                dst += prm.weight_rows
                src += prm.weight_src
        if dst:
            torch._foreach_copy_(dst, src)
        return work

    def exchange(self, step: Step, failed: bool) -> Status:
        send, recv = self._bufs["dir_send"], self._bufs["dir_recv"]
        for w in self._work:
            if w.direction is not w.grad:  # the gradient is spent: its buffer takes the direction
                w.grad.copy_(w.direction)
        dst, src = [], []
        for _, _, prm, _ in self._active(step):
            dst += prm.dir_dst
            src += prm.stack_rows
        if dst:
            torch._foreach_copy_(dst, src)
        self._write_flags(step, send)
        words = torch.tensor(status_words(FAILED if failed else 0, step.digest), dtype=self.dtype)
        send[self._words["dir_send"]] = words.repeat(self.num_shards)
        self._all_to_all("dir", self.routes.dir_recv, self.routes.dir_send, self.shard_group)
        # One host sync: anyone failed, anyone's digest differs, any block skipped anywhere.
        status = read_status(recv[self._words["dir_recv"]].view(-1, STATUS_WORDS), step.digest)
        skipped = recv[self._flags["dir_recv"]].ne(0).any().view(1)
        seen = torch.cat([status.any(0), skipped]).tolist()
        anyone_failed, disagreed, self._skipped = failed or seen[0], seen[2], seen[3]
        if self.num_replicas > 1:
            anyone_failed, disagreed = self._forward(step, anyone_failed, disagreed)
        return Status(bool(anyone_failed), bool(disagreed))

    def _write_flags(self, step: Step, send: torch.Tensor) -> None:
        """Flags the pieces of the blocks skipped in this step (rare: a slow path)."""
        skipped = {
            (w.group, w.stack_index, r)
            for w in self._work
            if w.skipped is not None
            for r in w.skipped.nonzero().flatten().tolist()
        }
        if not skipped and not self._flags_set:
            return
        send[self._flags["dir_send"]] = 0.0
        for gi, _, prm, _ in self._active(step):
            for si, row, flag in prm.owned:
                if (gi, si, row) in skipped:
                    send[flag] = 1.0
        self._flags_set = bool(skipped)

    def _forward(self, step: Step, anyone_failed: bool, disagreed: bool) -> tuple[bool, bool]:
        """Step 3 (HSDP): the rows of my shard computed in my group to the other groups."""
        R, fwd = self.num_replicas, self.routes.forward
        send, recv = self._bufs["fwd_send"], self._bufs["fwd_recv"]
        size = fwd.sizes[self.replica]
        payload = send[:size]
        if self._forward_dst:
            torch._foreach_copy_(self._forward_dst, self._forward_src)
        payload[self._flags["fwd_send"]] = self._bufs["dir_recv"][self._flags["fwd_from"]]
        # What this rank learnt in its shard group reaches the other replica groups.
        seen = (FAILED if anyone_failed else 0) | (DISAGREED if disagreed else 0)
        words = torch.tensor(status_words(seen, step.digest), dtype=self.dtype)
        payload[self._words["fwd_send"]] = words
        # The same payload goes to every group (my own chunk, to myself, is not read).
        send.view(R, size)[1:] = payload
        self._all_to_all("fwd", fwd, None, self.replicate_group)
        status = read_status(recv[self._words["fwd_recv"]].view(-1, STATUS_WORDS), step.digest)
        skipped = recv[self._flags["fwd_recv"]].ne(0).any().view(1)
        seen = torch.cat([status.any(0), skipped]).tolist()
        self._skipped = self._skipped or bool(seen[3])
        return anyone_failed or bool(seen[0]), disagreed or bool(seen[1] or seen[2])

    def apply(self, step: Step) -> None:
        flags = None
        if self._skipped:  # some block was skipped: read which pieces (a second host sync)
            flags = {
                name: self._bufs[name].tolist() for name in ("dir_recv", "fwd_recv")
                if name in self._bufs
            }
        by_group: dict[int, tuple[list, list]] = {}
        for gi, pi, prm, _ in self._active(step):
            views = self._param_views(gi, pi, prm, step.params[gi][pi])
            dst, src = by_group.setdefault(gi, ([], []))
            if flags is None:
                dst += views
                src += prm.dir_src
            else:
                for view, rows, (name, at) in zip(views, prm.dir_src, prm.dir_flag):
                    if flags[name][at] == 0:
                        dst.append(view)
                        src.append(rows)
        for gi, (dst, src) in by_group.items():
            opts = step.options[gi]
            if weight_decay_place(opts) == "holder-step":  # W <- W - lr (D + wd W)
                src = torch._foreach_add(src, dst, alpha=opts.weight_decay)
            if dst:
                torch._foreach_add_(dst, src, alpha=-opts.lr)

    def _all_to_all(self, kind: str, recv_chunks: Chunks, send_chunks: Chunks | None, group) -> None:
        recv = self._bufs[f"{kind}_recv"]
        send = self._bufs[f"{kind}_send"]
        recv_sizes = recv_chunks.sizes
        send_sizes = send_chunks.sizes if send_chunks is not None else (
            [recv_chunks.sizes[self.replica]] * self.num_replicas
        )
        if len(send_sizes) == 1:
            # A group of one rank (FSDP2 on a single rank): its chunk to itself.
            recv.copy_(send)
        else:
            dist.all_to_all_single(recv, send, list(recv_sizes), list(send_sizes), group=group)
