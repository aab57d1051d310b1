"""ReCo's regional contrast loss (Liu, Zhi, Johns, Davison, "Bootstrapping Semantic Segmentation with Regional
Contrast", ICLR 2022, arXiv 2104.04465, Eq. 1-3), vectorised: a few batched tensor ops on the device, every draw
from the ``generator`` passed in (:func:`draw_samples` returns exactly what the loss uses). :func:`reco_loss` says
what it computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PixelSet:
    """The valid pixels of a batch, sorted by class (stable): what the draws index into.

    ``feats (N, D)`` with gradient, ``labels (N,)``, ``hard (N,)`` bool, ``counts (C,)`` pixels per class, ``starts
    (C,)`` where each class begins, ``hard_pos (H,)`` positions of the hard pixels (grouped by class), ``hard_counts
    (C,)``, ``hard_starts (C,)``, ``protos (C, D)`` detached class means (rows of absent classes are 0).
    """

    feats: torch.Tensor
    labels: torch.Tensor
    hard: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    hard_pos: torch.Tensor
    hard_counts: torch.Tensor
    hard_starts: torch.Tensor
    protos: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """Classes with at least one valid pixel, ascending ``(K,)``."""
        return (self.counts > 0).nonzero().flatten()


def gather_pixels(rep: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, prob: torch.Tensor,
                  hard_threshold: float) -> PixelSet:
    """``rep (B, D, h, w)``, ``labels (B, h, w)`` long, ``valid (B, h, w)`` bool, ``prob (B, C, h, w)`` -> PixelSet."""
    num_classes = prob.shape[1]
    d = rep.shape[1]
    keep = valid.flatten()
    feats = rep.permute(0, 2, 3, 1).reshape(-1, d)[keep].float()
    lab = labels.flatten()[keep].long()
    p_own = prob.permute(0, 2, 3, 1).reshape(-1, num_classes)[keep].gather(1, lab[:, None]).squeeze(1)
    order = torch.argsort(lab, stable=True)
    feats, lab, hard = feats[order], lab[order], (p_own < hard_threshold)[order]
    counts = torch.bincount(lab, minlength=num_classes)
    hard_counts = torch.bincount(lab[hard], minlength=num_classes)
    protos = torch.zeros(num_classes, d, device=feats.device).index_add_(0, lab, feats.detach())
    protos = protos / counts.clamp(min=1)[:, None]
    return PixelSet(feats, lab, hard, counts, torch.cumsum(counts, 0) - counts, hard.nonzero().flatten(),
                    hard_counts, torch.cumsum(hard_counts, 0) - hard_counts, protos)


def negative_class_probs(protos: torch.Tensor, present: torch.Tensor, anchors: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """``(A, C)``: row ``a`` = ``softmax_j(cos(r_anchor_a, r_j) / tau)`` over the present classes ``j != anchor_a``
    (0 elsewhere), the class-relation graph of Eq. 3."""
    c = protos.shape[0]
    sim = F.cosine_similarity(protos[anchors][:, None, :], protos[None, :, :], dim=-1) / temperature  # (A, C)
    allowed = torch.zeros(len(anchors), c, dtype=torch.bool, device=protos.device)
    allowed[:, present] = True
    allowed[torch.arange(len(anchors), device=protos.device), anchors] = False
    return torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)


def _uniform_index(u: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``start + floor(u * count)`` for ``u`` in [0, 1): a uniform draw in ``[start, start + count)``."""
    return start + torch.minimum((u * count).long(), count - 1)


@dataclass
class Draws:
    """What one loss evaluation draws: ``anchors (A,)`` classes with hard queries, ``query (A, Q)`` and ``negative
    (A, Q, M)`` positions into :attr:`PixelSet.feats`, ``negative_class (A, Q, M)``."""

    anchors: torch.Tensor
    query: torch.Tensor
    negative: torch.Tensor
    negative_class: torch.Tensor


def draw_samples(px: PixelSet, *, num_queries: int, num_negatives: int, temperature: float,
                 generator: torch.Generator | None = None) -> Draws:
    """Hard queries and negative keys for every present class with hard pixels (three random calls in all)."""
    present = px.present
    anchors = present[px.hard_counts[present] > 0]
    a, dev = len(anchors), px.feats.device
    u_query = torch.rand(a, num_queries, device=dev, generator=generator)
    query = px.hard_pos[_uniform_index(u_query, px.hard_starts[anchors, None], px.hard_counts[anchors, None])]
    probs = negative_class_probs(px.protos, present, anchors, temperature)
    neg_cls = torch.multinomial(probs, num_queries * num_negatives, replacement=True, generator=generator)
    neg_cls = neg_cls.view(a, num_queries, num_negatives)
    u_neg = torch.rand(a, num_queries, num_negatives, device=dev, generator=generator)
    negative = _uniform_index(u_neg, px.starts[neg_cls], px.counts[neg_cls])
    return Draws(anchors, query, negative, neg_cls)


def loss_from_draws(px: PixelSet, draws: Draws, temperature: float) -> torch.Tensor:
    """``sum_c CE([cos(q, r_c), cos(q, k_1..M)] / tau, 0) / K`` (Eq. 2) for given draws; gradient through queries."""
    k = len(px.present)
    unit = F.normalize(px.feats, dim=1)
    q = unit[draws.query]  # (A, Q, D), with gradient
    pos = F.normalize(px.protos[draws.anchors], dim=1)  # (A, D), detached class means
    neg = unit.detach()[draws.negative]  # (A, Q, M, D), detached
    l_pos = torch.einsum("aqd,ad->aq", q, pos)[..., None]
    l_neg = torch.einsum("aqd,aqmd->aqm", q, neg)
    logits = torch.cat([l_pos, l_neg], dim=-1) / temperature  # positive at index 0
    per_anchor = (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean(dim=1)  # CE with target 0, mean over queries
    return per_anchor.sum() / k


def reco_loss(rep: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, prob: torch.Tensor, *,
              hard_threshold: float = 0.97, temperature: float = 0.5, num_queries: int = 256,
              num_negatives: int = 512, generator: torch.Generator | None = None) -> torch.Tensor:
    """ReCo loss of one batch. ``rep (B, D, h, w)`` (the representation head's output), ``labels (B, h, w)`` class ids
    at the same resolution, ``valid (B, h, w)`` bool (ignored and low-confidence pixels False), ``prob (B, C, h, w)``
    the student's softmax (detached). Returns a scalar; with fewer than 2 classes it is ``0 * rep.sum()`` (zero,
    still connected to the graph so DDP sees every parameter used).

    For every class ``c`` present among the valid pixels of the batch (labelled pixels, and unlabelled pixels whose
    pseudo-label confidence is >= delta_w):

    - the positive key is the class mean ``r_c = mean_{p in c} r_p`` of the representations (detached);
    - the queries are **hard** pixels of ``c`` (the predicted ``prob_c < delta_s`` = 0.97): ``num_queries`` (256)
      drawn uniformly with replacement;
    - each query gets ``num_negatives`` (512) negative keys: the class of each is drawn from the class-relation graph
      ``P(j | c) = softmax_{j != c, j present}( cos(r_c, r_j) / tau )`` (Eq. 3), the pixel uniformly within class
      ``j`` (detached);
    - ``l_c = CE( [cos(q, r_c), cos(q, k_1), ..., cos(q, k_512)] / tau, target 0 )`` averaged over the queries
      (Eq. 2).

    The loss is ``sum_c l_c / K`` with ``K`` the number of present classes (a class without hard queries adds 0 but
    still counts in ``K``, as the authors' code divides), and 0 when fewer than 2 classes are present. Only the
    queries carry gradient. The authors loop over classes in Python and draw negative pixels with NumPy per query;
    here one ``torch.multinomial`` over a (classes x classes) probability table draws every negative class, one
    ``torch.rand`` every position, and one gather + one batched dot product give every logit.

    Memory: the gathered negatives are ``K * num_queries * num_negatives * rep_dim`` floats (the same the authors'
    graph keeps, one class at a time): 2.8 GB at the paper's values with 21 classes; the CPU demo uses fewer queries.
    """
    zero = rep.sum() * 0.0
    if not bool(valid.any()):
        return zero
    px = gather_pixels(rep, labels, valid, prob.detach(), hard_threshold)
    if len(px.present) < 2 or int(px.hard_counts.sum()) == 0:
        return zero
    draws = draw_samples(px, num_queries=num_queries, num_negatives=num_negatives, temperature=temperature,
                         generator=generator)
    return loss_from_draws(px, draws, temperature) + zero
