"""Stage ``probe``: frozen-trunk linear probes (dense: semantic segmentation; object: box classes), the cheap,
low-variance transfer figures a CPU can afford. Mask R-CNN fine-tuning for a few dozen CPU iterations measures mostly
noise (pretrained vs random AP^b 0.024 vs 0.014 on one machine, 0.035 vs 0.032 on another); a linear probe asks a
narrower question -- how much of the labels can be read *linearly* from the trunk -- but answers it with a few
seconds of optimisation on cached features, so seeds can be compared. :func:`run_probe` says how.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from components.backbone import build_resnet, build_vit, is_vit, load_trunk, vit_feature_map, vit_image_size
from components.constants import normalize_uint8
from components.data.loading.ledger import loss_details
from components.data.segmentation.sources import open_shards
from components.data.shards.index import read_index, shards_root
from components.errors import UserError
from components.stage import Arg, Stage, summary_line
from components.tracking import Tracker
from components.transfer.export import load_backbone
from components.transfer.seg_metrics import confusion_matrix, metrics_from_confusion
from components.transfer.unsup.stage import resize_center_crop

log = logging.getLogger(__name__)

STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
VIT_LAYERS = ("tokens",)  # a ViT trunk: its final patch tokens as one map (stride = patch size, 16 for our archs)


# --------------------------------------------------------------------------------------------------------------------
# the frozen trunk and its features
# --------------------------------------------------------------------------------------------------------------------
def frozen_trunk(arch: str, state_dict: dict | None, *, seed: int, source: str) -> torch.nn.Module:
    """A torchvision trunk (ResNet without fc/avgpool, or ViT without its classifier), loaded strictly from
    ``state_dict`` (None: random init from ``seed``), in eval mode without gradients."""
    torch.manual_seed(seed)
    if is_vit(arch):  # built at the weights' own size; other sizes resize the position table on the fly
        net = build_vit(arch, vit_image_size(arch, state_dict) if state_dict is not None else 224)
    else:
        net = build_resnet(arch, head="none")
    if state_dict is not None:
        load_trunk(net, state_dict, arch=arch, source=source)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@torch.no_grad()
def trunk_maps(net: torch.nn.Module, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The requested stage outputs of a headless ResNet: ``{layer: (B, C_l, H/s_l, W/s_l)}``; a ViT:
    ``{"tokens": (B, D, H/p, W/p)}``."""
    if layers == VIT_LAYERS:
        return {"tokens": vit_feature_map(net, x)}
    out = {}
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        if name in layers:
            out[name] = x
        if len(out) == len(layers):
            break
    return out


def _instances(meta: dict, cat_index: dict[int, int], scale: float, x0: int, y0: int, res: int) -> list:
    """Non-crowd boxes of one image in the resized/cropped frame as ``[x0, y0, x1, y1, class]`` (boxes that end up
    under 2 px inside the crop are dropped)."""
    out = []
    for a in meta.get("annotations") or []:
        if a.get("iscrowd") or a.get("category_id") not in cat_index:
            continue
        bx, by, bw, bh = a["bbox"]
        box = [min(max(v, 0.0), float(res)) for v in (bx * scale - x0, by * scale - y0, (bx + bw) * scale - x0,
                                                     (by + bh) * scale - y0)]
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            out.append(box + [float(cat_index[a["category_id"]])])
    return out


@torch.no_grad()
def extract(net, samples, *, layers: tuple[str, ...], resolution: int, batch_size: int, cat_index: dict[int, int],
            device: torch.device) -> dict[str, torch.Tensor]:
    """One pass over ``samples`` (``{"image", "label", "meta"}``): dense features (N, C, h, w) on the finest chosen
    grid, labels (N, R, R) uint8, object features (M, C) and object classes (M,)."""
    dense, labels, obj, obj_cls = [], [], [], []
    strides = {**STRIDES, "tokens": getattr(net, "patch_size", 16)}
    finest = min(layers, key=lambda n: strides[n])
    buf: list[tuple[torch.Tensor, torch.Tensor, list]] = []

    def flush():
        x = normalize_uint8(torch.stack([b[0] for b in buf]).to(device))
        maps = trunk_maps(net, x, layers)
        size = maps[finest].shape[-2:]
        dense.append(torch.cat([F.interpolate(maps[n], size=size, mode="bilinear", align_corners=False)
                                if maps[n].shape[-2:] != size else maps[n] for n in layers], 1).half().cpu())
        labels.append(torch.stack([b[1] for b in buf]))
        rois = [torch.tensor([[i] + box[:4] for box in b[2]], dtype=torch.float32) for i, b in enumerate(buf) if b[2]]
        if rois:
            rois_t = torch.cat(rois).to(device)
            pooled = [roi_align(maps[n], rois_t, output_size=1, spatial_scale=1.0 / strides[n], sampling_ratio=-1,
                                aligned=True).flatten(1) for n in layers]
            obj.append(torch.cat(pooled, 1).cpu())
            obj_cls.append(torch.tensor([box[4] for b in buf for box in b[2]], dtype=torch.long))
        buf.clear()

    for s in samples:
        h, w = s["image"].shape[-2:]
        img, lbl = resize_center_crop(s["image"], s["label"], resolution)
        scale = resolution / min(h, w)
        x0 = (max(resolution, round(w * scale)) - resolution) // 2
        y0 = (max(resolution, round(h * scale)) - resolution) // 2
        buf.append((img, lbl, _instances(s.get("meta") or {}, cat_index, scale, x0, y0, resolution)))
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()
    if not dense:
        raise UserError("probe: the split holds no images")
    return {"dense": torch.cat(dense), "labels": torch.cat(labels),
            "obj": torch.cat(obj) if obj else torch.zeros(0, 0), "obj_cls": torch.cat(obj_cls) if obj_cls else
            torch.zeros(0, dtype=torch.long)}


def labelled_samples(src):
    """The samples of a :class:`~components.data.segmentation.sources.ShardSource` split with their COCO record kept:
    ``{"key", "image", "label" (class ids, 255 ignore), "meta"}`` in a fixed order."""
    lut = torch.from_numpy(src.lut)
    for s in src.samples():  # lost ones (and any without its map) counted in src.loss; stops above the threshold
        yield {"key": s["key"], "image": s["image"], "label": lut[s["seg"].long()], "meta": s.get("meta") or {}}


# --------------------------------------------------------------------------------------------------------------------
# the linear classifiers
# --------------------------------------------------------------------------------------------------------------------
def standardiser(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, 1/std) of ``x`` over every axis but ``dim`` (float64 sums: fp16 features in)."""
    axes = [a for a in range(x.ndim) if a != dim]
    xd = x.double()
    mean = xd.mean(dim=axes)
    std = xd.var(dim=axes, unbiased=False).sqrt().clamp_min(1e-6)
    return mean.float(), (1.0 / std).float()


def _standardised_rows(feats: torch.Tensor, std: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, C, h, w) features -> (N, h·w, C) float32, standardised (the classifier is then a plain matmul)."""
    mean, inv = std
    return ((feats.float() - mean.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)).flatten(2).transpose(1, 2).contiguous()


def _dense_logits(head: torch.nn.Linear, rows: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """(B, h·w, C) rows -> (B, K, size) logits, bilinearly upsampled from the feature grid."""
    b = rows.shape[0]
    logits = head(rows).transpose(1, 2).reshape(b, -1, *grid)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def train_dense_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, label_size: int, steps: int,
                      lr: float, weight_decay: float, batch: int, seed: int) -> tuple[torch.nn.Linear, tuple]:
    """A linear classifier per position (a 1x1 convolution) on standardised ``feats`` (N, C, h, w) for ``labels``
    (N, R, R); returns it and the standardiser ``(mean, inv_std)``."""
    std = standardiser(feats, 1)
    rows = _standardised_rows(feats, std)  # (N, h·w, C): standardised once, not per step
    grid = tuple(feats.shape[-2:])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    small = F.interpolate(labels[:, None].float(), size=(label_size, label_size), mode="nearest")[:, 0].long()
    n = feats.shape[0]
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(batch, n)]
        for g in opt.param_groups:  # cosine decay: a fixed budget, no tuning per trunk
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(_dense_logits(head, rows[idx], grid, (label_size, label_size)), small[idx],
                               ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head, std


@torch.no_grad()
def eval_dense_probe(head, std, feats: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                     batch: int = 16) -> dict[str, Any]:
    c = len(class_names)
    conf = torch.zeros(c, c, dtype=torch.int64)
    grid = tuple(feats.shape[-2:])
    for i in range(0, feats.shape[0], batch):
        logits = _dense_logits(head, _standardised_rows(feats[i : i + batch], std), grid, labels.shape[-2:])
        conf += confusion_matrix(logits.argmax(1), labels[i : i + batch], c, c)
    m = metrics_from_confusion(conf, class_names)
    return {"dense_mIoU": m["mIoU"], "dense_pixel_acc": m["pixel_acc"], "dense_mAcc": m["mAcc"],
            "dense_per_class_IoU": {k: v["IoU"] for k, v in m["per_class"].items()}}


def train_object_probe(feats: torch.Tensor, cls: torch.Tensor, num_classes: int, *, steps: int, lr: float,
                       weight_decay: float, seed: int) -> tuple[torch.nn.Linear, tuple]:
    """A linear classifier on standardised RoI features (M, C) for classes (M,), full batch."""
    mean, inv = standardiser(feats, 1)
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = (feats.float() - mean) * inv
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(head(x), cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head, (mean, inv)


@torch.no_grad()
def eval_object_probe(head, std, feats: torch.Tensor, cls: torch.Tensor, num_classes: int) -> dict[str, float]:
    mean, inv = std
    pred = head((feats.float() - mean) * inv).argmax(1)
    per_class = [float((pred[cls == c] == c).float().mean()) for c in range(num_classes) if (cls == c).any()]
    return {"object_acc": float((pred == cls).float().mean()), "object_mAcc": float(np.mean(per_class)),
            "num_val_objects": int(cls.numel())}


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def _probe_one(cfg, net, train_src, val_src, cat_index, num_things, device) -> dict[str, Any]:
    layers = VIT_LAYERS if hasattr(net, "patch_size") else tuple(cfg.layers)  # probe.layers name ResNet stages
    kw = dict(layers=layers, resolution=cfg.resolution, batch_size=cfg.batch_size, cat_index=cat_index, device=device)
    t0 = time.perf_counter()
    tr = extract(net, labelled_samples(train_src), **kw)
    va = extract(net, labelled_samples(val_src), **kw)
    t1 = time.perf_counter()
    out: dict[str, Any] = {}
    head, std = train_dense_probe(tr["dense"], tr["labels"], train_src.num_classes, label_size=cfg.label_size,
                                  steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, batch=cfg.probe_batch,
                                  seed=cfg.seed)
    out.update(eval_dense_probe(head, std, va["dense"], va["labels"], val_src.class_names))
    if tr["obj"].numel() and va["obj"].numel():
        ohead, ostd = train_object_probe(tr["obj"], tr["obj_cls"], num_things, steps=cfg.steps, lr=cfg.lr,
                                         weight_decay=cfg.weight_decay, seed=cfg.seed)
        out.update(eval_object_probe(ohead, ostd, va["obj"], va["obj_cls"], num_things))
    log.info("probe: features %.1fs, probes %.1fs", t1 - t0, time.perf_counter() - t1)
    out["feature_dim"] = int(tr["dense"].shape[1])
    return out


def run_probe(cfg, shards: str | Path, backbone: str | Path, *, tracker=None, device: str | None = None) -> dict:
    """Dense and object linear probes of the frozen trunk from ``backbone`` (``probe.init: random`` builds the same
    trunk randomly initialised; ``compare_random`` runs both).

    - **dense** (semantic segmentation, the scenes' stuff + thing maps): the chosen ``layers`` of the frozen trunk (BN
      in eval mode) at ``resolution`` (short side resize + centre crop, as unsup_seg), the coarser maps bilinearly
      upsampled to the finest one's grid and concatenated; features standardised with the train split's per-channel
      mean and std; a linear map (a 1x1 convolution) trained with cross-entropy on the logits bilinearly upsampled to
      ``label_size`` (labels nearest-resized; ignore 255); evaluated on val at the full label resolution: mIoU, pixel
      acc.
    - **object** (the recognition half of detection): every non-crowd ground-truth box of the split, RoI-averaged
      (``torchvision.ops.roi_align``, one bin, adaptive sampling) on each chosen layer, concatenated and
      standardised; a linear classifier over the thing categories; val top-1 accuracy and class-balanced accuracy.

    Both classifiers are trained with AdamW for ``steps`` steps (cosine decay) from a seeded init, on mini-batches of
    ``probe_batch`` images for the dense probe and on all boxes at once for the object probe: deterministic on a
    CPU. The val split is never seen in training; nothing is tuned per trunk.
    """
    tracker = tracker or Tracker()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lost = dict(max_lost_fraction=cfg.max_lost_fraction, what="probe")
    train_src, val_src = open_shards(shards, "train", **lost), open_shards(shards, "val", **lost)
    cats = [int(c["id"]) for c in read_index(shards).get("categories") or []]
    cat_index = {c: i for i, c in enumerate(cats)}
    if cfg.init == "random":
        arch, sd = cfg.arch, None
    else:
        arch, sd = load_backbone(cfg.init if cfg.init.endswith(".pt") else backbone)
    metrics: dict[str, Any] = {"init": cfg.init, "arch": arch,
                               "layers": ",".join(VIT_LAYERS if is_vit(arch) else cfg.layers),
                               "num_train_images": len(train_src), "num_val_images": len(val_src)}
    net = frozen_trunk(arch, sd, seed=cfg.seed, source=str(backbone)).to(device)
    metrics.update(_probe_one(cfg, net, train_src, val_src, cat_index, len(cats), device))
    if cfg.compare_random and sd is not None:
        rnet = frozen_trunk(arch, None, seed=cfg.seed, source="random").to(device)
        rand = _probe_one(cfg, rnet, train_src, val_src, cat_index, len(cats), device)
        metrics.update({f"random/{k}": v for k, v in rand.items() if not isinstance(v, dict)})
        for k in ("dense_mIoU", "object_acc"):
            if k in metrics and f"random/{k}" in metrics:
                metrics[f"gain/{k}"] = metrics[k] - metrics[f"random/{k}"]
    metrics.update(loss_details([train_src.loss, val_src.loss]))
    tracker.log_metrics(metrics)
    return metrics


def _run_stage(ctx) -> dict:
    return run_probe(ctx.cfg, shards_root(ctx.args.shards, ctx.args.params), ctx.args.backbone, tracker=ctx.tracker)


def _summary(m: dict) -> str:
    return summary_line(m, "dense mIoU {dense_mIoU:.4f}", ("object_acc", ", object acc {object_acc:.4f}"),
                        ("random/dense_mIoU", " (random trunk: {random/dense_mIoU:.4f}, {random/object_acc:.4f})"))


STAGE = Stage(
    name="probe", section="probe", run=_run_stage, metrics="metrics/probe.json", summary=_summary,
    headline=("dense_mIoU", "object_acc", "random/dense_mIoU", "random/object_acc"),
    args=(Arg("shards", "data/shards", "shards root (train/val splits with seg.png and COCO boxes)"),
          Arg("backbone", "models/backbone.pt", "exported backbone (slotcon export)")),
)
