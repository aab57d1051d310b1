"""Semantic segmentation heads on a pretrained trunk: FCN on a dilated ResNet (mmsegmentation's ``fcn_r50-d8``/``-d16``,
the SlotCon transfer protocol), DeepLabv3+ with ReCo's representation head (the ReCo protocol), or an FCN head on a
plain ViT's stride-16 map; :func:`build_segmenter` picks one from ``segment.head``. Each answers ``model(x)`` with
``(B, C, H, W)`` logits at the input size and ``model(x, train_logits=True)`` with low-resolution training outputs
``{"logits", "aux" (FCN's auxiliary logits or None), "rep" (ReCo's representation or None)}``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP

from components.backbone import (RESNET_ARCHS, build_resnet, build_vit, check_arch, is_vit, load_trunk, tokens_to_map,
                                 trunk_channels, vit_embed)
from components.errors import UserError


def build_trunk(arch: str, output_stride: int = 8) -> nn.Module:
    """A torchvision ResNet (random init, no ``fc``/``avgpool``) with output stride 8 or 16."""
    check_arch(arch, "segment", RESNET_ARCHS)
    return build_resnet(arch, output_stride=output_stride, head="none")


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class FCNHead(nn.Module):
    """mmseg ``FCNHead``: ``num_convs`` conv-BN-ReLU, optional concat of the input + fuse conv, dropout, 1x1 classifier.

    ``(B, in_channels, h, w) -> (B, num_classes, h, w)``.
    """

    def __init__(self, *, in_channels: int, channels: int, num_classes: int, num_convs: int = 2,
                 concat_input: bool = True, dropout: float = 0.1):
        super().__init__()
        convs = [ConvBNReLU(in_channels if i == 0 else channels, channels) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = ConvBNReLU(in_channels + channels, channels) if concat_input and num_convs else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(self.dropout(y))


def _fcn_heads(in_channels: int, aux_channels: int, *, num_classes: int, head_channels: int, num_convs: int,
               concat_input: bool, dropout: float, aux: bool) -> tuple[FCNHead, FCNHead | None]:
    """The main FCN head and the auxiliary one (one conv, half the width, no concat) or None."""
    head = FCNHead(in_channels=in_channels, channels=head_channels, num_classes=num_classes, num_convs=num_convs,
                   concat_input=concat_input, dropout=dropout)
    aux_head = (
        FCNHead(in_channels=aux_channels, channels=max(head_channels // 2, 8), num_classes=num_classes, num_convs=1,
                concat_input=False, dropout=dropout)
        if aux else None
    )
    return head, aux_head


class _FCNModel(nn.Module):
    """A trunk with FCN heads: subclasses give ``forward_logits`` (low-resolution main and auxiliary logits)."""

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, train_logits: bool = False):
        """``(B,C,H,W)`` logits at the input size; ``train_logits=True``: ``{"logits", "aux", "rep": None}`` at the
        trunk's stride (training goes through ``forward`` so DDP's gradient hooks see the call)."""
        logits, aux = self.forward_logits(x)
        if train_logits:
            return {"logits": logits, "aux": aux, "rep": None}
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class FCN(_FCNModel):
    """Dilated ResNet trunk + FCN head (+ auxiliary head on layer3). ``(B,3,H,W) -> (B,C,H,W)`` logits.

    The ResNet's last stage(s) trade stride for dilation (output stride 8: layer3 and layer4 dilated 2 and 4; 16:
    layer4 dilated 2; :func:`components.backbone.dilate_resnet_`); the FCN head (``num_convs`` 3x3 conv-BN-ReLU, the
    input concatenated back, dropout 0.1, 1x1 classifier) sits on layer4, the auxiliary one on layer3 (loss weight
    0.4). The trunk's state_dict keys are exactly the exported backbone's (torchvision minus ``fc.*``), so
    :func:`load_trunk_` is a strict load.
    """

    def __init__(self, *, arch: str, num_classes: int, output_stride: int = 8, head_channels: int = 512,
                 num_convs: int = 2, concat_input: bool = True, dropout: float = 0.1, aux: bool = True):
        super().__init__()
        self.arch = arch
        self.backbone = build_trunk(arch, output_stride)
        c4 = trunk_channels(arch)
        self.head, self.aux_head = _fcn_heads(c4, c4 // 2, num_classes=num_classes, head_channels=head_channels,
                                              num_convs=num_convs, concat_input=concat_input, dropout=dropout,
                                              aux=aux)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Low-resolution ``(B,C,H/os,W/os)`` main and auxiliary logits."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        aux = self.aux_head(c3) if self.aux_head is not None and self.training else None
        return self.head(c4), aux


class DeepLabV3Plus(nn.Module):
    """Dilated ResNet trunk + ASPP + low-level decoder (+ ReCo representation head), as ReCo's ``network/deeplabv3``
    (Chen et al. 2018).

    ``(B,3,H,W) -> (B,C,H,W)`` logits; ``train_logits=True`` -> ``{"logits": (B,C,H/4,W/4), "aux": None,
    "rep": (B,rep_dim,H/4,W/4) | None}``. The trunk at output stride 16 (layer4 dilated 2; 8 also works),
    torchvision's ``ASPP`` without its final dropout (rates 6/12/18 at os 16, 12/24/36 at os 8; 256 channels) on
    layer4, the low-level decoder (layer1 -> 1x1 conv-BN-ReLU to 48 channels; ASPP output bilinearly upsampled to
    that 1/4 grid and concatenated: 304 channels with the default widths), a classifier (3x3 conv-BN-ReLU 256, 1x1 to C) and ReCo's representation
    head (3x3 conv -> BN -> ReLU -> 1x1 conv to ``rep_dim`` = 256) on the same 1/4-resolution features.
    ``rep_dim=0`` builds no representation head (supervised / ClassMix runs: every parameter then gets a gradient, as
    DDP without ``find_unused_parameters`` requires).
    """

    def __init__(self, *, arch: str, num_classes: int, output_stride: int = 16, aspp_channels: int = 256,
                 low_channels: int = 48, decoder_channels: int = 256, rep_dim: int = 256):
        super().__init__()
        self.arch = arch
        self.backbone = build_trunk(arch, output_stride)
        c4 = trunk_channels(arch)
        c1 = c4 // 8  # layer1's width: 64 (BasicBlock ResNets), 256 (Bottleneck)
        self.aspp = ASPP(c4, [6, 12, 18] if output_stride == 16 else [12, 24, 36], aspp_channels)
        # ReCo's ASPP ends at the projection's conv-BN-ReLU (network/deeplabv3/aspp.py): drop torchvision's
        # trailing Dropout(0.5), which would zero half of the features that classifier and representation head see
        self.aspp.project = self.aspp.project[:3]
        self.project = ConvBNReLU(c1, low_channels, k=1)
        fused = aspp_channels + low_channels
        self.classifier = nn.Sequential(ConvBNReLU(fused, decoder_channels), nn.Conv2d(decoder_channels, num_classes, 1))
        self.representation = (
            nn.Sequential(ConvBNReLU(fused, decoder_channels), nn.Conv2d(decoder_channels, rep_dim, 1))
            if rep_dim else None
        )

    def forward(self, x: torch.Tensor, *, train_logits: bool = False):
        b = self.backbone
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        high = self.aspp(b.layer4(b.layer3(b.layer2(low))))
        low = self.project(low)
        feats = torch.cat([low, F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)], 1)
        logits = self.classifier(feats)
        if train_logits:
            rep = self.representation(feats) if self.representation is not None else None
            return {"logits": logits, "aux": None, "rep": rep}
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ViTFCN(_FCNModel):
    """ViT trunk (position table for ``image_size`` px, resized per input) + FCN head on the stride-16 map (+ an
    auxiliary head on the middle block's tokens). ``(B,3,H,W) -> (B,C,H,W)`` logits."""

    def __init__(self, *, arch: str, num_classes: int, image_size: int = 224, head_channels: int = 512,
                 num_convs: int = 2, concat_input: bool = True, dropout: float = 0.1, aux: bool = True):
        super().__init__()
        self.arch = arch
        self.backbone = build_vit(arch, -(-image_size // 16) * 16, head="none")
        d = trunk_channels(arch)
        self.aux_block = len(self.backbone.encoder.layers) // 2 - 1
        self.head, self.aux_head = _fcn_heads(d, d, num_classes=num_classes, head_channels=head_channels,
                                              num_convs=num_convs, concat_input=concat_input, dropout=dropout,
                                              aux=aux)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stride-16 ``(B,C,H/16,W/16)`` main and auxiliary logits."""
        vit = self.backbone
        grid = (x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size)
        tokens, mid = vit_embed(vit, x), None
        for i, block in enumerate(vit.encoder.layers):
            tokens = block(tokens)
            if i == self.aux_block:
                mid = tokens
        c16 = tokens_to_map(vit.encoder.ln(tokens)[:, 1:], grid)
        use_aux = self.aux_head is not None and self.training
        aux = self.aux_head(tokens_to_map(mid[:, 1:], grid)) if use_aux else None
        return self.head(c16), aux


def load_trunk_(model: nn.Module, state_dict: dict, where: str) -> None:
    """Strict load of torchvision ResNet keys (minus ``fc.*``) into ``model.backbone``; a mismatch names the file."""
    load_trunk(model.backbone, state_dict, arch=getattr(model, "arch", "resnet"), source=where,
               fix="re-run `slotcon export` for this arch, or set segment.init: random")


HEADS = ("fcn", "deeplabv3plus")


def build_segmenter(cfg, *, arch: str, num_classes: int, method: str | None = None) -> nn.Module:
    """The model ``segment.head`` names for ``method`` (default ``segment.method``), from a
    :class:`~components.config.SegmentConfig`; only ReCo gets a representation head. A ViT arch gets :class:`ViTFCN`
    (its position table built for ``crop_size``); DeepLabv3+ needs a ResNet's stride-4 features."""
    method = method or cfg.method
    if is_vit(arch):
        if cfg.resolved_head == "deeplabv3plus":
            raise UserError(f"params: segment.head: deeplabv3plus needs a ResNet trunk (a stride-4 map) and {arch} "
                            "is a ViT; set segment.head: fcn")
        return ViTFCN(arch=arch, num_classes=num_classes, image_size=cfg.crop_size, head_channels=cfg.head_channels,
                      num_convs=cfg.num_convs, concat_input=cfg.concat_input, dropout=0.1, aux=cfg.aux_weight > 0)
    if cfg.resolved_head == "deeplabv3plus":  # the run's head, also for the supervised baseline of a ReCo run
        width = cfg.head_channels  # ASPP and decoder width (paper: 256)
        return DeepLabV3Plus(arch=arch, num_classes=num_classes, output_stride=cfg.output_stride, aspp_channels=width,
                             decoder_channels=width, rep_dim=cfg.reco.rep_dim if method == "reco" else 0)
    return FCN(arch=arch, num_classes=num_classes, output_stride=cfg.output_stride, head_channels=cfg.head_channels,
               num_convs=cfg.num_convs, concat_input=cfg.concat_input, dropout=0.1, aux=cfg.aux_weight > 0)
