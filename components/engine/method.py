"""What the training engine asks of a method: :class:`Method`, the hooks :func:`components.engine.loop.fit` calls
(build, optimiser, schedules, batches, one step's losses, the post-step update, checkpointed extra state)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn


class Method:
    """Base class of what the engine drives. Override what differs; the defaults suit a plain supervised model.

    Required: :meth:`build`, :meth:`optimizer`, :meth:`lr_at`, :meth:`batches`, :meth:`forward`.
    """

    #: names of the per-step figures :meth:`forward` returns (scalar tensors); the first is the loss to minimise
    stat_keys: tuple[str, ...] = ("loss",)
    #: convert BatchNorm to SyncBatchNorm under DDP on CUDA (False: every process normalises with its own batch)
    sync_bn: bool = True
    #: images per step over all ranks (throughput); set by the method
    global_batch: int = 1
    #: prepare the next batch (decode, augment, copy) on a side CUDA stream while a step runs
    prefetch: bool = False

    def build(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def momentum_at(self, step: int) -> float | None:
        """EMA momentum of ``step`` (None: the method has no EMA)."""
        return None

    def batches(self, epoch: int) -> Iterable[Any]:
        """This rank's batches of ``epoch`` (deterministic from the seed and the epoch: resume re-reads them)."""
        raise NotImplementedError

    def prepare(self, batch: Any, device: torch.device) -> Any:
        """Loader batch -> what :meth:`forward` takes, on ``device`` (decode, augment, transfer)."""
        return batch

    def forward(self, model: nn.Module, batch: Any, step: int) -> Mapping[str, torch.Tensor]:
        """The losses of one step: ``{"loss": tensor with graph, <stat>: detached scalar, ...}``."""
        raise NotImplementedError

    def before_update(self, model: nn.Module, step: int) -> None:
        """After ``backward``, before ``optimizer.step`` (gradient clipping, cancelling a frozen part's grads)."""

    def after_update(self, model: nn.Module, step: int, momentum: float | None) -> None:
        """After ``optimizer.step`` (EMA teacher update). ``model`` is the unwrapped module."""

    def compile(self, model: nn.Module) -> None:
        """``torch.compile`` what pays (in place, so state_dict keys stay plain)."""
        model.compile()

    def generators(self) -> list[torch.Generator]:
        """Per-rank generators whose states go into checkpoints (the pretraining methods have none: every random number
        of a sample is drawn from its own seed in the loader workers)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Extra method state for checkpoints (counters of skipped data, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
