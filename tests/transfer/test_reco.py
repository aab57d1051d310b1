"""ReCo's regional contrast loss (components/transfer/segment/reco.py) against a plain loop over classes and queries."""
import math

import pytest
import torch
import torch.nn.functional as F

from components.transfer.segment.reco import draw_samples, gather_pixels, negative_class_probs, reco_loss


def _batch(b=3, d=8, h=6, w=7, c=5, seed=0, easy_frac=0.3, invalid_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    rep = torch.randn(b, d, h, w, generator=g)
    labels = torch.randint(0, c, (b, h, w), generator=g)
    valid = torch.rand(b, h, w, generator=g) >= invalid_frac
    logits = torch.randn(b, c, h, w, generator=g)
    easy = torch.rand(b, h, w, generator=g) < easy_frac  # make some pixels confident (>= 0.97) in their own class
    logits = logits + 12.0 * easy[:, None] * F.one_hot(labels, c).permute(0, 3, 1, 2)
    return rep, labels, valid, torch.softmax(logits, 1)


def loop_reference(rep, labels, valid, prob, draws, *, hard_threshold, temperature):
    """The paper's formula, one class and one query at a time (as the authors' code, without its NumPy sampling):
    the draws' positions are translated into each class's own pixel lists (row-major, as ``rep[mask]`` orders them)."""
    b, d, h, w = rep.shape
    c = prob.shape[1]
    feats = rep.permute(0, 2, 3, 1)
    all_feats, hard_feats, hard_global, protos, start = {}, {}, {}, {}, 0
    for k in range(c):  # per class: its valid pixels, its hard pixels, its mean (the positive key)
        mask = valid & (labels == k)
        if mask.sum() == 0:
            continue
        all_feats[k] = feats[mask]
        hard = prob[:, k][mask] < hard_threshold
        hard_feats[k] = all_feats[k][hard]
        hard_global[k] = [start + j for j in range(len(all_feats[k])) if hard[j]]  # sorted-position of each
        protos[k] = all_feats[k].mean(0).detach()
        start += len(all_feats[k])
    starts, offset = {}, 0
    for k in sorted(all_feats):
        starts[k] = offset
        offset += len(all_feats[k])
    total = rep.new_zeros(())
    for a, k in enumerate(draws.anchors.tolist()):
        losses = []
        for qi in range(draws.query.shape[1]):
            q = hard_feats[k][hard_global[k].index(int(draws.query[a, qi]))]
            keys = [protos[k]]
            for mi in range(draws.negative.shape[2]):
                j = int(draws.negative_class[a, qi, mi])
                keys.append(all_feats[j][int(draws.negative[a, qi, mi]) - starts[j]].detach())
            sims = torch.stack([F.cosine_similarity(q, key, dim=0) for key in keys]) / temperature
            losses.append(-torch.log_softmax(sims, 0)[0])
        total = total + torch.stack(losses).mean()
    return total / len(all_feats)


@pytest.mark.parametrize("shape,tau,q,m", [((3, 8, 6, 7, 5), 0.5, 4, 6), ((2, 4, 5, 5, 3), 0.1, 4, 5),
                                           ((4, 6, 4, 6, 7), 1.0, 3, 12)])
def test_loss_equals_the_loop_reference_with_the_same_draws(shape, tau, q, m):
    b, d, h, w, c = shape
    rep, labels, valid, prob = _batch(b, d, h, w, c, seed=c)
    rep_a = rep.clone().requires_grad_(True)
    loss = reco_loss(rep_a, labels, valid, prob, temperature=tau, num_queries=q, num_negatives=m,
                     generator=torch.Generator().manual_seed(7))
    loss.backward()
    # the same draws, taken from a generator in the same state
    px = gather_pixels(rep, labels, valid, prob, 0.97)
    draws = draw_samples(px, num_queries=q, num_negatives=m, temperature=tau,
                         generator=torch.Generator().manual_seed(7))
    rep_b = rep.clone().requires_grad_(True)
    ref = loop_reference(rep_b, labels, valid, prob, draws, hard_threshold=0.97, temperature=tau)
    ref.backward()
    assert len(draws.anchors) >= 2
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(rep_a.grad, rep_b.grad, atol=1e-5, rtol=1e-4)  # gradient through the queries only


def test_negative_classes_follow_softmax_of_prototype_cosines():
    """Chi-square goodness of fit of many draws against softmax_j(cos(r_c, r_j)/tau) over the other present classes."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    c, d = 6, 4
    protos = torch.randn(c, d)
    present = torch.tensor([0, 1, 3, 4, 5])  # class 2 absent
    anchors = torch.tensor([0, 3])
    tau = 0.5
    # pixels: class k has k+2 pixels with feature = its prototype, so the means are exactly ``protos``
    labels = torch.cat([torch.full((k + 2,), k) for k in present.tolist()])
    feats = protos[labels]
    rep = feats.T.reshape(1, d, 1, -1)
    prob = torch.full((1, c, 1, len(labels)), 0.5)  # everything hard
    px = gather_pixels(rep, labels.view(1, 1, -1), torch.ones(1, 1, len(labels), dtype=torch.bool), prob, 0.97)
    torch.testing.assert_close(px.protos[present], protos[present])
    draws = draw_samples(px, num_queries=64, num_negatives=256, temperature=tau,
                         generator=torch.Generator().manual_seed(1))
    assert draws.anchors.tolist() == present.tolist()
    for a, k in enumerate(draws.anchors.tolist()):
        others = [j for j in present.tolist() if j != k]
        sims = torch.tensor([F.cosine_similarity(protos[k], protos[j], dim=0).item() for j in others]) / tau
        expected = torch.softmax(sims, 0)
        drawn = draws.negative_class[a].flatten()
        assert not (drawn == k).any() and not (drawn == 2).any()  # never its own class, never an absent one
        counts = torch.bincount(drawn, minlength=c)[others].double().numpy()
        exp = expected.double().numpy()
        _, p = chisquare(counts, exp / exp.sum() * counts.sum())
        assert p > 1e-3, (k, counts, expected)
        # each negative pixel lies in the class drawn for it
        assert torch.equal(px.labels[draws.negative[a]], draws.negative_class[a])
    probs = negative_class_probs(px.protos, present, anchors, tau)
    assert probs[:, 2].eq(0).all() and probs[0, 0] == 0 and probs[1, 3] == 0
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_queries_are_hard_pixels_of_their_class_and_easy_classes_only_count():
    rep, labels, valid, prob = _batch(seed=3, easy_frac=0.5)
    labels[labels == 4] = 3  # class 4 absent
    prob = prob.clone()
    easy_class = 2  # every pixel of class 2 confident: no hard query, no anchor, but it counts in K
    prob[:, easy_class] = torch.where(labels == easy_class, torch.ones_like(prob[:, 0]), prob[:, easy_class])
    px = gather_pixels(rep, labels, valid, prob, 0.97)
    draws = draw_samples(px, num_queries=50, num_negatives=5, temperature=0.5,
                         generator=torch.Generator().manual_seed(0))
    assert easy_class not in draws.anchors.tolist() and len(px.present) == 4
    for a, k in enumerate(draws.anchors.tolist()):
        q = draws.query[a]
        assert px.hard[q].all() and (px.labels[q] == k).all()
    # hard = prob of the own class < 0.97, exactly
    keep = valid.flatten()
    own = prob.permute(0, 2, 3, 1).reshape(-1, 5)[keep].gather(1, labels.flatten()[keep][:, None]).squeeze(1)
    assert int(px.hard.sum()) == int((own < 0.97).sum())
    # the mean runs over all present classes: scaling check against the per-anchor sum
    from components.transfer.segment.reco import loss_from_draws

    loss = loss_from_draws(px, draws, 0.5)
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_zero_with_fewer_than_two_classes_and_still_connected():
    rep, labels, valid, prob = _batch()
    rep = rep.requires_grad_(True)
    one = torch.zeros_like(labels)
    loss = reco_loss(rep, one, valid, prob, num_queries=4, num_negatives=4, generator=torch.Generator())
    assert loss.item() == 0.0
    loss.backward()
    assert rep.grad is not None and rep.grad.abs().sum() == 0  # part of the graph (DDP sees the head used)
    none_valid = reco_loss(rep, labels, torch.zeros_like(valid), prob, num_queries=4, num_negatives=4)
    assert none_valid.item() == 0.0


def test_draws_are_fixed_by_the_generator():
    rep, labels, valid, prob = _batch()
    kw = dict(num_queries=8, num_negatives=8, temperature=0.5)
    a = reco_loss(rep, labels, valid, prob, generator=torch.Generator().manual_seed(3), **kw)
    b = reco_loss(rep, labels, valid, prob, generator=torch.Generator().manual_seed(3), **kw)
    c = reco_loss(rep, labels, valid, prob, generator=torch.Generator().manual_seed(4), **kw)
    assert a.item() == b.item() and a.item() != c.item()
