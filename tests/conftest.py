"""``pytest --device cuda`` runs the distributed tests on CUDA with NCCL, one GPU per rank (see
``tests/distributed/harness.py``); the default is the CPU with gloo."""

from __future__ import annotations

import os


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
