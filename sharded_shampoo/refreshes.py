"""Refreshes off the critical path (``refresh_delay = d > 0``): a refresh due at step ``t``
takes a copy of the stack's factors of step ``t`` (those its decomposition reads:
``algorithm.refresh_inputs``), decomposes it in the background, and is installed at the start
of the group's step ``t + d``, waiting for it if it is not done.

The result never depends on timing: a decomposition is a pure function of its copy
(``algorithm.decompose``), and it is installed at a step fixed when it starts. In the
background means a worker thread (torch releases the GIL inside its kernels), and on CUDA a
side stream with events, so that neither the host nor the device's main stream waits for it
before ``t + d``. It writes only the stack's ``pending_*`` state (``state.stacks``), which
the steps do not touch (they use ``BlockStack.working``), so that a checkpoint holds what is
in flight: ``state_dict`` first waits for it, ``load_state_dict`` resumes it (``restore``).

Rules, which the tests' reference implements:

- a block whose gradient is not finite when its refresh is due (``StackWork.keep``) has it
  computed but not installed: its state is left as it was, as in a synchronous step;
- a block with a refresh in flight skips the refreshes due meanwhile (staggered blocks whose
  phase comes within ``d`` steps after ``start_preconditioning_step``);
- a refresh is installed at the group's step ``t + d`` whether or not its parameter has a
  gradient in that step; root failures are counted, warned about and raised on then.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from .algorithm import decompose, install, install_keys, refresh_inputs, storage_format
from .algorithm.modes import factored_dims
from .diagnostics import BlockNamer, RootFailureWarning, warn
from .options import GroupOptions
from .state import Rows
from .state.groups import GroupState
from .state.stacks import BlockStack

__all__ = ["Refreshes", "check_roots"]

# How much lower the worker's priority is (a nice value: 10 gives it about a tenth of a core
# that a training thread also wants).
WORKER_NICENESS = 10


@dataclass
class _Job:
    """A refresh in flight: the rows of a stack (None: all) whose ``pending`` state it fills,
    installed at the group's step ``step``."""

    group: int
    stack: BlockStack
    rows: Rows | None
    step: int
    done: Future | None  # None once waited for (or restored from a checkpoint)
    # The positions in ``rows`` of the kept rows that failed, read by the worker (installing
    # then reads nothing back); None after a load.
    failed: list[int] | None = None


class Refreshes:
    """One optimizer's refreshes in flight, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._jobs: list[_Job] = []
        # Per stack (by id), each row's install step while one is in flight, else 0: on the
        # host, to choose rows without reading the device.
        self._busy: dict[int, torch.Tensor] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None

    # ------------------------------------------------------------ starting

    def launch(
        self,
        group: int,
        stack: BlockStack,
        opts: GroupOptions,
        t: int,
        rows: Rows | None,
        keep: torch.Tensor,
    ) -> None:
        """Starts the refresh of the rows ``rows`` (None: all) of ``stack`` due at step ``t``,
        from its state now (after step ``t``'s factor update); ``keep`` (num_rows,) bool on the
        device: the rows that stepped."""
        order = len(stack.block_shape)
        if not factored_dims(stack.state, order):
            return
        busy = self._busy.get(id(stack))
        if busy is None:
            busy = self._busy[id(stack)] = torch.zeros(
                stack.num_rows, dtype=torch.long, device="cpu"
            )
        host = torch.arange(stack.num_rows, device="cpu") if rows is None else rows.host
        free = busy[host] == 0
        if not bool(free.all()):  # host tensors: no device read
            host = host[free]
            if not host.numel():
                return
            rows = Rows(host.to(stack.device), host)
        installed_at = t + opts.refresh_delay
        busy[host] = installed_at
        inputs = stack.state.select(*refresh_inputs(stack.state, opts, order))
        # The install step, negated for rows not kept now (they stay busy, change nothing).
        step = stack.pending["step"]
        if rows is None:
            inputs = inputs.clone()
        else:
            inputs = inputs[rows.index]  # a copy
            keep = keep[rows.index]
        inputs["keep"] = keep
        if rows is None:
            step.copy_(_signed(keep, installed_at))
        else:
            step[rows.index] = _signed(keep, installed_at)
        pending = stack.pending
        like = storage_format(stack.state, opts, order)

        def work() -> list[int]:
            new = decompose(inputs.exclude("keep"), opts, t, order, like)
            for key in new.keys():
                if rows is None:
                    pending[key].copy_(new[key])
                else:
                    pending[key][rows.index] = new[key]
            return (~new["ok"].view(-1) & inputs["keep"]).nonzero().flatten().tolist()

        done = self._submit(work, inputs)
        self._jobs.append(_Job(group, stack, rows, installed_at, done))

    def _submit(self, work: Callable[[], list[int]], inputs: TensorDict) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="sharded_shampoo-refresh", initializer=_yield_to_training
            )
            weakref.finalize(self, self._executor.shutdown, wait=False)
        if self._device.type != "cuda":
            return self._executor.submit(work)
        # A side stream: it starts once the main stream has made the copy, and the main stream
        # waits for it when it installs the result (``_wait``).
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        stream, ready = self._stream, torch.cuda.Event()
        ready.record()
        for x in inputs.values():
            x.record_stream(stream)  # freed by the worker while the side stream may use it

        def on_side_stream() -> tuple[list[int], torch.cuda.Event]:
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                failed = work()
                finished = torch.cuda.Event()
                finished.record(stream)
                return failed, finished

        return self._executor.submit(on_side_stream)

    # ------------------------------------------------------------ installing

    def install(
        self, chosen: dict[int, GroupOptions], steps: list[int], name: BlockNamer
    ) -> str | None:
        """Installs the refreshes due at this step of the groups taking one (``chosen``: their
        options; ``steps[group] + 1`` is the step); returns the error to raise (roots that kept
        failing)."""
        error, remaining = None, []
        for job in self._jobs:
            opts = chosen.get(job.group)
            if opts is None or steps[job.group] + 1 != job.step:
                remaining.append(job)
                continue
            self._wait(job)
            error = self._install(job, opts, name) or error
        self._jobs = remaining
        return error

    def _install(self, job: _Job, opts: GroupOptions, name: BlockNamer) -> str | None:
        stack, rows = job.stack, job.rows
        order = len(stack.block_shape)
        pending = stack.pending if rows is None else stack.pending[rows.index]
        # Rows not kept when it was due were not given this step.
        keep = (pending["step"] == job.step).view(-1)
        if rows is None:
            ok = install(stack.working, pending, opts, order, keep)
            stack.pending["step"].zero_()
        else:
            keys = install_keys(stack.working, opts, order)
            sub = stack.working.select(*keys)[rows.index]
            ok = install(sub, pending, opts, order, keep)
            for key in keys:
                stack.state[key][rows.index] = sub[key]
            stack.pending["step"][rows.index] = 0
        host = torch.arange(stack.num_rows, device="cpu") if rows is None else rows.host
        self._busy[id(stack)][host] = 0
        if job.failed is not None:  # known on the host: nothing to read back
            if not job.failed:
                return None
            ok = torch.ones(len(host), dtype=torch.bool, device="cpu")
            ok[job.failed] = False
        return check_roots(job.group, opts, stack, ok, host, name, job.step)

    def _wait(self, job: _Job) -> None:
        if job.done is None:
            return
        result = job.done.result()  # raises what the worker raised
        if isinstance(result, tuple):  # CUDA: the main stream waits, the host does not
            result, finished = result
            torch.cuda.current_stream(self._device).wait_event(finished)
        job.failed, job.done = result, None

    # ------------------------------------------------------------ checkpoints

    def wait(self) -> None:
        """Waits for every refresh in flight: their results are then in the state (before a
        state dict is taken, or one loaded over them)."""
        for job in self._jobs:
            self._wait(job)

    def restore(self, groups: list[GroupState]) -> None:
        """After a load: the refreshes in flight are those the loaded state says (each row's
        ``pending_step``), already computed."""
        self.wait()
        self._jobs, self._busy = [], {}
        for gi, group in enumerate(groups):
            for stack in group.blocks.stacks:
                if "step" not in stack.pending.keys():
                    continue
                steps = stack.pending["step"].view(-1).abs().cpu()  # once per load
                # An install step already passed cannot come: nothing is in flight there.
                steps[steps <= int(group.step)] = 0
                self._busy[id(stack)] = steps
                for s in sorted(set(steps.tolist()) - {0}):
                    host = (steps == s).nonzero().flatten()
                    rows = (
                        None
                        if host.numel() == stack.num_rows
                        else Rows(host.to(stack.device), host)
                    )
                    self._jobs.append(_Job(gi, stack, rows, s, None))


def _signed(keep: torch.Tensor, step: int) -> torch.Tensor:
    """(n, 1): ``step`` where ``keep``, else ``-step``."""
    return (keep.view(-1, 1).long() * 2 - 1) * step


def _yield_to_training() -> None:
    """The worker runs at a lower scheduling priority (Linux: per thread), so that where the
    cores are busy (CPU training) it takes what the training threads leave instead of slowing
    them down; where cores are idle it runs at full speed all the same."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


def check_roots(
    gi: int,
    opts: GroupOptions,
    stack: BlockStack,
    ok: torch.Tensor,
    rows: torch.Tensor,
    name: BlockNamer,
    step: int,
) -> str | None:
    """Warns about blocks whose roots failed; returns the error to raise, if any."""
    if bool(ok.all()):
        return None
    failures = stack.state["root_failures"]
    what = "eigenbasis" if opts.eigenvalue_corrected else "inverse roots"
    error = None
    for j in (~ok).nonzero().flatten().tolist():
        r = int(rows[j])
        pi, bid = stack.row_owner[r]
        count = int(failures[r])
        if count >= opts.max_consecutive_root_failures:
            error = error or (
                f"the {what} of {name(gi, pi, bid)} failed {count} times in a row (also "
                "in float64); its factors are likely non-finite or badly scaled, or epsilon "
                "is too small for the roots to fit the parameter dtype. Parameters were not "
                "updated in this step."
            )
            continue
        warn(
            RootFailureWarning(
                f"{what} of {name(gi, pi, bid)} could not be computed (failure {count} "
                f"of {opts.max_consecutive_root_failures} allowed); keeping its previous ones"
            ),
            step,
        )
    return error
