"""A plain ViT as a detection backbone: ViTDet's simple feature pyramid (Li et al., ECCV 2022, Fig. 2c), built from
the ViT's one stride-16 map alone (no FPN top-down path), with torchvision's FPN output names so its Mask R-CNN takes
it unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from components.backbone import build_vit, load_trunk, vit_feature_map
from components.errors import UserError

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid", "build_vit_pyramid"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (ViTDet's ``LayerNorm`` for convs); an ``nn.LayerNorm``
    so the optimiser's norm rules (no weight decay) find it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _neck(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), LayerNorm2d(cout),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViT trunk (``torchvision`` ``VisionTransformer`` without ``heads``, patch 16) -> 5 maps of ``out_channels``.

    ``forward``: normalised, padded images ``(B, 3, H, W)`` (multiples of 32) -> ``OrderedDict`` ``{"0": stride 4,
    "1": 8, "2": 16, "3": 32, "pool": 64}``, each ``(B, out_channels, H/s, W/s)``::

        stride 4:  deconv 2x2/2 -> LayerNorm -> GELU -> deconv 2x2/2      (D -> D/2 -> D/4 channels)
        stride 8:  deconv 2x2/2                                           (D -> D/2)
        stride 16: the map itself                                         (D)
        stride 32: max-pool 2x2/2                                         (D)
        each then: 1x1 conv -> LayerNorm -> 3x3 conv -> LayerNorm         (-> 256 channels)
        stride 64: max-pool of the stride-32 output (kernel 1, stride 2; torchvision's LastLevelMaxPool)

    The names are torchvision FPN's (``"0"`` .. ``"3"``, ``"pool"``), so torchvision's Mask R-CNN (default anchors
    32..512, RoIAlign on ``"0"``-``"3"``) takes it unchanged. The ViT runs global attention at the input size, its
    position embedding resized to each padded batch's grid (:func:`components.backbone.vit_tokens`); ViTDet's window
    attention and relative positions are left out (they cost more code than a CPU demo needs; at COCO sizes global
    attention is the expensive part).
    """

    def __init__(self, trunk: nn.Module, out_channels: int = 256):
        super().__init__()
        if trunk.patch_size != 16:
            raise UserError(f"the simple feature pyramid expects a stride-16 ViT (patch 16), got patch {trunk.patch_size}")
        d = trunk.hidden_dim
        self.trunk = trunk
        self.out_channels = out_channels
        self.up4 = nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                                 nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2))
        self.up8 = nn.ConvTranspose2d(d, d // 2, 2, stride=2)
        self.down32 = nn.MaxPool2d(2, 2)
        self.necks = nn.ModuleList([_neck(c, out_channels) for c in (d // 4, d // 2, d, d)])

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c16 = vit_feature_map(self.trunk, images)  # (B, D, H/16, W/16)
        levels = (self.up4(c16), self.up8(c16), c16, self.down32(c16))
        out = OrderedDict((str(i), neck(x)) for i, (neck, x) in enumerate(zip(self.necks, levels)))
        out["pool"] = nn.functional.max_pool2d(out["3"], kernel_size=1, stride=2)
        return out


def build_vit_pyramid(arch: str, *, trunk_size: int, trunk_state: Mapping[str, torch.Tensor] | None = None,
                      trunk_source: str = "backbone", fix: str = "export a matching backbone with `slotcon export`",
                      out_channels: int = 256) -> SimpleFeaturePyramid:
    """A ViT of ``arch`` whose position table is built for ``trunk_size`` px (pretrained positions are resized to it
    once, then per batch), loaded strictly from ``trunk_state`` when given, under a simple feature pyramid."""
    trunk = build_vit(arch, trunk_size, head="none")
    if trunk_state is not None:
        load_trunk(trunk, trunk_state, arch=arch, source=trunk_source, fix=fix)
    return SimpleFeaturePyramid(trunk, out_channels)
