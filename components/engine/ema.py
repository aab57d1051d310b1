"""Vectorised exponential moving average of the student into the teacher (SlotCon Sec. 3.3, BYOL's target network).

``teacher <- m * teacher + (1 - m) * student`` for every pair of tensors, in two fused multi-tensor kernels
(``torch._foreach_mul_`` + ``torch._foreach_add_``, as lightly's ``update_momentum``) instead of a Python loop over
hundreds of parameters. The momentum ``m`` is computed by the loop from the global step
(:func:`components.engine.optim.momentum_at`) and passed in: nothing here has state.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for each ``(t, s)``; ``m = 1`` leaves the teacher bit-identical.

    ``teacher`` and ``student`` are equally long sequences of same-shaped tensors (parameters; any dtype/device
    shared pairwise). Raises ``ValueError`` on a length or shape mismatch (a silent zip would skip tensors).
    """
    teacher = [t.detach() if isinstance(t, torch.nn.Parameter) else t for t in teacher]
    student = [s.detach() for s in student]
    if len(teacher) != len(student):
        raise ValueError(f"EMA: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"EMA: tensor {i} has teacher shape {tuple(t.shape)} vs student {tuple(s.shape)}")
    if momentum == 1.0 or not teacher:
        return  # nothing moves; skip the kernels so m = 1 is bit-exact
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def split_pairs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``[(t, s), ...] -> ([t, ...], [s, ...])`` for models that expose their EMA pairs zipped."""
    teacher, student = [], []
    for t, s in pairs:
        teacher.append(t)
        student.append(s)
    return teacher, student
