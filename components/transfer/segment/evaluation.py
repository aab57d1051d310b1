"""Segmentation evaluation on the whole val split: whole image (or sliding windows of ``crop_size`` with 2/3 overlap,
``test_mode: slide``), one confusion matrix over the split -> mIoU, mAcc, pixel accuracy, per-class IoU. Not
included (small demo): multi-scale testing.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from components.constants import normalize_uint8
from components.errors import UserError
from components.transfer.seg_metrics import confusion_matrix, metrics_from_confusion


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float, ImageNet mean/std (what the torchvision trunk was trained on)."""
    return normalize_uint8(img)


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, *, mode: str = "whole", crop: int = 512) -> torch.Tensor:
    """Logits ``(B, C, H, W)`` of normalised images ``(B,3,H,W)``: whole image, or sliding windows (2/3 overlap)."""
    if mode == "whole":
        return model(image)
    b, _, h, w = image.shape
    stride = max(crop * 2 // 3, 1)
    out, count = None, image.new_zeros((b, 1, h, w))
    ys = list(range(0, max(h - crop, 0) + 1, stride))
    xs = list(range(0, max(w - crop, 0) + 1, stride))
    if ys[-1] + crop < h:
        ys.append(h - crop)
    if xs[-1] + crop < w:
        xs.append(w - crop)
    for y in ys:
        for x in xs:
            y0, x0 = max(y, 0), max(x, 0)
            win = image[:, :, y0 : y0 + crop, x0 : x0 + crop]
            logits = model(win)
            if out is None:
                out = image.new_zeros((b, logits.shape[1], h, w))
            out[:, :, y0 : y0 + win.shape[2], x0 : x0 + win.shape[3]] += logits
            count[:, :, y0 : y0 + win.shape[2], x0 : x0 + win.shape[3]] += 1
    return out / count


def _same_size_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group consecutive samples of equal size (whole-image inference needs one size per batch)."""
    buf: list[dict] = []
    for s in samples:
        if buf and (len(buf) == batch_size or buf[0]["image"].shape != s["image"].shape):
            yield buf
            buf = []
        buf.append(s)
    if buf:
        yield buf


@torch.no_grad()
def evaluate(model: nn.Module, samples: Iterable[dict], *, num_classes: int, class_names: list[str],
             batch_size: int = 8, mode: str = "whole", crop: int = 512, device: torch.device | str = "cpu") -> dict:
    """Whole-split evaluation: one confusion matrix over every val pixel -> mIoU / mAcc / pixel acc / per-class IoU."""
    device = torch.device(device)
    model.to(device).eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    n, t0 = 0, time.perf_counter()
    for group in _same_size_batches(samples, batch_size):
        img = normalize(torch.stack([s["image"] for s in group]).to(device))
        lbl = torch.stack([s["label"] for s in group]).long()
        pred = predict(model, img, mode=mode, crop=crop).argmax(1).cpu()
        conf += confusion_matrix(pred, lbl, num_classes, num_classes)
        n += len(group)
    if n == 0:
        raise UserError("segment: the val split is empty; nothing to evaluate")
    m = metrics_from_confusion(conf, class_names)
    m["num_images"] = n
    m["eval_img_per_s"] = n / (time.perf_counter() - t0)
    return m
