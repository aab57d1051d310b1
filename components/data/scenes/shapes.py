"""Geometry of the generated scenes: unit shape outlines, placement, and COCO mask encodings that round-trip exactly.

Every mask written to the COCO JSON is, by construction, what ``COCO.annToMask`` decodes: polygons are rasterised
with pycocotools itself (:func:`rasterize`), pixel-exact outlines are traced along pixel borders
(:func:`trace_polygons`), and anything else is stored as RLE (compressed, or uncompressed for crowds, as COCO does).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def _circle(n: int = 48, r: float = 1.0, a0: float = 0.0, a1: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape_outline(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit-size outline ``(N, 2)`` (x, y), radius ~1, plus an optional hole outline (the ring's)."""
    if shape == "disc":
        return _circle(), None
    if shape == "ring":
        return _circle(), _circle(r=0.55)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), None
    if shape == "triangle":
        return _circle(3, a0=-math.pi / 2, a1=1.5 * math.pi) * [1.0, 1.0] + [0.0, 0.2], None
    if shape == "hexagon":
        return _circle(6), None
    if shape == "ellipse":
        return _circle() * [1.0, 0.55], None
    if shape == "diamond":
        return np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]]), None
    if shape == "cross":
        a, b = 0.3, 0.95
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]]), None
    if shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None
    if shape == "arrow":
        return np.array([[-1.0, -0.3], [0.2, -0.3], [0.2, -0.7], [1.0, 0.0], [0.2, 0.7], [0.2, 0.3], [-1.0, 0.3]]), None
    if shape == "semicircle":
        return _circle(25, a0=0.0, a1=math.pi + 1e-9 + math.pi / 24) * [1.0, 1.0] + [0.0, -0.35], None
    if shape == "lshape":
        return np.array([[-0.8, -0.9], [-0.25, -0.9], [-0.25, 0.35], [0.8, 0.35], [0.8, 0.9], [-0.8, 0.9]]), None
    # --- the "more classes" shapes (num_thing_classes > 12): each outline distinct from all others under rotation
    if shape == "octagon":
        return _circle(8, a0=math.pi / 8, a1=2 * math.pi + math.pi / 8), None
    if shape == "trapezoid":
        return np.array([[-0.45, -0.6], [0.45, -0.6], [0.95, 0.6], [-0.95, 0.6]]), None
    if shape == "parallelogram":
        return np.array([[-0.35, -0.5], [0.95, -0.5], [0.35, 0.5], [-0.95, 0.5]]), None
    if shape == "tshape":
        return np.array([[-0.9, -0.9], [0.9, -0.9], [0.9, -0.45], [0.22, -0.45], [0.22, 0.95], [-0.22, 0.95],
                         [-0.22, -0.45], [-0.9, -0.45]]), None
    if shape == "chevron":
        return np.array([[-0.95, -0.6], [-0.45, -0.6], [0.0, 0.0], [0.45, -0.6], [0.95, -0.6], [0.0, 0.7]]), None
    if shape == "crescent":
        outer = _circle(24, a0=0.35 * math.pi, a1=1.65 * math.pi + 1e-9)
        inner = np.stack([0.3 + 0.7 * np.cos(np.linspace(1.45 * math.pi, 0.55 * math.pi, 16)),
                          0.7 * np.sin(np.linspace(1.45 * math.pi, 0.55 * math.pi, 16))], 1)
        return np.concatenate([outer, inner]), None
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # screen y points down
        return np.stack([x, y + 2.5], 1) / 17.0, None
    if shape == "hourglass":
        return np.array([[-0.75, -0.9], [0.75, -0.9], [0.12, 0.0], [0.75, 0.9], [-0.75, 0.9], [-0.12, 0.0]]), None
    if shape == "teardrop":
        arc = _circle(32, r=0.62, a0=-0.2 * math.pi, a1=1.2 * math.pi + 1e-9) + [0.0, 0.3]
        return np.concatenate([arc, [[0.0, -1.0]]]), None
    if shape == "gear":
        t = np.arange(32) * 2 * math.pi / 32
        r = np.where((np.arange(32) // 2) % 2 == 0, 1.0, 0.74)  # 8 flat teeth
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None
    if shape == "frame":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), np.array(
            [[-0.45, -0.45], [0.45, -0.45], [0.45, 0.45], [-0.45, 0.45]])
    if shape == "bolt":
        return np.array([[-0.15, -1.0], [0.6, -1.0], [0.15, -0.15], [0.6, -0.15], [-0.35, 1.0], [-0.05, 0.12],
                         [-0.5, 0.12]]), None
    raise ValueError(f"unknown shape {shape!r}")


def clutter_outline(rng: np.random.Generator) -> np.ndarray:
    """A distractor outline (unit size) that no thing class has: an irregular blob or a thin stick (branch, cable)."""
    if rng.random() < 0.6:
        n = int(rng.integers(7, 12))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    w = rng.uniform(0.05, 0.12)
    bend = rng.uniform(-0.25, 0.25)
    return np.array([[-1.0, -w], [0.0, -w + bend], [1.0, -w], [1.0, w], [0.0, w + bend], [-1.0, w]])


def _place(outline: np.ndarray, cx: float, cy: float, size: float, angle: float, size_px: int) -> list[float]:
    """Unit outline -> flat COCO polygon ``[x0, y0, x1, y1, ...]`` in pixels, clamped to the image, 2 decimals."""
    c, s = math.cos(angle), math.sin(angle)
    xy = outline @ np.array([[c, s], [-s, c]]) * (size / 2) + [cx, cy]
    xy = np.clip(np.round(xy, 2), 0.0, float(size_px))
    return [float(v) for v in xy.ravel()]


def _rasterize(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """Polygons -> (H, W) bool exactly as pycocotools rasterises them (``annToMask`` of a polygon annotation)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    return mask_utils.decode(rle).astype(bool)


def _trace_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """Exact pixel-edge outline(s) of ``mask`` (H, W) bool as COCO polygons; None if it has holes.

    Vertices sit on pixel corners, edges follow pixel borders (clockwise on screen, the region on the right). A polygon
    list means the UNION of its polygons in COCO, so a region with a hole can't be written this way: RLE it instead.
    """
    h, w = mask.shape
    m = np.zeros((h + 2, w + 2), bool)
    m[1:-1, 1:-1] = mask
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(r: np.ndarray, c: np.ndarray, d0: tuple[int, int], d1: tuple[int, int]) -> None:
        for rr, cc in zip(r.tolist(), c.tolist()):  # pixel (rr, cc) in unpadded coords
            start = (cc + d0[0], rr + d0[1])
            edges.setdefault(start, []).append((cc + d1[0], rr + d1[1]))

    inner = m[1:-1, 1:-1]
    add(*np.nonzero(inner & ~m[:-2, 1:-1]), (0, 0), (1, 0))  # top border, heading +x
    add(*np.nonzero(inner & ~m[1:-1, 2:]), (1, 0), (1, 1))  # right border, heading +y
    add(*np.nonzero(inner & ~m[2:, 1:-1]), (1, 1), (0, 1))  # bottom border, heading -x
    add(*np.nonzero(inner & ~m[1:-1, :-2]), (0, 1), (0, 0))  # left border, heading -y
    polygons: list[list[float]] = []
    for start in sorted(edges):
        while edges.get(start):
            loop = [start]
            prev, cur = start, edges[start].pop()
            while cur != start:
                outs = edges[cur]
                if len(outs) > 1:  # pinch corner (pixels touching diagonally): turn right, hug the current pixel
                    dx, dy = cur[0] - prev[0], cur[1] - prev[1]
                    right = (cur[0] - dy, cur[1] + dx)
                    nxt = right if right in outs else outs[0]
                    outs.remove(nxt)
                else:
                    nxt = outs.pop()
                loop.append(cur)
                prev, cur = cur, nxt
            pts = np.array(loop, dtype=np.int64)
            # shoelace on screen coords (y down): clockwise outer loops have positive area, holes negative
            area2 = int(np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1]))
            if area2 < 0:
                return None
            # keep corners only (drop vertices in the middle of straight runs)
            d_in = pts - np.roll(pts, 1, 0)
            d_out = np.roll(pts, -1, 0) - pts
            corner = np.any(np.sign(d_in) != np.sign(d_out), 1)
            pts = pts[corner]
            polygons.append([float(v) for v in pts.ravel()])
    return polygons


def _rle_compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's crowd encoding: run lengths over the column-major pixels, starting with a (possibly empty) 0-run."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _decode(segmentation: Any, h: int, w: int) -> np.ndarray:
    """Same branches as ``COCO.annToRLE`` + ``decode``."""
    if isinstance(segmentation, list):
        return _rasterize(segmentation, h, w)
    if isinstance(segmentation["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, h, w)).astype(bool)
    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)

