"""UniGrad (Tao et al., "Exploring the Equivalence of Siamese SSL via a Unified Gradient Framework", CVPR 2022), the
loss of SIM, in fp32 (:func:`unigrad`), and SIM's global + dense split of it (:func:`sim_loss`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AllReduce = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["correlation", "unigrad", "sim_loss", "target_health"]


@torch.no_grad()
def correlation(targets: torch.Tensor, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """``(N, D)`` -> ``(D, D)`` ``tᵀt / N`` in fp32, averaged over ranks by ``all_reduce`` (equal N per rank: the
    global batch's matrix); never carries a gradient."""
    t = targets.detach().float()
    corr = t.T @ t / t.shape[0]
    return all_reduce(corr) if all_reduce is not None else corr


def unigrad(pred: torch.Tensor, target: torch.Tensor, neg_weight: float, all_reduce: AllReduce | None = None,
            corr: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """UniGrad of ``(N, D)`` predictions against ``(N, D)`` targets (below), in fp32.

    Returns ``(loss, parts)`` with the detached ``pos`` and ``neg`` means (already divided by D) and ``corr``.

    For predictions ``p_n`` and (stop-gradient) targets ``t_n``, n = 1..N tokens of width D::

        F = (1/N) Σ_n t_n t_nᵀ                      (D x D, all-reduced: the mean over ranks; no gradient)
        L = [ (1/N) Σ_n ‖p_n − t_n‖² + λ (1/N) Σ_n p_nᵀ F p_n ] / D
        ∂L/∂p_n = [ 2 (p_n − t_n) + 2 λ F p_n ] / (N D)

    The first term pulls each prediction to its target, the second pushes predictions away from the directions the
    targets of the whole (global) batch occupy -- a contrastive push with O(D²) memory instead of O(N²). SIM takes the
    targets through a LayerNorm without affine parameters (``t``); the released code leaves predictions as they are
    (``online_ln: false``), an option LayerNorms them too.
    """
    p = pred.float()
    t = target.detach().float()
    d = p.shape[-1]
    corr = correlation(t, all_reduce) if corr is None else corr
    pos = (p - t).pow(2).sum(-1).mean() / d
    neg = ((p @ corr) * p).sum(-1).mean() / d  # diag(p F pᵀ) without the N x N matrix
    loss = pos + neg_weight * neg
    return loss, {"pos": pos.detach(), "neg": neg.detach(), "corr": corr}


def sim_loss(pred: torch.Tensor, target: torch.Tensor, *, neg_weight: float = 0.02, global_weight: float = 0.0,
             dense_weight: float = 1.0, online_ln: bool = False,
             all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SIM's loss of view B's predicted tokens against the target branch's tokens, in fp32 (autocast off).

    Args:
        pred: ``(B, L, D)`` online predictions for every patch of view B.
        target: ``(B, L, D)`` target tokens of view B (the EMA branch; the gradient is stopped here).
        neg_weight: λ of UniGrad (paper: 0.02).
        global_weight / dense_weight: α1 / α2. ``α1 = 0``: ``α2 · UniGrad`` over the raw tokens (the released code);
            ``α1 > 0``: ``α1 · UniGrad(image means) + α2 · UniGrad(tokens − image mean)`` (the paper's split).
        online_ln: LayerNorm (no affine) on the predictions as well.
        all_reduce: mean over ranks for the correlation matrices (None: one process).
    Returns:
        ``(loss, stats)``: stats are detached scalars -- ``loss_pos``/``loss_neg`` (the dense term's parts),
        ``loss_dense``, ``loss_global`` (0 when α1 = 0), and the collapse indicators of :func:`target_health` on
        the normalised targets.

    SIM's paper splits the objective into a global and a dense part, ``α1 · L_global + α2 · L_dense``: UniGrad on each
    image's mean token, and UniGrad on the tokens minus their image's mean (α1 = 1, α2 = 4 for short schedules). Since
    ``Σ_n ‖p_n − t_n‖² = L ‖p̄ − t̄‖² + Σ_n ‖(p_n − p̄) − (t_n − t̄)‖²`` per image, the split re-weights the
    image-level and the within-image parts of the released code's single dense term, which is what ``α1 = 0`` gives
    here (UniGrad on the raw tokens, times α2).
    """
    device_type = pred.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        p = pred.float()
        if online_ln:
            p = F.layer_norm(p, p.shape[-1:])
        with torch.no_grad():
            t = F.layer_norm(target.detach().float(), target.shape[-1:])
        d = p.shape[-1]
        tokens = t.reshape(-1, d)
        loss_global = p.new_zeros(())
        if global_weight > 0:
            p_mean, t_mean = p.mean(1), t.mean(1)  # (B, D)
            loss_global, _ = unigrad(p_mean, t_mean, neg_weight, all_reduce)
            p, t = p - p_mean[:, None], t - t_mean[:, None]
        dense, parts = unigrad(p.reshape(-1, d), t.reshape(-1, d), neg_weight, all_reduce)
        loss = global_weight * loss_global + dense_weight * dense
        corr = parts["corr"] if global_weight == 0 else correlation(tokens, all_reduce)
        stats = {"loss_dense": dense.detach(), "loss_global": loss_global.detach(), "loss_pos": parts["pos"],
                 "loss_neg": parts["neg"], **target_health(tokens, corr)}
    return loss, stats


@torch.no_grad()
def target_health(targets: torch.Tensor, corr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse indicators of ``(N, D)`` normalised targets (no host sync, no eigen-solver):

    - ``target_std``: the mean over dimensions of the std over tokens (this rank's): ~1 for LayerNormed targets that
      differ between tokens, 0 for a collapse to one vector;
    - ``target_erank``: the participation ratio ``(tr F)² / ‖F‖_F² = (Σλ)² / Σλ²`` of the all-reduced correlation
      matrix F, an effective rank: D for white targets, 1 for targets on one direction.
    """
    std = targets.float().std(dim=0).mean()
    erank = corr.diagonal().sum().pow(2) / corr.pow(2).sum().clamp_min(1e-30)
    return {"target_std": std, "target_erank": erank}
