"""Consolidated state dicts through torch's own API (issue 11): ``get_optimizer_state_dict``
with ``full_state_dict=True`` (with and without ``cpu_offload``) holds every block, keyed and
valued as one process's; full and plain single-process state dicts load into other world sizes
and modes, also with ``broadcast_from_rank0``, and training continues as if uninterrupted."""

from __future__ import annotations

import pytest

import full_cases
import scenarios
from harness import run_cases
from test_data_parallel import DDP_TOLERANCE

SAVES = {4: ["ddp", "fsdp", "hsdp"], 2: ["ddp", "fsdp"]}
# (mode, source, broadcast_from_rank0): full state dicts into another world size and mode.
LOADS = {
    4: [("fsdp", "single1", True), ("hsdp", "single1", False)],
    2: [("ddp", "hsdp4", True), ("fsdp", "ddp4", False)],
}
PLAIN_LOADS = {4: ["hsdp"], 2: ["fsdp", "ddp"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("full"))
    reference, uninterrupted = full_cases.save_single(root)
    out = {"reference": reference, "uninterrupted": uninterrupted}
    for world in (4, 2):  # 2 loads what 4 saved
        cases = [
            (full_cases.save_full, {"mode": m, "root": root, "cpu_offload": offload})
            for m in SAVES[world] for offload in (False, True)
        ]
        cases += [
            (full_cases.load_full, {"mode": m, "root": root, "source": s, "broadcast": b})
            for m, s, b in LOADS[world]
        ]
        cases += [(full_cases.load_plain, {"mode": m, "root": root}) for m in PLAIN_LOADS[world]]
        results = iter(run_cases(world, cases))
        for m in SAVES[world]:
            for offload in (False, True):
                out[("save", m, world, offload)] = next(results)
        for m, s, _ in LOADS[world]:
            out[("load", m, world, s)] = next(results)
        for m in PLAIN_LOADS[world]:
            out[("plain", m, world)] = next(results)
    return out


def assert_same_state_dict(got, want, where):
    assert got["param_groups"] == want["param_groups"], where
    assert set(got["state"]) == set(want["state"]), where
    for fqn, entries in want["state"].items():
        assert set(got["state"][fqn]) == set(entries), (where, fqn)
        for key, w in entries.items():
            g = got["state"][fqn][key]
            assert g.dtype == w.dtype and g.shape == w.shape, (where, fqn, key)
            scale = max(float(w.abs().max()) if w.numel() else 0.0, 1e-30)
            err = float((g.double() - w.double()).abs().max()) / scale if w.numel() else 0.0
            assert err <= 1e-12, (where, fqn, key, err)


@pytest.mark.parametrize("world, mode", [(w, m) for w in SAVES for m in SAVES[w]])
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_full_state_dict_has_every_block(runs, world, mode, cpu_offload):
    values = runs[("save", mode, world, cpu_offload)].ok()
    reference = runs["reference"]
    blocks = sum(len(s) for s in reference["state"].values())
    assert blocks > 60  # many blocks, spread over every rank
    # torch's semantics: every rank gets it, or rank 0 only with cpu_offload.
    for rank, got in enumerate(values):
        if cpu_offload and rank > 0:
            assert got == {}, rank
        else:
            assert_same_state_dict(got, reference, (mode, world, rank))


@pytest.mark.parametrize(
    "world, mode, source", [(w, m, s) for w in LOADS for m, s, _ in LOADS[w]]
)
def test_full_state_dict_loads_at_another_world_size_and_mode(runs, world, mode, source):
    values = runs[("load", mode, world, source)].ok()
    for params in values:
        err = scenarios.max_rel_err([params], [runs["uninterrupted"]])
        assert err <= DDP_TOLERANCE, (mode, world, source, err)


@pytest.mark.parametrize("world, mode", [(w, m) for w in PLAIN_LOADS for m in PLAIN_LOADS[w]])
def test_one_process_state_dict_loads_into_every_rank(runs, world, mode):
    values = runs[("plain", mode, world)].ok()
    for params in values:
        err = scenarios.max_rel_err([params], [runs["uninterrupted"]])
        assert err <= DDP_TOLERANCE, (mode, world, err)
