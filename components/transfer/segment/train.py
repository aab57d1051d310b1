"""Supervised segmentation training on the engine (:mod:`components.engine.loop`): :class:`SegmentMethod` (SlotCon's
transfer protocol), the per-sample augmentation it reads through, the loss and mmseg's poly schedule. SGD (momentum
0.9, weight decay 5e-4, Nesterov when asked); BatchNorm trains (SyncBN under DDP on GPUs); exact resume, all-rank
non-finite stop and DDP come from the engine. Not included (small demo): photometric distortion.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from components import dist
from components.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from components.engine.loop import Method
from components.pretrain.views import sample_seed
from components.transfer.segment.models import build_segmenter, load_trunk_


# ---------------------------------------------------------------------------------------------------------------------
# schedule, augmentation, batches
# ---------------------------------------------------------------------------------------------------------------------
def poly_lr(step: int, total: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """mmseg's poly policy at iteration ``step`` (0-based) of ``total``: ``(base - min)(1 - step/total)^power + min``."""
    frac = min(max(step, 0), total) / total
    return (base_lr - min_lr) * (1.0 - frac) ** power + min_lr


class SegAugment:
    """Per-sample train augmentation: random rescale (``scale_range``), random crop (``crop_size``, re-drawn up to 10
    times while one class covers > ``cat_max_ratio``, mmseg's RandomCrop), pad (image 0 / label 255), horizontal flip.

    ``{"key", "image": uint8 (3,H,W), "label": uint8 (H,W)} -> {"key", "image": float (3,S,S) normalised,
    "label": int64 (S,S)}``. Its random numbers come from a generator seeded by ``(seed, epoch, key, n-th visit)``
    (never from a worker's RNG): the same crops on a resumed run, with any number of loader workers.
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 *, seed: int = 0, epoch: int = 0):
        self.crop, self.scale_range, self.cat_max_ratio = crop_size, scale_range, cat_max_ratio
        self.seed, self.epoch = seed, epoch
        self._seen: dict[str, int] = {}

    def _generator(self, key: str) -> torch.Generator:
        n = self._seen[key] = self._seen.get(key, -1) + 1
        return torch.Generator().manual_seed(sample_seed("segment", self.seed, self.epoch, key, n))

    def __call__(self, s: dict) -> dict:
        g = self._generator(str(s["key"]))
        img, lbl = s["image"], s["label"]
        lo, hi = self.scale_range
        r = lo + (hi - lo) * torch.rand((), generator=g).item()
        h, w = img.shape[-2:]
        nh, nw = max(int(round(h * r)), 1), max(int(round(w * r)), 1)
        img = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
        lbl = F.interpolate(lbl[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        c = self.crop
        for _ in range(10):  # mmseg RandomCrop: avoid crops where one class covers > cat_max_ratio
            y0 = int(torch.randint(0, max(nh - c, 0) + 1, (), generator=g).item())
            x0 = int(torch.randint(0, max(nw - c, 0) + 1, (), generator=g).item())
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
        if torch.rand((), generator=g).item() < 0.5:
            img, lbl = img.flip(-1), lbl.flip(-1)
        return {"key": s["key"], "image": img.contiguous(), "label": lbl.contiguous()}


def collate_train(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[{"image": (3,S,S), "label": (S,S)}] -> ((B,3,S,S) float, (B,S,S) int64)``."""
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def seg_loss(logits: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Cross-entropy (ignore 255) of the upsampled logits, plus ``aux_weight`` x that of the auxiliary head."""
    size = labels.shape[-2:]
    loss = F.cross_entropy(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), labels,
                           ignore_index=IGNORE_INDEX)
    if aux is not None and aux_weight > 0:
        loss = loss + aux_weight * F.cross_entropy(
            F.interpolate(aux, size=size, mode="bilinear", align_corners=False), labels, ignore_index=IGNORE_INDEX)
    return loss


# ---------------------------------------------------------------------------------------------------------------------
# the method the engine drives
# ---------------------------------------------------------------------------------------------------------------------
class SegmentMethod(Method):
    """Supervised fine-tuning of a segmenter from one init, on ``source``'s train split.

    ``source`` is a :mod:`components.data.segmentation.sources` source (or anything with ``epoch_batches``); the
    network is the one ``segment.head`` names (:func:`~components.transfer.segment.models.build_segmenter`).
    """

    stat_keys = ("loss",)
    method_name = "supervised"

    def __init__(self, cfg, *, source, num_classes: int, arch: str, trunk_state: dict | None, trunk_source: str):
        self.cfg, self.source, self.num_classes, self.arch = cfg, source, num_classes, arch
        self.trunk_state, self.trunk_source = trunk_state, trunk_source
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rank_batch = max(1, cfg.batch_size // self.world)
        self.global_batch = self.rank_batch * self.world

    def build(self, device: torch.device) -> nn.Module:
        torch.manual_seed(self.cfg.seed)  # same head init for every init: only the trunk differs
        model = build_segmenter(self.cfg, arch=self.arch, num_classes=self.num_classes, method=self.method_name)
        if self.trunk_state is not None:
            load_trunk_(model, self.trunk_state, self.trunk_source)
        return model.to(device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # mmseg's FCN recipe decays every parameter (no paramwise rules) with plain SGD
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay, nesterov=self.cfg.nesterov)

    def lr_at(self, step: int) -> float:
        return poly_lr(step, self.cfg.iters, self.cfg.lr, self.cfg.power, min_lr=self.cfg.lr * 0.01)  # mmseg: 1e-4

    def batches(self, epoch: int) -> Iterable:
        cfg = self.cfg
        return self.source.epoch_batches(
            epoch, batch_size=self.rank_batch, map_fn=SegAugment(cfg.crop_size, tuple(cfg.scale_range), seed=cfg.seed,
                                                                 epoch=epoch),
            collate_fn=collate_train, seed=cfg.seed, num_workers=cfg.num_workers, rank=self.rank,
            world_size=self.world)

    def prepare(self, batch, device: torch.device) -> dict:
        images, labels = batch
        return {"images": images.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True)}

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(batch["images"], train_logits=True)
        return {"loss": seg_loss(out["logits"], out["aux"], batch["labels"], self.cfg.aux_weight)}

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The network to evaluate after training (semi-supervised methods: the teacher)."""
        return model
