"""Rank, world size and collectives with a single-process fallback, so every loss runs on CPU without a group.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; :func:`init_distributed`
joins the group (nccl on CUDA, gloo on CPU). Without it every helper here is the identity.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str | torch.device | None = None, timeout_s: int = 1800) -> bool:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1). Returns True if distributed."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    dev = torch.device(device) if device is not None else None
    use_nccl = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    if use_nccl:
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(
        backend="nccl" if use_nccl else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return True


def destroy() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity without a group."""
    if not is_initialized() or get_world_size() == 1:
        return t
    return all_reduce_sum(t) / get_world_size()


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity without a group."""
    if not is_initialized() or get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is True on any rank: used to stop every rank together (e.g. a non-finite loss)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


@torch.no_grad()
def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) over ranks along dim 0, in rank order; no gradient.

    The single-process fallback returns ``t`` itself, so a loss given ``gather=gather_cat`` on one process equals the
    loss on the concatenated global batch.
    """
    if not is_initialized() or get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)
