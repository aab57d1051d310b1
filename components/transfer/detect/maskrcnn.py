"""Mask R-CNN with a ResNet-FPN or ViT simple-pyramid backbone on a pretrained trunk (:func:`build_model`), its
schedule (:func:`lr_at`: detectron2's WarmupMultiStepLR as a pure function) and optimiser groups (:func:`param_groups`:
no weight decay on norm parameters, detectron2 ``WEIGHT_DECAY_NORM=0``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from components.backbone import ARCHS, build_resnet, check_arch, is_vit, load_trunk
from components.errors import UserError
from components.io import read_torch_file
from components.transfer.detect.vit_pyramid import build_vit_pyramid

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
WARMUP_FACTOR = 0.001  # detectron2 WARMUP_FACTOR: warm-up starts at lr / 1000
GAMMA = 0.1  # step decay factor


# --------------------------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------------------------
def lr_at(it: int, *, base_lr: float, warmup_iters: int, steps: Sequence[int], warmup_factor: float = WARMUP_FACTOR,
          gamma: float = GAMMA) -> float:
    """Learning rate of iteration ``it`` (0-based): detectron2's WarmupMultiStepLR as a pure function.

    ``base_lr * gamma ** #{s in steps: s <= it} * w`` with ``w = f + (1 - f) * it / warmup_iters`` for
    ``it < warmup_iters`` (f = ``warmup_factor``), else 1.
    """
    decay = gamma ** sum(1 for s in steps if it >= s)
    if it < warmup_iters:
        alpha = it / warmup_iters
        return base_lr * decay * (warmup_factor * (1.0 - alpha) + alpha)
    return base_lr * decay


# --------------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------------
def _norm_layer(norm: str) -> Callable[..., nn.Module]:
    return FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d  # syncbn: converted once a group exists


def _backbone(arch: str, norm: str, trunk_state: Mapping[str, torch.Tensor] | None, trunk_source: str,
              trunk_size: int) -> nn.Module:
    """ResNet-FPN (P2-P6, 256 channels) on a strictly loaded trunk, or a ViT under the simple feature pyramid."""
    check_arch(arch, trunk_source, ARCHS)
    fix = f"export a {arch} backbone with `slotcon export` or set detect.init: random"
    if is_vit(arch):
        return build_vit_pyramid(arch, trunk_size=trunk_size, trunk_state=trunk_state, trunk_source=trunk_source,
                                 fix=fix)
    frozen = norm == "frozen"
    trunk = build_resnet(arch, norm_layer=_norm_layer(norm), head="keep")
    if trunk_state is not None:
        load_trunk(trunk, trunk_state, arch=arch, source=trunk_source, fix=fix)
    # SSL transfer fine-tunes every layer (detectron2 FREEZE_AT=0); the supervised/FrozenBN recipe freezes stem+res2
    return _resnet_fpn_extractor(trunk, trainable_layers=3 if frozen else 5,
                                 norm_layer=None if frozen else nn.BatchNorm2d)


def _heads(out_channels: int, *, num_classes: int, box_head: str, mask_head: Sequence[int],
           head_norm: Callable[..., nn.Module] | None) -> dict[str, Any]:
    """The RPN / box / mask heads and predictors as :class:`MaskRCNN` keyword arguments."""
    kwargs: dict[str, Any] = {}
    if box_head == "4conv1fc":
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        kwargs.update(
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((out_channels, 7, 7), [256] * 4, [1024], norm_layer=head_norm),
        )
    elif box_head == "2fc":
        kwargs["box_head"] = TwoMLPHead(out_channels * 7 * 7, 1024)
    else:
        raise ValueError(f"box_head={box_head!r} must be '2fc' or '4conv1fc'")
    kwargs["box_predictor"] = FastRCNNPredictor(1024, num_classes + 1)  # both heads end in a 1024-d representation
    widths = [int(c) for c in mask_head]
    kwargs["mask_head"] = MaskRCNNHeads(out_channels, widths, 1,
                                        norm_layer=head_norm if box_head == "4conv1fc" else None)
    kwargs["mask_predictor"] = MaskRCNNPredictor(widths[-1], widths[-1], num_classes + 1)
    return kwargs


def build_model(
    *,
    arch: str,
    num_classes: int,
    norm: str = "bn",
    box_head: str = "2fc",
    min_size: Sequence[int] = (800,),
    max_size: int = 1333,
    rpn_batch_size: int = 256,
    roi_batch_size: int = 512,
    proposals_train: int = 2000,
    proposals_test: int = 1000,
    mask_head: Sequence[int] = (256, 256, 256, 256),
    detections_per_img: int = 100,
    trunk_state: Mapping[str, torch.Tensor] | None = None,
    trunk_source: str = "backbone",
    trunk_size: int = 224,
) -> nn.Module:
    """Mask R-CNN, ResNet-FPN (P2-P6, 256 channels), ``num_classes`` foreground classes (+ background).

    Input: a list of float images ``(3, H_i, W_i)`` in [0, 1]; training also takes targets (see
    :func:`components.transfer.detect.targets.coco_to_target`). ``trunk_state`` (torchvision ResNet keys) is loaded
    strictly into the trunk (:func:`components.backbone.load_trunk`); None keeps torchvision's random init.
    ``norm``: ``bn`` / ``syncbn`` train BN in the trunk, FPN and (``box_head="4conv1fc"``) the ROI heads, every layer
    fine-tuned, as the SSL transfer protocols (MoCo/SlotCon detectron2 configs ``*_syncbn``); ``frozen`` is
    torchvision's supervised default (FrozenBN, stem + layer1 frozen, no norm in FPN/heads). ``box_head="4conv1fc"``
    uses the normalised heads of the SSL transfer configs (torchvision's ``maskrcnn_resnet50_fpn_v2`` layout).
    ``mask_head`` are the widths of the mask head's 3x3 convs at 14x14 (COCO: four of 256; on a CPU it dominates the
    step). A ViT ``arch`` gets the simple feature pyramid (LayerNorm in the pyramid whatever ``norm`` says, the trunk
    fully trained); ``trunk_size`` is the image size its position table is built for (the pretrained one is resized).
    """
    backbone = _backbone(arch, norm, trunk_state, trunk_source, trunk_size)
    heads = _heads(backbone.out_channels, num_classes=num_classes, box_head=box_head, mask_head=mask_head,
                   head_norm=None if norm == "frozen" else nn.BatchNorm2d)
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors carry num_classes + 1 (background)
        min_size=tuple(int(s) for s in min_size),
        max_size=max_size,
        rpn_batch_size_per_image=rpn_batch_size,
        box_batch_size_per_image=roi_batch_size,
        rpn_pre_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_train=proposals_train,
        rpn_pre_nms_top_n_test=proposals_test,
        rpn_post_nms_top_n_test=proposals_test,
        box_detections_per_img=detections_per_img,
        **heads,
    )


def model_kwargs_of(cfg, *, arch: str, num_classes: int) -> dict[str, Any]:
    """The :func:`build_model` keyword arguments a :class:`DetectConfig` implies (stored in ``model.pt``). A ViT's
    position table is built for ``test_size`` (rounded up to a multiple of 32): pretrained and random inits get the
    same shapes, and ``load_detector`` rebuilds them."""
    kwargs = dict(arch=arch, num_classes=num_classes, norm=cfg.norm, box_head=cfg.box_head,
                  min_size=list(cfg.min_size), max_size=cfg.max_size, rpn_batch_size=cfg.rpn_batch_size,
                  roi_batch_size=cfg.roi_batch_size, proposals_train=cfg.proposals_train,
                  proposals_test=cfg.proposals_test, mask_head=list(cfg.mask_head),
                  detections_per_img=cfg.detections_per_img)
    if is_vit(arch):
        kwargs["trunk_size"] = -(-cfg.test_size // 32) * 32
    return kwargs


def load_detector(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``models/detect/model.pt`` -> (Mask R-CNN in eval mode on the CPU, the file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: detector not found; run `dvc repro detect` first")
    state = read_torch_file(path, "detector file", "re-run `dvc repro detect`")
    model = build_model(**state["model_kwargs"])
    model.load_state_dict(state["model"], strict=True)
    model.transform.min_size = (state.get("test_size", model.transform.min_size[-1]),)
    return model.eval(), {k: v for k, v in state.items() if k != "model"}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: norm-layer parameters without weight decay (detectron2 WEIGHT_DECAY_NORM=0), the rest with."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in norm_ids], "weight_decay": 0.0},
    ]
