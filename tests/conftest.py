"""``pytest --device cuda`` runs the distributed tests on CUDA with NCCL, one GPU per rank (see
``tests/distributed/harness.py``); the default is the CPU with gloo."""

from __future__ import annotations

import os

import pytest
from fault_report import FAULT_ROWS


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device of the distributed tests (default: $SHARDED_SHAMPOO_TEST_DEVICE or cpu)",
    )


def pytest_configure(config):
    # Before any test module imports the harness (which reads it), and inherited by the ranks.
    chosen = config.getoption("--device")
    if chosen is not None:
        os.environ["SHARDED_SHAMPOO_TEST_DEVICE"] = chosen
    if os.environ.get("SHARDED_SHAMPOO_TEST_DEVICE") == "cuda":
        import torch

        # Float64 references in this process too: no TF32 in matrix products.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def fault_row(request):
    """A row of the fault table (``scripts/run_faults.sh``): ``fault_row(scenario, expected)``
    returns a dict whose ``"happened"`` the test fills in once its assertions passed; the
    table shows each row with its test's outcome."""
    rows = request.config.stash.setdefault(FAULT_ROWS, [])

    def add(scenario: str, expected: str) -> dict:
        row = {"scenario": scenario, "expected": expected, "happened": None}
        row["test"] = request.node.nodeid
        rows.append(row)
        return row

    return add
