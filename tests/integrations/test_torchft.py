"""torchft 0.2: ShardedShampoo in replica groups that die and rejoin (``torchft_job``).

Two replica groups of two FSDP2 ranks each (and two groups of one rank), on gloo CPUs, with
torchft's lighthouse started by the test, a ``Manager`` per rank and its
``OptimizerWrapper``; the optimizer refreshes in the background and staggers its blocks. One
group is killed (between two steps; inside the optimizer's step; in the backward pass, before
the average over the groups, so that the other group's step is not committed) and started
again: the job goes on, the restarted group recovers live from the other, and from then on
both groups' parameters and optimizer state are bitwise identical. The same job without a kill
is the control.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchft", reason="the torchft extra is absent")

import torch  # noqa: E402
import torchft_job  # noqa: E402

# name: (ranks per group, kill: (group, step, where) or None)
JOBS = {
    "control": (2, None),
    "between_steps": (2, (1, 4, "between")),
    "in_the_optimizer_step": (2, (1, 6, "mid-step")),
    "in_the_backward": (2, (1, 5, "backward")),
    "single_rank_groups": (1, (1, 4, "between")),
}


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module", params=list(JOBS))
def job(request, tmp_path_factory):
    size, kill = JOBS[request.param]
    out = str(tmp_path_factory.mktemp(request.param))
    exits = torchft_job.run_job(out, groups=2, size=size, kill=kill)
    ranks = [
        [torch.load(f"{out}/group{g}_rank{r}.pt", weights_only=False) for r in range(size)]
        for g in range(2)
    ]
    return request.param, kill, exits, ranks


@pytest.mark.fault
def test_groups_end_bitwise_identical_after_a_group_died_and_recovered(job, fault_row):
    name, kill, exits, ranks = job
    size = len(ranks[0])
    where = {None: "none killed (control)", "between": "group 1 killed between two steps",
             "mid-step": "group 1 killed inside the optimizer step",
             "backward": "group 1 killed in the backward"}  # fmt: skip
    row = fault_row(
        f"torchft: 2 groups of {size} rank(s), {where[kill and kill[2]]}",
        "the job goes on; the restarted group recovers; then both groups bitwise identical",
    )
    assert all(code == 0 for key, codes in exits.items() if "hung" not in key for code in codes
               if not (kill and key == f"group{kill[0]}")), exits  # fmt: skip
    assert not any("hung" in key for key in exits), exits
    for healthy, other in zip(ranks[0], ranks[1], strict=True):
        a, b = dict(_flat(healthy["state"])), dict(_flat(other["state"]))
        assert a.keys() == b.keys() and len(a) > 20
        differ = [k for k in a if not _equal(a[k], b[k])]
        assert not differ, (name, differ[:5])
        assert healthy["step"] == other["step"] >= torchft_job.STEPS
        # The optimizer stepped exactly in the committed steps (the manager counts those).
        assert healthy["optimizer_step"] == healthy["step"] == other["optimizer_step"]
        blocks = [k for k in a if ".blocks." in k and k.endswith("factor_0")]
        assert blocks and any(bool(a[k].abs().sum() > 0) for k in blocks)  # trained state
        if kill is None:
            assert other["recovered_at"] is None and not healthy["skipped"]
        else:
            assert exits[f"group{kill[0]} restarted"] == [0] * len(ranks[0])
            # The restarted group caught up with the job, which went on meanwhile.
            assert other["recovered_at"] is not None and other["recovered_at"] > kill[1]
        if kill is not None and kill[2] == "backward":
            # The healthy group's step during the loss was not committed (and not taken).
            assert healthy["skipped"] == [kill[1]], healthy["skipped"]
    first, second = ranks[0][0], ranks[1][0]
    row["happened"] = (
        f"{len(dict(_flat(first['state'])))} entries per rank bitwise equal at step "
        f"{first['step']}"
        + ("" if kill is None else f"; group 1 recovered at step {second['recovered_at']}")
        + (f"; group 0 skipped step {first['skipped']}" if first["skipped"] else "")
    )


def test_a_step_the_manager_does_not_commit_leaves_the_optimizer_as_it_was():
    """One process, a manager that refuses its step 5 while a staggered refresh is in flight
    (launched at 4, installed at the optimizer's next step): the optimizer's state after the
    refused step is bitwise what it was before, and the run ends bitwise as one that was never
    given that step's gradient."""
    from torchft.optim import OptimizerWrapper

    from sharded_shampoo import ShardedShampoo

    class Manager:  # torchft.Manager's part that OptimizerWrapper uses
        def __init__(self, refuse):
            self.refuse, self.step = refuse, 0

        def start_quorum(self):
            self.step += 1

        def should_commit(self):
            return self.step != self.refuse

    def run(batches, refuse=None):
        model = torchft_job.make_net()
        opt = ShardedShampoo(model.parameters(), **torchft_job.OPTIONS)
        wrapper = OptimizerWrapper(Manager(refuse), opt)
        states = []
        for b in batches:
            wrapper.zero_grad()
            x, y = torchft_job.batch(b, 0, 0)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            wrapper.step()
            states.append(
                [
                    v.clone()
                    for p in opt.state
                    for v in opt.state[p].values()
                    if isinstance(v, torch.Tensor)
                ]  # fmt: skip
            )
        return list(model.parameters()), opt, states

    params, opt, states = run(range(1, 11), refuse=5)
    assert all(torch.equal(a, b) for a, b in zip(states[3], states[4], strict=True))
    assert opt.param_groups[0]["step"] == 9
    never, _, _ = run([1, 2, 3, 4, 6, 7, 8, 9, 10])
    assert all(torch.equal(a, b) for a, b in zip(params, never, strict=True))
