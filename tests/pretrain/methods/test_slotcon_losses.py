"""Each SlotCon loss equals a plain loop-based implementation of the paper's formula (several shapes, temperatures,
K) to 1e-5, including the slot keep masks, the x2τ scaling, the centering and the distributed gather."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from components.pretrain.methods.slotcon.grouping import pool_slots, prototype_scores, slot_keep_mask
from components.pretrain.methods.slotcon.losses import group_loss, slot_contrastive_loss, update_center



# ------------------------------------------------------------------------------------------------------ references
def ref_group_loss(s, t, c, tau_s, tau_t):
    """mean over pixels of Σ_k −softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k, one pixel at a time."""
    b, k, h, w = s.shape
    total, n = 0.0, 0
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                sv = [s[bi, kk, i, j].item() / tau_s for kk in range(k)]
                tv = [(t[bi, kk, i, j].item() - c[0, kk].item()) / tau_t for kk in range(k)]
                ls = math.log(sum(math.exp(x - max(sv)) for x in sv)) + max(sv)
                zt = sum(math.exp(x - max(tv)) for x in tv)
                total += sum(-(math.exp(tv[kk] - max(tv)) / zt) * (sv[kk] - ls) for kk in range(k))
                n += 1
    return total / n


def ref_keep(scores):
    """kept[b][k]: prototype k is the argmax of at least one pixel of image b."""
    b, k, h, w = scores.shape
    kept = [[False] * k for _ in range(b)]
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                vals = [scores[bi, kk, i, j].item() for kk in range(k)]
                kept[bi][vals.index(max(vals))] = True
    return kept


def ref_slot_loss(q_slots, k_slots, s_scores, t_scores, tau, predictor=None):
    """InfoNCE over kept slots: positive = same image and prototype, negatives = every other kept key; × 2τ."""
    b, k, d = q_slots.shape
    kq, kk_ = ref_keep(s_scores), ref_keep(t_scores)
    keys = [(bi, ki) for bi in range(b) for ki in range(k) if kk_[bi][ki]]
    losses = []
    for bi in range(b):
        for ki in range(k):
            if not (kq[bi][ki] and kk_[bi][ki]):
                continue
            q = q_slots[bi, ki]
            if predictor is not None:
                q = predictor(q.unsqueeze(0))[0]
            q = q / q.norm()
            logits = []
            for bj, kj in keys:
                key = k_slots[bj, kj] / k_slots[bj, kj].norm()
                logits.append((q @ key).item() / tau)
            pos = logits[keys.index((bi, ki))]
            m = max(logits)
            losses.append(-(pos - (m + math.log(sum(math.exp(x - m) for x in logits)))))
    return 2 * tau * sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------------------ group loss
@pytest.mark.parametrize(
    "shape,tau_s,tau_t", [((2, 5, 3, 3), 0.1, 0.07), ((3, 16, 4, 2), 0.2, 0.04), ((1, 64, 5, 5), 0.1, 0.07)]
)
def test_group_loss_matches_reference(shape, tau_s, tau_t):
    g = torch.Generator().manual_seed(sum(shape))
    s = torch.rand(shape, generator=g) * 2 - 1
    t = torch.rand(shape, generator=g) * 2 - 1
    c = torch.rand(1, shape[1], generator=g) * 0.2
    got = group_loss(s, t, c, tau_s, tau_t)
    assert abs(got.item() - ref_group_loss(s, t, c, tau_s, tau_t)) < 1e-5 * max(1.0, abs(got.item()))


def test_group_loss_gradient_only_to_student():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, requires_grad=True)
    group_loss(s, t, torch.zeros(1, 4), 0.1, 0.07).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_update_center_matches_reference_and_all_reduce():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(4, 6, 3, 2, generator=g), torch.randn(4, 6, 3, 2, generator=g)
    c = torch.randn(1, 6, generator=g)
    new = update_center(c, (t1, t2), 0.9)
    ref = [0.9 * c[0, k].item() + 0.1 * sum(x[b, k, i, j].item() for x in (t1, t2) for b in range(4)
                                            for i in range(3) for j in range(2)) / 48 for k in range(6)]
    torch.testing.assert_close(new, torch.tensor([ref]), atol=1e-6, rtol=1e-6)
    # two "ranks" holding halves of the batch, all_reduce = mean of their batch means -> the full-batch center
    halves = [(t1[:2], t2[:2]), (t1[2:], t2[2:])]
    means = [torch.cat(h).mean(dim=(0, 2, 3)).unsqueeze(0) for h in halves]
    fake_all_reduce = lambda x: (means[0] + means[1]) / 2  # noqa: E731
    for h in halves:
        torch.testing.assert_close(update_center(c, h, 0.9, fake_all_reduce), new, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ slot loss
def _slot_inputs(b, k, d, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, k, d, generator=g),
        torch.randn(b, k, d, generator=g),
        torch.randn(b, k, h, w, generator=g),
        torch.randn(b, k, h, w, generator=g),
    )


@pytest.mark.parametrize("b,k,d,h,w,tau", [(2, 8, 4, 2, 2, 0.2), (3, 16, 8, 3, 3, 0.1), (4, 6, 5, 4, 3, 0.5)])
@pytest.mark.parametrize("with_predictor", [False, True])
def test_slot_loss_matches_reference(b, k, d, h, w, tau, with_predictor):
    q, kk, ss, ts = _slot_inputs(b, k, d, h, w, seed=b * 100 + k)
    torch.manual_seed(0)
    predictor = torch.nn.Linear(d, d) if with_predictor else None
    got = slot_contrastive_loss(q, kk, ss, ts, temperature=tau, predictor=predictor)
    ref = ref_slot_loss(q, kk, ss, ts, tau, predictor)
    assert abs(got.item() - ref) < 1e-5 * max(1.0, abs(ref))
    # the keep masks really drop slots here (more prototypes than pixels), so the mask logic is exercised
    kept = slot_keep_mask(ss) & slot_keep_mask(ts)
    assert 0 < kept.sum() < b * k
    assert torch.equal(slot_keep_mask(ss), torch.tensor(ref_keep(ss)))


def test_slot_loss_scaling_is_two_tau():
    q, kk, ss, ts = _slot_inputs(2, 4, 3, 3, 3, seed=1)
    tau = 0.3
    # all logits equal (identical unit keys): InfoNCE = log(#keys); the loss is that times 2τ
    kk = torch.ones_like(kk)
    n_keys = int(slot_keep_mask(ts).sum())
    got = slot_contrastive_loss(q, kk, ss, ts, temperature=tau)
    assert abs(got.item() - 2 * tau * math.log(n_keys)) < 1e-5


def test_slot_loss_gradients_reach_student_and_predictor_only():
    q, kk, ss, ts = _slot_inputs(3, 8, 4, 2, 2, seed=2)
    q.requires_grad_(True)
    kk.requires_grad_(True)
    pred = torch.nn.Linear(4, 4)
    slot_contrastive_loss(q, kk, ss, ts, predictor=pred).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and kk.grad is None
    assert pred.weight.grad is not None


def test_slot_loss_nothing_kept_is_zero_with_grad_path():
    q, kk, ss, ts = _slot_inputs(2, 4, 3, 1, 1, seed=3)
    ss = torch.zeros_like(ss)
    ss[:, 0] = 1.0  # student picks prototype 0 everywhere
    ts = torch.zeros_like(ts)
    ts[:, 1] = 1.0  # teacher picks prototype 1 everywhere -> empty intersection
    q.requires_grad_(True)
    pred = torch.nn.Linear(3, 3)
    loss = slot_contrastive_loss(q, kk, ss, ts, predictor=pred)
    assert loss.item() == 0.0
    loss.backward()
    assert pred.weight.grad is not None and q.grad is not None


class ThreadGather:
    """all_gather across threads standing in for ranks: each call posts its tensor, waits, concatenates in rank
    order (what components.dist.gather_cat does across processes)."""

    def __init__(self, world):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), {}

    def for_rank(self, rank):
        calls = [0]

        def gather(t):
            key = calls[0]
            calls[0] += 1
            self.slots[(key, rank)] = t.clone()
            self.barrier.wait()
            out = torch.cat([self.slots[(key, r)] for r in range(self.world)])
            self.barrier.wait()
            return out

        return gather


@pytest.mark.parametrize("with_predictor", [False, True])
def test_slot_loss_gather_two_ranks_equals_full_batch(with_predictor):
    b, k, d, h, w, tau = 6, 8, 5, 2, 3, 0.2
    q, kk, ss, ts = _slot_inputs(b, k, d, h, w, seed=11)
    torch.manual_seed(0)
    predictor = torch.nn.Linear(d, d) if with_predictor else None
    full = slot_contrastive_loss(q, kk, ss, ts, temperature=tau, predictor=predictor)
    group, results = ThreadGather(2), {}

    def run(rank):
        sl = slice(rank * b // 2, (rank + 1) * b // 2)
        results[rank] = slot_contrastive_loss(
            q[sl], kk[sl], ss[sl], ts[sl], temperature=tau, predictor=predictor, gather=group.for_rank(rank)
        )

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    # each rank averages over its own queries (DDP then averages ranks): weight by query counts to get the full mean
    kept = (slot_keep_mask(ss) & slot_keep_mask(ts)).view(2, -1).sum(1).float()
    combined = (results[0] * kept[0] + results[1] * kept[1]) / kept.sum()
    assert abs(combined.item() - full.item()) < 1e-5
    # and without gathering, the negatives of the other rank are missing: a different (smaller) loss
    alone = slot_contrastive_loss(q[:3], kk[:3], ss[:3], ts[:3], temperature=tau, predictor=predictor)
    assert abs(alone.item() - results[0].item()) > 1e-4


# ------------------------------------------------------------------------------------------------------ grouping
def test_grouping_matches_reference():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, 3, 2, generator=g)
    protos = torch.randn(7, 5, generator=g)
    dots = prototype_scores(z, protos)
    slots = pool_slots(z, dots, 0.07)
    for b in range(2):
        for kk in range(7):
            for i in range(3):
                for j in range(2):
                    ref = F.cosine_similarity(protos[kk], z[b, :, i, j], dim=0)
                    assert abs(dots[b, kk, i, j].item() - ref.item()) < 1e-5
            attn = torch.softmax(dots[b] / 0.07, dim=0)[kk] + 1e-6  # (h, w)
            ref_slot = sum(z[b, :, i, j] * attn[i, j] for i in range(3) for j in range(2)) / attn.sum()
            torch.testing.assert_close(slots[b, kk], ref_slot, atol=1e-5, rtol=1e-5)


def test_rank_without_queries_still_gathers():
    """A rank with no kept query must still join the all_gather (else the other ranks hang) and return 0."""
    b, k, d, h, w = 4, 6, 5, 2, 2
    q, kk, ss, ts = _slot_inputs(b, k, d, h, w, seed=21)
    ss[:2] = 0.0
    ss[:2, 0] = 1.0  # rank 0: student picks prototype 0 everywhere ...
    ts[:2] = 0.0
    ts[:2, 1] = 1.0  # ... teacher prototype 1: no query kept on rank 0, but its keys (prototype 1) are negatives
    group, results = ThreadGather(2), {}

    def run(rank):
        sl = slice(rank * 2, rank * 2 + 2)
        results[rank] = slot_contrastive_loss(q[sl], kk[sl], ss[sl], ts[sl], gather=group.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert not any(t.is_alive() for t in threads), "a rank hung in gather"
    assert results[0].item() == 0.0
    full = slot_contrastive_loss(q, kk, ss, ts)
    assert abs(results[1].item() - full.item()) < 1e-5  # all full-batch queries live on rank 1


@pytest.mark.parametrize("pad_to", [None, 3])
def test_unequal_rank_batches_gather_with_or_without_padding(pad_to):
    """Ranks holding 3 and 2 images (one dropped at decode): padding to the configured per-rank batch (no size
    exchange, no host sync) gives the same keys, hence the same per-rank losses, as exchanging sizes first."""
    b, k, d, h, w, tau = 5, 8, 5, 2, 3, 0.2
    q, kk, ss, ts = _slot_inputs(b, k, d, h, w, seed=31)
    full = slot_contrastive_loss(q, kk, ss, ts, temperature=tau)
    group, results = ThreadGather(2), {}
    parts = [slice(0, 3), slice(3, 5)]

    def run(rank):
        sl = parts[rank]
        results[rank] = slot_contrastive_loss(q[sl], kk[sl], ss[sl], ts[sl], temperature=tau,
                                              gather=group.for_rank(rank), pad_to=pad_to)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    kept = torch.stack([(slot_keep_mask(ss[sl]) & slot_keep_mask(ts[sl])).sum() for sl in parts]).float()
    combined = (results[0] * kept[0] + results[1] * kept[1]) / kept.sum()
    assert abs(combined.item() - full.item()) < 1e-5
    with pytest.raises(ValueError, match="exceed pad_to"):
        slot_contrastive_loss(q, kk, ss, ts, gather=lambda t: t, pad_to=2)
