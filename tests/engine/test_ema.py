"""EMA: teacher = m*t + (1-m)*s exactly (vectorised), m = 1 changes nothing, mismatches are errors."""
from __future__ import annotations

import pytest
import torch

from components.engine.ema import ema_update_, split_pairs
from components.engine.optim import momentum_at


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (7,), (5, 2)]
    t = [torch.randn(s, generator=g) for s in shapes]
    s = [torch.randn(s, generator=g) for s in shapes]
    return t, s


@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 0.996])
def test_ema_formula(m):
    t, s = _pairs()
    expect = [m * a + (1 - m) * b for a, b in zip(t, s)]
    ema_update_(t, s, m)
    for a, e in zip(t, expect):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_ema_exact_on_dyadic_values():
    # values and m representable exactly in binary: every rounding is exact, so equality must be bitwise
    t = [torch.tensor([1.0, -2.0, 0.25]), torch.tensor([[4.0]])]
    s = [torch.tensor([3.0, 2.0, -0.75]), torch.tensor([[-4.0]])]
    ema_update_(t, s, 0.75)
    assert torch.equal(t[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 2, 0.75 * 0.25 + 0.25 * -0.75]))
    assert torch.equal(t[1], torch.tensor([[2.0]]))


def test_ema_m1_changes_nothing_and_m0_copies():
    t, s = _pairs(1)
    before = [a.clone() for a in t]
    ema_update_(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, before))
    ema_update_(t, s, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, s))


def test_ema_on_module_parameters_and_schedule():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    total = 10
    m = momentum_at(0, base_momentum=0.9, total_steps=total)
    assert m == pytest.approx(0.9)
    ema_update_(list(teacher.parameters()), list(student.parameters()), m)
    for p, a, b in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(p.detach(), 0.9 * a + 0.1 * b.detach(), rtol=0, atol=1e-6)
        assert not p.requires_grad or p.grad is None
    # last step of the schedule: momentum 1, teacher frozen
    frozen = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(list(teacher.parameters()), list(student.parameters()), momentum_at(total, base_momentum=0.9,
                                                                                     total_steps=total))
    assert all(torch.equal(p.detach(), f) for p, f in zip(teacher.parameters(), frozen))


def test_ema_mismatch_raises():
    with pytest.raises(ValueError, match="teacher tensors"):
        ema_update_([torch.zeros(2)], [], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    t, s = split_pairs([(torch.zeros(1), torch.ones(1))])
    assert len(t) == len(s) == 1
