"""Two-view crop parameters (boxes, flips, overlap coordinates), drawn in the CPU loader workers; no pixels touched
here (they are cropped later, batched on the device: :mod:`components.pretrain.augment`). Every draw is a pure function
of ``(height, width, generator)`` with torch's RNG only, consuming a fixed count of numbers, so a seeded generator
reproduces a whole epoch exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["sample_two_crops", "collate_crop_params", "overlap_coords", "flip_coords"]


def _draw_box(
    height: int,
    width: int,
    draws: list[list[float]],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    accept=None,
) -> tuple[int, int, int, int] | None:
    """torchvision RandomResizedCrop.get_params on pre-drawn uniforms; returns (x0, y0, w, h) or None.

    ``draws`` rows are 4 uniforms in [0, 1): scale, log-ratio, top, left. ``accept(box)`` optionally rejects a box
    (the overlap condition of the second crop).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for u_scale, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # randint(0, height - h) inclusive, as torchvision, from one uniform
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            box = (left, top, w, h)
            if accept is None or accept(box):
                return box
    return None


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest central crop whose aspect ratio lies in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _intersection(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Overlap area of two (x0, y0, w, h) boxes in pixels."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


def overlap_coords(boxes: torch.Tensor) -> torch.Tensor:
    """Overlap box of two crops in each crop's normalised coordinates.

    Args:
        boxes: (2, 4) pixel boxes (x0, y0, x1, y1) of the two crops in the original image.
    Returns:
        (2, 4) the intersection box expressed as (x0, y0, x1, y1) in [0, 1] relative to crop 1 (row 0) and crop 2
        (row 1), before any flip. Empty overlaps give x1 < x0 (never produced outside the fallback, which has none).
    """
    lo = torch.maximum(boxes[0, :2], boxes[1, :2])
    hi = torch.minimum(boxes[0, 2:], boxes[1, 2:])
    inter = torch.cat([lo, hi])  # (4,)
    origin = boxes[:, [0, 1, 0, 1]]  # (2, 4)
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (2, 4): w, h, w, h
    return (inter.unsqueeze(0) - origin) / size


def flip_coords(coords: torch.Tensor) -> torch.Tensor:
    """Horizontally flip normalised (…, 4) boxes: x0' = 1 − x1, x1' = 1 − x0."""
    out = coords.clone()
    out[..., 0] = 1.0 - coords[..., 2]
    out[..., 2] = 1.0 - coords[..., 0]
    return out


def sample_two_crops(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    min_overlap: float = 0.01,
    max_tries: int = 10,
    flip_prob: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Draw SlotCon's two overlapping random resized crops and their flips for one ``height`` × ``width`` image.

    Crop 1 follows torchvision's RandomResizedCrop (``max_tries`` draws, then the central-crop fallback). Crop 2 is
    re-drawn until its intersection with crop 1 covers at least ``min_overlap`` of crop 2's own area (the official
    code compares with the drawn target area; we use the rounded box's area, which is what the box really covers).
    **Fallback**: if no draw qualifies within ``max_tries``, crop 2 = crop 1 (a full overlap), flagged ``fallback``.
    (The official code falls back to an unconditioned crop that may not overlap at all, which would give the
    inverse augmentation an empty box.)

    The generator always consumes the same count of numbers (2·max_tries·4 + 2), whatever happens.

    Returns a dict of CPU tensors:
        boxes:    (2, 4) float32 pixel boxes (x0, y0, x1, y1) of crop 1 and crop 2 in the original image (integers).
        flips:    (2,) bool, whether view 1 / view 2 is flipped horizontally after cropping.
        coords:   (2, 4) float32 overlap box in view 1's / view 2's normalised [0, 1] coordinates, flipped with it.
        fallback: () bool, True if crop 2 is the explicit fallback (= crop 1).

    The official recipe (SlotCon's ``CustomTwoCrop`` + ``CustomRandomHorizontalFlip``): two random resized crops
    (torchvision's parameters, scale (0.08, 1), ratio (3/4, 4/3)), the second re-drawn until it overlaps the first by
    at least 1 % of its own area (10 tries), each view flipped with p = 0.5. What the model needs from this is the
    *overlap box* of the two crops in each view's normalised coordinates (flipped with the view), which drives the
    inverse augmentation (:mod:`components.pretrain.methods.slotcon.align`).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale={scale} and ratio={ratio} must be increasing positive ranges")
    u = torch.rand(2, max_tries, 4, generator=generator, dtype=torch.float64).tolist()
    u_flip = torch.rand(2, generator=generator)

    box1 = _draw_box(height, width, u[0], scale, ratio) or _central_box(height, width, ratio)
    box2 = _draw_box(
        height, width, u[1], scale, ratio, accept=lambda b: _intersection(b, box1) >= min_overlap * b[2] * b[3]
    )
    fallback = box2 is None
    if fallback:
        box2 = box1

    boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (box1, box2)], dtype=torch.float32)
    flips = u_flip < flip_prob
    coords = overlap_coords(boxes)
    coords = torch.where(flips.unsqueeze(1), flip_coords(coords), coords)
    return {"boxes": boxes, "flips": flips, "coords": coords, "fallback": torch.tensor(fallback)}


def collate_crop_params(params: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample :func:`sample_two_crops` dicts into a batch: boxes (B, 2, 4), flips (B, 2), coords (B, 2, 4),
    fallback (B,)."""
    if not params:
        raise ValueError("collate_crop_params needs at least one sample")
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}
