"""LARS and the training schedules (learning rate, EMA momentum) as pure functions of the global step.

Schedules are plain functions of ``step`` (DINO's ``cosine_scheduler`` idea without the precomputed array), so a
resumed run computes exactly the values a straight run would: nothing about the schedule lives in optimiser state.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

WARMUP_START_FACTOR = 0.01  # warm-up starts at lr / 100 (the official recipe's warmup multiplier 100)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.; SlotCon's recipe): ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256.0


def lr_at(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          start_factor: float = WARMUP_START_FACTOR) -> float:
    """Learning rate at global ``step`` (0-based; the value used for the update of that step).

    Warm-up: ``peak * (f + (1 - f) * step / warmup_steps)`` for ``step < warmup_steps``, f = ``start_factor``
    (1/100: SlotCon's GradualWarmupScheduler; 0: MAE/SIM's ``lr_sched``, ``peak * step / warmup_steps``); then
    ``min_lr + (peak - min_lr) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (total - warmup)`` in [0, 1].
    Steps past ``total_steps`` stay at ``min_lr``.

    The official code's GradualWarmupScheduler with multiplier 100 + CosineAnnealingLR, per iteration.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return peak_lr * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    decay = total_steps - warmup_steps
    if decay <= 0:
        return peak_lr
    t = min(1.0, (step - warmup_steps) / decay)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_at(step: int, *, base_momentum: float, total_steps: int) -> float:
    """Teacher EMA momentum ``1 - (1 - m0) * (cos(pi * step / total) + 1) / 2``: m0 at step 0, 1 at ``total``
    (SlotCon Sec. 3.3 / BYOL)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    t = min(1.0, max(0.0, step / total_steps))
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * t) + 1.0) / 2.0


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as used by SlotCon / MoCo v3.

    For each parameter ``w`` with gradient ``g``::

        if w.ndim > 1:                       # conv / linear weights, prototypes
            u = g + weight_decay * w
            q = eta * ||w|| / ||u||          (1 if either norm is 0)
            u = q * u
        else:                                # biases, BN affine: no weight decay, no trust ratio
            u = g
        mu = momentum * mu + u
        w  = w - lr * mu

    ``eta`` is the trust coefficient (0.001 in the paper). Parameters may carry per-group ``lr``; the loop sets
    ``group["lr"]`` from :func:`lr_at` every step. State per parameter: ``mu`` (the momentum buffer).

    The variant of MoCo v3 / MAE / SlotCon; the step is vectorised with ``torch._foreach_*``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"bad LARS hyper-parameters lr={lr} wd={weight_decay} momentum={momentum} eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # Updates: grads copied (never modify .grad in place: DDP/hooks may still read it).
            updates = [p.grad.detach().clone() for p in params]
            multi = [i for i, p in enumerate(params) if p.ndim > 1]
            if multi:
                w = [params[i] for i in multi]
                u = [updates[i] for i in multi]
                if group["weight_decay"]:
                    torch._foreach_add_(u, w, alpha=group["weight_decay"])
                w_norm = torch._foreach_norm(w)
                u_norm = torch._foreach_norm(u)
                # trust ratio per tensor: eta*||w||/||u|| where both norms are > 0, else 1 (on device, no host sync)
                wn, un = torch.stack(w_norm), torch.stack(u_norm)
                scale = torch.where((wn > 0) & (un > 0), group["eta"] * wn / un.clamp_min(1e-30), torch.ones_like(wn))
                torch._foreach_mul_(u, list(scale.unbind()))
            bufs = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                bufs.append(state["mu"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(
    model: torch.nn.Module | Iterable[torch.nn.Parameter],
    *,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 0.001,
    decay_1d: bool = False,
) -> torch.optim.Optimizer:
    """The optimiser named in ``pretrain.optimizer`` over the trainable parameters.

    ``lars`` (paper), ``sgd`` (momentum 0.9, wd on >1-D params only, like LARS without the trust ratio) or
    ``adamw`` (wd on >1-D params only). ``decay_1d``: sgd / adamw decay every parameter, biases and norms too (MoCo's
    released ``SGD(model.parameters(), weight_decay=...)``); LARS always exempts 1-D tensors. ``lr`` is the initial
    value; the loop overwrites it every step.
    """
    params = [p for p in (model.parameters() if isinstance(model, torch.nn.Module) else model) if p.requires_grad]
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
    decay = [p for p in params if p.ndim > 1 or decay_1d]
    no_decay = [p for p in params if p.ndim <= 1 and not decay_1d]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (allowed: lars, sgd, adamw)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
