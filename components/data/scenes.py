"""The embedded default dataset: generated scene-centric images in COCO's exact layout (stage ``scenes``).

SlotCon (Wen et al., NeurIPS 2022) learns objects from *scene-centric* images: several objects in cluttered layouts,
as in COCO. This module draws such images offline, deterministically from a seed:

- ``num_thing_classes`` "thing" categories, each defined by a SHAPE and a TEXTURE (striped disc, checkered square,
  dotted triangle, ...). Every instance gets a random colour, so colour never identifies a category (colour jitter
  is part of SlotCon's augmentation; a colour-defined class would be erased by it).
- ``num_stuff_classes`` "stuff" backgrounds (sky, grass, water, ...) told apart by texture; half of the images split
  the background into two regions (e.g. sky over grass), like a horizon.
- ``min_objects..max_objects`` objects per image, drawn back to front: later objects occlude earlier ones, an
  instance's mask is its VISIBLE part, and instances left with fewer than ``_min_visible_px`` pixels are not drawn
  at all (so every annotation is non-empty and every drawn object is annotated).
- Some images hold a "crowd": a cluster of small shapes of one category annotated as one ``iscrowd: 1`` region.

Output under ``out_dir`` (COCO 2017 + COCO-Stuff layout)::

    train2017/000000000001.jpg ...          val2017/000010000001.jpg ...   (ids unique across splits)
    annotations/instances_train2017.json    annotations/instances_val2017.json
    annotations/semantic_classes.json       [{"id", "name", "isthing"}], ids 0..T+S-1
    stuffthingmaps_trainval2017/{train2017,val2017}/<stem>.png   uint8: things 0..T-1 (= category_id - 1),
                                            stuff T..T+S-1, 255 = ignore (1-px inner border of each thing instance)

Segmentations use all three encodings real COCO files contain, so downstream code meets each of them: polygons for
most instances (the smooth shape outline when fully visible, the exact pixel-edge outline when occluded), compressed
RLE (a string, as ``pycocotools.mask.encode`` gives) for some, and uncompressed RLE (a list of counts, as COCO's own
crowd annotations) for ``iscrowd: 1`` regions. Every mask is, by construction, exactly what ``COCO.annToMask``
decodes (a polygon whose rasterisation would differ falls back to RLE), and ``area``/``bbox`` are computed from that
decoded mask.

Determinism: image ``id`` is drawn from ``numpy.random.default_rng([seed, id])``, independent of generation order
(parallel-safe, and a val image doesn't change when ``num_train`` does). JPEG/PNG settings are fixed, JSON keys are
sorted and carry no timestamps: the same params give a byte-identical tree. The tree is written to a temporary
folder beside ``out_dir`` and renamed into place at the end, so an interrupted run never looks complete.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from components.config import ScenesConfig
from components.errors import UserError
from components.stage import Arg, Stage

SPLITS: tuple[str, ...] = ("train2017", "val2017")
# Image ids: train 1..num_train, val VAL_ID_OFFSET+1.. (config caps num_train below it) -> unique across splits and a
# val image's id/content doesn't depend on num_train.
SPLIT_ID_OFFSET: dict[str, int] = {"train2017": 0, "val2017": 10_000_000}
ANN_PER_IMAGE = 100  # annotation id = image_id * 100 + k (k <= max_objects + 1 crowd <= 99): unique across
# splits, independent of generation order, and < 2**31 for every allowed config (int32-safe downstream)
CROWD_PROB = 0.2  # fraction of images holding one crowd region (COCO: ~1% of annotations are crowds)
RLE_PROB = 0.15  # non-crowd instances stored as compressed RLE instead of polygons
TWO_STUFF_PROB = 0.5  # images whose background is two stuff regions (sky/ground-like)
IGNORE = 255

# (name, shape, texture, supercategory). Shapes AND textures are all distinct, so either cue separates classes.
THING_CATALOGUE: tuple[tuple[str, str, str, str], ...] = (
    ("striped_disc", "disc", "stripes", "round"),
    ("checkered_square", "square", "checker", "polygon"),
    ("dotted_triangle", "triangle", "dots", "polygon"),
    ("spoked_ring", "ring", "radial", "round"),
    ("grid_cross", "cross", "grid", "symbol"),
    ("concentric_star", "star", "concentric", "symbol"),
    ("zigzag_ellipse", "ellipse", "zigzag", "round"),
    ("hatched_hexagon", "hexagon", "crosshatch", "polygon"),
    ("speckled_diamond", "diamond", "speckle", "polygon"),
    ("gradient_arrow", "arrow", "gradient", "symbol"),
    ("wavy_semicircle", "semicircle", "waves", "round"),
    ("plaid_lshape", "lshape", "plaid", "symbol"),
)
# (name, texture, base RGB in [0,1]); the base colour is jittered per image, so texture is the reliable cue.
STUFF_CATALOGUE: tuple[tuple[str, str, tuple[float, float, float]], ...] = (
    ("sky", "sky", (0.55, 0.70, 0.90)),
    ("grass", "grass", (0.30, 0.55, 0.25)),
    ("water", "water", (0.20, 0.40, 0.60)),
    ("sand", "sand", (0.80, 0.72, 0.52)),
    ("wall", "bricks", (0.65, 0.40, 0.32)),
    ("wood", "wood", (0.55, 0.38, 0.22)),
    ("gravel", "gravel", (0.50, 0.50, 0.48)),
    ("fog", "fog", (0.78, 0.78, 0.80)),
)


# ----------------------------------------------------------------------------------------------------------------
# data classes
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DrawnInstance:
    """One annotated region as drawn: ``mask`` (H, W) bool is its visible part, equal to what annToMask decodes."""

    category_id: int
    iscrowd: int
    mask: np.ndarray
    segmentation: Any  # list of polygons | {"size", "counts": str} | {"size", "counts": list[int]} (crowd)
    encoding: str  # "polygon" | "rle" | "crowd_rle"
    colours: list[tuple[float, float, float]] = field(default_factory=list)  # RGB in [0,1] of its shape(s)


@dataclass
class Scene:
    """One generated image: ``image`` (H, W, 3) uint8 RGB, ``semantic`` (H, W) uint8, instances back to front."""

    image_id: int
    image: np.ndarray
    semantic: np.ndarray
    instances: list[DrawnInstance]
    stuff: list[int]  # stuff class indices (0..S-1) used in the background


# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------
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
    raise ValueError(f"unknown shape {shape!r}")


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


# ----------------------------------------------------------------------------------------------------------------
# textures
# ----------------------------------------------------------------------------------------------------------------
def _value_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth random field in [0, 1], (h, w): random lattice values, smoothstep-interpolated."""
    grid = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    y = ((np.arange(h) + 0.5) / h * cells_y).astype(np.float32)
    x = ((np.arange(w) + 0.5) / w * cells_x).astype(np.float32)
    y0, x0 = np.minimum(y.astype(int), cells_y - 1), np.minimum(x.astype(int), cells_x - 1)
    ty, tx = y - y0, x - x0
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    top = a + (b - a) * tx[None]
    bot = c + (d - c) * tx[None]
    return top + (bot - top) * ty[:, None]


def _thing_pattern(texture: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] at object-local pixel coords ``u, v`` (rotated with the object), ``period`` px."""
    p = period
    if texture == "stripes":
        return (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / p * 2) + np.floor(v / p * 2)) % 2).astype(np.float32)
    if texture == "dots":
        du, dv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if texture == "radial":
        return (np.sin(8 * np.arctan2(v, u)) > 0).astype(np.float32)
    if texture == "grid":
        return (((u / p) % 1 < 0.3) | ((v / p) % 1 < 0.3)).astype(np.float32)
    if texture == "concentric":
        return (np.sin(2 * np.pi * np.hypot(u, v) / p) > 0).astype(np.float32)
    if texture == "zigzag":
        tri = np.abs((u / p) % 1 - 0.5) * p
        return (((v + tri) / p) % 1 < 0.5).astype(np.float32)
    if texture == "crosshatch":
        return ((((u + v) / p) % 1 < 0.25) | (((u - v) / p) % 1 < 0.25)).astype(np.float32)
    if texture == "speckle":
        return (rng.random(u.shape) < 0.35).astype(np.float32)
    if texture == "gradient":
        span = max(float(np.ptp(u)), 1.0)
        return ((u - u.min()) / span).astype(np.float32)
    if texture == "waves":
        return (0.5 + 0.5 * np.sin(2 * np.pi * (v + 0.35 * p * np.sin(2 * np.pi * u / p)) / p)).astype(np.float32)
    if texture == "plaid":
        return (0.5 * (np.sin(2 * np.pi * u / p) > 0) + 0.5 * (np.sin(2 * np.pi * v / (1.7 * p)) > 0)).astype(
            np.float32
        )
    raise ValueError(f"unknown texture {texture!r}")


def _stuff_image(texture: str, base: np.ndarray, rng: np.random.Generator, s: int) -> np.ndarray:
    """One stuff class over the whole (s, s) image -> (s, s, 3) float RGB in [0, 1]."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    if texture == "sky":
        t = 0.75 + 0.35 * (y / s) + 0.1 * _value_noise(rng, s, s, 2, 3)
    elif texture == "grass":
        t = 0.6 + 0.6 * _value_noise(rng, s, s, max(2, s // 24), max(4, s // 3))
    elif texture == "water":
        n = _value_noise(rng, s, s, 3, 3)
        t = 0.8 + 0.25 * np.sin(2 * np.pi * (y / max(4.0, s / 14) + 1.5 * n))
    elif texture == "sand":
        t = 0.85 + 0.3 * rng.random((s, s)) * 0.5 + 0.1 * _value_noise(rng, s, s, 4, 4)
    elif texture == "bricks":
        bh = max(4.0, s / 12)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bh
        mortar = ((y % bh) < 1.2) | ((xs % (2 * bh)) < 1.2)
        t = np.where(mortar, 1.45, 0.85 + 0.1 * _value_noise(rng, s, s, 6, 6))
    elif texture == "wood":
        n = _value_noise(rng, s, s, 2, 4)
        t = 0.8 + 0.25 * np.sin(2 * np.pi * (x / max(3.0, s / 20) + 3.0 * n))
    elif texture == "gravel":
        t = 0.55 + 0.9 * (_value_noise(rng, s, s, max(3, s // 10), max(3, s // 10)) > 0.5) * 0.5 + 0.1 * rng.random(
            (s, s)
        )
    elif texture == "fog":
        t = 0.7 + 0.5 * _value_noise(rng, s, s, 3, 3)
    else:
        raise ValueError(f"unknown stuff texture {texture!r}")
    return np.clip(t[..., None] * base[None, None], 0.0, 1.0).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated colour (RGB in [0,1]) from random hue/saturation/value."""
    hue, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return (val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _min_visible_px(size: int) -> int:
    """Instances with fewer visible pixels are not drawn (tiny slivers make useless, near-empty annotations)."""
    return max(8, int(round(0.0015 * size * size)))


# ----------------------------------------------------------------------------------------------------------------
# one scene
# ----------------------------------------------------------------------------------------------------------------
def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The image's own generator: independent of the order (or process) in which images are generated."""
    return np.random.default_rng([seed, image_id])


def render_scene(cfg: ScenesConfig, image_id: int) -> Scene:
    """Draw image ``image_id``: background stuff, then objects back to front; masks = visible parts.

    Returns the :class:`Scene` with the annotations' segmentations already encoded; each ``DrawnInstance.mask``
    (H, W) bool equals what pycocotools decodes from its segmentation (checked here; tests check it again).
    """
    rng = image_rng(cfg.seed, image_id)
    s = cfg.image_size
    T, S = cfg.num_thing_classes, cfg.num_stuff_classes

    # --- background: one stuff class, or two regions split by a wavy horizon
    y = np.arange(s, dtype=np.float32)[:, None] + 0.5
    x = np.arange(s, dtype=np.float32)[None, :] + 0.5
    if S >= 2 and rng.random() < TWO_STUFF_PROB:
        stuff = [int(v) for v in rng.choice(S, 2, replace=False)]
        h0 = rng.uniform(0.3, 0.7) * s
        amp, freq, phase = rng.uniform(0.0, 0.08) * s, rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        lower = y > h0 + amp * np.sin(2 * np.pi * freq * x / s + phase)
    else:
        stuff = [int(rng.integers(S))]
        lower = np.zeros((s, s), bool)
    canvas = np.empty((s, s, 3), np.float32)
    semantic = np.empty((s, s), np.uint8)
    for region, k in zip((~lower, lower), stuff):
        _, texture, base = STUFF_CATALOGUE[k]
        base = np.clip(np.array(base, np.float32) + rng.uniform(-0.08, 0.08, 3), 0.05, 1.0)
        layer = _stuff_image(texture, base, rng, s)
        np.copyto(canvas, layer, where=region[..., None])
        semantic[region] = T + k

    # --- objects back to front: {category, crowd, members: [shape placements]}; a crowd (if any) goes first = behind
    lo, hi = cfg.min_object_frac * s, cfg.max_object_frac * s
    objects: list[dict] = []
    if rng.random() < CROWD_PROB:
        cat = int(rng.integers(T))
        ccx, ccy = rng.uniform(0.2, 0.8, 2) * s
        spread = rng.uniform(0.08, 0.16) * s
        members = []
        for _ in range(int(rng.integers(5, 11))):
            members.append(
                dict(cx=ccx + rng.normal() * spread, cy=ccy + rng.normal() * spread * 0.6,
                     size=max(4.0, rng.uniform(0.35, 0.6) * lo), angle=rng.uniform(0, 2 * np.pi))
            )
        objects.append(dict(category=cat, crowd=True, members=members))
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        objects.append(
            dict(category=int(rng.integers(T)), crowd=False,
                 members=[dict(cx=rng.uniform(0.1, 0.9) * s, cy=rng.uniform(0.1, 0.9) * s,
                               size=rng.uniform(lo, hi), angle=rng.uniform(0, 2 * np.pi))])
        )

    # shapes -> full masks (pycocotools' own rasterisation of the outline, minus the hole if any)
    for obj in objects:
        _, shape, _, _ = THING_CATALOGUE[obj["category"]]
        outline, hole = _shape_outline(shape)
        obj["full"] = np.zeros((s, s), bool)
        obj["parts"] = []
        for mem in obj["members"]:
            poly = _place(outline, mem["cx"], mem["cy"], mem["size"], mem["angle"], s)
            part = _rasterize([poly], s, s)
            if hole is not None:
                part &= ~_rasterize([_place(hole, mem["cx"], mem["cy"], mem["size"], mem["angle"], s)], s, s)
            obj["parts"].append((mem, part, poly))
            obj["full"] |= part
        obj["smooth"] = [obj["parts"][0][2]] if (not obj["crowd"] and hole is None) else None

    # visibility, front to back: an object hidden below the threshold is dropped (never drawn, so never unlabelled)
    min_px = _min_visible_px(s)
    covered = np.zeros((s, s), bool)
    kept: list[dict] = []
    for obj in reversed(objects):
        visible = obj["full"] & ~covered
        if np.count_nonzero(visible) < min_px:
            continue
        obj["visible"] = visible
        covered |= obj["full"]
        kept.append(obj)
    kept.reverse()

    # --- paint back to front; encode annotations
    inst_map = np.zeros((s, s), np.int32)
    instances: list[DrawnInstance] = []
    for idx, obj in enumerate(kept, start=1):
        texture = THING_CATALOGUE[obj["category"]][2]
        colours = []
        for mem, part, poly in obj["parts"]:
            colour = _random_colour(rng)
            second = colour * 0.3 if rng.random() < 0.5 else colour + (1 - colour) * 0.7  # darker or lighter variant
            colours.append(tuple(float(c) for c in colour))
            # nonzero on the outline's bounding box (+1 px margin) only: the rasterised mask lies inside it
            x0, y0 = max(0, int(math.floor(min(poly[0::2]))) - 1), max(0, int(math.floor(min(poly[1::2]))) - 1)
            x1, y1 = int(math.ceil(max(poly[0::2]))) + 2, int(math.ceil(max(poly[1::2]))) + 2
            ys, xs = np.nonzero(part[y0:y1, x0:x1])
            ys, xs = ys + y0, xs + x0
            if ys.size == 0:
                continue
            ca, sa = math.cos(mem["angle"]), math.sin(mem["angle"])
            dx, dy = xs + 0.5 - mem["cx"], ys + 0.5 - mem["cy"]
            u, v = ca * dx + sa * dy, -sa * dx + ca * dy
            period = float(np.clip(mem["size"] / 4.0, 4.0, 16.0))
            pat = _thing_pattern(texture, u, v, period, rng)[:, None]
            shade = 1.0 + 0.12 * (u / max(mem["size"], 1.0))[:, None]  # soft light from one side
            canvas[ys, xs] = np.clip((colour * (1 - pat) + second * pat) * shade, 0, 1)
            semantic[ys, xs] = obj["category"]
            inst_map[ys, xs] = idx
        vis = obj["visible"]
        if obj["crowd"]:
            seg, enc = _rle_uncompressed(vis), "crowd_rle"
        else:
            seg, enc = None, "rle"
            if rng.random() >= RLE_PROB:
                full_view = obj["smooth"] is not None and np.array_equal(vis, obj["full"])
                seg = obj["smooth"] if full_view else _trace_polygons(vis)
                enc = "polygon"
                if seg is not None and not np.array_equal(_rasterize(seg, s, s), vis):
                    seg = None  # a rasterisation corner case: keep the exact mask as RLE instead
            if seg is None:
                seg, enc = _rle_compressed(vis), "rle"
        instances.append(DrawnInstance(obj["category"] + 1, int(obj["crowd"]), vis, seg, enc, colours))

    # --- ignore: the 1-px inner border of every thing instance (against stuff or another instance), as COCO-Stuff
    # leaves thin unlabelled seams; the border is ambiguous after JPEG anyway.
    pad = np.pad(inst_map, 1, mode="edge")
    border = np.zeros((s, s), bool)
    for nb in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        border |= nb != inst_map
    semantic[border & (inst_map > 0)] = IGNORE

    # mild global illumination and sensor noise, so no two pixels of a flat region are identical
    light = 1.0 + rng.uniform(-0.1, 0.1) * ((x - s / 2) / s) + rng.uniform(-0.1, 0.1) * ((y - s / 2) / s)
    canvas = canvas * light[..., None] + 0.015 * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    return Scene(image_id=image_id, image=image, semantic=semantic, instances=instances, stuff=stuff)


# ----------------------------------------------------------------------------------------------------------------
# encoding and the whole dataset
# ----------------------------------------------------------------------------------------------------------------
def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # fixed settings -> identical bytes for identical pixels; 4:2:0 as most COCO JPEGs
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def _png_bytes(semantic: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(semantic).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def categories(cfg: ScenesConfig) -> list[dict]:
    """COCO ``categories``: ids 1..T."""
    return [
        {"id": i + 1, "name": name, "supercategory": sup}
        for i, (name, _shape, _tex, sup) in enumerate(THING_CATALOGUE[: cfg.num_thing_classes])
    ]


def semantic_classes(cfg: ScenesConfig) -> list[dict]:
    """Semantic ids 0..T+S-1 of the PNG maps: things first (category_id - 1), then stuff."""
    things = [{"id": c["id"] - 1, "name": c["name"], "isthing": 1} for c in categories(cfg)]
    stuff = [
        {"id": cfg.num_thing_classes + k, "name": name, "isthing": 0}
        for k, (name, _tex, _rgb) in enumerate(STUFF_CATALOGUE[: cfg.num_stuff_classes])
    ]
    return things + stuff


def image_ids(cfg: ScenesConfig, split: str) -> list[int]:
    n = cfg.num_train if split == "train2017" else cfg.num_val
    return [SPLIT_ID_OFFSET[split] + i + 1 for i in range(n)]


def _annotation(scene: Scene, k: int, inst: DrawnInstance) -> dict:
    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
    return {
        "id": scene.image_id * ANN_PER_IMAGE + k,
        "image_id": scene.image_id,
        "category_id": inst.category_id,
        "segmentation": inst.segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": inst.iscrowd,
    }


@dataclass
class _Encoded:
    """One image, ready to write: what a worker process sends back (no big arrays)."""

    image: dict
    jpeg: bytes
    png: bytes
    annotations: list[dict]
    encodings: dict[str, int]
    pixels: tuple[int, int, int]  # thing, stuff, ignore pixel counts of the semantic map


def _encode_scene(job: tuple[ScenesConfig, int]) -> _Encoded:
    cfg, image_id = job
    scene = render_scene(cfg, image_id)
    sem = scene.semantic
    T = cfg.num_thing_classes
    encodings: dict[str, int] = {}
    for inst in scene.instances:
        encodings[inst.encoding] = encodings.get(inst.encoding, 0) + 1
    n_ignore = int(np.count_nonzero(sem == IGNORE))
    n_thing = int(np.count_nonzero(sem < T))
    return _Encoded(
        image={"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": cfg.image_size,
               "height": cfg.image_size, "license": 1},
        jpeg=_jpeg_bytes(scene.image, cfg.jpeg_quality),
        png=_png_bytes(sem),
        annotations=[_annotation(scene, k, inst) for k, inst in enumerate(scene.instances, start=1)],
        encodings=encodings,
        pixels=(n_thing, sem.size - n_thing - n_ignore, n_ignore),
    )


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete ``.<name>-<pid>-*.tmp`` folders left by killed runs (their process is gone); live ones are kept."""
    for d in out_dir.parent.glob(f".{out_dir.name}-*.tmp"):
        try:
            pid = int(d.name[len(out_dir.name) + 2 :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _preview(out_dir: Path, cfg: ScenesConfig, n: int = 8) -> Image.Image:
    """A strip of the first ``n`` train images over their semantic maps (ignore = white), for the MLflow record."""
    palette = (np.random.default_rng(0).random((256, 3)) * 200 + 30).astype(np.uint8)
    palette[IGNORE] = 255
    cols = []
    for image_id in image_ids(cfg, "train2017")[:n]:
        stem = f"{image_id:012d}"
        with Image.open(out_dir / "train2017" / f"{stem}.jpg") as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(out_dir / "stuffthingmaps_trainval2017" / "train2017" / f"{stem}.png") as im:
            sem = palette[np.asarray(im)]
        cols.append(np.concatenate([rgb, sem], 0))
    return Image.fromarray(np.concatenate(cols, 1))


def generate_scenes(cfg: ScenesConfig, out_dir: str | os.PathLike, tracker: Any = None) -> dict:
    """Generate the whole dataset under ``out_dir`` (replaced atomically) and return its statistics.

    Layout: see the module docstring. Returns a flat dict of numbers (per-split image/annotation counts, encodings,
    crowd regions, mean objects per image, pixel fractions of thing/stuff/ignore, bytes on disk, seconds).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; remove it or pass another --out")
    if cfg.num_thing_classes > len(THING_CATALOGUE) or cfg.num_stuff_classes > len(STUFF_CATALOGUE):
        raise UserError(f"params.yaml: scenes has at most {len(THING_CATALOGUE)} thing / {len(STUFF_CATALOGUE)} stuff "
                        "classes; lower num_thing_classes / num_stuff_classes")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-{os.getpid()}-", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the dataset folder should get the usual permissions
    stats: dict[str, Any] = {}
    T = cfg.num_thing_classes
    pix_thing = pix_stuff = pix_ignore = pix_total = 0
    # images are independent (own generator each): workers only change the speed, never the bytes. "spawn" keeps
    # children clean of the parent's threads (tqdm monitor, MLflow, torch) at ~1 s start-up each.
    pool = None
    try:
        if cfg.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(cfg.workers)
        (tmp / "annotations").mkdir()
        cats = categories(cfg)
        for split in SPLITS:
            ids = image_ids(cfg, split)
            (tmp / split).mkdir()
            sem_dir = tmp / "stuffthingmaps_trainval2017" / split
            sem_dir.mkdir(parents=True)
            images, anns = [], []
            enc_counts = {"polygon": 0, "rle": 0, "crowd_rle": 0}
            jobs = [(cfg, image_id) for image_id in ids]
            results = pool.imap(_encode_scene, jobs, chunksize=8) if pool else map(_encode_scene, jobs)
            for enc in tqdm(results, total=len(ids), desc=f"scenes {split}", unit="img", mininterval=1.0,
                            leave=False):
                (tmp / split / enc.image["file_name"]).write_bytes(enc.jpeg)
                (sem_dir / enc.image["file_name"].replace(".jpg", ".png")).write_bytes(enc.png)
                images.append(enc.image)
                anns.extend(enc.annotations)
                for k, v in enc.encodings.items():
                    enc_counts[k] += v
                pix_thing += enc.pixels[0]
                pix_stuff += enc.pixels[1]
                pix_ignore += enc.pixels[2]
                pix_total += cfg.image_size**2
            doc = {
                "info": {"description": f"slotcon-pipeline generated scenes (seed {cfg.seed})", "version": "1.0",
                         "year": 2017, "contributor": "components/data/scenes.py", "url": "", "date_created": ""},
                "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
                "images": images,
                "annotations": anns,
                "categories": cats,
            }
            (tmp / "annotations" / f"instances_{split}.json").write_bytes(_dump_json(doc))
            short = split.removesuffix("2017")
            stats[f"{short}.images"] = len(images)
            stats[f"{short}.annotations"] = len(anns)
            stats[f"{short}.polygon"] = enc_counts["polygon"]
            stats[f"{short}.rle"] = enc_counts["rle"]
            stats[f"{short}.crowd"] = enc_counts["crowd_rle"]
            stats[f"{short}.objects_per_image"] = round((len(anns) - enc_counts["crowd_rle"]) / max(1, len(images)), 4)
            per_cat = np.bincount([a["category_id"] for a in anns if not a["iscrowd"]], minlength=T + 1)[1:]
            stats[f"{short}.min_instances_per_category"] = int(per_cat.min())
        (tmp / "annotations" / "semantic_classes.json").write_bytes(_dump_json(semantic_classes(cfg)))
        size = _dir_bytes(tmp)
        # the swap: an interrupted run leaves only a *.tmp folder, never a half-written out_dir
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-{os.getpid()}-old.tmp")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_img = stats["train.images"] + stats["val.images"]
    stats.update(
        {
            "thing_pixel_frac": round(pix_thing / pix_total, 4),
            "stuff_pixel_frac": round(pix_stuff / pix_total, 4),
            "ignore_pixel_frac": round(pix_ignore / pix_total, 4),
            "bytes": size,
            "seconds": round(seconds, 3),
            "images_per_s": round(n_img / max(seconds, 1e-9), 1),
        }
    )
    if tracker is not None and getattr(tracker, "active", True):
        tracker.log_metrics(stats)
        tracker.log_dict({"categories": categories(cfg), "semantic_classes": semantic_classes(cfg)},
                         "scenes/classes.json")
        with tempfile.TemporaryDirectory() as d:
            _preview(out_dir, cfg).save(Path(d) / "preview.png")
            tracker.log_artifact(Path(d) / "preview.png", "scenes")
    return stats


run_scenes = generate_scenes  # the house name of a stage's pure function (run_<stage>)


# ----------------------------------------------------------------------------------------------------------------
# CLI: slotcon scenes --out data/scenes
# ----------------------------------------------------------------------------------------------------------------
def _run_stage(ctx) -> dict:
    return generate_scenes(ctx.cfg, ctx.path("out"), tracker=ctx.tracker)


def _summary(stats: dict) -> str:
    return (f"{stats['train.images']} train + {stats['val.images']} val images, "
            f"{stats['train.annotations'] + stats['val.annotations']} annotations, {stats['bytes'] / 1e6:.1f} MB "
            f"in {stats['seconds']:.1f} s ({stats['images_per_s']:.0f} img/s)")


STAGE = Stage(
    name="scenes", section="scenes", run=_run_stage, metrics="metrics/scenes.json", summary=_summary,
    headline=("train.images", "val.images"),
    args=(Arg("out", "data/scenes", "dataset root to (re)write"),),
)
