"""Stage ``segment``: semantic segmentation on the pretrained trunk, supervised (SlotCon's transfer protocol) or
semi-supervised (``segment.method: classmix | reco``, :mod:`components.transfer.segment.semisup`, ReCo's protocol).

Labels: ``segment.labeled`` images of the train split keep their labels (a count or a fraction, drawn uniformly from
``split_seed``; the keys are written to ``<out>/labeled.txt``, their number and hash to the metrics and MLflow); the
rest is read without labels and used only by the semi-supervised methods. A semi-supervised run also trains the
supervised baseline on the same labelled images (``compare_supervised``), so the gain is one subtraction, and draws
image / ground truth / each model's prediction side by side (``<plots>/predictions.png``, MLflow).

Model (:mod:`components.transfer.segment.models`, ``segment.head``): FCN on a dilated trunk (os 8 or 16) + auxiliary head
(weight 0.4), or DeepLabv3+ (os 16, + ReCo's representation head for ``reco``); a ViT: FCN on its stride-16 map;
cross-entropy with ignore index 255. Optimiser: SGD (momentum 0.9, weight decay 5e-4, Nesterov when asked) with
mmseg's poly schedule
``lr_t = (lr - min_lr) (1 - t/T)^0.9 + min_lr`` (a pure function of the iteration). Augmentation per sample
(:class:`SegAugment`, random numbers drawn from ``(seed, epoch, key)``, so a resumed run and any worker count draw
the same): random rescale (``scale_range``), random crop (``crop_size``, re-drawn up to 10 times while one class
covers > 75 %, mmseg's ``cat_max_ratio``), pad (image 0 / label 255), horizontal flip. BatchNorm trains (SyncBN under
DDP on GPUs). Training runs on the engine (:mod:`components.engine.loop`): exact resume from ``--checkpoints``,
all-rank non-finite stop, DDP when ``nproc_per_node > 1``. Evaluation on the whole val split, whole image (or sliding
windows of ``crop_size`` with 2/3 overlap when ``test_mode: slide``), one confusion matrix over the split -> mIoU,
mAcc, pixel accuracy, per-class IoU; a semi-supervised run is evaluated with its teacher (as ReCo).

Trunk init: ``pretrained`` = ``models/backbone.pt`` (loaded strictly), a ``.pt`` path = that backbone, ``random`` =
torchvision's default init. ``compare_random`` also trains from random init with the same seed, schedule and data
order, so the gain of pretraining is one subtraction. Not included (small demo): photometric distortion and
multi-scale testing.

Kept as one file (a little over the house's 450 lines): the stage's augmentation, method, evaluation and the run of
every (init, method) belong together; the models are in :mod:`components.transfer.segment.models`, the semi-supervised
parts in :mod:`components.transfer.segment.semisup`, :mod:`~components.transfer.segment.reco` and :mod:`~components.transfer.segment.mixing`.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from components import dist
from components.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, normalize_uint8
from components.errors import UserError
from components.stage import Arg, Stage
from components.engine.loop import Method, RunSpec, fit, write_loss_plot
from components.transfer.seg_metrics import confusion_matrix, metrics_from_confusion
from components.transfer.segment.models import FCN, build_segmenter, build_trunk, load_trunk_  # noqa: F401

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# schedule, augmentation, batches
# ---------------------------------------------------------------------------------------------------------------------
def poly_lr(step: int, total: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """mmseg's poly policy at iteration ``step`` (0-based) of ``total``: ``(base - min)(1 - step/total)^power + min``."""
    frac = min(max(step, 0), total) / total
    return (base_lr - min_lr) * (1.0 - frac) ** power + min_lr


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float, ImageNet mean/std (what the torchvision trunk was trained on)."""
    return normalize_uint8(img)


class SegAugment:
    """Per-sample train augmentation: rescale, crop (cat_max_ratio), pad, flip.

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
        from components.pretrain.views import sample_seed

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
    """Supervised fine-tuning of a segmenter from one init, on ``source``'s train split (see the module docstring).

    ``source`` is a :mod:`components.data.segmentation.sources` source (or anything with ``epoch_batches``); ``model_fn``
    builds the network (default: ``segment.head`` from the config).
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


# ---------------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------------
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


#: what changes no training step (left out of the checkpoint fingerprint, so changing it keeps the checkpoints)
_NOT_TRAINING = ("compare_random", "compare_supervised", "num_vis", "test_mode", "save_every", "num_workers")


def train_one(cfg, *, init: str, arch: str, state_dict: dict | None, where: str, train_src, checkpoints, tracker,
              prefix: str, device=None, on_step=None, stop_after_step: int | None = None,
              method: str = "supervised", unlabeled_src=None):
    """Train one (init, method) through the engine on ``train_src`` (the labelled images) and, for a
    semi-supervised ``method``, ``unlabeled_src``; returns ``(model to evaluate, FitResult)``."""
    from components.transfer.segment.semisup import SEMISUP_METHODS

    label = prefix.rstrip("/") or ("random" if init == "random" else "pretrained")
    kw = dict(source=train_src, num_classes=train_src.num_classes, arch=arch, trunk_state=state_dict,
              trunk_source=where)
    if method == "supervised":
        m = SegmentMethod(cfg, **kw)
    else:
        m = SEMISUP_METHODS[method](cfg, unlabeled=unlabeled_src, **kw)
    spec = RunSpec(total_steps=cfg.iters, steps_per_epoch=None, log_every=max(cfg.iters // 20, 1),
                   save_every=cfg.save_every, amp=cfg.amp, label=f"segment[{label}]", metric_prefix=f"{prefix}train/",
                   keep_checkpoints=1)
    fp = {**cfg.model_dump(exclude=set(_NOT_TRAINING)), "init": label, "arch": arch, "run_method": method,
          "classes": train_src.class_names, "trunk": _sha1(where) if state_dict is not None else "random",
          "data": len(train_src), "labeled_keys": _keys_sha1(train_src),
          "unlabeled": len(unlabeled_src) if unlabeled_src is not None and method != "supervised" else 0}
    result = fit(m, spec, ckpt_dir=Path(checkpoints) / label if checkpoints else None, fingerprint=fp,
                 tracker=tracker, device=device, on_step=on_step, stop_after_step=stop_after_step)
    return m.eval_model(result.extra["model"]), result


def _sha1(path) -> str:
    from components.io import sha1_file

    return sha1_file(path)[:16]


def _keys_sha1(src) -> str | None:
    """A short hash of the source's sample keys (None when it cannot list them)."""
    import hashlib

    try:
        keys = src.keys()
    except (AttributeError, UserError):
        return None
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def split_train(cfg, train_src, out_dir: str | Path | None, tracker) -> tuple[Any, Any, dict]:
    """``(labelled source, unlabelled source or None, split metrics)``; writes ``<out_dir>/labeled.txt`` (one key a
    line) and logs it to MLflow. ``labeled: 1.0`` keeps the whole split labelled (no split)."""
    from components.io import write_text_atomic
    from components.transfer.segment.semisup import split_labeled

    if isinstance(cfg.labeled, float) and cfg.labeled >= 1.0:
        return train_src, None, {"labeled_images": len(train_src), "unlabeled_images": 0}
    lab, unl = split_labeled(train_src.keys(), cfg.labeled, cfg.split_seed)
    if cfg.method != "supervised" and not unl:
        raise UserError(f"segment.labeled={cfg.labeled} leaves no unlabelled image of {len(lab)}: "
                        f"method={cfg.method!r} needs some; lower labeled")
    labeled_src = train_src.subset(lab, labels=True)
    unlabeled_src = train_src.subset(unl, labels=False) if unl else None
    info = {"labeled_images": len(lab), "unlabeled_images": len(unl), "split_seed": cfg.split_seed,
            "labeled_sha1": _keys_sha1(labeled_src)}
    if out_dir is not None and dist.get_rank() == 0:
        write_text_atomic(Path(out_dir) / "labeled.txt", "".join(f"{k}\n" for k in lab))
        tracker.log_params({k: v for k, v in info.items()}, prefix="segment_split.")
        tracker.log_artifact(Path(out_dir) / "labeled.txt", "split")
    return labeled_src, unlabeled_src, info


def _runs(cfg) -> list[tuple[str, str, str]]:
    """``[(init, method, metric prefix)]``: the main run first ("" prefix), then ``supervised/``, ``random/``..."""
    inits = [cfg.init] + (["random"] if cfg.compare_random and cfg.init != "random" else [])
    methods = [cfg.method] + (["supervised"] if cfg.method != "supervised" and cfg.compare_supervised else [])
    return [(i, m, ("random/" if i != inits[0] else "") + ("supervised/" if m != methods[0] else ""))
            for i in inits for m in methods]


def run_segment(cfg, shards: str | Path | None, backbone: str | Path, out_dir: str | Path, *, tracker=None,
                device: str | None = None, checkpoints: str | Path | None = None,
                plots_dir: str | Path | None = None) -> dict:
    """Train every (init, method) of :func:`_runs`, evaluate each, return the metrics dict.

    Writes ``out_dir/model.pt`` (the main run's model; the teacher of a semi-supervised run), ``labeled.txt`` and,
    with ``plots_dir``, ``loss.csv``, ``loss.png`` and ``predictions.png``. Pure: reads only its arguments.
    """
    from components.data.segmentation.sources import open_source
    from components.io import save_torch_atomic
    from components.tracking.runs import Tracker
    from components.transfer.export import load_backbone

    tracker = tracker or Tracker()
    device = torch.device(device) if device else None
    train_src = open_source(cfg.data_root, shards, cfg.dataset, "train")  # cheap checks first: layout, backbone
    val_src = open_source(cfg.data_root, shards, cfg.dataset, "val")
    if train_src.class_names != val_src.class_names:
        raise UserError(f"{cfg.data_root or shards}: train and val splits list different classes")
    bb_path = Path(cfg.init) if cfg.init.endswith(".pt") else Path(backbone)
    arch, sd = load_backbone(bb_path)
    labeled_src, unlabeled_src, split = split_train(cfg, train_src, out_dir, tracker)
    runs = _runs(cfg)
    log.info("segment: %s (%d labelled + %d unlabelled train / %d val images, %d classes), %s trunk, %s head, "
             "runs %s", train_src.kind, split["labeled_images"], split["unlabeled_images"], len(val_src),
             val_src.num_classes, arch, cfg.resolved_head, [(i, m) for i, m, _ in runs])
    metrics: dict = {"num_classes": val_src.num_classes, "dataset": train_src.kind, "arch": arch, "iters": cfg.iters,
                     "method": cfg.method, "head": cfg.resolved_head, **split}
    curves: dict[int, dict] = {}
    models: list[tuple[str, nn.Module]] = []
    for init, method, prefix in runs:
        name = prefix.rstrip("/") or cfg.method
        t0 = time.perf_counter()
        model, result = train_one(cfg, init=init, arch=arch, state_dict=None if init == "random" else sd,
                                  where=str(bb_path), train_src=labeled_src, checkpoints=checkpoints, tracker=tracker,
                                  prefix=prefix, device=device, method=method, unlabeled_src=unlabeled_src)
        train_s = time.perf_counter() - t0
        for row in result.curve:
            curves.setdefault(int(row["step"]), {"iter": int(row["step"])})[name] = row["loss"]
        if dist.get_rank() != 0:
            continue
        m = evaluate(model, val_src.iterate(), num_classes=val_src.num_classes, class_names=val_src.class_names,
                     batch_size=cfg.batch_size, mode=cfg.test_mode, crop=cfg.crop_size,
                     device=result.extra["device"])
        losses = [r["loss"] for r in result.curve]
        metrics.update(_flat(m, prefix))
        metrics[f"{prefix}loss_first"] = losses[0] if losses else float("nan")
        metrics[f"{prefix}loss_last"] = losses[-1] if losses else float("nan")
        metrics[f"{prefix}train_img_per_s"] = result.img_per_s if result.steps_this_run else 0.0
        metrics[f"{prefix}train_s"] = round(train_s, 3)
        tracker.log_metrics({f"{prefix}{k}": m[k] for k in ("mIoU", "mAcc", "pixel_acc")})
        title = {"supervised": "supervised", "classmix": "ClassMix (teacher)", "reco": "ReCo+ClassMix (teacher)"}
        models.append((("random init: " if prefix.startswith("random/") else "") + title[method], model))
        if prefix == "":
            metrics["init"] = init if not init.endswith(".pt") else "path"
            metrics["num_val_images"] = m["num_images"]
    if dist.get_rank() != 0:
        return {}
    if "random/mIoU" in metrics:
        metrics["gain/mIoU"] = metrics["mIoU"] - metrics["random/mIoU"]
    if "supervised/mIoU" in metrics:
        metrics["semisup_gain/mIoU"] = metrics["mIoU"] - metrics["supervised/mIoU"]
    main_model = models[0][1]
    save_torch_atomic(
        {"arch": arch, "num_classes": val_src.num_classes, "class_names": val_src.class_names, "method": cfg.method,
         "head": cfg.resolved_head, "output_stride": cfg.output_stride, "head_channels": cfg.head_channels,
         "num_convs": cfg.num_convs, "concat_input": cfg.concat_input,
         "rep_dim": cfg.reco.rep_dim if cfg.method == "reco" else 0, "crop_size": cfg.crop_size,
         "state_dict": main_model.cpu().state_dict()},
        Path(out_dir) / "model.pt",
    )
    if plots_dir is not None:
        names = [r[2].rstrip("/") or cfg.method for r in runs]
        write_loss_plot([curves[k] for k in sorted(curves)], Path(plots_dir) / "loss.csv",
                        Path(plots_dir) / "loss.png", x="iter", ys=names, title="segmentation training loss")
        tracker.log_artifact(Path(plots_dir) / "loss.png", "plots")
        if cfg.num_vis:
            _draw(models, val_src, cfg, Path(plots_dir) / "predictions.png", tracker)
    metrics["skipped_samples"] = sum(s.skipped for s in (labeled_src, unlabeled_src, val_src) if s is not None)
    return metrics


def _draw(models, val_src, cfg, path: Path, tracker) -> None:
    """image / ground truth / each model's prediction on the first ``num_vis`` val images -> ``path`` + MLflow."""
    from components.transfer.draw import draw_segmentation

    samples = list(itertools.islice(val_src.iterate(), cfg.num_vis))
    columns = []
    for title, model in models:
        model.eval()
        columns.append((title, [predict(model, normalize(s["image"][None].to(next(model.parameters()).device)),
                                        mode=cfg.test_mode, crop=cfg.crop_size).argmax(1)[0].cpu()
                                for s in samples]))
    fig = draw_segmentation([s["image"] for s in samples], [s["label"] for s in samples], columns,
                            val_src.class_names, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    tracker.log_artifact(path, "plots")


def _run_stage(ctx) -> dict:
    a = ctx.args
    return run_segment(ctx.cfg, a.shards, a.backbone, a.out, tracker=ctx.tracker, checkpoints=a.checkpoints,
                       plots_dir=a.plots)


def _summary(m: Mapping[str, Any]) -> str:
    msg = f"{m.get('method', 'supervised')}: mIoU {m['mIoU']:.4f} pixel acc {m['pixel_acc']:.4f}"
    if "supervised/mIoU" in m:
        msg += f" (supervised on the same {m.get('labeled_images')} labels: mIoU {m['supervised/mIoU']:.4f})"
    if "random/mIoU" in m:
        msg += f" (random init: mIoU {m['random/mIoU']:.4f})"
    return msg


STAGE = Stage(
    name="segment", section="segment", run=_run_stage, metrics="metrics/segment.json", distributed=True,
    summary=_summary, headline=("mIoU", "pixel_acc", "supervised/mIoU", "semisup_gain/mIoU", "random/mIoU",
                                "labeled_images"),
    args=(Arg("shards", "data/shards", "shards root (the scenes default when data_root is empty)"),
          Arg("backbone", "models/backbone.pt", "exported backbone (init: pretrained)"),
          Arg("out", "models/segment", "folder for the fine-tuned model and labeled.txt"),
          Arg("plots", "plots/segment", "folder for loss.csv, loss.png and predictions.png"),
          Arg("checkpoints", None, "resumable checkpoints (outside DVC's outs, e.g. checkpoints/segment)")),
)
