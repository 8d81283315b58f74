"""The scripts a newcomer runs keep working (tiny sizes; their figures are not checked here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from paths import SCRIPTS


def run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=SCRIPTS, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_demo_runs_both_optimizers(tmp_path):
    out = run(
        *(
            "train.py --steps 4 --width 32 --layers 1 --context 16 --batch 4"
            " --precondition-frequency 2 --parallelism none --threads 1 --data-bytes 300000"
            " --eval-every 2 --out-dir"
        ).split(),
        str(tmp_path),
        "--checkpoint-every",
        "0",
    )
    lines = [line.split() for line in out.splitlines() if line.startswith(("shampoo ", "adamw "))]
    assert [row[0] for row in lines] == ["shampoo", "adamw"]
    for row in lines:
        steps, train_loss, val_loss = int(row[1]), float(row[2]), float(row[3])
        assert steps == 4
        assert 0 < train_loss < 6 and 0 < val_loss < 6  # byte-level: ln(256) = 5.5 at the start
    assert (tmp_path / "loss.png").exists()


def test_bench_step_reports_its_figures(tmp_path):
    path = tmp_path / "bench.json"
    run(
        *(
            "bench_step.py --steps 2 --warmup 1 --width 32 --layers 1 --context 16 --batch 2"
            " --world-sizes 1,2 --json"
        ).split(),
        str(path),
        "--no-others",
    )
    one, two = json.loads(path.read_text())
    for r in (one, two):
        for key in ("adamw_opt_ms", "shampoo_opt_ms", "shampoo_floor_ms", "whole_step_ratio"):
            assert r[key] > 0, key
    assert (one["world"], two["world"]) == (1, 2)
    assert one["blocks_owned"] == one["blocks_total"] == two["blocks_total"] > two["blocks_owned"]
    # What the AllGather moves, measured on loopback, is at least its theoretical minimum.
    assert two["measured_bytes_sent"] >= two["allgather_minimum_bytes"]


def test_muon_takes_the_hidden_layers_and_conv_filters_as_matrices():
    """train.py's Muon baseline: the hidden layers' weights go to Muon, conv filters as
    (out, rest) matrices sharing the filter's storage and given its gradient after backward;
    the output layer and the biases go to AdamW."""
    import torch
    import train

    torch.manual_seed(0)
    model = train.DigitsNet()
    matrices, rest = train.muon_params(model)
    convs = (model.conv1.weight, model.conv2.weight)
    assert [m.shape for m in matrices] == [(16, 9), (32, 144)]
    assert [m.data_ptr() for m in matrices] == [c.data_ptr() for c in convs]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - {id(c) for c in convs}
    x = torch.rand(4, 1, 8, 8)
    model(x, torch.tensor([0, 1, 2, 3])).backward()
    for m, c in zip(matrices, convs, strict=True):
        assert torch.equal(m.grad, c.grad.reshape(m.shape))
    before = [c.detach().clone() for c in convs]
    torch.optim.Muon(matrices, lr=0.1, adjust_lr_fn="match_rms_adamw").step()
    for b, c in zip(before, convs, strict=True):
        assert not torch.equal(b, c)
    auto = train.Autoencoder()
    matrices, rest = train.muon_params(auto)
    assert [m.shape for m in matrices] == [layer.weight.shape for layer in auto.layers[:-1]]


def test_train_runs_muon_on_the_autoencoder_and_refuses_its_checkpoints(tmp_path):
    common = "train.py --workload autoencoder --optimizer muon --steps 4 --parallelism none"
    out = run(*common.split(), "--checkpoint-every", "0", "--out-dir", str(tmp_path))
    row = next(line.split() for line in out.splitlines() if line.startswith("muon "))
    assert int(row[1]) == 4 and 0 < float(row[3]) < 1  # binary cross-entropy of pixels
    refused = subprocess.run(
        [sys.executable, *common.split(), "--out-dir", str(tmp_path / "ckpt")],
        cwd=SCRIPTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--checkpoint-every 0" in refused.stderr


def simulated(mode: str, world: int) -> dict:
    """Rank 0 of a job of ``world`` ranks on torch's fake process group (a process of its
    own), a Llama-shaped model with small dims and many layers."""
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bench_scale.py"),
            "--one",
            f"llama-mini,{mode},{world}",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["fsdp2", "hsdp", "ddp"])
def simulated_jobs(request):
    return {world: simulated(request.param, world) for world in (64, 512, 4096)}


def test_simulated_512_ranks(simulated_jobs):
    """At 512 ranks rank 0 builds and steps, sends exactly the rows that must move
    (FSDP2/HSDP) or the AllGather of its sharding group, and the plan keeps memory even."""
    r = simulated_jobs[512]
    assert r["bytes_minimum"] > 0
    assert r["bytes_sent"] <= 1.1 * r["bytes_minimum"], r
    if r["blocks_min"] >= 8:
        assert r["state_max_bytes"] <= 1.1 * r["state_mean_bytes"], r


def test_calls_per_step_do_not_grow_with_the_world(simulated_jobs):
    """What Python does per step, counted: the calls that copy data (batched over pieces) are
    as many at 64, 512 and 4,096 ranks, and all torch calls (views of the pieces a rank holds,
    fewer as the world grows) no more at 4,096 than at 512. (From 64 to 512 under HSDP the
    count rises once: with fewer blocks than ranks every block lands in the first replica
    group, whose holders then send all their gradient rows, where at 64 they sent half.)"""
    copies = {w: r["copy_calls"] for w, r in simulated_jobs.items()}
    assert len(set(copies.values())) == 1, copies
    assert simulated_jobs[4096]["torch_calls"] <= simulated_jobs[512]["torch_calls"]


def test_bench_step_reports_spikes(tmp_path):
    path = tmp_path / "spikes.json"
    out = run(
        *(
            "bench_step.py --spikes --spike-frequencies 4 --width 32 --layers 1 --context 16"
            " --batch 2 --world-sizes 1 --json"
        ).split(),
        str(path),
    )
    (r,) = json.loads(path.read_text())
    names = ["all_at_once", "staggered", "background_d1", "background_all_at_once_d1"]
    for name in [*names, "no_refresh"]:
        s = r["spikes"][f"f4_{name}"]
        assert s["steps"] == 8 and s["first_refresh_ms"] > 0, s
        for part in ("whole", "optimizer"):
            t = s[part]
            assert 0 < t["median_ms"] <= t["p95_ms"] <= t["max_ms"], (name, part, t)
        assert s["optimizer"]["median_ms"] < s["whole"]["median_ms"]
    for name in names:
        assert f"f4_{name}: mean whole step" in out


def test_bench_step_spikes_compare_the_step_with_its_math_and_collectives():
    out = run(
        *(
            "bench_step.py --spikes --spike-frequencies 4 --width 32 --layers 1 --context 16"
            " --batch 2 --world-sizes 2 --parallelism ddp"
        ).split()
    )
    for name in ("no_refresh", "no_refresh_one_bucket"):
        assert f"f4_{name}: step" in out and "x the larger" in out, out


def test_bench_converge_compares_staggered_roots(tmp_path):
    out = run(
        *(
            "bench_converge.py --stagger-seeds 1 --steps 6 --eval-every 3 --threads 1 --out-dir"
        ).split(),
        str(tmp_path),
        *(
            "-- --precondition-frequency 2 --width 32 --layers 1 --context 16 --batch 4"
            " --data-bytes 300000"
        ).split(),
    )
    assert re.search(r"staggered +[\d.]+; mean [\d.]+, (within|below|ABOVE) that spread", out)
    finals = json.loads((tmp_path / "stagger.json").read_text())
    assert set(finals) == {"all at once", "staggered"} and all(len(v) == 1 for v in finals.values())


def test_bench_memory_reports_bytes_per_parameter(tmp_path):
    """The benchmark GPT in one process: AdamW's 8 bytes per parameter, and the defaults' and
    the packing-off figures from memory_report, whose state the block shapes decide."""
    path = tmp_path / "memory.json"
    out = run(
        "bench_memory.py", "--models", "gpt", "--settings", "defaults,symmetric_packing=False",
        "--json", str(path),
    )  # fmt: skip
    rows = {r["setting"]: r for r in json.loads(path.read_text())}
    assert rows["AdamW"]["total"] == 8 * rows["AdamW"]["params"]
    packed, full = rows["defaults"], rows["symmetric_packing=False"]
    assert packed["params"] == full["params"] == rows["AdamW"]["params"]
    # Factors and roots: m (m + 1) / 2 entries per dim instead of m^2, for blocks of up to 1024.
    ratio = packed["by_kind"]["factors"] / full["by_kind"]["factors"]
    assert 0.5 < ratio < 0.51, ratio
    assert packed["by_kind"]["grafting"] == full["by_kind"]["grafting"] == 4 * packed["params"]
    assert "B/param" in out


def test_bench_step_compares_preconditioners(tmp_path):
    path = tmp_path / "prec.json"
    out = run(
        *(
            "bench_step.py --preconditioners --steps 2 --width 32 --layers 1 --context 16 --json"
        ).split(),
        str(path),
    )
    (r,) = json.loads(path.read_text())
    assert set(r["preconditioners"]) == {
        "root_inverse",
        "eigenvalue_corrected_eigh",
        "eigenvalue_corrected_qr",
    }
    assert all(x["step_ms"] > 0 and x["refresh_ms"] > 0 for x in r["preconditioners"].values())
    assert "the refresh's extra time: QR" in out


def test_gpu_check_passes_on_the_cpu():
    """The GPU check's steps, on the CPU with a tiny speed model: every check passes (the
    synchronizations are CUDA's to count: on the CPU the check says so)."""
    out = run("gpu_check.py", "--device", "cpu", "--small")
    checks = [line.split(None, 1) for line in out.splitlines() if line.startswith(("ok ", "FAIL"))]
    names = [rest.split("  ")[0].strip() for _, rest in checks]
    assert all(status == "ok" for status, _ in checks), out
    for name in (
        "exact shampoo",
        "exact eigenvalue_corr",
        "exact background",
        "fsdp2 shampoo",
        "dcp",
        "full_state_dict",
        "syncs single",
        "syncs fsdp2",
        "speed",
    ):
        assert any(n.startswith(name) for n in names), (name, out)
    assert out.count("not counted on the CPU") == 2, out
    assert "shampoo background optimizer step" in out, out
    assert out.rstrip().splitlines()[-1].startswith("0 failed")


@pytest.mark.skipif(
    not os.environ.get("SHAMPOO_REFERENCE"),
    reason="needs a checkout of facebookresearch/optimizers in $SHAMPOO_REFERENCE",
)
def test_eigenvalue_corrected_matches_the_reference_implementation():
    """Every option set of compare_reference.py within 1e-9 of the reference implementation
    (float64, 20 steps with refreshes, eigh and QR)."""
    out = run("compare_reference.py", "--reference", os.environ["SHAMPOO_REFERENCE"])
    assert out.rstrip().splitlines()[-1].startswith("worst"), out


def test_bench_refresh_reports_every_method_per_size_and_step():
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bench_refresh.py"),
            "--sizes",
            "16,32",
            "--repeats",
            "1",
            "--workloads",
            "autoencoder",
            "--step-count",
            "12",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["16"], ["32"])
    ]
    assert [(r[0], r[1]) for r in rows] == [
        ("16", "full"),
        ("16", "low-rank"),
        ("32", "full"),
        ("32", "low-rank"),
    ]
    for r in rows:  # eigh's own ratio is 1, every method's is a positive figure
        assert r[4] == "(1.00x)" and all(float(r[i]) > 0 for i in (3, 5, 7, 9)), r
    # The step table: every optimizer, its times positive, Muon's own ratio 1.
    steps = {
        " ".join(line.split()[:-4]): line.split()[-4:]
        for line in out.stdout.split("refreshed every step")[1].splitlines()[2:]
    }
    assert set(steps) == {"adamw", "muon", "shampoo eigh", "shampoo qr", "shampoo newton30",
                          "EC eigh", "EC qr (soap)"}, steps  # fmt: skip
    assert steps["muon"][3] == "1.00x", steps
    assert all(float(v) > 0 for row in steps.values() for v in row[:3]), steps
