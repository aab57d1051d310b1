"""The checks one COCO annotation must pass before anything rasterises it: ``prepare`` drops (and counts by reason)
the annotations that fail, so shards never hold them, and the readers that turn annotations into masks (``detect``)
run the same check against the decoded image before pycocotools is called.

What is refused, and why: a non-finite number (a NaN polygon makes pycocotools' rasteriser crash the process); a
polygon part with fewer than 6 coordinates or an odd count; a polygon coordinate outside ``[-1, 2] x`` the image's
width (x) or height (y) (the rasteriser allocates in proportion to the polygon's extent); an RLE whose ``size`` is not
the image's ``[height, width]`` (decoding allocates ``size[0] * size[1]`` bytes whatever the image is); RLE counts
that are not non-negative integers summing to ``height * width``, uncompressed or as a compressed string (a shorter
run list leaves pycocotools' buffer partly unwritten, a longer one writes past it); a ``bbox`` that is not 4 finite numbers with width and
height > 0.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping

#: why an annotation was dropped (the keys of ``annotations_skipped``)
REASONS = ("bad_record", "non_finite", "bad_bbox", "bad_polygon", "polygon_out_of_range", "rle_size_mismatch",
           "bad_rle", "bad_segmentation", "image_size_unknown")
#: polygon coordinates must lie in [LOW, HIGH] x the image side (COCO's polygons reach at most a pixel outside)
POLYGON_RANGE = (-1.0, 2.0)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def rle_string_length(s: str, limit: int) -> int | None:
    """Pixels a compressed COCO RLE string covers (pycocotools' ``rleFrString`` in Python), or None when the string is
    malformed (a character outside the alphabet, a run cut short, a negative count) or covers more than ``limit``:
    decoding stops as soon as it passes ``limit``, so a crafted string costs no more than reading it."""
    counts: list[int] = []
    total, p, n = 0, 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the last run's continuation bit promises more characters
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
            if k > 13:
                return None  # more than 64 bits: no real count
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
        total += x
        if total > limit:
            return None
    return total


def _check_polygon(segm: list, height: int, width: int) -> str | None:
    if not segm:
        return "bad_polygon"
    lo, hi = POLYGON_RANGE
    for part in segm:
        if not isinstance(part, list) or len(part) < 6 or len(part) % 2 or not all(_number(v) for v in part):
            return "bad_polygon"
        if not all(math.isfinite(v) for v in part):
            return "non_finite"
        xs, ys = part[0::2], part[1::2]
        if min(xs) < lo * width or max(xs) > hi * width or min(ys) < lo * height or max(ys) > hi * height:
            return "polygon_out_of_range"
    return None


def _check_rle(segm: Mapping[str, Any], height: int, width: int) -> str | None:
    size, counts = segm.get("size"), segm.get("counts")
    if not isinstance(size, list) or len(size) != 2 or not all(_number(v) for v in size):
        return "bad_rle"
    if not all(math.isfinite(v) for v in size):
        return "non_finite"
    if [int(size[0]), int(size[1])] != [height, width] or size[0] != int(size[0]) or size[1] != int(size[1]):
        return "rle_size_mismatch"
    if isinstance(counts, list):  # uncompressed (crowd regions): runs summing to every pixel
        if not all(_number(v) for v in counts):
            return "bad_rle"
        if not all(math.isfinite(v) for v in counts):
            return "non_finite"
        if any(v < 0 or v != int(v) for v in counts) or sum(counts) != height * width:
            return "bad_rle"
        return None
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            return "bad_rle"
    if isinstance(counts, str):
        return None if rle_string_length(counts, height * width) == height * width else "bad_rle"
    return "bad_rle"


def check_annotation(ann: Any, height: int | None, width: int | None) -> str | None:
    """Why ``ann`` cannot be used on an image of ``height`` x ``width`` (a reason of :data:`REASONS`), or None.

    ``height``/``width`` None (the image record has no size): an annotation with a segmentation is refused
    (``image_size_unknown``), since its extent cannot be bounded."""
    if not isinstance(ann, Mapping):
        return "bad_record"
    cid = ann.get("category_id")
    if not _number(cid) or not _finite(cid) or cid != int(cid):
        return "non_finite" if _number(cid) and not math.isfinite(cid) else "bad_record"
    for k in ("area", "iscrowd"):
        if k in ann and ann[k] is not None and not _finite(ann[k]):
            return "non_finite" if _number(ann[k]) else "bad_record"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        return "bad_bbox"
    if not all(math.isfinite(v) for v in bbox):
        return "non_finite"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "bad_bbox"
    segm = ann.get("segmentation")
    if not segm:
        return None  # no mask: the box stands in for it
    if height is None or width is None or height <= 0 or width <= 0:
        return "image_size_unknown"
    if isinstance(segm, list):
        return _check_polygon(segm, int(height), int(width))
    if isinstance(segm, Mapping):
        return _check_rle(segm, int(height), int(width))
    return "bad_segmentation"


def image_sizes(images: Iterable[Any]) -> dict[Any, tuple[int | None, int | None]]:
    """``{image id: (height, width)}`` of COCO image records (None where a record has no positive integer size)."""
    out: dict[Any, tuple[int | None, int | None]] = {}
    for rec in images:
        if isinstance(rec, Mapping) and "id" in rec:
            h, w = rec.get("height"), rec.get("width")
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
            out[rec["id"]] = (h, w) if ok else (None, None)
    return out


def filter_annotations(annotations: Iterable[Any], sizes: Mapping[Any, tuple[int | None, int | None]]
                       ) -> tuple[list[Any], Counter]:
    """``(kept, {reason: dropped})``: the annotations that pass :func:`check_annotation` on their image's size.
    Annotations of images ``sizes`` does not list are kept as they are (the caller counts them as orphans)."""
    kept: list[Any] = []
    dropped: Counter = Counter()
    for ann in annotations:
        img = ann.get("image_id") if isinstance(ann, Mapping) else None
        if isinstance(ann, Mapping) and (not isinstance(img, (int, str)) or img not in sizes):
            kept.append(ann)
            continue
        reason = check_annotation(ann, *sizes[img]) if img is not None else "bad_record"
        if reason is None:
            kept.append(ann)
        else:
            dropped[reason] += 1
    return kept, dropped
