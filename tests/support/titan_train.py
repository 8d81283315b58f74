"""torchtitan's own training entry point (``torchtitan.train.main``) on CPU processes:

    PYTHONPATH=tests/support torchrun --nproc_per_node 2 tests/support/titan_train.py \\
        --module titan_job --config shampoo_debugmodel --dump_folder runs/titan

torchtitan 0.3.0 targets accelerators; the shims here let its trainer run on CPUs and gloo,
and change nothing it computes:

- its device helpers (``torchtitan.tools.utils.device_type`` / ``device_module``) name the CPU,
  with a device module answering the calls the trainer makes of ``torch.cuda`` (memory
  statistics are empty);
- FSDP2's reduce-scatter with torchtitan's gradient divide factor of 1 is a sum
  (``PREMUL_SUM`` by 1, which gloo lacks): it is asked for as a plain sum;
- torchtitan 0.3.0 calls ``torch.distributed.set_timeout``, which torch 2.13 has under its
  private name ``_set_pg_timeout``;
- two imports that serve code this job never runs are stubbed: its MoE expert-parallel
  kernels (they import triton) and the Hugging Face ``datasets`` package (its C4 loaders; this
  job brings its own data, and torchtitan's pin of ``datasets<4.8`` cannot be installed beside
  ``transformers`` 5, whose Hub client it conflicts with).
"""

from __future__ import annotations

import os
import sys
import types

import torch
import torch.distributed as dist


class CpuDevice:
    """What torchtitan calls on ``torch.cuda``, for the CPU."""

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name="cpu")

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def is_available() -> bool:
        return True


def _stub(name: str, **attrs) -> None:
    """A module that imports: ``attrs``, and any other name a function that raises if called."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} is not available in this CPU job")

        return unavailable

    module.__getattr__ = missing
    sys.modules[name] = module


def install_cpu_shims() -> None:
    """Before torchtitan's modules import its device helpers."""
    import torchtitan.tools.utils as utils

    utils.device_type, utils.device_module = "cpu", CpuDevice
    _stub("torchtitan.distributed.minimal_async_ep.kernels")
    import torchtitan.distributed.fsdp as fsdp
    from torch.distributed.fsdp import FSDPModule

    undivided = fsdp.disable_fsdp_gradient_division

    def summed(model) -> None:
        undivided(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    fsdp.disable_fsdp_gradient_division = summed
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            _stub("datasets", Dataset=type("Dataset", (), {}))
            _stub("datasets.distributed")
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = dist.distributed_c10d._set_pg_timeout
    torch.set_num_threads(1)


if __name__ == "__main__":
    install_cpu_shims()
    from torchtitan.train import main

    main()
