"""The convergence study: its statistics against plain loops, its grid search, and a tiny study
end to end (every figure read back from the runs' own logs; a second call runs nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import bench_converge as bc
import numpy as np
import pytest
from paths import SCRIPTS


def test_t_interval_is_the_student_interval():
    values = [2.20, 2.14, 2.18, 2.29, 2.23]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t975_4 = 2.7764451051977987  # Student t, 4 degrees of freedom, 97.5th percentile
    got = bc.t_interval(values)
    assert got == pytest.approx((mean, mean - t975_4 * sd / n**0.5, mean + t975_4 * sd / n**0.5))


def mean_curve_steps(x, val, target):
    """Plain loop: the first evaluation where the mean over seeds is at or below target."""
    for k in range(len(val[0])):
        if sum(v[k] for v in val) / len(val) <= target:
            return sum(row[k] for row in x) / len(x)
    return math.inf


def test_to_target_is_the_first_crossing_of_the_mean_curves():
    steps = np.array([[10, 20, 30, 40]] * 3, dtype=float)
    adamw = np.array([[3.0, 2.5, 2.2, 2.0], [3.1, 2.6, 2.3, 2.2], [2.9, 2.4, 2.2, 2.1]])
    fast = np.array([[2.5, 2.0, 1.9, 1.8], [2.6, 2.2, 2.0, 1.9], [2.4, 2.1, 2.0, 1.9]])
    slow = adamw + 0.5
    target = adamw[:, -1].mean()
    assert target == pytest.approx(2.1)
    for val, expected in ((fast, 20 / 40), (adamw, 1.0), (slow, math.inf)):
        want = mean_curve_steps(steps, val, target) / mean_curve_steps(steps, adamw, target)
        assert want == expected
        assert bc.to_target(steps, val, steps, adamw) == expected


def test_ratio_interval_brackets_its_point_and_counts_not_reached():
    steps = np.array([[10, 20, 30, 40]] * 5, dtype=float)
    rng = np.random.default_rng(1)
    adamw = np.linspace(3, 2, 4) + rng.normal(0, 0.05, (5, 4))
    same = np.tile(adamw[:1], (5, 1))  # identical seeds: every resample gives the point
    point, lo, hi = bc.ratio_interval(steps, adamw - 0.5, steps, same, resamples=200)
    assert point == lo == hi == 30 / 40  # the mean curve (2.5, 2.17, 1.83, 1.5) vs about 2.0
    point, lo, hi = bc.ratio_interval(steps, adamw + 1.0, steps, adamw, resamples=200)
    assert point == lo == hi == math.inf
    # Two seeds far better, three a little worse: the point is reached, some resamples are not.
    mixed = np.vstack([adamw[:2] - 0.4, adamw[2:] + 0.05])
    point, lo, hi = bc.ratio_interval(steps, mixed, steps, adamw, resamples=400)
    assert lo <= point < hi == math.inf


@pytest.mark.parametrize(
    "optimum, first, tried, interior",
    [
        (0.3, (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), True),
        (1e-2, (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2, 3e-2), True),
        (1e-7, (1e-4, 3e-4), (1e-5, 3e-5, 1e-4, 3e-4), False),  # the ladder ends at 1e-5
    ],
)
def test_grid_widens_until_the_best_is_interior(monkeypatch, optimum, first, tried, interior):
    ran = []

    def get(self, workload, label, lr, seed):
        ran.append((lr, seed))
        return {"final_val_loss": (math.log10(lr) - math.log10(optimum)) ** 2}

    monkeypatch.setattr(bc.Study, "get", get)
    monkeypatch.setitem(bc.WORKLOADS, "w", (10, first))
    study = bc.Study.__new__(bc.Study)
    study.args = type("A", (), {"grid": None})()
    study.plan = lambda n: None
    best, finals, inside = study.tune("w", "adamw")
    assert sorted(finals) == pytest.approx(sorted(tried))
    assert {seed for _, seed in ran} == {0} and len(ran) == len(tried)
    assert best == pytest.approx(min(tried, key=lambda lr: abs(math.log10(lr / optimum))))
    assert inside == interior


def study(out_dir):
    out = subprocess.run(
        [
            sys.executable,
            "bench_converge.py",
            *("--workloads", "digits", "--optimizers", "adamw,shampoo", "--steps", "6"),
            *("--eval-every", "3", "--seeds", "2", "--grid", "0.01,0.1,1", "--threads", "1"),
            *("--no-progress", "--out-dir", str(out_dir), "--"),
            *("--precondition-frequency", "2", "--eval-batches", "2"),
        ],
        cwd=SCRIPTS,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def logged(path):
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if "val_loss" in r]


def test_study_reports_what_the_runs_logged_and_resumes(tmp_path):
    study(tmp_path)
    runs = json.loads((tmp_path / "study.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())["digits"]
    target = None
    for label, name in (("adamw", "adamw"), ("shampoo", "shampoo")):
        s = summary["optimizers"][label]
        tuning = {lr: runs[f"digits/{label}/lr{lr}/seed0"]["final_val_loss"] for lr in s["grid"]}
        assert tuning == s["grid"] and min(tuning, key=tuning.get) == f"{s['lr']:g}"
        finals = []
        for seed in (1, 2):
            log = tmp_path / f"seed{seed}" / "digits" / f"{label}-lr{s['lr']:g}" / f"{name}.jsonl"
            evals = logged(log)
            assert [r["step"] for r in evals] == [3, 6]
            finals.append(evals[-1]["val_loss"])
        assert s["final_val_loss_per_seed"] == finals
        assert s["final_val_loss"][0] == pytest.approx(sum(finals) / 2)
        if label == "adamw":
            target = sum(finals) / 2
            assert s["steps_ratio"][0] == 1.0
    assert summary["target_val_loss"] == pytest.approx(target)
    assert (tmp_path / "converge.png").stat().st_size > 10_000

    logs = sorted(tmp_path.rglob("*.jsonl"))
    stamps = [os.stat(p).st_mtime_ns for p in logs]
    again = study(tmp_path)
    assert [os.stat(p).st_mtime_ns for p in logs] == stamps  # nothing ran again
    assert json.loads((tmp_path / "summary.json").read_text())["digits"] == summary
    assert "digits: target" in again
