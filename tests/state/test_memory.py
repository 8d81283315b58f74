"""``memory_report()``: every tensor the optimizer keeps between steps, counted once, by kind."""

from __future__ import annotations

import gc
import types

import torch

from sharded_shampoo import ShardedShampoo


def _held_bytes(opt: ShardedShampoo, params: list[torch.Tensor]) -> int:
    """Bytes of every storage reachable from the optimizer, parameters and gradients excluded:
    a walk of the whole object graph (modules aside), written apart from the package's."""
    excluded = {
        t.untyped_storage().data_ptr() for p in params for t in (p, p.grad) if t is not None
    }
    seen, storages, todo = set(), {}, [opt]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.data_ptr() not in excluded:
                storages[s.data_ptr()] = s.nbytes()
            continue
        todo.extend(gc.get_referents(obj))
    return sum(storages.values())


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 40))


def _trained(**options):
    model = _model()
    opt = ShardedShampoo(
        model.parameters(),
        lr=1e-2,
        betas=(0.9, 0.99),
        weight_decay=0.01,
        max_preconditioner_dim=16,
        precondition_frequency=2,
        **options,
    )
    x = torch.randn(32, 12)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def _packed(m):
    return m * (m + 1) // 2


def test_state_by_kind_follows_the_block_shapes():
    """Blocks: (8, 12); (8,); (16, 8), (16, 8), (8, 8); (16,), (16,), (8,). Per block, a factor
    and a root per dim (packed: m (m + 1) / 2 entries), grafting and first moment of its size,
    one int32 counter."""
    _, opt = _trained()
    blocks = [(8, 12), (8,), (16, 8), (16, 8), (8, 8), (16,), (16,), (8,)]
    matrices = sum(_packed(m) for shape in blocks for m in shape)
    numel = sum(torch.Size(shape).numel() for shape in blocks)
    report = opt.memory_report()
    assert report.state == {
        "factors": 4 * matrices,
        "roots": 4 * matrices,
        "grafting": 4 * numel,
        "first moment": 4 * numel,
        "failure counters": 4 * len(blocks),
    }
    assert report.params == numel
    _, full = _trained(symmetric_packing=False)
    squares = sum(m * m for shape in blocks for m in shape)
    assert full.memory_report().state["factors"] == 4 * squares


def test_the_report_counts_everything_kept_between_steps():
    """The report's total is what an independent walk of the optimizer finds, plus the packing
    indices (a cache shared by the process: 4 bytes per entry of an m x m matrix and of its
    upper triangle, per block size); no gradient stack or direction outlives its step."""
    model, opt = _trained()
    report = opt.memory_report()
    indices = sum(4 * (m * m + _packed(m)) for m in (8, 12, 16))
    assert report.buffers["packing indices"] == indices
    assert report.total == _held_bytes(opt, list(model.parameters())) + indices
    assert "gradient stacks" not in report.buffers or report.buffers["gradient stacks"] == 0
    assert report.buffers["bookkeeping"] < report.state_bytes
    assert report.per_param() == report.total / report.params
    assert "B per parameter" in str(report)


def test_bfloat16_moving_averages_are_counted_with_their_rounding_patterns():
    """Moving averages kept in bfloat16: half the bytes of grafting and first moment, plus one
    int32 rounding pattern per block size (4 bytes per element of one block), shared like the
    packing indices."""
    model, opt = _trained(grafting_dtype=torch.bfloat16, first_moment_dtype=torch.bfloat16)
    _, wide = _trained()
    report, wide_report = opt.memory_report(), wide.memory_report()
    for kind in ("grafting", "first moment"):
        assert 2 * report.state[kind] == wide_report.state[kind]
    block_sizes = {8 * 12, 8, 16 * 8, 8 * 8, 16}
    patterns = 4 * sum(block_sizes)
    assert report.buffers["rounding patterns"] == patterns
    indices = sum(4 * (m * m + _packed(m)) for m in (8, 12, 16))
    assert report.total == _held_bytes(opt, list(model.parameters())) + indices + patterns
