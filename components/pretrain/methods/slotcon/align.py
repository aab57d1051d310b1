"""Inverse augmentation: bring a view's dense map back onto the region the two views share.

Each view sees a different crop of the image (possibly flipped). The group loss compares the two views' prototype
scores pixel by pixel, so each view's (B, K, h, w) score map is resampled onto the overlap box of the two crops
(RoIAlign, ``aligned=True``, to the same h × w) and, where the view was flipped, flipped back — the official code's
``invaug``. After this, pixel (i, j) of both aligned maps looks at the same place of the original image.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

__all__ = ["align_scores"]


def align_scores(scores: torch.Tensor, coords: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Resample each map onto its overlap box and undo the view's horizontal flip.

    Args:
        scores: (B, K, h, w) dense map of each view (any channel count; gradients flow through).
        coords: (B, 4) overlap box (x0, y0, x1, y1) in this view's normalised [0, 1] coordinates, already flipped with
            the view (as :func:`components.pretrain.crops.sample_two_crops` records it).
        flips: (B,) bool, whether the view was flipped.
    Returns:
        (B, K, h, w) the map on the overlap region, in the original (un-flipped) orientation.
    """
    b, _, h, w = scores.shape
    if coords.shape != (b, 4) or flips.shape != (b,):
        raise ValueError(f"coords {tuple(coords.shape)} / flips {tuple(flips.shape)} do not match scores (B={b})")
    scale = torch.tensor([w, h, w, h], dtype=scores.dtype, device=scores.device)
    rois = torch.cat(
        [torch.arange(b, device=scores.device, dtype=scores.dtype).unsqueeze(1), coords.to(scores) * scale], dim=1
    )
    aligned = roi_align(scores, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = flips.to(device=scores.device, dtype=torch.bool).view(b, 1, 1, 1)
    return torch.where(flips, aligned.flip(-1), aligned)
