"""MoCo v2's loss and queue as pure, single-process functions (He et al. 2020, Eq. 1; Chen et al. 2020).

The distributed parts are parameters: ``gather`` (concatenate over ranks in rank order,
``components.dist.gather_cat``). ``None`` means one process, so each function runs on a CPU without a process group
and equals the multi-rank computation on the concatenated batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["info_nce_queue", "enqueue", "shuffle_plan"]

Collective = Callable[[torch.Tensor], torch.Tensor]


def info_nce_queue(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with a queue of negatives (MoCo Eq. 1), averaged over the batch.

    ``L = mean_n −log( exp(q_n·k_n/τ) / (exp(q_n·k_n/τ) + Σ_j exp(q_n·queue_j/τ)) )``: the positive logit is at
    index 0 of ``[q·k⁺, q·queue_1 … q·queue_K]`` and the loss is cross-entropy with label 0.

    Args:
        query: (N, D) L2-normalised query embeddings (with gradient).
        key: (N, D) L2-normalised key embeddings of the other views (the gradient is stopped here).
        queue: (K, D) L2-normalised keys of earlier batches (no gradient).
        temperature: τ (0.2 in MoCo v2).
    Returns:
        loss: () float32 mean cross-entropy.
        logits: (N, 1 + K) float32 logits ``/ τ`` (detached), for accuracy and similarity statistics.
    """
    q = query.float()
    pos = (q * key.detach().float()).sum(dim=1, keepdim=True)  # (N, 1)
    neg = q @ queue.detach().float().t()  # (N, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits.detach()


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor,
            gather: Collective | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys over the oldest ones (a ring buffer); every rank ends with the same queue.

    Args:
        queue: (K, D) current queue.
        ptr: () long tensor, the index of the oldest entry (where the next keys go); on the queue's device, so the
            update needs no host sync.
        keys: (N, D) this rank's keys; ``gather`` concatenates them over ranks in rank order (M = N · world).
        gather: concatenation over ranks, or None on one process.
    Returns:
        (new queue (K, D), new pointer ``(ptr + M) % K``). ``K`` must be a multiple of ``M`` (as MoCo asserts), so
        a batch never wraps around the end and every entry is overwritten once per ``K / M`` steps.
    """
    keys = gather(keys) if gather is not None else keys
    m, k = keys.shape[0], queue.shape[0]
    if k % m:
        raise ValueError(f"queue size {k} is not a multiple of the global batch {m}")
    idx = ptr + torch.arange(m, device=queue.device)
    return queue.index_copy(0, idx, keys.to(queue.dtype)), (ptr + m) % k


def shuffle_plan(global_batch: int, groups: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The key encoder's shuffled BatchNorm groups of a global batch (MoCo's shuffle BN).

    Args:
        global_batch: samples over all ranks, ``world · per-rank batch``.
        groups: BatchNorm groups over all ranks (``world · splits per rank``); must divide ``global_batch``.
        generator: the same state on every rank (seeded from the step), so no broadcast is needed.
    Returns:
        perm: (global_batch,) the global sample order the key encoder sees; group g is ``perm[g·s:(g+1)·s]``
            with ``s = global_batch / groups``; rank r runs the groups ``r·splits … (r+1)·splits − 1``.
        unperm: (global_batch,) its inverse: ``keys_in_perm_order[unperm]`` is in the original order.

    Shuffle BN (MoCo Sec. 3.3) is expressed as index arithmetic on the *global* batch (:func:`shuffle_plan`): the key
    encoder sees a random permutation of the global batch, cut into ``groups`` equal parts that each get their own
    BatchNorm statistics (one part per rank, or several per rank to emulate more GPUs), so the statistics used for a
    query and for its positive key come from different subsets of samples.
    """
    if global_batch % groups:
        raise ValueError(f"global batch {global_batch} is not divisible into {groups} BatchNorm groups")
    perm = torch.randperm(global_batch, generator=generator)
    return perm, torch.argsort(perm)
