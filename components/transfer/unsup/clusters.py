"""Dense cluster assignments of any pretrained model, for unsupervised segmentation and the slot pictures.

:class:`ClusterHead` turns a method's learned prototypes, or k-means on its dense features, into K cluster scores.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CHUNK = 65536  # rows per distance block in k-means (a (CHUNK, K) block at a time)
MAX_POINTS = 200_000  # features used to fit k-means; more images -> fewer positions per image


@torch.no_grad()
def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for cosine distance ``1 - x·c`` (x L2-normalised rows): (K, D) initial centroids."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        p = dist.double().cpu()
        idx = int(torch.multinomial(p / p.sum(), 1, generator=gen)) if p.sum() > 0 else int(
            torch.randint(n, (1,), generator=gen))
        centers.append(x[idx])
        dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
    return torch.stack(centers)


@torch.no_grad()
def _assign(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), best similarity (N,)) of every row, computed ``chunk`` rows at a time."""
    labels, best = [], []
    for part in x.split(chunk):
        sim, lab = (part @ centers.t()).max(dim=1)
        labels.append(lab)
        best.append(sim)
    return torch.cat(labels), torch.cat(best)


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50, restarts: int = 3,
                     chunk: int = CHUNK) -> torch.Tensor:
    """Spherical k-means (Lloyd on the unit sphere) of the rows of ``x`` (N, D): (K, D) unit centroids.

    Deterministic for a given ``seed`` (a CPU generator draws every random choice). An empty cluster is re-seeded
    with the row farthest from its centroid. Stops when no assignment changes or after ``iters`` steps; of
    ``restarts`` runs the one with the highest total similarity (lowest cosine inertia) wins.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means: {n} feature vectors for {k} clusters")
    x = F.normalize(x.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    best_c, best_score = None, -float("inf")
    for _ in range(restarts):
        c = _kmeans_pp(x, k, gen)
        labels = None
        for _ in range(iters):
            new, sim = _assign(x, c, chunk)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():  # the worst-fitting rows become the empty clusters' centroids
                far = torch.argsort(sim)[: empty.numel()]
                sums[empty] = x[far]
            c = F.normalize(sums, dim=1)
        score = float(_assign(x, c, chunk)[1].sum())
        if score > best_score:
            best_c, best_score = c, score
    return best_c


class ClusterHead:
    """K cluster scores of a pretrained model's dense output.

    ``method`` is the :class:`~components.pretrain.method.PretrainMethod` subclass of the model (its two static hooks
    are used). Call :meth:`fit` once with the images to segment; then :meth:`scores` gives ``(B, K, h, w)``.

    Every pretraining method answers two questions (:class:`components.pretrain.method.PretrainMethod`):
    ``prototype_scores(model, images)`` -- ``(B, K, h, w)`` scores against *learned* prototypes (SlotCon), or None --
    and ``dense_features(model, images)`` -- ``(B, D, h, w)``. This head turns either into K cluster scores:

    - **prototypes** when the method has them: the scores as they are (K = the number of prototypes);
    - **k-means** otherwise (MoCo, SIM, a random trunk): spherical k-means (cosine; the features are L2-normalised)
      with K = the number of classes on the dense features of the images to segment (transductive, labels unused, as
      the usual "k-means on features" baselines), k-means++ seeding from a fixed seed, a few restarts (the lowest
      inertia wins), on the model's device, in chunks of rows so memory stays bounded; the scores are then the cosine
      similarities of every feature to the centroids.

    Either way the downstream protocol is the same (upsample the scores, argmax, Hungarian matching), so a method with
    prototypes and one without are measured by one ruler.
    """

    def __init__(self, model: torch.nn.Module, method, num_clusters: int, *, seed: int = 0,
                 mode: str = "auto", max_points: int = MAX_POINTS):
        if mode not in ("auto", "kmeans"):
            raise ValueError(f"mode={mode!r} must be 'auto' or 'kmeans'")
        self.model, self.method, self.num_clusters = model, method, int(num_clusters)
        self.seed, self.mode, self.max_points = seed, mode, max_points
        self.kind: str | None = None  # "prototypes" | "kmeans", known after fit
        self.centers: torch.Tensor | None = None  # (K, D) k-means centroids
        self.k = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, h, w) dense features (float32)."""
        return self.method.dense_features(self.model, x).float()

    @torch.no_grad()
    def fit(self, images: Callable[[], Iterable[torch.Tensor]], num_images: int | None = None) -> "ClusterHead":
        """``images()`` yields (B, 3, H, W) normalised batches on the model's device (a fixed order). Uses the
        method's prototypes if it has them (``mode: auto``); else fits k-means on a seeded subsample of the
        features of every image (at most ``max_points`` in all)."""
        it = iter(images())
        first = next(it, None)
        if first is None:
            raise ValueError("no images to cluster")
        if self.mode == "auto":
            s = self.method.prototype_scores(self.model, first)
            if s is not None:
                self.kind, self.k = "prototypes", int(s.shape[1])
                return self
        if self.num_clusters < 2:
            raise ValueError(f"k-means needs at least 2 clusters (got {self.num_clusters}): the method has no "
                             "prototypes; give the number of clusters")
        self.kind, self.k = "kmeans", self.num_clusters
        gen = torch.Generator().manual_seed(self.seed)
        per_image = None
        rows = []
        for batch in _chain(first, it):
            f = F.normalize(self.features(batch), dim=1)  # (B, D, h, w)
            b, d, h, w = f.shape
            if per_image is None:
                per_image = max(1, min(h * w, self.max_points // max(num_images or 1, 1)))
            f = f.permute(0, 2, 3, 1).reshape(b, h * w, d)
            if per_image < h * w:
                idx = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in range(b)])
                f = torch.gather(f, 1, idx.to(f.device)[..., None].expand(-1, -1, d))
            rows.append(f.reshape(-1, d))
        x = torch.cat(rows)
        self.centers = spherical_kmeans(x, self.k, seed=self.seed)
        log.info("k-means: %d clusters on %d feature vectors of dim %d", self.k, x.shape[0], x.shape[1])
        return self

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K, h, w) scores (prototype scores, or cosine to the centroids)."""
        if self.kind is None:
            raise RuntimeError("ClusterHead.fit must run first")
        if self.kind == "prototypes":
            return self.method.prototype_scores(self.model, x).float()
        f = F.normalize(self.features(x), dim=1)
        return torch.einsum("bdhw,kd->bkhw", f, self.centers.to(f.device))


def _chain(first, rest):
    yield first
    yield from rest
