"""Facts shared by every stage, in one place (they used to be copied, and copies drift).

- ``IMAGENET_MEAN`` / ``IMAGENET_STD``: the input normalisation of every torchvision trunk, SlotCon's recipe and the
  downstream protocols (per RGB channel, images in [0, 1]).
- ``IGNORE_INDEX``: the "no label" value of semantic maps (COCO-Stuff, VOC borders, the scenes' 1-px object borders);
  cross-entropy and the confusion matrices skip it.
- ``RESNET_ARCHS``: the trunk architectures every stage accepts (no torch import here: params validation reads it).
"""
from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IGNORE_INDEX: int = 255

#: ResNets (torchvision names) and the channels of their last stage (layer4). Params validation, pretraining, export,
#: detection and segmentation all read this one table (through :mod:`components.backbone`).
RESNET_CHANNELS: dict[str, int] = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
}
RESNET_ARCHS: tuple[str, ...] = tuple(RESNET_CHANNELS)


def normalize_uint8(images, dim: int = -3):
    """uint8 (or 0-255 float) images ``(..., 3, H, W)`` -> float, ImageNet mean/std, on the images' device."""
    import torch

    shape = [1] * images.ndim
    shape[dim] = 3
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(shape)
    return (images.float() / 255.0 - mean) / std
