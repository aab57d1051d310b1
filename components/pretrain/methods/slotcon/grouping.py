"""Semantic grouping (paper Sec. 3.1): soft assignment of pixels to learnable prototypes, then attention pooling.

Computed in float32 whatever the autocast dtype: the scores are divided by a small temperature (0.07) before a
softmax over K prototypes, where bf16 rounding would visibly change the assignment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototype_scores", "pool_slots", "slot_keep_mask", "mean_assignment_entropy"]


def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine scores between pixels and prototypes: ``dots_bkhw = <normalize(S_k), normalize(z_bhw)>``.

    Args:
        z: (B, D, h, w) projected feature map.
        prototypes: (K, D) prototype vectors S.
    Returns:
        (B, K, h, w) float32 scores in [-1, 1].
    """
    with torch.autocast(z.device.type, enabled=False):  # einsum would otherwise run in bf16 under autocast
        return torch.einsum(
            "kd,bdhw->bkhw", F.normalize(prototypes.float(), dim=1), F.normalize(z.float(), dim=1)
        )


def pool_slots(z: torch.Tensor, scores: torch.Tensor, temp: float, eps: float = 1e-6) -> torch.Tensor:
    """Slots by attention pooling: ``A = softmax_k(dots / temp) + eps``, ``s_k = Σ_hw z_hw A_khw / Σ_hw A_khw``.

    Args:
        z: (B, D, h, w) the *un-normalised* projection.
        scores: (B, K, h, w) cosine scores from :func:`prototype_scores`.
        temp: attention temperature (the paper uses τ_t = 0.07 in student and teacher alike).
    Returns:
        (B, K, D) float32 slots.
    """
    with torch.autocast(z.device.type, enabled=False):
        attn = torch.softmax(scores.float() / temp, dim=1) + eps
        attn = attn / attn.sum(dim=(2, 3), keepdim=True)
        return torch.einsum("bdhw,bkhw->bkd", z.float(), attn)


def slot_keep_mask(scores: torch.Tensor) -> torch.Tensor:
    """Which slots exist: prototype k is kept in image b if it is the argmax of at least one pixel.

    Args:
        scores: (B, K, h, w) full, un-aligned scores of one view.
    Returns:
        (B, K) bool.
    """
    b, k = scores.shape[:2]
    winners = scores.argmax(dim=1).flatten(1)  # (B, h*w)
    hits = torch.zeros(b, k, device=scores.device, dtype=torch.int32)
    hits.scatter_(1, winners, 1)
    return hits > 0


@torch.no_grad()
def mean_assignment_entropy(scores: torch.Tensor, temp: float, all_reduce=None) -> torch.Tensor:
    """Entropy (nats) of the mean soft assignment ``mean_bhw softmax_k(scores / temp)``: the collapse alarm.

    log K when every prototype is used equally, 0 when every pixel of every image picks the same one.

    Args:
        scores: (B, K, h, w) teacher scores.
        all_reduce: optional mean over ranks of the (K,) mean assignment (``components.dist.all_reduce_mean``).
    Returns:
        () float32.
    """
    p = torch.softmax(scores.float() / temp, dim=1).mean(dim=(0, 2, 3))
    if all_reduce is not None:
        p = all_reduce(p)
    return -(p * p.clamp_min(1e-12).log()).sum()
