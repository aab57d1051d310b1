"""Stage ``unsup_seg``: unsupervised semantic segmentation from a pretrained model's clusters (SlotCon §4).

The model's clusters (:class:`components.transfer.unsup.clusters.ClusterHead`) are matched to the val split's classes
over one confusion matrix (Hungarian: the headline mIoU); a randomly initialised model of the same method is the
baseline (:func:`run_unsup_seg`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.data.segmentation.layouts import CURATED_LIST, detect_layout
from components.data.loading.ledger import loss_details
from components.data.segmentation.sources import open_source
from components.data.shards.index import shards_root
from components.errors import UserError
from components.pretrain.registry import open_pretrained
from components.stage import Arg, Stage
from components.tracking import Tracker
from components.transfer.seg_metrics import (
    confusion_matrix,
    hungarian_match,
    majority_match,
    matched_metrics,
)
from components.transfer.unsup.clusters import ClusterHead

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_center_crop(image: torch.Tensor, label: torch.Tensor | None, resolution: int):
    """uint8 ``(3,H,W)`` (+ ``(H,W)`` labels) -> short side ``resolution`` (bilinear / nearest), centre crop R x R."""
    h, w = image.shape[-2:]
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=s < 1)[0].round().clamp(0, 255).to(torch.uint8)
        if label is not None:
            label = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].to(torch.uint8)
    y0, x0 = (nh - resolution) // 2, (nw - resolution) // 2
    image = image[:, y0 : y0 + resolution, x0 : x0 + resolution]
    if label is not None:
        label = label[y0 : y0 + resolution, x0 : x0 + resolution]
    return image, label


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B,3,H,W)`` -> ImageNet-normalised float (what SlotCon's views are)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def batched(samples: Iterable[dict], batch_size: int, resolution: int, with_label: bool = True) -> Iterator[dict]:
    """Samples -> ``{"keys", "images": uint8 (B,3,R,R), "labels": uint8 (B,R,R) | None}`` batches (fixed order)."""
    keys, imgs, lbls = [], [], []
    for s in samples:
        img, lbl = resize_center_crop(s["image"], s.get("label") if with_label else None, resolution)
        keys.append(s["key"])
        imgs.append(img)
        lbls.append(lbl)
        if len(keys) == batch_size:
            yield {"keys": keys, "images": torch.stack(imgs), "labels": torch.stack(lbls) if with_label else None}
            keys, imgs, lbls = [], [], []
    if keys:
        yield {"keys": keys, "images": torch.stack(imgs), "labels": torch.stack(lbls) if with_label else None}


def image_batches(samples_fn, batch_size: int, resolution: int, device: torch.device):
    """``samples_fn()`` -> normalised ``(B, 3, R, R)`` batches on ``device`` (for :meth:`ClusterHead.fit`)."""
    def gen():
        for b in batched(samples_fn(), batch_size, resolution, with_label=False):
            yield normalize(b["images"].to(device))
    return gen


@torch.no_grad()
def assign_clusters(head, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(B,3,H,W)`` uint8 -> ``(B, H', W')`` int64 cluster index: argmax_k of the head's scores, upsampled first.

    ``head`` is a fitted :class:`~components.transfer.unsup.clusters.ClusterHead` (or anything with ``device`` and
    ``scores``); ``size`` defaults to the image size; upsampling the scores (not the argmax) gives smooth boundaries.
    """
    scores = head.scores(normalize(images.to(head.device)))  # (B, K, h, w)
    scores = F.interpolate(scores.float(), size=size or tuple(images.shape[-2:]), mode="bilinear",
                           align_corners=False)
    return scores.argmax(dim=1)


@torch.no_grad()
def cluster_confusion(head, samples: Iterable[dict], *, num_classes: int, resolution: int, batch_size: int,
                      desc: str = "unsup_seg") -> tuple[torch.Tensor, int]:
    """The ``(K, C)`` cluster x class confusion over all ``samples`` (``{"key","image","label"}``) and their count."""
    k = int(head.k)
    conf = torch.zeros(k, num_classes, dtype=torch.int64)
    n, t0 = 0, time.perf_counter()
    for b in tqdm(batched(samples, batch_size, resolution), desc=desc, leave=False, mininterval=5):
        pred = assign_clusters(head, b["images"]).cpu()
        conf += confusion_matrix(pred, b["labels"], k, num_classes)
        n += len(b["keys"])
    log.info("%s: %d images in %.1fs (%.1f img/s)", desc, n, time.perf_counter() - t0,
             n / max(time.perf_counter() - t0, 1e-9))
    return conf, n


def fit_head(model, method, src, cfg, device: torch.device):
    """A :class:`ClusterHead` for ``model`` fitted on the images of ``src`` (prototypes, or k-means with K = the
    number of classes, seed ``cfg.seed``)."""
    head = ClusterHead(model, method, src.num_classes, seed=cfg.seed, mode=cfg.assign)
    return head.fit(image_batches(src.iterate, cfg.batch_size, cfg.resolution, device), len(src))


def score_clusters(conf: torch.Tensor | np.ndarray, class_names: list[str], prefix: str = "") -> dict:
    """Hungarian (headline) and, when K > C, majority-vote metrics of a ``(K, C)`` confusion, flat with ``prefix``."""
    conf = np.asarray(conf)
    k, c = conf.shape
    hung = matched_metrics(conf, hungarian_match(conf), class_names)
    out = {
        f"{prefix}mIoU": hung["mIoU"],
        f"{prefix}pixel_acc": hung["pixel_acc"],
        f"{prefix}mAcc": hung["mAcc"],
        f"{prefix}clusters_used": int((conf.sum(axis=1) > 0).sum()),
        f"{prefix}per_class_IoU": {n: v["IoU"] for n, v in hung["per_class"].items()},
    }
    if k > c:
        maj = matched_metrics(conf, majority_match(conf), class_names)
        out[f"{prefix}majority/mIoU"] = maj["mIoU"]
        out[f"{prefix}majority/pixel_acc"] = maj["pixel_acc"]
    return out


def _source(cfg, shards):
    """The labelled val split: shards (scenes) or ``cfg.data_root`` (COCO-Stuff-27 etc.)."""
    kind = cfg.dataset
    if cfg.data_root and kind == "auto" and detect_layout(cfg.data_root) == "cocostuff":
        if (Path(cfg.data_root) / "curated" / "val2017" / CURATED_LIST).is_file():
            kind = "cocostuff27"  # the paper's protocol whenever the curated lists are there
    return open_source(cfg.data_root, shards, kind, "val", max_lost_fraction=cfg.max_lost_fraction, what="unsup_seg")


def run_unsup_seg(cfg, shards: str | Path | None, checkpoint: str | Path, *, tracker=None,
                  device: str | None = None) -> dict:
    """Hungarian-matched mIoU / pixel acc of the pretrained model's clusters (and of a random one); the metrics.

    Prediction: every val image is resized (short side -> ``resolution``, bilinear) and centre-cropped to ``resolution
    x resolution``; the model's cluster scores ``(B, K, h, w)`` (h = resolution/32) are bilinearly upsampled to the
    label resolution and the cluster with the highest score wins each pixel (argmax over K). The clusters come from
    the checkpoint's method (:class:`components.transfer.unsup.clusters.ClusterHead`): its learned prototypes when it
    has them (SlotCon: the teacher's cosine scores, K = number of prototypes), else spherical k-means with K = the
    number of classes on its dense features (MoCo, SIM); ``unsup.assign: kmeans`` forces k-means for every method.
    Labels get the same resize (nearest) and crop. One ``(K, C)`` cluster x class confusion matrix is accumulated over
    the *whole* val split (ignore 255), then clusters are matched to classes:

    - Hungarian matching (``scipy.optimize.linear_sum_assignment``, maximising the matched pixels): one cluster per
      class; mIoU and pixel accuracy of the matched prediction are the headline figures (the PiCIE/STEGO/SlotCon
      protocol);
    - many-to-one majority mapping (each cluster -> its most overlapped class), reported as ``majority/*`` when K > C:
      it always scores at least as high and rewards over-clustering, so it is a second figure only.

    Baseline: the same method's model randomly initialised with the checkpoint's ``model_kwargs`` (seed
    ``unsup.seed``) through the same path (``random/*``), so the gain of pretraining is visible.

    COCO-Stuff-27 (the paper's benchmark, PiCIE protocol): give ``unsup.data_root`` = a COCO-Stuff 164k root with the
    curated IIC lists (``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt``, 2175 val images) and the stuffthingmaps;
    the 182 fine labels are merged into 27 coarse classes (12 thing + 15 stuff super-categories, PiCIE's
    ``fine_to_coarse``), images and labels are resized to 320 on the short side and centre-cropped to 320x320
    (``resolution: 320``), and Hungarian matching is done once over the whole curated val set. The official SlotCon
    code never released this evaluation; this follows PiCIE's ``eval_coco``/STEGO's data module. The layout is
    recognised by ``components.data.segmentation.layouts`` (``dataset: auto`` picks ``cocostuff27`` when the curated
    list exists).
    """
    tracker = tracker or Tracker()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = _source(cfg, shards)  # cheap layout checks before loading anything heavy
    art, method, model = open_pretrained(checkpoint)
    model = model.to(device).eval()
    kwargs, name = art.model_kwargs, art.method
    c = src.num_classes
    head = fit_head(model, method, src, cfg, device)
    log.info("unsup_seg: %s val (%d images, %d classes), %s (%s, K=%d), resolution %d on %s", src.kind, len(src), c,
             name, head.kind, head.k, cfg.resolution, device)

    metrics: dict = {"method": name, "clusters": head.kind, "num_clusters": head.k, "num_classes": c,
                     "dataset": src.kind, "resolution": cfg.resolution}
    conf, n = cluster_confusion(head, src.iterate(), num_classes=c, resolution=cfg.resolution,
                                batch_size=cfg.batch_size, desc="unsup_seg pretrained")
    if n == 0 or conf.sum() == 0:
        raise UserError(f"{shards if not cfg.data_root else cfg.data_root}: no labelled val pixels to evaluate")
    metrics.update(score_clusters(conf, src.class_names))
    metrics["num_images"] = n
    if cfg.compare_random:  # the same method's model, randomly initialised, through the same path
        torch.manual_seed(cfg.seed)
        rand = method.model_from_kwargs(kwargs).to(device).eval()
        rhead = fit_head(rand, method, src, cfg, device)
        rconf, _ = cluster_confusion(rhead, src.iterate(), num_classes=c, resolution=cfg.resolution,
                                     batch_size=cfg.batch_size, desc="unsup_seg random")
        metrics.update(score_clusters(rconf, src.class_names, "random/"))
        metrics["gain/mIoU"] = metrics["mIoU"] - metrics["random/mIoU"]
    metrics["skipped_samples"] = getattr(src, "skipped", 0)
    if getattr(src, "loss", None) is not None:  # shards: what was lost of the val split, counted against index.json
        metrics.update(loss_details([src.loss]))
    tracker.log_metrics(metrics)
    tracker.log_dict({"confusion": conf.tolist(), "class_names": src.class_names}, "unsup_seg_confusion.json")
    return metrics


def _run_stage(ctx) -> dict:
    return run_unsup_seg(ctx.cfg, shards_root(ctx.args.shards, ctx.args.params), ctx.args.checkpoint, tracker=ctx.tracker)


def _summary(metrics: dict) -> str:
    msg = f"Hungarian mIoU {metrics['mIoU']:.4f} pixel acc {metrics['pixel_acc']:.4f}"
    if "random/mIoU" in metrics:
        msg += f" (random init: mIoU {metrics['random/mIoU']:.4f})"
    return msg


STAGE = Stage(
    name="unsup_seg", section="unsup", run=_run_stage, metrics="metrics/unsup_seg.json", summary=_summary,
    headline=("mIoU",),
    args=(Arg("shards", "data/shards", "shards root (scenes val split with seg.png)"),
          Arg("checkpoint", "models/pretrain/last.pt", "pretrained model (last.pt of any pretrain.method)")),
)
