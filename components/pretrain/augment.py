"""Two-view augmentation of the pretraining methods (SlotCon's recipe by default), batched on the training device with
per-sample random parameters from one generator (:class:`TwoViewAugment`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.pretrain.resize import crop_resize, resize_crops

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TwoViewAugment",
    "blur_kernel_size",
    "crop_resize",
    "resize_crops",
    "rgb_to_gray",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "gaussian_blur",
    "solarize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def blur_kernel_size(image_size: int, sigma_max: float = 2.0) -> int:
    """Odd Gaussian kernel size: ~10 % of the image (23 at 224 px), at least 2·⌈3σ_max⌉ + 1, below the image size."""
    k = max(int(0.1 * image_size), 2 * int(-(-3 * sigma_max // 1)) + 1)
    k = k + 1 if k % 2 == 0 else k
    while k // 2 >= image_size:  # reflect padding needs pad < size
        k -= 2
    return max(k, 1)


# --------------------------------------------------------------------------------------------------------------------
# colour: torchvision.transforms.functional semantics on float images in [0, 1], one factor per sample
# --------------------------------------------------------------------------------------------------------------------
def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) → (N, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W), (N,) → ``clamp(factor · x)``."""
    return (_per_sample(factor) * x).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma."""
    return _blend(x, rgb_to_gray(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: faster than a strided reduction over 3 channels
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    grey = chroma == 0
    sat = chroma / torch.where(grey, torch.ones_like(maxc), maxc)
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    hue = torch.where(
        maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)
    )
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack([hue, sat, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    # closed form of the sector table: channel c = v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n_c + 6h) mod 6,
    # n = (5, 3, 1) for (r, g, b); equal to torchvision's p/q/t table for s, v in [0, 1], in a few batched ops
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` ∈ [-0.5, 0.5] of a turn (HSV round trip)."""
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU → device without a stream sync (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Packer:
    """Collects small CPU tensors and moves them to the device in one float and one int64 copy, then hands back
    device views of each, so the per-sample branch decisions cost no GPU→CPU synchronisation."""

    def __init__(self):
        self.floats: list[torch.Tensor] = []
        self.ints: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> tuple[str, int, tuple[int, ...]]:
        bucket = self.ints if t.dtype == torch.int64 else self.floats
        bucket.append(t.reshape(-1).to(torch.int64 if bucket is self.ints else torch.float32))
        return ("i" if bucket is self.ints else "f", len(bucket) - 1, tuple(t.shape))

    def send(self, device: torch.device) -> "_Packer":
        self.dev = {}
        for tag, bucket in (("f", self.floats), ("i", self.ints)):
            if bucket:
                flat = _to_device(torch.cat(bucket), device)
                self.dev[tag] = flat.split([b.numel() for b in bucket])
        return self

    def get(self, handle) -> torch.Tensor:
        tag, i, shape = handle
        return self.dev[tag][i].view(shape)


def _plan_jitter(packer: _Packer, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> list:
    """CPU plan of :func:`color_jitter`: per position and operation, the samples that do it there and their factors
    (``None`` for the indices when every sample does: the op then runs on the whole batch)."""
    steps = []
    n = factors.shape[0]
    for pos in range(4):
        for op_id in range(4):
            use = apply & (order[:, pos] == op_id)
            count = int(use.sum())
            if count == n:
                steps.append((op_id, packer.add(factors[:, op_id]), None))
            elif count:
                idx = use.nonzero().squeeze(1)
                steps.append((op_id, packer.add(factors[idx, op_id]), packer.add(idx)))
    return steps


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _run_jitter(x: torch.Tensor, packer: _Packer, steps: list, owned: bool = False) -> torch.Tensor:
    """Each step on its samples only (the others' pixels are left as they are: what an identity factor gives),
    written back in place: into ``x`` itself when the caller hands it over (``owned``), else into one copy."""
    if not owned and any(idx is not None for _, _, idx in steps):
        x = x.clone()
    for op_id, fac, idx in steps:
        op = _COLOR_OPS[op_id]
        if idx is None:
            x = op(x, packer.get(fac))
        else:
            idx = packer.get(idx)
            x.index_copy_(0, idx, op(x.index_select(0, idx), packer.get(fac)))
    return x


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter with its own parameters and order per sample.

    Each operation at each position runs only on the samples that do it there (gathered, then put back), the
    whole batch when all do.

    Args:
        x: (N, 3, H, W) float in [0, 1].
        factors: (N, 4) CPU brightness, contrast, saturation, hue factors.
        order: (N, 4) CPU int, a permutation of 0..3 per sample (0 brightness, 1 contrast, 2 saturation, 3 hue).
        apply: (N,) CPU bool: which samples are jittered at all.
    """
    packer = _Packer()
    steps = _plan_jitter(packer, factors.cpu().float(), order.cpu(), apply.cpu())
    return _run_jitter(x, packer.send(x.device), steps)


# --------------------------------------------------------------------------------------------------------------------
# blur, solarize
# --------------------------------------------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one σ per sample (torchvision's kernel, reflect padding).

    Args:
        x: (N, C, H, W) float.
        sigma: (N,) standard deviations in pixels.
    """
    n, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.unsqueeze(0) / sigma.to(x).unsqueeze(1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 128.0 / 255.0) -> torch.Tensor:
    """Invert the pixels ≥ threshold (PIL ImageOps.solarize(128) on [0, 1] floats)."""
    return torch.where(x >= threshold, 1.0 - x, x)


# --------------------------------------------------------------------------------------------------------------------
class TwoViewAugment(nn.Module):
    """Batched two-view augmentation of SlotCon (each step below; other methods pass their own probabilities).

    ``forward(images, params, generator)``:
        images: list of B uint8 (3, H_i, W_i) tensors (or a (B, 3, H, W) tensor) on the training device.
        params: collated :func:`~components.pretrain.crops.sample_two_crops` output: ``boxes`` (B, 2, 4),
            ``flips`` (B, 2), ``coords`` (B, 2, 4), and ``draws`` (B, 2, NUM_DRAWS): each sample's uniforms for its
            colour, blur and solarize decisions (extra keys are ignored).
        generator: without ``draws``, the uniforms come from this ``torch.Generator`` (CPU recommended; each call
            draws 2·B·13 numbers).
    Returns a dict to pass as ``model(**views)``:
        view1, view2: (B, 3, S, S) float32, ImageNet-normalised.
        coords1, coords2: (B, 4) float32 overlap boxes in each view's normalised coordinates (flipped with it).
        flip1, flip2: (B,) bool.

    The official recipe (PIL, one image at a time in loader workers) is, per view: crop (RandomResizedCrop, bicubic) →
    horizontal flip (p 0.5) → colour jitter (0.4, 0.4, 0.2, 0.1) in random order, p 0.8 → grayscale p 0.2 → Gaussian
    blur σ ∈ [0.1, 2] (p 1.0 view 1, 0.1 view 2) → solarize (p 0.2, view 2 only) → ImageNet normalisation. Here the
    crop boxes and flips come from the loader workers (:func:`components.pretrain.crops.sample_two_crops`) and
    everything with pixels runs on whole batches:

    * **crop + resize** (``resize``; "auto": "filter" on the CPU, "roi_align" elsewhere). "filter": each crop resized
      from the uint8 image with the authors' antialiased ``interpolation`` (bicubic; MoCo: bilinear), uint8 out, as
      torchvision's ``resized_crop`` and within rounding of PIL (:func:`components.pretrain.resize.resize_crops`).
      "roi_align": one ``torchvision.ops.roi_align(aligned=True)`` call for all 2·B crops of a padded uint8 batch
      (one kernel on the GPU); with ``sampling_ratio=-1`` each output pixel averages ⌈crop/S⌉² bilinear samples:
      exact bilinear when up-sampling, an antialiased (box-of-bilinear) filter approximating PIL's when
      down-sampling. Padding replicates each image's last row/column, so crops touching the border match
      torchvision's edge clamping; batches of very uneven sizes are cropped image by image.
    * **colour jitter**: torchvision's formulas (``adjust_brightness/contrast/saturation/hue`` on float images) with a
      random order per sample; each operation at each position runs only on the samples that do it there.
    * **grayscale**, **solarize** (threshold 128/255, as PIL's 128 on uint8): per-sample masks.
    * **Gaussian blur**: separable depthwise convolution, one kernel per sample, reflect padding, kernel size
      ``max(odd(0.1·S), 13)``: 23 at 224 px as BYOL/torchvision, but never under ±3σ_max at small demo sizes.

    The random numbers are CPU tensors: each sample's own ``draws`` (made in the loader workers with its crops, so a
    sample's views do not depend on which batch, process or device augments it), else one ``torch.Generator``. So
    the same seed gives the same views on CPU and GPU, and no GPU→CPU synchronisation is needed to know which
    samples take which branch.
    """

    def __init__(
        self,
        image_size: int,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel: int | None = None,
        solarize_prob: tuple[float, float] = (0.0, 0.2),
        solarize_threshold: float = 128.0 / 255.0,
        sampling_ratio: int = -1,
        interpolation: str = "bicubic",
        resize: str = "auto",
    ):
        super().__init__()
        if resize not in ("auto", "filter", "roi_align"):
            raise ValueError(f"resize={resize!r}: must be 'auto', 'filter' or 'roi_align'")
        self.interpolation, self.resize = interpolation, resize
        self.image_size = int(image_size)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = tuple(float(p) for p in blur_prob)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.blur_kernel = blur_kernel or blur_kernel_size(self.image_size, self.blur_sigma[1])
        self.solarize_prob = tuple(float(p) for p in solarize_prob)
        self.solarize_threshold = float(solarize_threshold)
        self.sampling_ratio = sampling_ratio
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    NUM_DRAWS = 13  # uniforms per sample and view

    def draw(self, batch_size: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Per-sample parameters of both views from ``generator`` (CPU tensors, leading dims (2, B)); see
        :meth:`from_uniforms`."""
        dev = generator.device if generator is not None else torch.device("cpu")
        return self.from_uniforms(torch.rand(2, batch_size, self.NUM_DRAWS, generator=generator, device=dev).cpu())

    def from_uniforms(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """(2, B, NUM_DRAWS) uniforms in [0, 1) -> per-sample parameters of both views: jitter apply/factors/order,
        grayscale, blur apply/σ, solarize."""
        u = u.cpu()
        b, c, s, h = self.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        view_blur = torch.tensor(self.blur_prob).view(2, 1)
        view_sol = torch.tensor(self.solarize_prob).view(2, 1)
        return {
            "jitter": u[..., 0] < self.jitter_prob,
            "factors": lo + (hi - lo) * u[..., 1:5],
            "order": u[..., 5:9].argsort(dim=-1),  # a uniform random permutation per sample
            "gray": u[..., 9] < self.grayscale_prob,
            "blur": u[..., 10] < view_blur,
            "sigma": self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[..., 11],
            "solarize": u[..., 12] < view_sol,
        }

    def crops(self, images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor,
              device: torch.device) -> torch.Tensor:
        """The 2·B crops, resized to S × S: (2B, 3, S, S) float32 on ``device``, in 0..255, view-major."""
        mode = self.resize if self.resize != "auto" else "filter" if device.type == "cpu" else "roi_align"
        if mode == "filter":
            return resize_crops(images, boxes, self.image_size, self.interpolation).to(device, torch.float32)
        return crop_resize(images, boxes, self.image_size, self.sampling_ratio)

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        params: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        boxes = params["boxes"]
        bsz = boxes.shape[0]
        device = images.device if isinstance(images, torch.Tensor) else images[0].device
        draws = params.get("draws")  # (B, 2, NUM_DRAWS), drawn per sample where its crops were
        r = self.draw(bsz, generator) if draws is None else self.from_uniforms(draws.transpose(0, 1))
        flat = {k: v.reshape(2 * bsz, *v.shape[2:]) for k, v in r.items()}  # view-major (2B, ...)
        packer = _Packer()
        jitter = _plan_jitter(packer, flat["factors"], flat["order"], flat["jitter"])
        gray_idx, sol_idx = flat["gray"].nonzero().squeeze(1), flat["solarize"].nonzero().squeeze(1)
        gray = packer.add(gray_idx) if gray_idx.numel() else None
        sol = packer.add(sol_idx) if sol_idx.numel() else None
        blur_idx = flat["blur"].nonzero().squeeze(1)
        blur = (packer.add(blur_idx), packer.add(flat["sigma"][blur_idx])) if blur_idx.numel() else None
        flips = params["flips"].to(dtype=torch.bool).transpose(0, 1).reshape(-1)  # view-major (2B,)
        flip_idx = flips.nonzero().squeeze(1) if flips.device.type == "cpu" else None  # no sync for CPU flips
        flip = packer.add(flip_idx) if flip_idx is not None and flip_idx.numel() else None
        packer.send(device)

        x = self.crops(images, boxes, device).div_(255.0)  # (2B, 3, S, S), this call's own tensor
        if flip is not None:  # only the flipped samples are touched
            idx = packer.get(flip)
            x.index_copy_(0, idx, x.index_select(0, idx).flip(-1))
        elif flip_idx is None:  # flips given on the device: a mask instead of indices
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        x = _run_jitter(x, packer, jitter, owned=True)  # x is this call's own tensor (made by crop_resize above)
        if gray is not None:  # only the samples that take the branch (the others' pixels are not touched)
            idx = packer.get(gray)
            x.index_copy_(0, idx, rgb_to_gray(x.index_select(0, idx)).expand(-1, x.shape[1], -1, -1))
        if blur is not None:
            idx = packer.get(blur[0])
            x.index_copy_(0, idx, gaussian_blur(x.index_select(0, idx), packer.get(blur[1]), self.blur_kernel))
        if sol is not None:
            idx = packer.get(sol)
            x.index_copy_(0, idx, solarize(x.index_select(0, idx), self.solarize_threshold))
        x = x.sub_(self.mean.to(device)).div_(self.std.to(device))

        coords = params["coords"].to(device=device, dtype=torch.float32)
        pflips = params["flips"].to(device=device, dtype=torch.bool)
        return {
            "view1": x[:bsz],
            "view2": x[bsz:],
            "coords1": coords[:, 0],
            "coords2": coords[:, 1],
            "flip1": pflips[:, 0],
            "flip2": pflips[:, 1],
        }
