"""Trunks by arch name: the one list of architectures (:data:`ARCHS`), and building, dilating and strictly loading a
torchvision trunk. Every stage that touches a trunk (params validation, pretraining, export, detection, segmentation)
goes through here, so an arch the params accept works everywhere and a weight file that does not fit is the same
one-line error everywhere (:func:`load_trunk`). ResNets keep torchvision's key names minus ``fc.*``
(:func:`build_resnet`), plain ViTs those of ``torchvision.models.VisionTransformer`` minus ``heads.*`` (:func:`build_vit`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from components.constants import ARCHS, RESNET_ARCHS, RESNET_CHANNELS, VIT_ARCHS, VIT_SPECS
from components.errors import UserError

__all__ = ["ARCHS", "RESNET_ARCHS", "VIT_ARCHS", "check_arch", "is_vit", "trunk_channels", "head_prefix",
           "build_resnet", "build_vit", "vit_embed", "vit_tokens", "tokens_to_map", "vit_feature_map",
           "vit_image_size", "resize_pos_embedding", "load_trunk"]

#: The layers of a ResNet trunk, input to stride 32 (``fc`` and ``avgpool`` are not part of it).
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def check_arch(arch: str, where: str = "params", allowed: Sequence[str] = ARCHS) -> str:
    """``arch`` if it is one of ``allowed``; else a one-line :class:`UserError` naming ``where`` and the choices."""
    if arch not in allowed:
        raise UserError(f"{where}: unknown trunk arch {arch!r} (allowed: {', '.join(allowed)})")
    return arch


def is_vit(arch: str) -> bool:
    return arch in VIT_SPECS


def trunk_channels(arch: str) -> int:
    """Channels of the trunk's last map: layer4 of a ResNet, the token width of a ViT."""
    if is_vit(arch):
        return VIT_SPECS[arch]["hidden_dim"]
    return RESNET_CHANNELS[check_arch(arch)]


def head_prefix(arch: str) -> str:
    """State-dict prefix of the classifier that exported weights leave out (``heads.`` for ViTs, ``fc.`` else)."""
    return "heads." if is_vit(arch) else "fc."


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
    import torchvision  # lazy: torchvision costs ~1 s at start-up; reading checkpoints needs only the key helpers

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


# --------------------------------------------------------------------------------------------------------------------
# plain ViTs (torchvision's VisionTransformer class)
# --------------------------------------------------------------------------------------------------------------------
def build_vit(arch: str, image_size: int = 224, *, head: str = "none") -> "torchvision.models.VisionTransformer":  # noqa: F821
    """``torchvision.models.VisionTransformer`` of ``arch`` (:data:`VIT_SPECS`) for ``image_size`` px; never downloads.

    ``head``: ``"none"`` deletes ``heads`` (state_dict = the exported keys; use :func:`vit_tokens`), ``"identity"``
    makes it an ``Identity`` (forward gives the class token's ``(B, D)`` features: the exported model), ``"keep"``
    leaves torchvision's classifier.

    The position embedding fixes the image size the model was built for (:func:`vit_image_size` reads it back from a
    state_dict); :func:`vit_tokens` runs any size (multiple of the patch) by resizing the position grid, as DeiT/MAE
    fine-tuning does.
    """
    import torchvision  # lazy: torchvision costs ~1 s at start-up; reading checkpoints needs only the key helpers

    spec = VIT_SPECS[check_arch(arch, allowed=VIT_ARCHS)]
    if image_size % spec["patch_size"]:
        raise UserError(f"image size {image_size} is not a multiple of {arch}'s patch size {spec['patch_size']}")
    net = torchvision.models.VisionTransformer(image_size=image_size, **spec)
    if head == "none":
        del net.heads
    elif head == "identity":
        net.heads = nn.Identity()
    elif head != "keep":
        raise ValueError(f"head={head!r} must be 'none', 'identity' or 'keep'")
    return net


def vit_image_size(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int:
    """The (square) image size a ViT state_dict was built for, from its position embedding ``(1, 1 + n*n, D)``."""
    pos = state_dict.get("encoder.pos_embedding")
    if pos is None:
        raise UserError(f"{arch} weights hold no 'encoder.pos_embedding'")
    n = int(round((pos.shape[1] - 1) ** 0.5))
    if n * n != pos.shape[1] - 1:
        raise UserError(f"{arch} weights: encoder.pos_embedding has {pos.shape[1] - 1} patch positions, not a square")
    return n * VIT_SPECS[arch]["patch_size"]


def resize_pos_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, 1 + n*n, D)`` class + square-grid position embedding -> ``(1, 1 + gh*gw, D)`` for another grid
    (bicubic on the patch part, the class position kept; DeiT/MAE's ``interpolate_pos_embed``). Same grid: as is."""
    n = int(round((pos.shape[1] - 1) ** 0.5))
    if (n, n) == tuple(grid):
        return pos
    patch = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    patch = nn.functional.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], 1)


def vit_embed(net: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1 + L', D)``: the sequence that enters the first block (class token, patch tokens
    plus positions, resized to the grid of ``H, W``; only the ``keep`` patches when given). See :func:`vit_tokens`."""
    b, _, h, w = images.shape
    p = net.patch_size
    grid = (h // p, w // p)
    x = net.conv_proj(images).flatten(2).transpose(1, 2)  # (B, L, D), row-major patches
    pos = resize_pos_embedding(net.encoder.pos_embedding, grid)
    x = x + pos[:, 1:]
    if keep is not None:
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (net.class_token + pos[:, :1]).expand(b, -1, -1)
    return net.encoder.dropout(torch.cat([cls, x], dim=1))


def vit_tokens(net: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None, *,
               final_norm: bool = True) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1 + L', D)``: class token then patch tokens after the final LayerNorm (before it
    with ``final_norm=False``: SIM's pretraining branches, which have no norm there).

    Exactly torchvision's ``VisionTransformer`` encoder (``x + pos_embedding`` -> blocks -> ``ln``) for any ``H, W``
    (patches of ``p`` px: the conv drops a remainder; the position grid is resized when it differs from the built
    one). ``keep`` ``(B, L')`` (long, row-major patch indices): only those patches enter the blocks -- MAE/SIM's
    encoding of the visible tokens; each keeps its own position embedding, so the result equals the full sequence
    with the other patches masked out of attention.
    """
    tokens = net.encoder.layers(vit_embed(net, images, keep))
    return net.encoder.ln(tokens) if final_norm else tokens


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``(B, h * w, D)`` (no class token) -> ``(B, D, h, w)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid[0], grid[1])


def vit_feature_map(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, D, H / p, W / p)``: the patch tokens as a map (stride = patch size)."""
    p = net.patch_size
    return tokens_to_map(vit_tokens(net, images)[:, 1:], (images.shape[-2] // p, images.shape[-1] // p))


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
    """Copy ``state_dict`` (torchvision keys; the classifier ``fc.*`` / ``heads.*`` ignored) into ``trunk``, strictly,
    or raise one line.

    Every trunk tensor except the classifier must be present with the same shape; BN's ``num_batches_tracked``
    counters are not weights and may be absent (FrozenBN has none). A ViT's position embedding built for another
    image size is resized to the trunk's grid (:func:`resize_pos_embedding`), the usual fine-tuning practice. The
    error names ``source``, the missing / unexpected / mismatched keys and ``fix``.
    """
    head = head_prefix(arch)
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in clean_keys(state_dict).items() if not k.startswith(head)}
    pos = "encoder.pos_embedding"
    if is_vit(arch) and pos in own and pos in given and own[pos].shape != given[pos].shape \
            and own[pos].shape[-1] == given[pos].shape[-1]:
        n = int(round((own[pos].shape[1] - 1) ** 0.5))
        given[pos] = resize_pos_embedding(given[pos], (n, n))
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
