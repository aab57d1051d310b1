"""Rank, world size and collectives with a single-process fallback, so every loss runs on CPU without a group.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; :func:`init_distributed`
joins the group (nccl on CUDA, gloo on CPU). Without it every helper here is the identity.

Every collective waits at most ``SLOTCON_DDP_TIMEOUT_S`` seconds (default :data:`DEFAULT_DDP_TIMEOUT_S`) for the
other ranks; :func:`peer_lost` tells a lost peer (connection closed, or no reply within that time) from other errors,
and :func:`lost_peer_message` says in one line who stopped answering and how to resume.
"""
from __future__ import annotations

import datetime
import os
import re

import torch
import torch.distributed as dist

from components.errors import UserError

DDP_TIMEOUT_ENV = "SLOTCON_DDP_TIMEOUT_S"
# the longest a rank waits in a collective for the others: it must cover the longest rank-0-only pause between two
# collectives (a checkpoint write; detection's COCO evaluation of the whole val set while the other ranks wait)
DEFAULT_DDP_TIMEOUT_S = 600.0
_LOST = False  # set once a peer was lost: the group can no longer synchronise, so destroy() skips its barrier


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


def ddp_timeout_s(env=None) -> float:
    """Seconds a collective waits for the other ranks: ``SLOTCON_DDP_TIMEOUT_S`` (a positive number) or the default."""
    raw = (os.environ if env is None else env).get(DDP_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DDP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{DDP_TIMEOUT_ENV}={raw!r}: give the seconds a rank waits for the others (a positive number, "
                        f"default {DEFAULT_DDP_TIMEOUT_S:g})")
    return value


def init_distributed(device: str | torch.device | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1). Returns True if distributed.

    ``timeout_s`` (default :func:`ddp_timeout_s`) bounds every collective's wait for the other ranks."""
    timeout_s = ddp_timeout_s() if timeout_s is None else timeout_s
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
    """Leave the group (after a barrier, unless a peer was lost: nobody would answer it)."""
    if is_initialized():
        if not _LOST:
            dist.barrier()
        dist.destroy_process_group()


# gloo / NCCL / store texts of a peer that died (connection closed) or stopped answering (timed out)
_CLOSED = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused|socket closed|"
                     r"remote process exited|NCCL communicator was aborted|ncclRemoteError", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out waiting|collective operation timeout|gloo.*timed out|socket timeout",
                      re.IGNORECASE)


def peer_lost(exc: BaseException) -> str | None:
    """Why a collective failed, when the cause is another rank (``"connection closed by peer"``, ``"no reply within
    SLOTCON_DDP_TIMEOUT_S=T s"``); None for any other error. Marks the group as lost (see :func:`destroy`)."""
    global _LOST
    if not isinstance(exc, RuntimeError) or not is_initialized():
        return None
    text = str(exc)
    if _CLOSED.search(text):
        reason = "connection closed by peer"
    elif _TIMEOUT.search(text):
        reason = f"no reply within {DDP_TIMEOUT_ENV}={ddp_timeout_s():g} s"
    else:
        return None
    _LOST = True
    return reason


def lost_peer_message(reason: str, *, step: int | None = None, checkpoint: str | None = None,
                      env=None) -> str:
    """One line: who stopped answering (with two nodes, the other node and its ranks), when, and how to resume."""
    env = os.environ if env is None else env
    world = get_world_size()
    local = int(env.get("LOCAL_WORLD_SIZE", world) or world)
    node, nnodes = int(env.get("GROUP_RANK", 0) or 0), max(world // max(local, 1), 1)
    if nnodes == 2:
        other = 1 - node
        ranks = f"rank {other * local}" if local == 1 else f"ranks {other * local}-{other * local + local - 1}"
        who = f"{ranks} (node {other})"
    else:
        who = "another rank" + (" (on another node)" if nnodes > 2 else "")
    when = f" at step {step}" if step is not None else ""
    kept = f"last checkpoint: {checkpoint}; " if checkpoint else ""
    return (f"{who} stopped answering{when} ({reason}); every rank stopped; {kept}re-run the same command on every "
            "node to resume")


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
