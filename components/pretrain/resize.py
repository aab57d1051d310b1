"""Crop + resize of the two views, on whole batches: :func:`resize_crops` (each crop with PIL's antialiased filter,
uint8 in and out, as the authors' ``RandomResizedCrop`` on PIL images; the CPU path) and :func:`crop_resize` (every
crop of a batch in one RoIAlign call; the GPU path, one kernel).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["crop_resize", "resize_crops", "INTERPOLATIONS"]

INTERPOLATIONS = ("bicubic", "bilinear")


def resize_crops(images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Each (integer) crop box of each image resized to ``size`` × ``size`` with the antialiased ``interpolation``
    filter: what ``torchvision.transforms.functional.resized_crop(..., antialias=True)`` does to a uint8 image, and
    within rounding of PIL's ``Image.resize`` (the authors' pipeline: bicubic for SlotCon and SIM, bilinear for MoCo).

    Args:
        images: (B, 3, H, W) tensor or a list of B (3, H_i, W_i) uint8 tensors.
        boxes: (B, V, 4) pixel boxes (x0, y0, x1, y1); rounded to whole pixels (the crops draw whole pixels).
    Returns:
        (V·B, 3, S, S) uint8 on CPU (torch's vectorised uint8 path), else float32 rounded to whole values; view-major.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: must be one of {INTERPOLATIONS}")
    b, v = boxes.shape[:2]
    if len(images) != b:
        raise ValueError(f"{len(images)} images but boxes for {b}")
    out = []
    for view, per_image in enumerate(boxes.round().to(torch.int64).transpose(0, 1).tolist()):
        for i, (x0, y0, x1, y1) in enumerate(per_image):
            im = images[i]
            h, w = int(im.shape[-2]), int(im.shape[-1])
            x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
            x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
            crop = im[None, :, y0:y1, x0:x1]
            if crop.device.type != "cpu" or crop.dtype != torch.uint8:
                crop = crop.float()
            r = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
            out.append(r if r.dtype == torch.uint8 else r.round_().clamp_(0, 255))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
def _pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Variable-size uint8 (3, H_i, W_i) images → (B, 3, max H + 1, max W + 1), each image's last row/column
    replicated once so bilinear samples near its border clamp to its edge (not to the zero padding)."""
    hmax = max(int(im.shape[-2]) for im in images)
    wmax = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], hmax + 1, wmax + 1))
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        out[i, :, :h, :w] = im
        out[i, :, h, :w] = im[:, h - 1]
        out[i, :, : h + 1, w] = out[i, :, : h + 1, w - 1]
    return out


def crop_resize(
    images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, size: int, sampling_ratio: int = -1
) -> torch.Tensor:
    """Crop several boxes from each image and resize them to ``size`` × ``size`` in one RoIAlign call.

    Args:
        images: (B, 3, H, W) tensor or a list of B (3, H_i, W_i) tensors (uint8 or float), all on one device.
        boxes: (B, V, 4) pixel boxes (x0, y0, x1, y1) of V crops per image.
        size: output side S.
        sampling_ratio: RoIAlign samples per bin and axis; -1 = adaptive ⌈crop / S⌉ (antialiased down-sampling).
    Returns:
        (V·B, 3, S, S) float32 in the input's value range, view-major: rows v·B … v·B + B − 1 are crop v.
    """
    b, v = boxes.shape[:2]
    if len(images) != b:
        raise ValueError(f"{len(images)} images but boxes for {b}")
    device = images[0].device
    boxes = boxes.to(device=device, dtype=torch.float32)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = images
    elif len({tuple(im.shape) for im in images}) == 1:
        batch = torch.stack(list(images))
    else:
        padded = len(images) * (max(im.shape[-2] for im in images) + 1) * (max(im.shape[-1] for im in images) + 1)
        if padded <= 4 * sum(im.shape[-2] * im.shape[-1] for im in images):
            batch = _pad_batch(images)  # COCO-like sizes: one padded batch, one kernel
        else:  # very uneven sizes (a few huge images): crop image by image instead of padding everything
            crops = [
                roi_align(im.unsqueeze(0).float(), [boxes[i]], output_size=(size, size),
                          sampling_ratio=sampling_ratio, aligned=True)
                for i, im in enumerate(images)
            ]  # each (V, 3, S, S)
            return torch.stack(crops, dim=1).flatten(0, 1)  # view-major
    idx = torch.arange(b, device=device, dtype=torch.float32).repeat(v)  # view-major
    rois = torch.cat([idx.unsqueeze(1), boxes.transpose(0, 1).reshape(-1, 4)], 1)
    return roi_align(batch.float(), rois, output_size=(size, size), sampling_ratio=sampling_ratio, aligned=True)
