"""COCO annotations of one image -> the target dict torchvision's Mask R-CNN trains on, following torchvision's
reference training (``references/detection/coco_utils.py``); masks decoded with pycocotools from any of COCO's three
segmentation encodings, each checked first against the image's size (a NaN polygon crashes pycocotools' rasteriser,
an RLE claiming a larger size allocates that size: :mod:`components.data.prepare.annotations`); :func:`category_maps` maps COCO's non-contiguous category ids to labels ``1..C`` and back.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from components.data.prepare.annotations import check_annotation

# counters every conversion reports (summed over a split by the caller)
COUNT_KEYS = ("annotations", "kept", "crowd", "zero_area", "unknown_category", "no_segmentation", "invalid")


def category_maps(categories: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], dict[int, int]]:
    """COCO category ids -> contiguous labels ``1..C`` (sorted by id, as torchvision/detectron2 do) and back."""
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in {ids}")
    cat_to_label = {cid: i + 1 for i, cid in enumerate(ids)}
    return cat_to_label, {v: k for k, v in cat_to_label.items()}


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict:
    """One annotation's ``segmentation`` (polygon list, uncompressed RLE as crowds use, or compressed RLE) ->
    compressed RLE.

    Same branches as ``pycocotools.coco.COCO.annToRLE``, after :func:`check_annotation` on this image's size (a
    ValueError names what is wrong): pycocotools never sees a segmentation it could crash on or that claims more
    pixels than the image has.
    """
    reason = check_annotation({"category_id": 0, "bbox": [0, 0, 1, 1], "segmentation": segm}, height, width)
    if reason is not None:
        raise ValueError(f"segmentation refused ({reason}) for a {height}x{width} image")
    if isinstance(segm, list):  # polygons: one object may have several parts -> merge
        rles = mask_utils.frPyObjects(segm, height, width)
        return mask_utils.merge(rles)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions)
        return mask_utils.frPyObjects(segm, height, width)
    if isinstance(segm, dict) and "counts" in segm:  # already compressed
        return segm
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def segmentation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 {0, 1} mask of one annotation's segmentation."""
    return mask_utils.decode(segmentation_to_rle(segm, height, width))


def usable_annotations(annotations: Iterable[Any], height: int, width: int) -> tuple[list[Any], int]:
    """``(the annotations that pass check_annotation on a height x width image, how many did not)``: a reader's
    guard for shards written before ``prepare`` checked annotations, or by another writer."""
    anns = list(annotations)
    kept = [a for a in anns if check_annotation(a, height, width) is None]
    return kept, len(anns) - len(kept)


def has_valid_annotation(annotations: Iterable[Mapping[str, Any]]) -> bool:
    """torchvision reference (``_coco_remove_images_without_annotations``): an image trains only if some annotation
    has a box > 1 px in both sides."""
    anns = list(annotations)
    if not anns:
        return False
    return not all(any(o <= 1 for o in a["bbox"][2:]) for a in anns)


def coco_to_target(
    annotations: Sequence[Mapping[str, Any]],
    *,
    height: int,
    width: int,
    cat_to_label: Mapping[int, int],
    image_id: int = -1,
) -> tuple[dict[str, torch.Tensor], Counter]:
    """Training target of one image and what was dropped.

    Returns ``(target, counts)`` where ``target`` has ``boxes`` (N, 4) float32 xyxy in pixels, ``labels`` (N,) int64
    in ``1..C``, ``masks`` (N, H, W) uint8, ``area`` (N,) float32, ``iscrowd`` (N,) int64 (all 0), ``image_id``
    () int64; ``counts`` counts annotations seen / kept / crowd / zero_area / unknown_category / no_segmentation.
    An annotation without a segmentation keeps its box, with the box filled as its mask (counted).

    As torchvision's ``ConvertCocoPolysToMask``: crowd annotations (``iscrowd=1``) are left out; boxes go from COCO
    ``[x, y, w, h]`` to ``[x1, y1, x2, y2]``, are clamped to the image, and boxes with zero width or height are dropped
    (and counted, so nothing is lost silently).
    """
    counts: Counter = Counter({k: 0 for k in COUNT_KEYS})
    boxes, labels, masks, areas = [], [], [], []
    for ann in annotations:
        counts["annotations"] += 1
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1  # reference: crowd regions are not training targets
            continue
        cid = int(ann["category_id"])
        if cid not in cat_to_label:
            counts["unknown_category"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if not (x2 > x1 and y2 > y1):
            counts["zero_area"] += 1
            continue
        segm = ann.get("segmentation")
        if segm:
            m = segmentation_to_mask(segm, height, width)
        else:
            counts["no_segmentation"] += 1
            m = np.zeros((height, width), dtype=np.uint8)
            m[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = 1
        boxes.append([x1, y1, x2, y2])
        labels.append(cat_to_label[cid])
        masks.append(m)
        areas.append(float(ann.get("area", w * h)))
        counts["kept"] += 1
    n = len(boxes)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, height, width), dtype=torch.uint8),
        "area": torch.tensor(areas, dtype=torch.float32),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "image_id": torch.tensor(int(image_id), dtype=torch.int64),
    }
    return target, counts


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Horizontal flip of an image ``(C, H, W)`` and its target (boxes mirrored about the width, masks flipped)."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    out["boxes"] = boxes
    out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out
