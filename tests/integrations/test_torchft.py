"""torchft 0.2: ShardedShampoo in replica groups that die and rejoin (``torchft_job``).

Two replica groups of two FSDP2 ranks each (and two groups of one rank), on gloo CPUs, with
torchft's lighthouse started by the test, a ``Manager`` per rank and its
``OptimizerWrapper``; the optimizer refreshes in the background and staggers its blocks. One
group is killed (between two steps; inside the optimizer's step; in the backward pass, before
the average over the groups, so that the other group's step is not committed) and started
again, three times in one job: the job goes on, the restarted group recovers live from the
other each time, and at the end both groups' parameters and optimizer state are bitwise
identical. The same job without a kill is the control.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchft", reason="the torchft extra is absent")

import torch  # noqa: E402
import torchft_job  # noqa: E402

# name: (ranks per group, the last group's deaths: (steps after its start, where)). The group
# killed three times is killed between two steps, inside the optimizer's step, then in the
# backward (before the average over the groups, so that the other group's step fails and is
# not committed), each time a few steps after it recovered.
JOBS = {
    "control": (2, ()),
    "killed_three_times": (2, ((4, "between"), (3, "mid-step"), (3, "backward"))),
    "single_rank_groups": (1, ((4, "between"),)),
}
WHERE = {
    "between": "between two steps",
    "mid-step": "inside the optimizer step",
    "backward": "in the backward",
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
    size, kills = JOBS[request.param]
    out = str(tmp_path_factory.mktemp(request.param))
    exits = torchft_job.run_job(out, groups=2, size=size, kills=kills)
    ranks = [
        [torch.load(f"{out}/group{g}_rank{r}.pt", weights_only=False) for r in range(size)]
        for g in range(2)
    ]
    return request.param, kills, exits, ranks


@pytest.mark.fault
def test_groups_end_bitwise_identical_after_a_group_died_and_recovered(job, fault_row):
    name, kills, exits, ranks = job
    size = len(ranks[0])
    killed = ", then ".join(WHERE[where] for _, where in kills)
    what = f"group 1 killed {killed}" if kills else "none killed (control)"
    row = fault_row(
        f"torchft: 2 groups of {size} rank(s); {what}",
        "the job goes on; the restarted group recovers; then both groups bitwise identical",
    )
    # The healthy group and the last incarnation finished; every earlier one was killed.
    assert exits["group0"] == [0] * size, exits
    last = "group1" + (f" restart {len(kills)}" if kills else "")
    assert exits[last] == [0] * size, exits
    dead = [k for k in exits if k.startswith("group1") and k != last]
    assert len(dead) == len(kills) and all(any(exits[k]) for k in dead), exits
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
        # The restarted group caught up with the job, which went on meanwhile.
        assert (other["recovered_at"] is None) == (not kills), other["recovered_at"]
        # The healthy group's step whose average failed (the death in the backward) was not
        # committed, nor taken; no other.
        assert len(healthy["skipped"]) == sum(w == "backward" for _, w in kills), healthy
    first, second = ranks[0][0], ranks[1][0]
    row["happened"] = (
        f"{len(dict(_flat(first['state'])))} entries per rank bitwise equal at step "
        f"{first['step']}"
        + (f"; last recovery at step {second['recovered_at']}" if kills else "")
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
