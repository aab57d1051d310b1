"""JPEG bytes -> RGB pixels on the training device: nvJPEG batch decode on CUDA, libjpeg-turbo on the CPU.

The loader hands raw bytes through when the device decodes (``decode="bytes"``); :func:`decode_images` turns a batch of
them into ``(3, H, W)`` uint8 RGB tensors on the device. Already decoded tensors are just moved.
"""
from __future__ import annotations

import torch


def decode_images(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG byte tensors -> (3, H, W) uint8 RGB on ``device`` (nvJPEG batch decode on CUDA); decoded tensors move."""
    if images and images[0].ndim == 1:
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.type == "cuda":
            try:
                return decode_jpeg(images, device=device, mode=ImageReadMode.RGB)
            except RuntimeError:  # a JPEG nvJPEG can't take (rare CMYK/odd sampling): this batch on the CPU instead
                from components.data.loader import decode_rgb

                return [decode_rgb(bytes(b.numpy())).to(device, non_blocking=True) for b in images]
        return [decode_jpeg(b, mode=ImageReadMode.RGB) for b in images]
    return [im.to(device, non_blocking=True) for im in images]
