"""LARS against a plain per-parameter reference; lr / momentum schedules at their endpoints and through warm-up."""
from __future__ import annotations

import math

import pytest
import torch

from components.engine.optim import LARS, build_optimizer, lr_at, momentum_at, scaled_lr


def reference_lars_step(params, grads, bufs, *, lr, wd, momentum, eta):
    """The official SlotCon/MoCo v3 LARS, one tensor at a time, written out literally."""
    new_params, new_bufs = [], []
    for p, g, mu in zip(params, grads, bufs):
        p, g, mu = p.double(), g.double(), mu.double()
        if p.ndim > 1:
            d = g + wd * p
            pn, dn = p.norm(), d.norm()
            q = eta * pn / dn if (pn > 0 and dn > 0) else 1.0
            d = d * q
        else:
            d = g
        mu = momentum * mu + d
        new_bufs.append(mu)
        new_params.append(p - lr * mu)
    return new_params, new_bufs


@pytest.mark.parametrize("wd,momentum,eta", [(1e-5, 0.9, 1e-3), (0.1, 0.0, 0.02), (0.0, 0.5, 1e-3)])
def test_lars_matches_reference(wd, momentum, eta):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (16, 8), (8,), (5,), (3, 7)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[-1].zero_()  # ||w|| = 0 -> trust ratio 1
    opt = LARS(params, lr=0.3, weight_decay=wd, momentum=momentum, eta=eta)
    ref_p = [p.detach().double().clone() for p in params]
    ref_mu = [torch.zeros_like(p) for p in ref_p]
    for it in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        lr = 0.3 / (it + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref_p, ref_mu = reference_lars_step(ref_p, grads, ref_mu, lr=lr, wd=wd, momentum=momentum, eta=eta)
        for p, r in zip(params, ref_p):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
        for p, gr in zip(params, grads):
            assert torch.equal(p.grad, gr)  # .grad is not modified in place


def test_lars_skips_params_without_grad_and_state_roundtrips():
    a, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = LARS([a, b], lr=0.1, weight_decay=0.0, momentum=0.9)
    a.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))
    # trust ratio: eta*||w||/||g|| = 1e-3 * 3 / 3 -> a moves by lr * 1e-3 * g
    torch.testing.assert_close(a.detach(), torch.full((3, 3), 1 - 0.1 * 1e-3))
    opt2 = LARS([a, b], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[a]["mu"], opt.state[a]["mu"])


def test_build_optimizer_kinds():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert isinstance(build_optimizer(m, name="lars", lr=0.1, weight_decay=1e-5), LARS)
    sgd = build_optimizer(m, name="sgd", lr=0.1, weight_decay=1e-5)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-5, 0.0]
    assert len(sgd.param_groups[0]["params"]) == 1  # only the Linear weight is decayed
    with pytest.raises(ValueError):
        build_optimizer(m, name="nope", lr=0.1, weight_decay=0.0)


def test_scaled_lr():
    assert scaled_lr(1.0, 512) == 2.0
    assert scaled_lr(1.0, 32) == 0.125


def test_lr_schedule_endpoints_and_warmup():
    peak, floor, warm, total = 2.0, 1e-6, 10, 110
    kw = dict(peak_lr=peak, min_lr=floor, warmup_steps=warm, total_steps=total)
    assert lr_at(0, **kw) == pytest.approx(peak / 100)  # warm-up starts at lr / 100
    # linear, per iteration
    steps = [lr_at(s, **kw) for s in range(warm + 1)]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)
    assert lr_at(warm, **kw) == pytest.approx(peak)  # the peak right after warm-up
    assert lr_at(warm + 50, **kw) == pytest.approx(floor + (peak - floor) / 2)  # cosine midpoint
    assert lr_at(total, **kw) == pytest.approx(floor)
    assert lr_at(total + 5, **kw) == pytest.approx(floor)
    values = [lr_at(s, **kw) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    # no warm-up: starts at the peak
    assert lr_at(0, peak_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 1.0


def test_momentum_schedule_endpoints():
    assert momentum_at(0, base_momentum=0.99, total_steps=100) == pytest.approx(0.99)
    assert momentum_at(100, base_momentum=0.99, total_steps=100) == pytest.approx(1.0)
    assert momentum_at(50, base_momentum=0.99, total_steps=100) == pytest.approx(0.995)
    for s in (7, 33, 91):
        expect = 1 - (1 - 0.99) * (math.cos(math.pi * s / 100) + 1) / 2
        assert momentum_at(s, base_momentum=0.99, total_steps=100) == pytest.approx(expect, abs=1e-12)
