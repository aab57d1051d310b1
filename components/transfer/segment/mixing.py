"""Batched, seeded data mixing and strong augmentation for semi-supervised segmentation (ReCo's ``generate_unsup_data``
and ``batch_transform``): ClassMix / CutMix masks, pair mixing, flip and colour jitter, on the device, every random
number from the generator passed in.
"""
from __future__ import annotations

import torch

from components.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


def class_mix_masks(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix (Olsson et al. 2021): ``labels (B, H, W)`` long (255 = ignore) -> bool ``(B, H, W)``: the pixels of
    image ``i`` whose class is in a uniformly drawn half (``floor(n_i / 2)``) of the ``n_i`` classes present in it
    (ignored pixels never are)."""
    b = labels.shape[0]
    valid = labels != IGNORE_INDEX
    idx = torch.where(valid, labels, torch.full_like(labels, num_classes)).view(b, -1)  # ignore -> an extra slot
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, idx, True)
    present = present[:, :num_classes]
    scores = torch.rand(b, num_classes, device=labels.device, generator=generator)
    scores = scores.masked_fill(~present, 2.0)  # absent classes sort last
    rank = torch.argsort(torch.argsort(scores, dim=1), dim=1)  # a uniform random order of the present classes
    chosen = rank < (present.sum(1, keepdim=True) // 2)
    chosen = torch.cat([chosen, chosen.new_zeros(b, 1)], dim=1)  # the ignore slot is never chosen
    return chosen.gather(1, idx).view_as(labels)


def cut_mix_masks(batch: int, height: int, width: int, *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """CutMix as ReCo draws it (``generate_cutout_mask``): bool ``(B, H, W)``, False inside one box of half the area
    per image (width uniform in ``(W/2, W)``, height = area / width, uniformly placed)."""
    u = torch.rand(batch, 3, device=device, generator=generator)
    lo = width // 2 + 1
    w = (lo + (u[:, 0] * max(width - lo, 1)).floor()).clamp(max=width)
    h = (height * width / 2 / w).round().clamp(1, height)
    x0 = (u[:, 1] * (width - w + 1)).floor()
    y0 = (u[:, 2] * (height - h + 1)).floor()
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + h)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + w)[:, None, None]))
    return ~inside


def mix_pairs(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``x (B, ..., H, W)`` -> ``where(mask_i, x_i, x_{(i+1) mod B})`` with ``mask (B, H, W)`` broadcast over
    the channel dimension of images: one mask for images, pseudo-labels and confidences alike, the next image in the
    batch cyclically, exactly as ReCo pairs them."""
    out = []
    for x in tensors:
        m = mask if x.dim() == mask.dim() else mask[:, None]
        out.append(torch.where(m, x, x.roll(-1, dims=0)))
    return tuple(out)


def _gray(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``(B, 3, H, W)`` in [0, 1] -> ``(B, 1, H, W)`` (torchvision's ``rgb_to_grayscale``)."""
    return (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])


def color_jitter(images: torch.Tensor, generator: torch.Generator | None = None, *, strength: float = 0.25,
                 p: float = 0.8) -> torch.Tensor:
    """Normalised ``(B, 3, H, W)`` -> the same with brightness, contrast and saturation scaled by factors drawn from
    ``[1 - strength, 1 + strength]`` (with probability ``p`` per image; torchvision's formulas)."""
    b, dev = images.shape[0], images.device
    mean = torch.tensor(IMAGENET_MEAN, device=dev, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev, dtype=images.dtype).view(1, 3, 1, 1)
    u = torch.rand(b, 4, device=dev, generator=generator)
    apply = (u[:, 0] < p).view(b, 1, 1, 1)
    f = (1 - strength + 2 * strength * u[:, 1:]).to(images.dtype).view(b, 3, 1, 1, 1)
    x = (images * std + mean).clamp(0, 1)
    x = (x * f[:, 0]).clamp(0, 1)  # brightness
    x = ((x - _gray(x).mean((2, 3), keepdim=True)) * f[:, 1] + _gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
    x = ((x - _gray(x)) * f[:, 2] + _gray(x)).clamp(0, 1)  # saturation
    return torch.where(apply, (x - mean) / std, images)


def strong_augment(images: torch.Tensor, *others: torch.Tensor, generator: torch.Generator | None = None,
                   jitter: bool = True) -> tuple[torch.Tensor, ...]:
    """Per-sample horizontal flip (p 0.5) of ``images (B, 3, H, W)`` and every ``(B, H, W)`` tensor in ``others``
    alike, then (``jitter``) :func:`color_jitter` of the images."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    out = [torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)]
    out += [torch.where(flip.view(-1, 1, 1), t.flip(-1), t) for t in others]
    if jitter:
        out[0] = color_jitter(out[0], generator)
    return tuple(out)
