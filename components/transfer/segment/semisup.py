"""Semi-supervised segmentation on the training engine: mean teacher + ClassMix/CutMix (``segment.method: classmix``)
and ReCo on top (``reco``), after Liu et al., ICLR 2022 (arXiv 2104.04465) and its code (lorenmt/reco). The train
split is cut once into a labelled and an unlabelled part (:func:`split_labeled`); :class:`MeanTeacherMethod` says
what one step does.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from components.engine.ema import ema_update_ as ema_tensors_
from components.errors import UserError
from components.pretrain.views import sample_seed
from components.transfer.segment.mixing import class_mix_masks, cut_mix_masks, mix_pairs, strong_augment
from components.transfer.segment.reco import reco_loss
from components.transfer.segment.train import SegAugment, SegmentMethod, collate_train, seg_loss


# ---------------------------------------------------------------------------------------------------------------------
# the labelled / unlabelled split and the unlabelled crops
# ---------------------------------------------------------------------------------------------------------------------
def split_labeled(keys: Iterable[str], labeled: int | float, seed: int) -> tuple[list[str], list[str]]:
    """``(labelled keys, unlabelled keys)``, both sorted: a uniform draw of ``labeled`` images (a count, or a
    fraction of ``len(keys)`` rounded, at least 1) from a permutation of the sorted keys seeded by ``seed``. The same
    keys and seed give the same split on every machine and process."""
    keys = sorted(set(keys))
    n = len(keys)
    count = labeled if isinstance(labeled, int) else max(1, round(labeled * n))
    if count > n:
        raise UserError(f"segment.labeled={labeled} asks for {count} labelled images but the train split has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(perm[:count])
    return [k for i, k in enumerate(keys) if i in chosen], [k for i, k in enumerate(keys) if i not in chosen]


class UnlabeledCrop:
    """``{"key", "image": uint8 (3,H,W)} -> {"key", "image": float (3,S,S) normalised, "valid": bool (S,S)}``: a
    random ``S x S`` crop at scale 1 (zero-padded where the image is smaller: ``valid`` False there), no flip. Random
    numbers from ``(seed, epoch, key, visit)`` as :class:`SegAugment` draws them."""

    def __init__(self, crop_size: int, *, seed: int = 0, epoch: int = 0):
        self.crop, self.seed, self.epoch = crop_size, seed, epoch
        self._seen: dict[str, int] = {}

    def __call__(self, s: dict) -> dict:
        key = str(s["key"])
        n = self._seen[key] = self._seen.get(key, -1) + 1
        g = torch.Generator().manual_seed(sample_seed("segment-unlabeled", self.seed, self.epoch, key, n))
        img = s["image"].float()
        h, w = img.shape[-2:]
        c = self.crop
        y0 = int(torch.randint(0, max(h - c, 0) + 1, (), generator=g))
        x0 = int(torch.randint(0, max(w - c, 0) + 1, (), generator=g))
        img = img[:, y0 : y0 + c, x0 : x0 + c]
        img = (img / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        valid = torch.ones(img.shape[1:], dtype=torch.bool)
        ph, pw = c - img.shape[1], c - img.shape[2]
        if ph > 0 or pw > 0:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            valid = F.pad(valid, (0, pw, 0, ph), value=False)
        return {"key": s["key"], "image": img.contiguous(), "valid": valid}


def collate_unlabeled(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[{"image": (3,S,S), "valid": (S,S)}] -> ((B,3,S,S) float, (B,S,S) bool)``."""
    return torch.stack([s["image"] for s in samples]), torch.stack([s["valid"] for s in samples])


# ---------------------------------------------------------------------------------------------------------------------
# teacher, pseudo-labels, unsupervised loss
# ---------------------------------------------------------------------------------------------------------------------
def ema_momentum(step: int, cap: float = 0.99) -> float:
    """ReCo's mean-teacher momentum of update ``step`` (0-based): ``min(1 - 1/(step+1), cap)``."""
    return min(1.0 - 1.0 / (step + 1), cap)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t = m t + (1 - m) s`` for every parameter and floating buffer, matched by name (the student may be
    SyncBN-converted), in fused multi-tensor kernels (:func:`components.engine.ema.ema_update_`); integer buffers
    (``num_batches_tracked``) are copied."""
    s_state = student.state_dict(keep_vars=True)
    pairs = [(t, s_state[k]) for k, t in teacher.state_dict(keep_vars=True).items()]
    ema_tensors_([t for t, _ in pairs if t.is_floating_point()], [s for t, s in pairs if t.is_floating_point()],
                 momentum)
    for t, s in pairs:
        if not t.is_floating_point():
            t.copy_(s)


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, images: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conf (B,H,W), labels (B,H,W) long)`` = max/argmax of the teacher's softmax at the images' resolution;
    invalid (padded) pixels get label 255 and confidence 0."""
    prob = torch.softmax(teacher(images).float(), dim=1)
    conf, lab = prob.max(dim=1)
    return conf.masked_fill(~valid, 0.0), lab.masked_fill(~valid, IGNORE_INDEX)


def unsup_ce(logits: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Confidence-weighted pixel CE (ReCo's ``compute_unsupervised_loss``): ``logits (B,C,h,w)`` upsampled to
    ``labels (B,H,W)``; image ``b``'s weight = share of its valid pixels with ``conf >= threshold``; mean over the
    valid pixels."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    weight = ((conf >= threshold) & valid).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    return (weight[:, None, None] * ce * valid).sum() / valid.sum().clamp(min=1)


def nearest_down(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` -> ``(B, h, w)`` by nearest neighbour (labels, masks, confidences alike)."""
    return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# the methods the engine drives
# ---------------------------------------------------------------------------------------------------------------------
class MeanTeacherMethod(SegmentMethod):
    """``classmix``: mean teacher + ClassMix (or CutMix, ``semisup.mix``) on ``unlabeled``.

    ``source`` is the labelled part (anything with ``epoch_batches``), ``unlabeled`` the unlabelled part (its
    ``epoch_batches`` yields ``{"key","image"}`` samples: it has no labels to give). One step (:meth:`forward`), with
    ``B_l`` labelled and ``B_u`` unlabelled crops:

    1. the **teacher** (an EMA of the student, eval mode, no gradient) labels the un-augmented unlabelled crops:
       ``conf, y_hat = max softmax(teacher(x_u))`` at the crop's resolution (padding: ignore);
    2. **mixing**: one mask per image pair (ClassMix: half of the pseudo-classes of image ``i``; or CutMix) mixes the
       images, the pseudo-labels and the confidences alike (:mod:`components.transfer.segment.mixing`), then a
       per-sample flip (all three) and colour jitter (image);
    3. the **student** runs once on ``[x_l ; x_mixed]`` (one forward: BatchNorm sees both, and DDP one call per step);
    4. ``loss = CE(x_l, y_l) [+ 0.4 aux] + w_u * L_u [+ w_r * ReCo]`` where ``L_u`` is the pixel CE on the mixed
       batch, image ``b``'s pixels weighted by the share of its valid pixels with ``conf >= 0.97`` (ReCo's
       ``compute_unsupervised_loss``); ReCo (:mod:`components.transfer.segment.reco`) runs at the representation's 1/4
       grid on every labelled pixel and on the unlabelled pixels with ``conf >= 0.7``, with their pseudo-labels;
    5. after the optimiser step the teacher moves: ``theta_t = m theta_t + (1 - m) theta_s`` with
       ``m = min(1 - 1/(t+1), 0.99)`` (so the first update copies the student), through the engine's ``momentum_at``
       / ``after_update`` hooks; floating buffers (BN running statistics) move the same way.

    Under DDP each rank mixes, pseudo-labels and computes ReCo on its own batch (the authors' one-GPU batch; nothing
    is gathered), DDP averages the gradients, so every rank's student and teacher parameters stay equal.

    Not included: ReCo's random rescale of the pseudo-labelled batch before mixing, Gaussian blur and hue jitter; its
    class-balanced choice of the labelled images (it reads every label to choose them). Different on purpose: the
    authors' teacher labels in train mode (BatchNorm on the unlabelled batch's statistics, its running statistics its
    own) and only its parameters are averaged; here the teacher runs in eval mode on averaged statistics too, so a
    pseudo-label does not depend on which images share its batch (and resume stays exact).
    """

    stat_keys = ("loss", "sup", "unsup", "confident")
    method_name = "classmix"
    use_reco = False

    def __init__(self, cfg, *, source, unlabeled, num_classes: int, arch: str, trunk_state: dict | None,
                 trunk_source: str):
        super().__init__(cfg, source=source, num_classes=num_classes, arch=arch, trunk_state=trunk_state,
                         trunk_source=trunk_source)
        self.unlabeled = unlabeled
        self.rank_ubatch = max(1, cfg.unlabeled_batch_size // self.world)
        self.global_batch = (self.rank_batch + self.rank_ubatch) * self.world
        self.teacher: nn.Module | None = None
        self.gen: torch.Generator | None = None

    def build(self, device: torch.device) -> nn.Module:
        student = super().build(device)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.gen = torch.Generator(device).manual_seed(sample_seed("segment-semisup", self.cfg.seed, self.rank))
        return student

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.teacher  # ReCo evaluates the mean teacher

    def momentum_at(self, step: int) -> float:
        return ema_momentum(step, self.cfg.semisup.ema_max)

    def after_update(self, model: nn.Module, step: int, momentum: float | None) -> None:
        ema_update_(self.teacher, model, momentum)

    def generators(self) -> list[torch.Generator]:
        return [self.gen]

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state) -> None:
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])

    def _labeled_cycle(self, epoch: int):
        """Endless labelled batches: shuffled passes ``epoch * 100003 + p`` for p = 0, 1, ... (each its own crops)."""
        cfg = self.cfg
        for p in itertools.count():
            sub = epoch * 100_003 + p
            yield from self.source.epoch_batches(
                sub, batch_size=self.rank_batch, collate_fn=collate_train, seed=cfg.seed,
                map_fn=SegAugment(cfg.crop_size, tuple(cfg.scale_range), seed=cfg.seed, epoch=sub),
                num_workers=cfg.num_workers, rank=self.rank, world_size=self.world)

    def batches(self, epoch: int) -> Iterable:
        """``(labelled batch, unlabelled batch)`` pairs: labelled crops (:class:`SegAugment`) from an endless cycle of
        shuffled passes, unlabelled crops (:class:`UnlabeledCrop`) from the unlabelled part, read *without* labels
        (folder: label files never opened; shards: maps never decoded). An epoch is one pass over the unlabelled
        part."""
        cfg = self.cfg
        unlabeled = self.unlabeled.epoch_batches(
            epoch, batch_size=self.rank_ubatch, map_fn=UnlabeledCrop(cfg.crop_size, seed=cfg.seed, epoch=epoch),
            collate_fn=collate_unlabeled, seed=cfg.seed + 1, num_workers=cfg.num_workers, rank=self.rank,
            world_size=self.world)
        return ((lab, unl) for unl, lab in zip(unlabeled, self._labeled_cycle(epoch)))  # the unlabelled pass ends it

    def prepare(self, batch, device: torch.device) -> dict:
        (img_l, lbl_l), (img_u, valid_u) = batch
        to = dict(device=device, non_blocking=True)
        return {"images": img_l.to(**to), "labels": lbl_l.to(**to), "u_images": img_u.to(**to),
                "u_valid": valid_u.to(**to)}

    def mixed_unlabeled(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher pseudo-labels on the un-augmented unlabelled crops, one mask per pair, flip + jitter:
        ``(images (B,3,S,S), labels (B,S,S), conf (B,S,S))``."""
        ss = self.cfg.semisup
        img, valid = batch["u_images"], batch["u_valid"]
        conf, lab = pseudo_labels(self.teacher, img, valid)
        if ss.mix == "classmix":
            mask = class_mix_masks(lab, self.num_classes, generator=self.gen)
        else:
            mask = cut_mix_masks(*lab.shape, device=lab.device, generator=self.gen)
        img, lab, conf = mix_pairs(mask, img, lab, conf)
        return strong_augment(img, lab, conf, generator=self.gen, jitter=ss.color_jitter)

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        img_m, lab_m, conf_m = self.mixed_unlabeled(batch)
        n_l = batch["images"].shape[0]
        out = model(torch.cat([batch["images"], img_m]), train_logits=True)
        logits = out["logits"]
        aux = out["aux"][:n_l] if out["aux"] is not None else None
        sup = seg_loss(logits[:n_l], aux, batch["labels"], cfg.aux_weight)
        unsup = unsup_ce(logits[n_l:], lab_m, conf_m, cfg.semisup.strong_threshold)
        confident = ((conf_m >= cfg.semisup.strong_threshold) & (lab_m != IGNORE_INDEX)).float().mean()
        stats = {"sup": sup.detach(), "unsup": unsup.detach(), "confident": confident}
        loss = sup + cfg.semisup.unsup_weight * unsup
        if self.use_reco:
            reco = self.reco_term(out["rep"], logits, batch["labels"], lab_m, conf_m)
            loss = loss + cfg.reco.weight * reco
            stats["reco"] = reco.detach()
        return {"loss": loss, **stats}

    def reco_term(self, rep, logits, labels_l, labels_u, conf_u) -> torch.Tensor:
        """ReCo at the representation's grid: labelled pixels (not ignored) and unlabelled pixels with
        ``conf >= weak_threshold``, each with its (pseudo-)label; hard queries from the student's softmax."""
        rc = self.cfg.reco
        size = rep.shape[-2:]
        lab = torch.cat([nearest_down(labels_l, size), nearest_down(labels_u, size)])
        weak = torch.cat([torch.ones_like(nearest_down(labels_l, size), dtype=torch.bool),
                          nearest_down(conf_u, size) >= rc.weak_threshold])
        valid = weak & (lab != IGNORE_INDEX)
        prob = torch.softmax(logits.detach().float(), dim=1)
        return reco_loss(rep, lab, valid, prob, hard_threshold=rc.hard_threshold, temperature=rc.temperature,
                         num_queries=rc.num_queries, num_negatives=rc.num_negatives, generator=self.gen)


class ReCoMethod(MeanTeacherMethod):
    """``reco``: :class:`MeanTeacherMethod` + the ReCo loss (needs the DeepLabv3+ representation head)."""

    stat_keys = ("loss", "sup", "unsup", "reco", "confident")
    method_name = "reco"
    use_reco = True


SEMISUP_METHODS = {"classmix": MeanTeacherMethod, "reco": ReCoMethod}
