"""Trunks by arch name: the one list of architectures, and building, dilating and strictly loading a torchvision trunk.

Every stage that touches a trunk goes through here -- params validation (:data:`ARCHS`), pretraining (the SlotCon
encoder), export (the torchvision model written to ``models/backbone.pt``), detection (Mask R-CNN's FPN body) and
segmentation (a dilated trunk) -- so an arch that params accept is accepted everywhere, and a weight file that does
not fit is the same one-line error everywhere (:func:`load_trunk`).

Weights are torchvision's key names minus ``fc.*`` (what ``slotcon export`` writes): they load strictly into
``torchvision.models.<arch>()`` with ``fc = Identity()``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from components.constants import RESNET_ARCHS, RESNET_CHANNELS
from components.errors import UserError

#: Every trunk arch a params file may name (``pretrain.arch``); ViTs join with the SIM method.
ARCHS: tuple[str, ...] = RESNET_ARCHS
#: The layers of a ResNet trunk, input to stride 32 (``fc`` and ``avgpool`` are not part of it).
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def check_arch(arch: str, where: str = "params", allowed: Sequence[str] = ARCHS) -> str:
    """``arch`` if it is one of ``allowed``; else a one-line :class:`UserError` naming ``where`` and the choices."""
    if arch not in allowed:
        raise UserError(f"{where}: unknown trunk arch {arch!r} (allowed: {', '.join(allowed)})")
    return arch


def trunk_channels(arch: str) -> int:
    return RESNET_CHANNELS[check_arch(arch, allowed=RESNET_ARCHS)]


def build_resnet(
    arch: str,
    *,
    norm_layer: Callable[..., nn.Module] | None = None,
    zero_init_residual: bool = False,
    output_stride: int = 32,
    head: str = "none",
) -> "torchvision.models.ResNet":  # noqa: F821
    """``torchvision.models.<arch>(weights=None)`` (never downloads), dilated to ``output_stride``.

    ``head``: ``"none"`` deletes ``fc`` and ``avgpool`` (the state_dict is then exactly the exported keys; use
    :func:`trunk_forward`), ``"identity"`` makes ``fc`` an ``Identity`` (forward gives pooled ``(B, C)`` features,
    the exported model), ``"keep"`` leaves torchvision's classifier (detection's FPN extractor ignores it).
    """
    import torchvision

    check_arch(arch, allowed=RESNET_ARCHS)
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual, **kwargs)
    if output_stride != 32:
        dilate_resnet_(net, output_stride)
    if head == "none":
        del net.fc, net.avgpool
    elif head == "identity":
        net.fc = nn.Identity()
    elif head != "keep":
        raise ValueError(f"head={head!r} must be 'none', 'identity' or 'keep'")
    return net


def trunk_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W) -> (B, C, H/os, W/os)`` through :data:`TRUNK_LAYERS` of a (headless) ResNet."""
    for name in TRUNK_LAYERS:
        x = getattr(net, name)(x)
    return x


def dilate_resnet_(net: nn.Module, output_stride: int) -> nn.Module:
    """Turn the stride-2 of layer4 (os 16) or layer3 + layer4 (os 8) into dilation, in place; keys are unchanged.

    Works for BasicBlock too (torchvision's ``replace_stride_with_dilation`` refuses it). As torchvision/mmseg's
    ``contract_dilation``: the first block of a dilated stage keeps the previous dilation, the others use the new one.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    stages = {32: [], 16: ["layer4"], 8: ["layer3", "layer4"]}[output_stride]
    dilation = 1
    for name in ("layer3", "layer4"):
        if name not in stages:
            continue
        prev, dilation = dilation, dilation * 2
        for i, block in enumerate(getattr(net, name)):
            d = prev if i == 0 else dilation
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d):
                    if conv.stride == (2, 2):
                        conv.stride = (1, 1)
                    if conv.kernel_size == (3, 3):
                        conv.dilation, conv.padding = (d, d), (d, d)
    return net


def _short(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def clean_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes anywhere in the keys (DDP, torch.compile)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("_orig_mod.", "")
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def load_trunk(trunk: nn.Module, state_dict: Mapping[str, torch.Tensor], *, arch: str, source: str,
               fix: str = "export a matching backbone with `slotcon export`") -> None:
    """Copy ``state_dict`` (torchvision keys; ``fc.*`` ignored) into ``trunk``, strictly, or raise one line.

    Every trunk tensor except ``fc.*`` must be present with the same shape; BN's ``num_batches_tracked`` counters
    are not weights and may be absent (FrozenBN has none). The error names ``source``, the missing / unexpected /
    mismatched keys and ``fix``.
    """
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    given = {k: v for k, v in clean_keys(state_dict).items() if not k.startswith("fc.")}
    counter = "num_batches_tracked"
    missing = sorted(k for k in own if k not in given and not k.endswith(counter))
    unexpected = sorted(k for k in given if k not in own and not k.endswith(counter))
    shapes = sorted(k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_short(unexpected)}")
        if shapes:
            pairs = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
            parts.append(f"shape mismatch: {_short(pairs, 2)}")
        raise UserError(f"{source}: backbone weights do not fit a torchvision {arch} trunk ({'; '.join(parts)}); "
                        f"{fix}")
    with torch.no_grad():
        for k, v in own.items():
            if k in given:
                v.copy_(given[k].to(v.dtype))
