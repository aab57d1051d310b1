"""One training step, as the engine runs it and as benchmarks time it: autocast, DDP wrapping, the device-side
stat vector, and the prefetch of the next batch on a side CUDA stream."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from components import dist


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets ``lr`` times its ``lr_scale`` (default 1): one schedule, per-group multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; fp32 elsewhere (CPU autocast is slower than fp32 for convs)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda", dist.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def uses_sync_bn(device_type: str, world_size: int, sync_bn: bool) -> bool:
    """Whether :func:`wrap_model` turns BatchNorm into SyncBatchNorm: only on CUDA with more than one rank, and only for
    a method that asks for it (``Method.sync_bn``; SyncBatchNorm has no CPU/gloo kernel)."""
    return sync_bn and device_type == "cuda" and world_size > 1


def ddp_ready(model: nn.Module, device_type: str, world_size: int, *, sync_bn: bool) -> nn.Module:
    """``model`` as DDP will hold it: BatchNorm converted to SyncBatchNorm when :func:`uses_sync_bn` says so."""
    if uses_sync_bn(device_type, world_size, sync_bn):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_model(model: nn.Module, device: torch.device, *, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """``(wrapped, raw)``: DDP (SyncBatchNorm first on CUDA when ``sync_bn``) when the world is larger than one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model, model
    cuda = device.type == "cuda"
    model = ddp_ready(model, device.type, dist.get_world_size(), sync_bn=sync_bn)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                              broadcast_buffers=True)
    return ddp, model


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (one element without a group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Trainer:
    """One optimisation step exactly as :func:`fit` runs it (benchmarks time this same code).

    Holds the method, the (maybe DDP-wrapped, compiled) model and the optimiser. :meth:`step` prepares a loader batch,
    runs forward under autocast, all-reduces ``[stats..., non-finite flag]`` (summed over ranks, left on the device:
    no host sync), then backward, the optimiser step and the method's EMA hook.
    """

    def __init__(self, method, model: nn.Module, optimizer: torch.optim.Optimizer, spec,  # components.engine.loop.RunSpec
                 device: torch.device):
        self.method, self.optimizer, self.spec, self.device = method, optimizer, spec, device
        self.keys = tuple(method.stat_keys)
        self.wrapped, self.raw = wrap_model(model, device, sync_bn=method.sync_bn)
        if spec.compile:
            method.compile(self.raw)
        self.channels_last = device.type == "cuda" and spec.channels_last

    def prepare(self, batch: Any) -> Any:
        inputs = self.method.prepare(batch, self.device)
        return _channels_last(inputs) if self.channels_last else inputs

    def step(self, batch: Any, step: int, *, prepared: Any = None) -> tuple[torch.Tensor, float, float | None]:
        """Train on ``batch`` (or on ``prepared``, what :meth:`prepare` made of it ahead of time) as global step
        ``step``; returns ``(rank-summed stat vector, lr, momentum)``."""
        method, optimizer = self.method, self.optimizer
        lr = method.lr_at(step)
        momentum = method.momentum_at(step)
        set_lr(optimizer, lr)
        inputs = prepared if prepared is not None else self.prepare(batch)
        with autocast(self.device, self.spec.amp):
            out = method.forward(self.wrapped, inputs, step)
        loss = out["loss"]
        vec = torch.stack([out[k].detach().float().reshape(()) for k in self.keys]
                          + [(~torch.isfinite(loss.detach())).float().reshape(())])
        vec = dist.all_reduce_sum(vec)  # one small collective per step, no host sync
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_update(self.raw, step)
        optimizer.step()
        method.after_update(self.raw, step, momentum)
        return vec, lr, momentum


class Prefetcher:
    """Prepares batch ``i + 1`` (decode, augmentation, host-to-device copies) while step ``i`` runs.

    On CUDA the preparation runs on a side stream (the default stream waits on an event before it uses the tensors,
    and the tensors are marked as used by the default stream, so the caching allocator never hands their memory out
    early); the loader pins its batches. Elsewhere (tests) it runs inline, one batch ahead.

    Exact resume: preparing batch ``i + 1`` draws from the method's generators before step ``i``'s checkpoint is
    written, so :attr:`saved_generator_states` holds their states from *before* that draw; the engine writes those.
    """

    def __init__(self, trainer: "Trainer", batches: Iterator):
        self.trainer, self.batches = trainer, batches
        cuda = trainer.device.type == "cuda"
        self.stream = torch.cuda.Stream(trainer.device) if cuda else None
        self.saved_generator_states: list | None = None
        self._next = self._prepare_next()

    def _prepare_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        states = [g.get_state() for g in self.trainer.method.generators()]
        if self.stream is None:
            return self.trainer.prepare(batch), None, states
        with torch.cuda.stream(self.stream):
            inputs = self.trainer.prepare(batch)
            event = torch.cuda.Event()
            event.record(self.stream)
        return inputs, event, states

    def __iter__(self):
        return self

    def __next__(self):
        if self._next is None:
            raise StopIteration
        inputs, event, _ = self._next
        if event is not None:
            main = torch.cuda.current_stream(self.trainer.device)
            main.wait_event(event)
            _record_stream(inputs, main)
        self._next = self._prepare_next()  # queued now: overlaps with the step the caller runs next
        self.saved_generator_states = self._next[2] if self._next is not None else None
        return inputs


def _record_stream(obj: Any, stream) -> None:
    if isinstance(obj, torch.Tensor) and obj.is_cuda:
        obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record_stream(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record_stream(v, stream)


def _channels_last(inputs: Any) -> Any:
    """4-D float tensors of a batch dict to channels_last (NHWC convs: tensor cores without transposes)."""
    if isinstance(inputs, dict):
        return {k: (v.contiguous(memory_format=torch.channels_last)
                    if isinstance(v, torch.Tensor) and v.ndim == 4 and v.is_floating_point() else v)
                for k, v in inputs.items()}
    return inputs
