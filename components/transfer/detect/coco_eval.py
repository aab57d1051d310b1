"""COCO evaluation with pycocotools: model outputs -> COCO results (RLE masks) -> ``COCOeval`` -> named metrics
(``{"bbox_AP": .., ..., "segm_ARl": ..}``, the 12 summary numbers per type).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.transfer.detect.targets import segmentation_to_rle

# the order of COCOeval.stats (COCOeval.summarize)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def make_coco(
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
) -> COCO:
    """An indexed ground-truth ``COCO`` object from in-memory records (no file; image records, annotations and
    categories as read from the shards); missing ``area`` / ``iscrowd`` / ``id`` get COCO's values."""
    anns = []
    for i, a in enumerate(annotations):
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a.setdefault("id", i + 1)
        if "area" not in a:
            img = next(im for im in images if im["id"] == a["image_id"])
            if a.get("segmentation"):
                a["area"] = float(mask_utils.area(segmentation_to_rle(a["segmentation"], img["height"], img["width"])))
            else:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
        anns.append(a)
    ids = [a["id"] for a in anns]
    if len(set(ids)) != len(ids):  # COCOeval indexes by id: renumber rather than silently merge
        for i, a in enumerate(anns):
            a["id"] = i + 1
    coco = COCO()
    coco.dataset = {
        "images": [dict(im) for im in images],
        "annotations": anns,
        "categories": [dict(c) for c in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def predictions_to_results(
    image_id: int,
    prediction: Mapping[str, Any],
    label_to_cat_id: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """COCO result dicts for one image from a torchvision output (tensors or arrays, on any device): ``boxes`` (N, 4)
    xyxy -> ``bbox`` xywh, ``labels`` mapped back to category ids, ``masks`` (N, 1, H, W) probabilities thresholded at
    ``mask_threshold`` and RLE-encoded as torchvision's reference does."""

    def arr(x):
        return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    boxes = arr(prediction["boxes"]).reshape(-1, 4)
    scores = arr(prediction["scores"]).reshape(-1)
    labels = arr(prediction["labels"]).reshape(-1).astype(np.int64)
    if len(boxes) == 0:
        return []
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    rles = None
    if prediction.get("masks") is not None:
        m = arr(prediction["masks"])
        if m.ndim == 4:  # (N, 1, H, W)
            m = m[:, 0]
        binary = (m > mask_threshold).astype(np.uint8)  # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    out = []
    for i in range(len(boxes)):
        r = {
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id[int(labels[i])]),
            "bbox": [round(float(v), 3) for v in xywh[i]],
            "score": float(scores[i]),
        }
        if rles is not None:
            rle = dict(rles[i])
            rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
            r["segmentation"] = rle
        out.append(r)
    return out


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``coco_gt.loadRes`` that also accepts an empty list (pycocotools indexes ``anns[0]``)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def evaluate(
    coco_gt: COCO,
    results: list[dict],
    iou_types: Iterable[str] = IOU_TYPES,
    *,
    summary: list[str] | None = None,
) -> dict[str, float]:
    """``COCOeval`` for each IoU type; returns ``{f"{iou_type}_{stat}": value}`` for the 12 stats of each (AP in
    [0, 1]; -1 where COCO finds no ground truth in an area range). An empty result list scores 0 instead of crashing
    inside ``COCO.loadRes``.

    ``summary``, when given, receives COCO's printed summary table per type (the stdout is kept off the terminal).
    The segm type needs every result to carry a ``segmentation``.
    """
    metrics: dict[str, float] = {}
    coco_dt = _load_results(coco_gt, results)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type={iou_type!r} must be one of {IOU_TYPES}")
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if summary is not None:
            summary.append(f"[{iou_type}]\n{buf.getvalue()}")
        for name, value in zip(STAT_NAMES, ev.stats):
            metrics[f"{iou_type}_{name}"] = float(value)
    return metrics
