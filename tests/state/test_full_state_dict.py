"""Consolidated state dicts through torch's own API: ``get_optimizer_state_dict``
with ``full_state_dict=True`` (with and without ``cpu_offload``) holds every block, keyed and
valued as one process's; full and plain single-process state dicts load into other world sizes
and modes, also with ``broadcast_from_rank0``, and training continues as if uninterrupted."""

from __future__ import annotations

import full_cases
import pytest
import scenarios
from harness import run_cases
from scenarios import DDP_TOLERANCE

SAVES = {4: ["ddp", "fsdp", "hsdp"], 2: ["ddp", "fsdp"]}
# (mode, source, broadcast_from_rank0): full state dicts into another world size and mode.
LOADS = {
    4: [("fsdp", "single1", True), ("hsdp", "single1", False)],
    2: [("ddp", "hsdp4", True), ("fsdp", "ddp4", False)],
}
PLAIN_LOADS = {4: ["hsdp"], 2: ["fsdp", "ddp"]}
REQUESTS = ["ddp", "fsdp"]  # at 2 ranks; and one process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("full"))
    reference, uninterrupted = full_cases.save_single(root)
    out = {"reference": reference, "uninterrupted": uninterrupted}
    for world in (4, 2):  # 2 loads what 4 saved
        cases = [
            (full_cases.save_full, {"mode": m, "root": root, "cpu_offload": offload})
            for m in SAVES[world]
            for offload in (False, True)
        ]
        cases += [
            (full_cases.load_full, {"mode": m, "root": root, "source": s, "broadcast": b})
            for m, s, b in LOADS[world]
        ]
        cases += [(full_cases.load_plain, {"mode": m, "root": root}) for m in PLAIN_LOADS[world]]
        if world == 2:
            cases += [(full_cases.requests, {"mode": m, "root": root}) for m in REQUESTS]
        results = iter(run_cases(world, cases))
        for m in SAVES[world]:
            for offload in (False, True):
                out[("save", m, world, offload)] = next(results)
        for m, s, _ in LOADS[world]:
            out[("load", m, world, s)] = next(results)
        for m in PLAIN_LOADS[world]:
            out[("plain", m, world)] = next(results)
        if world == 2:
            for m in REQUESTS:
                out[("requests", m)] = next(results)
    out[("requests", "single")] = full_cases.requests(0, 1, "single", root)
    return out


def assert_same_state_dict(got, want, where):
    assert got["param_groups"] == want["param_groups"], where
    assert set(got["state"]) == set(want["state"]), where
    for fqn, entries in want["state"].items():
        assert set(got["state"][fqn]) == set(entries), (where, fqn)
        for key, w in entries.items():
            g = got["state"][fqn][key]
            assert g.dtype == w.dtype and g.shape == w.shape, (where, fqn, key)
            if key.endswith(".checksum"):  # of tensors equal to 1e-12, not bitwise
                continue
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


@pytest.mark.parametrize("world, mode, source", [(w, m, s) for w in LOADS for m, s, _ in LOADS[w]])
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


@pytest.mark.parametrize("mode", [*REQUESTS, "single"])
def test_full_state_is_asked_for_explicitly_or_found_or_refused(runs, mode):
    """Explicit requests (``full_state``, ``checkpoint.full_optimizer_state_dict``) and torch's
    API behind six wrapper frames give every block; ``sharded_state`` gives this rank's; a
    plain ``state_dict()`` and torch's state-dict code whose options cannot be read raise on
    every rank of a sharded optimizer instead of passing one rank's blocks off as all (one
    process: its blocks are all of them, no error)."""
    values = runs[("requests", mode)] if mode == "single" else runs[("requests", mode)].ok()
    values = [values] if mode == "single" else values
    reference = runs["reference"]
    total = sum(1 for s in reference["state"].values() for k in s if k.startswith("blocks."))
    for rank, got in enumerate(values):
        where = (mode, rank)
        assert_same_state_dict(got["helper"], reference, where)
        assert_same_state_dict(got["wrapped"], reference, where)
        if rank == 0:
            assert_same_state_dict(got["helper_offload"], reference, where)
        else:
            assert got["helper_offload"] == {}, where
        assert got["context_blocks"] == total, where
        if mode == "single":
            assert got["sharded_blocks"] == total, where
            assert got["plain"] == got["unreadable"] == "no error", where
        else:
            assert got["sharded_blocks"] < total, where
            assert "a plain state_dict() would hold this rank's blocks only" in got["plain"]
            assert "without options this version can read" in got["unreadable"], where
    if mode != "single":
        assert sum(v["sharded_blocks"] for v in values) == total
