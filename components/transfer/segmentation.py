"""Stage ``segment``: FCN semantic segmentation fine-tuning on the pretrained trunk (SlotCon's transfer protocol).

Model (mmsegmentation's ``fcn_r50-d8``/``-d16`` style): a torchvision ResNet whose last stage(s) trade stride for
dilation (output stride 8: layer3 and layer4 dilated 2 and 4; 16: layer4 dilated 2), an FCN head (``num_convs`` 3x3
conv-BN-ReLU, the input concatenated back, dropout 0.1, 1x1 classifier) on layer4 and an auxiliary FCN head on layer3
(loss weight 0.4), logits bilinearly upsampled to the input size. Loss: cross-entropy with ignore index 255.
Optimiser: SGD (momentum 0.9, weight decay 5e-4) with the poly schedule ``lr_t = (lr - min_lr) (1 - t/T)^0.9 +
min_lr``, a pure function of the iteration. Augmentation per sample: random rescale (ratio in ``scale_range``),
random crop (``crop_size``, re-drawn up to 10 times while one class covers > 75%, mmseg's ``cat_max_ratio``), pad
(image 0 / label 255), horizontal flip. BatchNorm is in train mode (the SSL transfer protocol fine-tunes BN; SyncBN
under DDP would be the multi-GPU equivalent). Evaluation on the whole val split, whole image (or sliding windows of
``crop_size`` with 2/3 overlap when ``test_mode: slide``), one confusion matrix over the split -> mIoU, mAcc, pixel
accuracy, per-class IoU.

Trunk init: ``pretrained`` = ``models/backbone.pt`` (torchvision ResNet keys minus ``fc.*``, loaded *strictly*), a
``.pt`` path = that backbone, ``random`` = torchvision's default init. ``compare_random`` also trains from random init
with the same seed, schedule and data order, so the gain of pretraining is one subtraction.
Not included (on purpose, small demo): photometric distortion and multi-scale testing.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from components.errors import UserError
from components.transfer.seg_metrics import IGNORE_INDEX, confusion_matrix, metrics_from_confusion

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


# ---------------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------------
def dilate_resnet_(net: torchvision.models.ResNet, output_stride: int) -> torchvision.models.ResNet:
    """Turn the stride-2 of layer4 (os 16) or layer3+layer4 (os 8) into dilation, in place; keys are unchanged.

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


def build_trunk(arch: str, output_stride: int = 8) -> torchvision.models.ResNet:
    """A torchvision ResNet (random init, no ``fc``/``avgpool``) with output stride 8 or 16."""
    if arch not in ARCHS:
        raise UserError(f"backbone arch {arch!r} is not supported (allowed: {', '.join(ARCHS)})")
    net = getattr(torchvision.models, arch)(weights=None)
    del net.fc, net.avgpool  # the trunk's state_dict is then exactly the exported keys
    return dilate_resnet_(net, output_stride)


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


class FCN(nn.Module):
    """Dilated ResNet trunk + FCN head (+ auxiliary head on layer3). ``(B,3,H,W) -> (B,C,H,W)`` logits."""

    def __init__(self, *, arch: str, num_classes: int, output_stride: int = 8, head_channels: int = 512,
                 num_convs: int = 2, concat_input: bool = True, dropout: float = 0.1, aux: bool = True):
        super().__init__()
        self.backbone = build_trunk(arch, output_stride)
        c4 = self.backbone.layer4[-1].conv1.in_channels if arch in ("resnet18", "resnet34") else 2048
        c3 = c4 // 2
        self.head = FCNHead(in_channels=c4, channels=head_channels, num_classes=num_classes, num_convs=num_convs,
                            concat_input=concat_input, dropout=dropout)
        self.aux_head = (
            FCNHead(in_channels=c3, channels=max(head_channels // 2, 8), num_classes=num_classes, num_convs=1,
                    concat_input=False, dropout=dropout)
            if aux else None
        )

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Low-resolution ``(B,C,H/os,W/os)`` main and auxiliary logits."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        aux = self.aux_head(c3) if self.aux_head is not None and self.training else None
        return self.head(c4), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.forward_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def load_trunk_(model: FCN, state_dict: dict, where: str) -> None:
    """Strict load of torchvision ResNet keys (minus ``fc.*``) into the trunk; a mismatch names the file and keys."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        model.backbone.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise UserError(f"{where}: backbone weights do not fit the trunk strictly ({first}); re-run export") from None


def read_backbone(path: str | Path) -> tuple[str, dict]:
    """``(arch, state_dict)`` of an exported backbone (``components.transfer.convert.load_backbone``)."""
    from components.transfer.convert import load_backbone

    return load_backbone(path)


# ---------------------------------------------------------------------------------------------------------------------
# schedule, augmentation, batches
# ---------------------------------------------------------------------------------------------------------------------
def poly_lr(step: int, total: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """mmseg's poly policy at iteration ``step`` (0-based) of ``total``: ``(base - min)(1 - step/total)^power + min``."""
    frac = min(max(step, 0), total) / total
    return (base_lr - min_lr) * (1.0 - frac) ** power + min_lr


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float, ImageNet mean/std (what the torchvision trunk was trained on)."""
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(3, 1, 1)
    return (img.float() / 255.0 - mean) / std


class SegAugment:
    """Per-sample train augmentation: rescale, crop (cat_max_ratio), pad, flip. Randomness from torch's RNG
    (seeded per loader worker), so it runs inside the loader ``map_fn``.

    ``{"image": uint8 (3,H,W), "label": uint8 (H,W)} -> {"image": float (3,S,S) normalised, "label": int64 (S,S)}``.
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75):
        self.crop, self.scale_range, self.cat_max_ratio = crop_size, scale_range, cat_max_ratio

    def __call__(self, s: dict) -> dict:
        img, lbl = s["image"], s["label"]
        lo, hi = self.scale_range
        r = lo + (hi - lo) * torch.rand(()).item()
        h, w = img.shape[-2:]
        nh, nw = max(int(round(h * r)), 1), max(int(round(w * r)), 1)
        img = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
        lbl = F.interpolate(lbl[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        c = self.crop
        for _ in range(10):  # mmseg RandomCrop: avoid crops where one class covers > cat_max_ratio
            y0 = int(torch.randint(0, max(nh - c, 0) + 1, ()).item())
            x0 = int(torch.randint(0, max(nw - c, 0) + 1, ()).item())
            crop_l = lbl[y0 : y0 + c, x0 : x0 + c]
            _, counts = torch.unique(crop_l[crop_l != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        img = img[:, y0 : y0 + c, x0 : x0 + c]
        lbl = crop_l
        img = (img / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        ph, pw = c - img.shape[1], c - img.shape[2]
        if ph > 0 or pw > 0:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            lbl = F.pad(lbl, (0, pw, 0, ph), value=IGNORE_INDEX)
        if torch.rand(()).item() < 0.5:
            img, lbl = img.flip(-1), lbl.flip(-1)
        return {"key": s["key"], "image": img.contiguous(), "label": lbl.contiguous()}


def collate_train(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[{"image": (3,S,S), "label": (S,S)}] -> ((B,3,S,S) float, (B,S,S) int64)``."""
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


# ---------------------------------------------------------------------------------------------------------------------
# train / eval
# ---------------------------------------------------------------------------------------------------------------------
def train_fcn(
    model: FCN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, iters: int, lr: float, power: float = 0.9,
    momentum: float = 0.9, weight_decay: float = 5e-4, aux_weight: float = 0.4, device: torch.device | str = "cpu",
    on_step: Callable[[int, dict], None] | None = None,
) -> list[float]:
    """``iters`` SGD steps with the poly schedule; BN in train mode. Returns the loss of every step."""
    device = torch.device(device)
    model.to(device).train()
    # mmseg's FCN recipe decays every parameter (no paramwise rules) with plain SGD
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses: list[float] = []
    it: Iterator = iter(batches)
    t0, seen = time.perf_counter(), 0
    from tqdm import tqdm

    for step in tqdm(range(iters), desc="segment train", leave=False, mininterval=5):
        images, labels = next(it)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        cur_lr = poly_lr(step, iters, lr, power, min_lr=lr * 0.01)  # mmseg: min_lr 1e-4 at lr 0.01
        for g in opt.param_groups:
            g["lr"] = cur_lr
        logits, aux = model.forward_logits(images)
        size = labels.shape[-2:]
        loss = F.cross_entropy(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), labels,
                               ignore_index=IGNORE_INDEX)
        if aux is not None and aux_weight > 0:
            loss = loss + aux_weight * F.cross_entropy(
                F.interpolate(aux, size=size, mode="bilinear", align_corners=False), labels, ignore_index=IGNORE_INDEX
            )
        if not torch.isfinite(loss):
            raise RuntimeError(f"segment: non-finite loss at step {step} (lr {cur_lr:.3g}); lower segment.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        seen += images.shape[0]
        if on_step is not None:
            on_step(step, {"loss": losses[-1], "lr": cur_lr, "img_per_s": seen / (time.perf_counter() - t0)})
    return losses


@torch.no_grad()
def predict(model: FCN, image: torch.Tensor, *, mode: str = "whole", crop: int = 512) -> torch.Tensor:
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
def evaluate(model: FCN, samples: Iterable[dict], *, num_classes: int, class_names: list[str],
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


# ---------------------------------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------------------------------
def _flat(m: dict, prefix: str = "") -> dict:
    out = {f"{prefix}{k}": m[k] for k in ("mIoU", "mAcc", "pixel_acc")}
    out[f"{prefix}per_class_IoU"] = {n: v["IoU"] for n, v in m["per_class"].items()}
    return out


def _train_one(cfg, *, arch: str, state_dict: dict | None, where: str, train_src, val_src, device, tracker,
               prefix: str) -> tuple[FCN, dict, list[float]]:
    torch.manual_seed(cfg.seed)  # same head init and same augmentation draws for every init
    model = FCN(arch=arch, num_classes=train_src.num_classes, output_stride=cfg.output_stride,
                head_channels=cfg.head_channels, num_convs=cfg.num_convs, concat_input=cfg.concat_input,
                dropout=0.1, aux=cfg.aux_weight > 0)
    if state_dict is not None:
        load_trunk_(model, state_dict, where)
    batches = train_src.train_batches(
        batch_size=cfg.batch_size, map_fn=SegAugment(cfg.crop_size, tuple(cfg.scale_range)),
        collate_fn=collate_train, seed=cfg.seed, num_workers=cfg.num_workers,
    )
    every = max(cfg.iters // 20, 1)

    def on_step(step: int, m: dict) -> None:
        if step % every == 0 or step == cfg.iters - 1:
            tracker.log_metrics({f"{prefix}train/{k}": v for k, v in m.items()}, step=step)
            log.info("%s step %d/%d loss %.4f lr %.4g %.1f img/s", prefix or "pretrained ", step, cfg.iters,
                     m["loss"], m["lr"], m["img_per_s"])

    t0 = time.perf_counter()
    losses = train_fcn(model, batches, iters=cfg.iters, lr=cfg.lr, power=cfg.power, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, aux_weight=cfg.aux_weight, device=device, on_step=on_step)
    train_s = time.perf_counter() - t0
    m = evaluate(model, val_src.iterate(), num_classes=val_src.num_classes, class_names=val_src.class_names,
                 batch_size=cfg.batch_size, mode=cfg.test_mode, crop=cfg.crop_size, device=device)
    m["train_s"] = train_s
    m["train_img_per_s"] = cfg.iters * cfg.batch_size / max(train_s, 1e-9)
    return model, m, losses


def run_segment(cfg, shards: str | Path | None, backbone: str | Path, out_dir: str | Path, *, tracker=None,
                device: str | None = None) -> dict:
    """Fine-tune FCN from the chosen init (and from random init if ``compare_random``); return the metrics dict.

    Writes ``out_dir/model.pt`` (the fine-tuned model of the main init). Pure: reads only its arguments.
    """
    from components.tracking import Tracker

    tracker = tracker or Tracker()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # -- cheap checks first: the data layout and the backbone file
    from components.data.segdatasets import open_source

    train_src = open_source(cfg.data_root, shards, cfg.dataset, "train")
    val_src = open_source(cfg.data_root, shards, cfg.dataset, "val")
    if train_src.class_names != val_src.class_names:
        raise UserError(f"{cfg.data_root or shards}: train and val splits list different classes")
    bb_path = Path(cfg.init) if cfg.init.endswith(".pt") else Path(backbone)
    arch, sd = read_backbone(bb_path)
    inits = [cfg.init] + (["random"] if cfg.compare_random and cfg.init != "random" else [])
    log.info("segment: %s (%d train / %d val images, %d classes) on %s, %s trunk, inits %s", train_src.kind,
             len(train_src), len(val_src), val_src.num_classes, device, arch, inits)

    metrics: dict = {"num_classes": val_src.num_classes, "dataset": train_src.kind, "arch": arch, "iters": cfg.iters}
    main_model = None
    for init in inits:
        prefix = "" if init == inits[0] else "random/"
        model, m, losses = _train_one(cfg, arch=arch, state_dict=None if init == "random" else sd, where=str(bb_path),
                                      train_src=train_src, val_src=val_src, device=device, tracker=tracker,
                                      prefix=prefix)
        metrics.update(_flat(m, prefix))
        metrics[f"{prefix}loss_first"] = losses[0]
        metrics[f"{prefix}loss_last"] = sum(losses[-5:]) / len(losses[-5:])
        metrics[f"{prefix}train_img_per_s"] = m["train_img_per_s"]
        tracker.log_metrics({f"{prefix}{k}": m[k] for k in ("mIoU", "mAcc", "pixel_acc")})
        if prefix == "":
            metrics["init"] = init if not init.endswith(".pt") else "path"
            metrics["num_val_images"] = m["num_images"]
            main_model = model
    if "random/mIoU" in metrics:
        metrics["gain/mIoU"] = metrics["mIoU"] - metrics["random/mIoU"]

    from components.io import save_torch_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(
        {"arch": arch, "num_classes": val_src.num_classes, "class_names": val_src.class_names,
         "output_stride": cfg.output_stride, "head_channels": cfg.head_channels, "num_convs": cfg.num_convs,
         "concat_input": cfg.concat_input, "state_dict": main_model.cpu().state_dict()},
        out / "model.pt",
    )
    skipped = getattr(train_src, "skipped", 0) + getattr(val_src, "skipped", 0)
    metrics["skipped_samples"] = skipped
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="data/shards", help="shards root (the scenes default when data_root is empty)")
    parser.add_argument("--backbone", default="models/backbone.pt", help="exported backbone (init: pretrained)")
    parser.add_argument("--out", default="models/segment", help="folder for the fine-tuned model")
    parser.add_argument("--metrics", default="metrics/segment.json")


def main(args: argparse.Namespace) -> int:
    from components.config import load_section
    from components.io import write_json_atomic
    from components.tracking import log_json_artifact, stage_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_section("segment", args.params)
    tracking = load_section("tracking", args.params)
    with stage_run("segment", cfg, tracking) as tracker:
        metrics = run_segment(cfg, args.shards, args.backbone, args.out, tracker=tracker)
        write_json_atomic(args.metrics, metrics)
        log_json_artifact(tracker, metrics, "segment.json")
    msg = f"segment: mIoU {metrics['mIoU']:.4f} pixel acc {metrics['pixel_acc']:.4f}"
    if "random/mIoU" in metrics:
        msg += f" (random init: mIoU {metrics['random/mIoU']:.4f})"
    print(msg)
    return 0
