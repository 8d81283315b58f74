"""ShardedShampoo under tensor parallelism, FSDP2 x TP and HSDP x TP against one process.

A small Llama (attention q/k/v/o, SwiGLU, RMSNorm, untied embedding) is parallelized with
torchtitan's plan (``workloads.llama_tp_plan``): its parameters are DTensors placed
``Shard(0)``, ``Shard(1)`` and ``Replicate()`` on the tensor-parallel dim, and under FSDP2
``(_StridedShard(0), Shard(0))``, ``(Shard(0), Shard(1))`` and ``(Shard(0), Replicate())``
on a 2-D mesh (3-D with HSDP). Blocks come from the full shapes, so every mode must give the
one-process result (float64, ``DDP_TOLERANCE``) over 16 steps with four root refreshes, and
checkpoints must cross modes and world sizes.
"""

from __future__ import annotations

import pytest
import scenarios
import tp_cases
from harness import run_cases
from scenarios import DDP_TOLERANCE

NAN = dict(nan_at=3, momentum=0.0)  # holders apply decay with the direction: must skip too
VARIANTS = {  # name: options, each against one process with the same options
    "base": {},  # momentum with decoupled weight decay: the weights travel to the owner
    "l2": dict(decoupled_weight_decay=False),  # decay added by the sending holder
    "no_momentum": dict(momentum=0.0),  # decay applied by every holder
    "nan": NAN,
    "eigenvalue_corrected": dict(preconditioner="eigenvalue_corrected"),
    "eigenvalue_corrected_qr": dict(preconditioner="eigenvalue_corrected", eigenbasis="qr"),
    "background": dict(stagger_roots=True, refresh_delay=2),  # refreshes in the background
    "qr_roots": dict(eigenbasis="qr", precondition_frequency=1, start_preconditioning_step=1),
    # KL-Shampoo with pseudo-inverse roots of factors of the first moment (rank-deficient ones
    # included: norms' gains, unseen embedding rows), Nesterov's look-ahead, a fixed norm.
    "estimators": dict(
        scenarios.KL_PSEUDO_INVERSE, grafting="rms", inverse_exponent_override={2: 1 / 3}
    ),
    "spectral": dict(preconditioner="spectral", newton_schulz="polar_express"),
}
# (mode, world): variants run there.
RUNS = {
    ("tp", 2): ["base", "nan", "eigenvalue_corrected", "spectral"],
    # The variants the other modes run stand for themselves here too (staggered roots are in
    # "background"), but those of the weights' and weight decay's placements.
    ("fsdp_tp", 4): [
        "base",
        "l2",
        "no_momentum",
        "nan",
        "eigenvalue_corrected_qr",
        "background",
        "estimators",
    ],
    ("hsdp_tp", 4): ["base", "eigenvalue_corrected_qr", "qr_roots", "estimators"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_checkpoints"))


@pytest.fixture(scope="module")
def groups(root):
    """Three process groups: 2 ranks (TP; DDP and TP checkpoints saved), 4 ranks (FSDP2 x TP,
    HSDP x TP; loads across modes), 2 ranks again (loads of the 4-rank checkpoint)."""
    out = {}

    def run(world, named):
        for name, res in zip(
            [n for n, _ in named], run_cases(world, [c for _, c in named]), strict=True
        ):
            out[name] = res

    def runs(mode, world):
        return [
            ((mode, v), (tp_cases.run, {"mode": mode, **VARIANTS[v]})) for v in RUNS[(mode, world)]
        ]

    run(
        2,
        runs("tp", 2)
        + [
            ("save ddp", (tp_cases.save, {"mode": "ddp", "root": root})),
            ("save tp", (tp_cases.save, {"mode": "tp", "root": root})),
        ],
    )
    run(
        4,
        runs("fsdp_tp", 4)
        + runs("hsdp_tp", 4)
        + [
            ("failures", (tp_cases.failures, {})),
            ("partial", (tp_cases.partial_placement, {})),
            ("empty tp2", (tp_cases.empty_shards, {"tp": 2})),
            ("empty tp4", (tp_cases.empty_shards, {"tp": 4})),
            ("save fsdp_tp", (tp_cases.save, {"mode": "fsdp_tp", "root": root})),
            (
                "fsdp from fsdp_tp",
                (tp_cases.resume, {"mode": "fsdp", "root": root, "source": "fsdp_tp"}),
            ),
            (
                "fsdp_tp from ddp",
                (tp_cases.resume, {"mode": "fsdp_tp", "root": root, "source": "ddp"}),
            ),
            (
                "hsdp_tp from tp",
                (tp_cases.resume, {"mode": "hsdp_tp", "root": root, "source": "tp"}),
            ),
        ],
    )
    run(
        2,
        [
            (
                "ddp from fsdp_tp",
                (tp_cases.resume, {"mode": "ddp", "root": root, "source": "fsdp_tp"}),
            ),
            (
                "tp from fsdp_tp",
                (tp_cases.resume, {"mode": "tp", "root": root, "source": "fsdp_tp"}),
            ),
        ],
    )
    return out


@pytest.fixture(scope="module")
def references():
    return {v: tp_cases.run(0, 1, "single", **o) for v, o in VARIANTS.items()}


@pytest.mark.parametrize(
    "mode, world, variant", [(mode, world, v) for (mode, world), vs in RUNS.items() for v in vs]
)
def test_matches_single_process(groups, references, mode, world, variant):
    values = groups[(mode, variant)].ok()
    tp_cases.check(values, references[variant])
    if variant == "base":
        expected = {
            "tp": {"(Shard(dim=0),)", "(Shard(dim=1),)", "(Replicate(),)"},
            "fsdp_tp": {
                "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
                "(Shard(dim=0), Shard(dim=1))",
                "(Shard(dim=0), Replicate())",
            },
            "hsdp_tp": {
                "(Replicate(), _StridedShard(dim=0, sf=2), Shard(dim=0))",
                "(Replicate(), Shard(dim=0), Shard(dim=1))",
                "(Replicate(), Shard(dim=0), Replicate())",
            },
        }[mode]
        scale = values[0]["placements"].pop("scale", None)
        placements = set(values[0]["placements"].values())
        assert placements == expected  # the layouts this test is about were exercised
        # The logit scale: plain under TP alone, on the data-parallel slice under FSDP2 x TP.
        assert (
            scale
            == {"tp": None, "fsdp_tp": "(Shard(dim=0),)", "hsdp_tp": "(Replicate(), Shard(dim=0))"}[
                mode
            ]
        ), scale


def test_nan_block_is_skipped_everywhere(groups, references):
    values = groups[("fsdp_tp", "nan")].ok()
    assert not all(
        values[0]["params"][n].equal(references["base"]["params"][n])
        for n in references["base"]["params"]
    )  # the skip changed the result: the case is not vacuous
    tp_cases.check(values, references["nan"])


def test_root_failures_raise_on_every_rank_together(groups):
    values = groups["failures"].ok()
    steps = set()
    for r, (outcome, finite) in enumerate(values):
        assert finite and "unchanged=True" in outcome, (r, outcome)
        steps.add(outcome.split(":")[0])
    assert "failed 2 times in a row" in values[0][0], values[0][0]
    assert len(steps) == 1, steps


def test_partial_placement_is_refused_by_name(groups):
    for message in groups["partial"].ok():
        assert "encoder.weight" in message and "Partial" in message, message


@pytest.mark.parametrize(
    "name",
    [
        "fsdp from fsdp_tp",
        "fsdp_tp from ddp",
        "hsdp_tp from tp",
        "ddp from fsdp_tp",
        "tp from fsdp_tp",
    ],
)
def test_checkpoints_cross_modes_and_world_sizes(groups, references, name):
    """Saved after FIRST steps, loaded in another mode (and world size), THEN more steps: the
    uninterrupted one-process run of FIRST + THEN steps."""
    assert tp_cases.FIRST + tp_cases.THEN == tp_cases.STEPS
    tp_cases.check(groups[name].ok(), references["base"])


def test_one_process_loads_a_tensor_parallel_checkpoint(groups, root, references):
    groups["save fsdp_tp"].ok()
    tp_cases.check([tp_cases.resume(0, 1, "single", root, "fsdp_tp")], references["base"])


@pytest.mark.parametrize("tp", [2, 4])
def test_empty_shards_under_fsdp2_x_tp(groups, tp):
    """A rank whose tensor-parallel shard is empty on a dim FSDP2 does not shard (DTensor and
    FSDP2's nested chunks then disagree on the empty shard's shape and offset) is accepted, and
    the result is one process's."""
    values = groups[f"empty tp{tp}"].ok()
    reference = tp_cases.empty_shards(0, 1, tp)["params"]
    # The case exists: some rank holds nothing of a weight.
    assert any(0 in shape for v in values for shape in v["local"].values()), values
    for v in values:
        err = scenarios.max_rel_err([list(v["params"].values())], [list(reference.values())])
        assert err <= DDP_TOLERANCE, f"relative error {err:.2e}"
