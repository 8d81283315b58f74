"""Training in one process: LR schedulers (beta1 too), closures, warnings that name blocks, a
model that learns, parameter dtypes and memory formats."""

from __future__ import annotations

import pytest
import torch
from convnet import OPTS, batch, make_model, train

from sharded_shampoo import ShardedShampoo


def test_lr_scheduler_drives_the_step_size():
    # With grafting "sgd", beta1 = 0 and before preconditioning starts, the step is -lr * grad.
    p = torch.zeros(4, requires_grad=True)
    opt = ShardedShampoo(
        [p], lr=1.0, betas=(0.0, 1.0), grafting="sgd", start_preconditioning_step=100
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    moves = []
    for _ in range(6):
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        sched.step()
        moves.append((before - p.detach())[0].item())
    assert moves == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_one_cycle_scheduler_cycles_beta1():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    beta1s = []
    for s in range(10):
        train(model, opt, 1, start=s)
        sched.step()
        beta1s.append(opt.param_groups[0]["betas"][0])
    assert len(set(beta1s)) > 3


def test_closure_is_evaluated_and_its_loss_returned():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_named_parameters_name_blocks_in_warnings():
    model = torch.nn.Linear(4, 3)
    opt = ShardedShampoo(model.named_parameters(), lr=0.1)
    model.weight.grad = torch.full((3, 4), float("nan"))
    model.bias.grad = torch.ones(3)
    with pytest.warns(UserWarning, match=r"of parameter weight \(3, 4\)"):
        opt.step()


def test_small_model_learns():
    """A teacher-student regression: the loss falls by more than 20x in 300 steps."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(512, 8)
    with torch.no_grad():
        y = teacher(x)
    student = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = ShardedShampoo(student.parameters(), lr=0.01, precondition_frequency=10, epsilon=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameter_dtypes(dtype):
    torch.manual_seed(0)
    p = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    opt = ShardedShampoo([p], lr=0.1, precondition_frequency=2)
    for _ in range(4):
        p.grad = torch.randn(6, 5).to(dtype)
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert opt.state[p]["blocks.0.filtered_grad"].dtype == torch.promote_types(dtype, torch.float32)


def test_channels_last_parameter_is_updated_like_a_contiguous_one():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2)
    a = w.clone().requires_grad_()
    b = w.clone().to(memory_format=torch.channels_last).requires_grad_()
    opt_a = ShardedShampoo([a], lr=0.1, max_preconditioner_dim=4, precondition_frequency=2)
    opt_b = ShardedShampoo([b], lr=0.1, max_preconditioner_dim=4, precondition_frequency=2)
    for s in range(4):
        g = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(s))
        a.grad = g.clone()
        b.grad = g.clone().to(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
