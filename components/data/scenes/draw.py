"""Drawing one generated scene: stuff background, objects back to front, exact visible masks, semantic map. Every
random draw comes from the image's own generator in a fixed order, and the variants (``clutter_shapes``,
``object_spread``, more classes) only draw when switched on, so the demo's bytes never depend on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.config import ScenesConfig
from components.constants import IGNORE_INDEX
from components.data.scenes.shapes import (
    _place, _rasterize, _rle_compressed, _rle_uncompressed, _shape_outline, _trace_polygons, clutter_outline,
)
from components.data.scenes.textures import _random_colour, _stuff_image, _thing_pattern

CROWD_PROB = 0.2  # fraction of images holding one crowd region (COCO: ~1% of annotations are crowds)
RLE_PROB = 0.15  # non-crowd instances stored as compressed RLE instead of polygons
TWO_STUFF_PROB = 0.5  # images whose background is two stuff regions (sky/ground-like)
IGNORE = IGNORE_INDEX  # unlabelled pixels of the semantic maps

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
    # the "more classes" variant (num_thing_classes 13..24)
    ("spiral_octagon", "octagon", "spiral", "polygon"),
    ("triangled_trapezoid", "trapezoid", "triangles", "polygon"),
    ("barcode_parallelogram", "parallelogram", "barcode", "polygon"),
    ("glowing_tshape", "tshape", "vignette", "symbol"),
    ("dartboard_chevron", "chevron", "dartboard", "symbol"),
    ("scaled_crescent", "crescent", "scales", "round"),
    ("camo_heart", "heart", "camo", "round"),
    ("dashed_hourglass", "hourglass", "dashes", "polygon"),
    ("plus_teardrop", "teardrop", "plus_lattice", "round"),
    ("boxed_gear", "gear", "hollow_squares", "round"),
    ("woven_frame", "frame", "weave", "polygon"),
    ("rippled_bolt", "bolt", "ripple", "symbol"),
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
    # the "more classes" variant (num_stuff_classes 9..16)
    ("snow", "snow", (0.92, 0.93, 0.96)),
    ("rock", "rock", (0.45, 0.42, 0.40)),
    ("tiles", "tiles", (0.80, 0.80, 0.76)),
    ("leaves", "leaves", (0.25, 0.45, 0.15)),
    ("carpet", "carpet", (0.60, 0.22, 0.26)),
    ("clouds", "clouds", (0.72, 0.78, 0.88)),
    ("mud", "mud", (0.40, 0.30, 0.20)),
    ("road", "asphalt", (0.30, 0.30, 0.32)),
)
CLUTTER_NAME = "clutter"  # the stuff class of the distractors (semantic id T+S) when scenes.clutter_shapes > 0


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


def _min_visible_px(size: int) -> int:
    """Instances with fewer visible pixels are not drawn (tiny slivers make useless, near-empty annotations)."""
    return max(8, int(round(0.0015 * size * size)))


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The image's own generator: independent of the order (or process) in which images are generated."""
    return np.random.default_rng([seed, image_id])


# ----------------------------------------------------------------------------------------------------------------
# the steps of one scene, in the order their random draws happen
# ----------------------------------------------------------------------------------------------------------------
def _draw_background(cfg: ScenesConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One stuff class, or two regions split by a wavy horizon -> canvas (s, s, 3) float, semantic (s, s), stuff."""
    s, T, S = cfg.image_size, cfg.num_thing_classes, cfg.num_stuff_classes
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
    return canvas, semantic, stuff


def _layout(cfg: ScenesConfig, rng: np.random.Generator) -> list[dict]:
    """Objects back to front: ``{category, crowd, clutter, members: [placements]}``; a crowd (if any) goes first."""
    s, T = cfg.image_size, cfg.num_thing_classes
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
        objects.append(dict(category=cat, crowd=True, clutter=False, members=members))
    # object_spread < 1: centres gather around a focus point (drawn only then: the default draws stay as they were)
    focus = rng.uniform(0.3, 0.7, 2) * s if cfg.object_spread < 1.0 else None

    def coord(axis: int) -> float:
        u = rng.uniform(0.1, 0.9)
        return u * s if focus is None else float(focus[axis] + (u - 0.5) * cfg.object_spread * s)

    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        objects.append(
            dict(category=int(rng.integers(T)), crowd=False, clutter=False,
                 members=[dict(cx=coord(0), cy=coord(1), size=rng.uniform(lo, hi), angle=rng.uniform(0, 2 * np.pi))])
        )
    for _ in range(cfg.clutter_shapes):  # distractors at random depths: some hide objects, some are hidden
        outline = clutter_outline(rng)
        mem = dict(cx=rng.uniform(0.0, 1.0) * s, cy=rng.uniform(0.0, 1.0) * s, size=rng.uniform(0.1, 0.45) * s,
                   angle=rng.uniform(0, 2 * np.pi))
        objects.insert(int(rng.integers(len(objects) + 1)),
                       dict(category=None, crowd=False, clutter=True, members=[mem], outline=outline))
    return objects


def _full_masks(obj: dict, s: int) -> None:
    """Shapes -> ``obj["full"]`` (s, s) bool (pycocotools' own rasterisation, minus the hole if any), parts, smooth."""
    if obj["clutter"]:
        outline, hole = obj["outline"], None
    else:
        outline, hole = _shape_outline(THING_CATALOGUE[obj["category"]][1])
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


def _visible(objects: list[dict], s: int) -> list[dict]:
    """Front to back: each object's visible part; a thing hidden below the threshold is dropped (never drawn, so
    never unlabelled). Clutter is always kept: it is part of the background, not an instance."""
    min_px = _min_visible_px(s)
    covered = np.zeros((s, s), bool)
    kept: list[dict] = []
    for obj in reversed(objects):
        visible = obj["full"] & ~covered
        if not obj["clutter"] and np.count_nonzero(visible) < min_px:
            continue
        obj["visible"] = visible
        covered |= obj["full"]
        kept.append(obj)
    kept.reverse()
    return kept


def _pixels(part: np.ndarray, poly: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Row/column indices of ``part``, searched only on the outline's bounding box (+1 px margin), where it lies."""
    x0, y0 = max(0, int(math.floor(min(poly[0::2]))) - 1), max(0, int(math.floor(min(poly[1::2]))) - 1)
    x1, y1 = int(math.ceil(max(poly[0::2]))) + 2, int(math.ceil(max(poly[1::2]))) + 2
    ys, xs = np.nonzero(part[y0:y1, x0:x1])
    return ys + y0, xs + x0


def _paint_thing(obj: dict, idx: int, rng, canvas: np.ndarray, semantic: np.ndarray, inst_map: np.ndarray) -> list:
    """Paint one thing's parts with its texture in a random colour (and a darker/lighter second tone)."""
    texture = THING_CATALOGUE[obj["category"]][2]
    colours = []
    for mem, part, poly in obj["parts"]:
        colour = _random_colour(rng)
        second = colour * 0.3 if rng.random() < 0.5 else colour + (1 - colour) * 0.7  # darker or lighter variant
        colours.append(tuple(float(c) for c in colour))
        ys, xs = _pixels(part, poly)
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
    return colours


def _paint_clutter(obj: dict, clutter_id: int, rng, canvas: np.ndarray, semantic: np.ndarray,
                   inst_map: np.ndarray) -> None:
    """A distractor: mottled random colour, labelled ``clutter`` (stuff); it hides whatever thing lies below."""
    colour = _random_colour(rng)
    phase = rng.uniform(0, 2 * np.pi, 2)
    (mem, part, poly), = obj["parts"]
    ys, xs = _pixels(part, poly)
    mottle = 0.85 + 0.15 * np.sin(xs / 2.7 + phase[0]) * np.sin(ys / 3.3 + phase[1])
    canvas[ys, xs] = np.clip(colour[None] * mottle[:, None], 0, 1)
    semantic[ys, xs] = clutter_id
    inst_map[ys, xs] = 0


def _encode_instance(obj: dict, rng, s: int) -> tuple[Any, str]:
    """The visible mask as COCO writes it: crowd -> uncompressed RLE; else mostly polygons, some compressed RLE."""
    vis = obj["visible"]
    if obj["crowd"]:
        return _rle_uncompressed(vis), "crowd_rle"
    seg, enc = None, "rle"
    if rng.random() >= RLE_PROB:
        full_view = obj["smooth"] is not None and np.array_equal(vis, obj["full"])
        seg = obj["smooth"] if full_view else _trace_polygons(vis)
        enc = "polygon"
        if seg is not None and not np.array_equal(_rasterize(seg, s, s), vis):
            seg = None  # a rasterisation corner case: keep the exact mask as RLE instead
    if seg is None:
        seg, enc = _rle_compressed(vis), "rle"
    return seg, enc


def render_scene(cfg: ScenesConfig, image_id: int) -> Scene:
    """Draw image ``image_id``: background stuff, then objects back to front; masks = visible parts.

    Params that shape a scene (``params.yaml: scenes``): ``num_thing_classes`` / ``num_stuff_classes`` take the first
    N entries of :data:`THING_CATALOGUE` (shape + texture; each instance gets a random colour, so colour never
    identifies a category) and :data:`STUFF_CATALOGUE` (texture; half of the images split the background into two
    regions, like a horizon); the first 12 / 8 are the demo's, up to 24 / 16 for the "more classes" variant.
    ``min_objects..max_objects`` and ``min_object_frac..max_object_frac``: how many objects and how large; an instance
    left with fewer than ``_min_visible_px`` visible pixels is not drawn, so every annotation is non-empty. Some
    images hold a crowd: a cluster of small shapes of one category annotated as one ``iscrowd: 1`` region.
    ``clutter_shapes`` (0 = off): unannotated distractors (irregular blobs and thin sticks with a mottled colour, at
    random depths) labelled in the semantic map as the extra stuff class ``clutter`` (id T+S). ``object_spread``
    (1 = off): the fraction of the image side over which object centres spread around a per-image focus point; below
    1 objects pile up and occlude each other.

    Returns the :class:`Scene` with the annotations' segmentations already encoded; each ``DrawnInstance.mask``
    (H, W) bool equals what pycocotools decodes from its segmentation (checked here; tests check it again).
    """
    rng = image_rng(cfg.seed, image_id)
    s = cfg.image_size
    canvas, semantic, stuff = _draw_background(cfg, rng)
    objects = _layout(cfg, rng)
    for obj in objects:
        _full_masks(obj, s)
    kept = _visible(objects, s)

    # paint back to front; encode annotations (the draws interleave as they always did)
    inst_map = np.zeros((s, s), np.int32)
    instances: list[DrawnInstance] = []
    for idx, obj in enumerate(kept, start=1):
        if obj["clutter"]:
            _paint_clutter(obj, cfg.num_thing_classes + cfg.num_stuff_classes, rng, canvas, semantic, inst_map)
            continue
        colours = _paint_thing(obj, idx, rng, canvas, semantic, inst_map)
        seg, enc = _encode_instance(obj, rng, s)
        instances.append(DrawnInstance(obj["category"] + 1, int(obj["crowd"]), obj["visible"], seg, enc, colours))

    # ignore: the 1-px inner border of every thing instance (against stuff or another instance), as COCO-Stuff
    # leaves thin unlabelled seams; the border is ambiguous after JPEG anyway.
    pad = np.pad(inst_map, 1, mode="edge")
    border = np.zeros((s, s), bool)
    for nb in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        border |= nb != inst_map
    semantic[border & (inst_map > 0)] = IGNORE

    # mild global illumination and sensor noise, so no two pixels of a flat region are identical
    y = np.arange(s, dtype=np.float32)[:, None] + 0.5
    x = np.arange(s, dtype=np.float32)[None, :] + 0.5
    light = 1.0 + rng.uniform(-0.1, 0.1) * ((x - s / 2) / s) + rng.uniform(-0.1, 0.1) * ((y - s / 2) / s)
    canvas = canvas * light[..., None] + 0.015 * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    return Scene(image_id=image_id, image=image, semantic=semantic, instances=instances, stuff=stuff)
