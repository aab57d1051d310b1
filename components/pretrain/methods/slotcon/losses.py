"""SlotCon's two losses as pure, single-process functions (paper Sec. 3.2, Eq. 2-5).

The distributed parts are parameters: ``all_reduce`` (mean over ranks, ``components.dist.all_reduce_mean``) for the
center, ``gather`` (concatenate over ranks, ``components.dist.gather_cat``) for the contrastive negatives. ``None``
means one process, so every loss here runs on a CPU without a process group and equals the multi-rank loss on the
concatenated batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from components.pretrain.methods.slotcon.grouping import slot_keep_mask

__all__ = ["group_loss", "update_center", "slot_contrastive_loss"]

Collective = Callable[[torch.Tensor], torch.Tensor]


def group_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Self-distillation of the pixel-to-prototype assignment across views, one direction (paper Eq. 2-3).

    ``mean_{b,h,w} Σ_k −softmax_k((t − c) / τ_t) · log_softmax_k(s / τ_s)`` on aligned maps; the caller sums the two
    directions (student view 1 vs teacher view 2 and 2 vs 1).

    Args:
        student_scores: (B, K, h, w) aligned student cosine scores (with gradient).
        teacher_scores: (B, K, h, w) aligned teacher cosine scores of the *other* view (no gradient needed).
        center: (1, K) running center of the teacher scores.
    Returns:
        () float32 loss averaged over the B·h·w aligned pixels.
    """
    k = student_scores.shape[1]
    s = student_scores.float().permute(0, 2, 3, 1).reshape(-1, k)
    t = teacher_scores.detach().float().permute(0, 2, 3, 1).reshape(-1, k)
    target = F.softmax((t - center.float()) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(s / student_temp, dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def update_center(
    center: torch.Tensor,
    teacher_scores: torch.Tensor | Sequence[torch.Tensor],
    momentum: float,
    all_reduce: Collective | None = None,
) -> torch.Tensor:
    """New center: ``c ← m·c + (1 − m)·mean(teacher scores)`` (DINO's centering, paper Sec. 3.2).

    Args:
        center: (1, K) current center.
        teacher_scores: (N, K, h, w) or a sequence of such maps: the teacher's **un-aligned** scores of both views.
        momentum: m (0.9 in the paper).
        all_reduce: mean over ranks of the (1, K) batch mean (equal batch sizes per rank, as DDP requires).
    Returns:
        (1, K) the updated center (a new tensor; the caller stores it).
    """
    if not isinstance(teacher_scores, torch.Tensor):
        teacher_scores = torch.cat(list(teacher_scores))
    batch_center = teacher_scores.float().mean(dim=(0, 2, 3)).unsqueeze(0)
    if all_reduce is not None:
        batch_center = all_reduce(batch_center)
    return center * momentum + batch_center.to(center) * (1.0 - momentum)


def slot_contrastive_loss(
    student_slots: torch.Tensor,
    teacher_slots: torch.Tensor,
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float = 0.2,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gather: Collective | None = None,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Slot-level InfoNCE, one direction (paper Eq. 4-5), times 2τ as the official code.

    Keep masks: a query slot (b, k) of the student view is used only if prototype k is the argmax of at least one pixel
    of the student's full score map **and** of the teacher's other-view score map; a key slot only if k wins a pixel
    of the teacher view. Query ``q = normalize(predictor(student slot))``, keys ``normalize(teacher slot)``; the
    positive of query (b, k) is the key (b, k); the negatives are every other kept key of every rank (``gather``).

    ``loss = 2τ · mean_q [ logsumexp_{kept keys j} (q·k_j / τ) − q·k_pos / τ ]``.
    The positive logit is computed locally (it is also one of the gathered keys), so no rank offset is needed.

    The predictor (BatchNorm1d inside) runs on the kept queries only, as the official code. Where its batch
    statistics would come from fewer than 2 queries (this rank's with plain BN, all ranks' with SyncBN), training-mode
    BN normalises every query to its β: the query no longer depends on the student's slot and the loss gives the
    encoder no gradient. The official code crashes there ("Expected more than 1 value per channel"); this one treats it
    as "nothing to contrast" (a zero loss that still reaches every trainable input, so DDP's gradient all-reduce sees
    the same parameters on every rank, and every rank takes the same branch where SyncBN's collectives are involved).
    Ranks may hold different batch sizes (images dropped at decode): the gather pads to the largest.

    Args:
        student_slots: (B, K, D) student slots of view a (with gradient).
        teacher_slots: (B, K, D) teacher slots of view b.
        student_scores: (B, K, h, w) un-aligned student scores of view a.
        teacher_scores: (B, K, h, w) un-aligned teacher scores of view b.
        temperature: τ (0.2 in the paper).
        predictor: maps (N, D) → (N, D); None = identity.
        gather: concatenates (N, …) tensors over ranks along dim 0 (same shape on every rank); None = one process.
        pad_to: the per-rank batch size every rank pads to before the gather (the configured one); None: the ranks
            exchange their sizes first (one more collective and a host sync).
    Returns:
        () float32 loss (mean over the kept queries of this rank).
    """
    b, k, d = student_slots.shape
    key_mask = slot_keep_mask(teacher_scores).reshape(-1)  # (B*K,)
    query_mask = slot_keep_mask(student_scores).reshape(-1) & key_mask

    keys_local = F.normalize(teacher_slots.detach().float().reshape(b * k, d), dim=1)
    # one gather of the keys with their key and query masks as two more columns; every rank gathers, even one with
    # nothing to contrast (all_gather is collective). Rows are padded to ``pad_to`` images (the configured per-rank
    # batch), so ranks whose batch lost an image at decode still gather equal shapes without exchanging sizes first.
    rows = torch.cat([keys_local, key_mask.float()[:, None], query_mask.float()[:, None]], dim=1)
    if gather is not None:
        rows = _gather_rows(rows, gather, None if pad_to is None else pad_to * k)
    # the one host sync of this loss: where the kept keys (all ranks) and this rank's kept queries are, in one
    # nonzero over both masks (the kept counts decide the shapes of everything below)
    n_rows = rows.shape[0]
    where = torch.cat([rows[:, d] > 0.5, query_mask]).nonzero().squeeze(1)
    split = int(torch.searchsorted(where, torch.tensor(n_rows, device=where.device)))
    key_idx, query_idx = where[:split], where[split:] - n_rows
    keys_all = rows.index_select(0, key_idx)[:, :d]  # (Nk, D) kept keys of every rank, rank order
    run, join = _predictor_plan(predictor, query_idx.numel(), lambda: int((rows[:, d + 1] > 0.5).sum()),
                                synced=gather is not None)
    if not run:
        # nothing to contrast on this rank: a zero that still reaches every trainable input (DDP needs the grads)
        zero = student_slots.sum() * 0.0
        if isinstance(predictor, torch.nn.Module):
            if join:  # SyncBN's collectives run on every rank; it accepts an empty input (plain BN would not)
                zero = zero + predictor(student_slots.reshape(b * k, d)[:0]).sum() * 0.0
            zero = zero + sum(p.sum() * 0.0 for p in predictor.parameters() if p.requires_grad)
        return zero.float()

    queries = student_slots.reshape(b * k, d).index_select(0, query_idx)
    if predictor is not None:
        queries = predictor(queries)
    queries = F.normalize(queries.float(), dim=1)  # (Nq, D)

    with torch.autocast(queries.device.type, enabled=False):  # logits / τ in fp32 even under bf16 autocast
        logits = queries @ keys_all.t() / temperature  # (Nq, Nk)
        positive = (queries * keys_local.index_select(0, query_idx)).sum(dim=1) / temperature  # (Nq,)
        return (torch.logsumexp(logits, dim=1) - positive).mean() * (2.0 * temperature)


_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def _predictor_plan(predictor, local: int, everywhere: Callable[[], int], synced: bool) -> tuple[bool, bool]:
    """``(run the predictor on this rank's queries, call it on an empty batch to join SyncBN's collectives)``.

    A predictor without batch statistics (none, a Linear, BN in eval mode) runs on any non-empty batch. Training-mode
    BN needs at least 2 rows: this rank's (plain BN), or every rank's together (SyncBN across ranks, where all ranks
    must make the same choice, so it is taken on ``everywhere()``, the same number on every rank: only then is that
    count read, a host sync plain BN does not pay).
    """
    norms = [m for m in predictor.modules() if isinstance(m, _BATCH_NORMS) and m.training] \
        if isinstance(predictor, torch.nn.Module) else []
    if not norms:
        return local > 0, False
    if synced and any(isinstance(m, torch.nn.SyncBatchNorm) for m in norms) and torch.distributed.is_available() \
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        total = everywhere()
        return local > 0 and total >= 2, local == 0 and total >= 2
    return local >= 2, False


def _gather_rows(rows: torch.Tensor, gather: Collective, pad_rows: int | None) -> torch.Tensor:
    """``gather`` for (N_r, C) tensors whose N_r may differ by rank (images dropped at decode). With ``pad_rows``
    (every rank's known upper bound) each rank pads to it and no sizes are exchanged: padded rows carry zero masks,
    so they are never a key or a query. Without it the sizes go first and the padding is cut off after."""
    if pad_rows is not None:
        if rows.shape[0] > pad_rows:
            raise ValueError(f"{rows.shape[0]} slot rows exceed pad_to's {pad_rows}")
        if rows.shape[0] < pad_rows:
            rows = torch.cat([rows, rows.new_zeros(pad_rows - rows.shape[0], rows.shape[1])])
        return gather(rows)
    sizes = gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
    most = max(sizes)
    if rows.shape[0] < most:
        rows = torch.cat([rows, rows.new_zeros(most - rows.shape[0], rows.shape[1])])
    out = gather(rows)
    return torch.cat([out[r * most : r * most + n] for r, n in enumerate(sizes)])
