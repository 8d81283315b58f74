"""torchtitan 0.3: ShardedShampoo inside torchtitan's own trainer, on the meshes it builds.

- Its ``Trainer`` (what ``torchtitan.train`` builds; ``titan_job``'s config, CPU shims in
  ``titan_train``) with FSDP2, HSDP, TP, FSDP2 x TP and HSDP x TP, on both DTensor backends
  where they differ: 6 steps of its Llama 3 debug model (two of its layers), checkpointed by
  its checkpointer (sync and async) at step 3; a second job resumed from step 3 continues
  bitwise (losses, parameters, every rank's optimizer state).
- Context parallelism (FSDP over dp_shard x cp, a flattened dim under the full-DTensor
  backend): torchtitan's CP attention has no CPU kernels, so the trainer is built, not trained.
- tp_cases' float64 Llama on ``ParallelDims(...).build_mesh()``'s meshes, every layout above
  and CP's FSDP dim, against one process (``DDP_TOLERANCE``).
- torchtitan's command-line entry point under torchrun: ``test_titan_entry_point.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchtitan.components.optimizer", reason="the torchtitan extra is absent")
pytest.importorskip("torchdata", reason="torchtitan's trainer needs torchdata")

import titan_cases  # noqa: E402
import tp_cases  # noqa: E402
from harness import run_cases  # noqa: E402

FSDP = {"data_parallel_shard": 2}
TP = {"tensor_parallel": 2}
HSDP = {"data_parallel_replicate": 2, "data_parallel_shard": 2}
HSDP_TP = {"data_parallel_replicate": 2, "data_parallel_shard": 1, **TP}
# name: (world, degrees, backend, options)
TRAINER = {
    "fsdp-async": (2, FSDP, "partial_dtensor", {"async_mode": "async"}),
    "fsdp-full-dtensor": (2, FSDP, "full_dtensor", {}),
    "tp-async": (2, TP, "partial_dtensor", {"async_mode": "async"}),
    "hsdp": (4, HSDP, "partial_dtensor", {}),
    "fsdp_tp": (4, {**FSDP, **TP}, "partial_dtensor", {}),
    "hsdp_tp": (4, HSDP_TP, "partial_dtensor", {"async_mode": "async"}),
}
CP = {"data_parallel_shard": 2, "context_parallel": 2}
BUILT = {  # name: (degrees, options)
    "cp": (CP, {"backend": "partial_dtensor"}),
    "cp-full-dtensor": (CP, {"backend": "full_dtensor", "flex": True}),
}
# name: (world, ParallelDims degrees)
DIMS = {
    "tp": (2, dict(tp=2)),
    "fsdp": (4, dict(dp_shard=4)),
    "hsdp": (4, dict(dp_replicate=2, dp_shard=2)),
    "fsdp_tp": (4, dict(dp_shard=2, tp=2)),
    "hsdp_tp": (4, dict(dp_replicate=2, tp=2)),
    "fsdp_over_cp": (4, dict(dp_shard=2, cp=2)),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("titan"))


def run_group(world: int, root: str) -> dict:
    """The uninterrupted jobs, the built trainers and the mesh cases in one group of processes;
    then the resumed jobs in another, as a new job starts."""
    jobs = {n: (d, dict(backend=b, **o)) for n, (w, d, b, o) in TRAINER.items() if w == world}
    named = [
        (name, (titan_cases.trainer, dict(root=root, name=name, degrees=d, **o)))
        for name, (d, o) in jobs.items()
    ]
    if world == 4:
        named += [
            (name, (titan_cases.built, dict(root=root, name=name, degrees=d, **o)))
            for name, (d, o) in BUILT.items()
        ]
    named += [(f"dims-{n}", (titan_cases.dims, d)) for n, (w, d) in DIMS.items() if w == world]
    named += [
        (
            f"resumed-{name}",
            (titan_cases.trainer, dict(root=root, name=name, degrees=d, resume=True, **o)),
        )
        for name, (d, o) in jobs.items()
    ]
    first = [c for n, c in named if not n.startswith("resumed-")]
    second = [c for n, c in named if n.startswith("resumed-")]
    results = run_cases(world, first, deadline_s=200) + run_cases(world, second, deadline_s=80)
    return dict(zip([n for n, _ in named], results, strict=True))


@pytest.fixture(scope="module")
def two(root):
    return run_group(2, root)


@pytest.fixture(scope="module")
def four(root):
    return run_group(4, root)


@pytest.fixture
def groups(request):
    """The results of the group a test's case ran in (one group per world size, each its own
    fixture so that each fits a test's timeout)."""
    name = request.node.callspec.params["name"]
    world = TRAINER[name][0] if name in TRAINER else 4
    return request.getfixturevalue({2: "two", 4: "four"}[world])


@pytest.mark.parametrize("name", list(TRAINER))
def test_trainer_trains_and_resumes_bitwise(groups, name):
    whole, resumed = groups[name].ok(), groups[f"resumed-{name}"].ok()
    first = titan_cases.FIRST
    for w, r in zip(whole, resumed, strict=True):
        assert {f"step-{first}", f"step-{2 * first}"} <= set(w["saved"]), w["saved"]
        assert len(w["losses"]) == titan_cases.STEPS
        assert r["losses"] == w["losses"][first:]  # bitwise
        assert all(r["params"][n].equal(p) for n, p in w["params"].items())
        assert w["state"].keys() == r["state"].keys() and w["state"]
        assert all(r["state"][k].equal(t) for k, t in w["state"].items())
    losses = whole[0]["losses"]
    assert losses[-1] < losses[0] - 1.5, losses  # it trained (from about 8.3)
    for w in whole[1:]:  # every rank holds the same full parameters
        assert all(w["params"][n].equal(p) for n, p in whole[0]["params"].items())


@pytest.mark.parametrize("name", list(BUILT))
def test_context_parallel_trainer_builds_on_its_fsdp_dim(groups, name):
    values = groups[name].ok()
    mesh = {"cp": "fsdp=4", "cp-full-dtensor": "dp_shard_cp=4"}[name]
    for v in values:
        assert all(mesh in m for m in v["meshes"]), v["meshes"]
        assert v["world"] == (4,)  # one dim of 4 ranks, however the mesh was made
        assert v["blocks"] > 0  # every rank owns blocks


@pytest.fixture(scope="module")
def reference():
    return tp_cases.run(0, 1, "single")


@pytest.mark.parametrize("name", list(DIMS))
def test_torchtitan_meshes_match_single_process(request, reference, name):
    group = request.getfixturevalue({2: "two", 4: "four"}[DIMS[name][0]])
    tp_cases.check(group[f"dims-{name}"].ok(), reference)
