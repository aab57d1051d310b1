"""Facts shared by every stage, in one place (no torch import at module level: params validation reads them):
the ImageNet input normalisation (per RGB channel, images in [0, 1]), ``IGNORE_INDEX`` (the "no label" value of
semantic maps, skipped by cross-entropy and the confusion matrices), and the trunk architectures every stage accepts.
"""
from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IGNORE_INDEX: int = 255  # COCO-Stuff and VOC borders, the scenes' 1-px object borders

#: ResNets (torchvision names) and the channels of their last stage (layer4). Params validation, pretraining, export,
#: detection and segmentation all read this one table (through :mod:`components.backbone`).
RESNET_CHANNELS: dict[str, int] = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
}
RESNET_ARCHS: tuple[str, ...] = tuple(RESNET_CHANNELS)

#: Plain ViTs built from torchvision's ``VisionTransformer`` class (never with downloaded weights): patch size, depth,
#: heads, width, MLP width. ``vit_s_16`` / ``vit_b_16`` are the paper models (DeiT-S / ViT-B); ``vit_demo_16`` is the
#: CPU demo's (4 blocks of 192-d, patch 16: a 6x6 grid at 96 px; not DeiT-Ti, which has 12 blocks).
VIT_SPECS: dict[str, dict[str, int]] = {
    "vit_demo_16": dict(patch_size=16, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768),
    "vit_s_16": dict(patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
}
VIT_ARCHS: tuple[str, ...] = tuple(VIT_SPECS)
ARCHS: tuple[str, ...] = RESNET_ARCHS + VIT_ARCHS


def normalize_uint8(images, dim: int = -3):
    """uint8 (or 0-255 float) images ``(..., 3, H, W)`` -> float, ImageNet mean/std, on the images' device."""
    import torch  # lazy: params validation reads this module's tables without torch

    shape = [1] * images.ndim
    shape[dim] = 3
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(shape)
    return (images.float() / 255.0 - mean) / std
