"""Backbone trunk, projector and predictor of SlotCon (paper Sec. 3, official ``DINOHead2d`` / ``DINOHead``).

Heads use truncated-normal(0.02) weights and zero biases, as DINO/SlotCon.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

__all__ = ["ARCH_CHANNELS", "ResNetTrunk", "ConvProjector", "MLPPredictor"]

ARCH_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc: (B, 3, H, W) → (B, C, H/32, W/32), C = 512 (r18/34) or 2048 (r50).

    Exactly torchvision's parameter names minus ``fc.*``, so its state_dict loads into
    ``torchvision.models.resnetXX()`` (strict, without fc). Initialised as the official code: He-normal (fan_out)
    convs and zero-γ for the last BN of each residual block.
    """

    def __init__(self, arch: str = "resnet18"):
        super().__init__()
        if arch not in ARCH_CHANNELS:
            raise ValueError(f"arch={arch!r} is not supported (allowed: {', '.join(ARCH_CHANNELS)})")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)  # never downloads
        for name in TRUNK_LAYERS:
            setattr(self, name, getattr(net, name))
        self.arch = arch
        self.num_channels = ARCH_CHANNELS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in TRUNK_LAYERS:
            x = getattr(self, name)(x)
        return x


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvProjector(nn.Module):
    """(B, C, h, w) → (B, D, h, w) by a 3-layer 1×1-conv MLP (BN + GELU between layers).

    conv(C→H)+BN+GELU, conv(H→H)+BN+GELU, conv(H→D).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1),
            nn.BatchNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, hidden_dim, 1),
            nn.BatchNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )
        self.apply(_trunc_normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MLPPredictor(nn.Module):
    """(N, D) → (N, D_out) by a 3-layer MLP (BatchNorm1d + GELU between layers).

    The same shape as :class:`ConvProjector` on vectors: Linear/BatchNorm1d/GELU.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.apply(_trunc_normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
