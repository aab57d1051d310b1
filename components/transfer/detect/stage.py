"""Stage ``detect``: Mask R-CNN fine-tuning on the pretrained trunk (ResNet-FPN, or a ViT under ViTDet's simple
feature pyramid, :mod:`.maskrcnn`), COCO AP^b / AP^m on val; the paper's headline transfer (SlotCon Table 1: R50-FPN,
COCO 1x, AP^b 41.0 / AP^m 37.0). The official code runs detectron2 by hand; here it is one stage on torchvision and
the training engine (:mod:`components.engine.loop`: exact resume, all-rank non-finite stop, DDP, logging).
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torchvision
from torch import nn

from components import dist
from components.backbone import is_vit
from components.data.loading.ledger import SplitLoss, loss_details
from components.data.loading.loader import make_loader
from components.data.shards.index import (INDEX_NAME, expected_counts, join_root, read_index, read_root_file,
                                          shards_root, split_urls)
from components.engine.loop import Method, RunSpec, fit, write_loss_plot
from components.errors import UserError
from components.io import save_torch_atomic, sha1_file
from components.stage import Arg, Stage
from components.transfer.detect.evaluation import counted_val, evaluate_detector, to_float
from components.transfer.detect.maskrcnn import build_model, lr_at, model_kwargs_of, param_groups
from components.transfer.detect.targets import (
    category_maps, coco_to_target, has_valid_annotation, hflip, usable_annotations,
)
from components.transfer.draw import draw_predictions
from components.transfer.export import load_backbone

LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def prepare_train_sample(sample: dict, *, cat_to_label: Mapping[int, int], seed: int, epoch: int) -> dict:
    """Loader ``map_fn`` (runs in the worker): uint8 image ``(3, H, W)`` + target, or ``{"skip": reason}``.

    Targets from COCO annotations as torchvision's reference training makes them (crowds left out, zero-area boxes
    dropped and counted, images without a usable annotation skipped and counted: :func:`refill` tops the batch up).
    Horizontal flip with p = 0.5 drawn from ``(seed, epoch, key)``, so it is the same on a resumed run and independent
    of workers; the short side is drawn per image from ``min_size`` inside the model.
    """
    key = sample.get("key", "?")
    try:
        image = sample["image"]
        meta = sample["meta"] or {}
        h, w = int(image.shape[-2]), int(image.shape[-1])
        anns, invalid = usable_annotations(meta.get("annotations") or [], h, w)  # never rasterise a crafted one
        if not has_valid_annotation(anns):  # reference: _coco_remove_images_without_annotations
            return {"key": key, "skip": "no_valid_annotation"}
        image_id = int((meta.get("image") or {}).get("id", -1))
        target, counts = coco_to_target(anns, height=h, width=w, cat_to_label=cat_to_label, image_id=image_id)
        counts["invalid"] += invalid
    except (KeyError, TypeError, ValueError) as exc:  # a corrupt annotation: skip and count, with the key and URL
        print(f"detect: skipping {key} ({sample.get('url', '?')}): bad annotation ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return {"key": key, "skip": "bad_annotation"}
    # an image whose only usable objects are crowds trains with empty targets (all proposals background), as the
    # reference does: its filter runs before crowds are removed
    if random.Random(f"{seed}:{epoch}:{key}").random() < 0.5:
        image, target = hflip(image, target)
    return {"key": key, "image": image, "target": target, "counts": counts}


def refill(batches: Iterable[list[dict]], size: int) -> Iterator[list[dict]]:
    """Loader batches -> batches of ``size`` usable samples: skipped samples (``{"skip": reason}``) are left out and the
    batch is topped up from the next ones, so a rank never trains on an empty or short batch mid-stream. Skipped
    samples are passed along in ``batch[0]["skipped"]`` (a list of ``(key, reason)``) so they are still counted."""
    buf: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for batch in batches:
        for s in batch:
            if "skip" in s:
                skipped.append((s["key"], s["skip"]))
            else:
                buf.append(s)
        while len(buf) >= size:
            out, buf = buf[:size], buf[size:]
            yield [dict(out[0], skipped=skipped), *out[1:]]
            skipped = []
    if buf:
        yield [dict(buf[0], skipped=skipped), *buf[1:]]


# --------------------------------------------------------------------------------------------------------------------
# the method the engine drives
# --------------------------------------------------------------------------------------------------------------------
class DetectMethod(Method):
    """Mask R-CNN fine-tuning from one init, on the labelled train split of the shards (:func:`prepare_train_sample`).

    The trunk is loaded strictly from ``trunk_state`` (None: the same network without loading, so the random baseline
    runs the same way). SGD (momentum 0.9, weight decay 1e-4, none on norm parameters), linear warm-up from
    ``lr/1000``, x0.1 at each of ``steps``; COCO 1x is 90k iterations at batch 16. Under torchrun each rank reads its
    part of the shards and DDP all-reduces gradients; SyncBN on GPUs (``norm: syncbn``).
    """

    stat_keys = LOSS_KEYS

    def __init__(self, cfg, *, kwargs: dict[str, Any], trunk_state: dict | None, trunk_source: str,
                 train_urls: Sequence[str], cat_to_label: Mapping[int, int], num_train_samples: int | None,
                 loss: SplitLoss | None = None):
        self.cfg, self.kwargs, self.trunk_state, self.trunk_source = cfg, kwargs, trunk_state, trunk_source
        self.train_urls, self.cat_to_label = list(train_urls), dict(cat_to_label)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rank_batch = max(1, cfg.batch_size // self.world)
        self.global_batch = self.rank_batch * self.world
        self.sync_bn = cfg.norm == "syncbn"
        self.num_train_samples = num_train_samples
        self.skipped: dict[str, str] = {}  # image key -> why it was left out (per image, not per epoch)
        self.per_image: dict[str, Counter] = {}  # image key -> target counts (kept / crowd / zero-area ...)
        self.corrupt = 0
        self.loss = loss  # the train split's lost samples, counted against index.json (None: not counted)

    def build(self, device: torch.device) -> nn.Module:
        torch.manual_seed(self.cfg.seed)  # the same head init for every init: only the trunk differs
        model = build_model(**self.kwargs, trunk_state=self.trunk_state, trunk_source=self.trunk_source).to(device)
        torch.manual_seed(self.cfg.seed + self.rank)  # RPN/ROI sampling and the scale draw differ per rank
        if self.world > 1 and self.cfg.norm == "syncbn" and device.type != "cuda" and self.rank == 0:
            print("detect: norm=syncbn on CPU ranks: BN statistics stay per rank (SyncBatchNorm needs CUDA)")
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr, momentum=self.cfg.momentum)

    def lr_at(self, step: int) -> float:
        return lr_at(step, base_lr=self.cfg.lr, warmup_iters=self.cfg.warmup_iters, steps=self.cfg.steps)

    def batches(self, epoch: int) -> Iterator[list[dict]]:
        """One pass over the train split on one process; under DDP a resampled stream long enough for the whole
        run (ranks must yield equally many batches, and refilling makes pass lengths differ per rank)."""
        cfg = self.cfg
        resampled = self.world > 1 or len(self.train_urls) < max(1, cfg.num_workers)
        per_epoch = (self.num_train_samples if self.world == 1 else 2 * cfg.iters * self.global_batch + 1024) \
            if resampled else None
        loader = make_loader(
            self.train_urls, batch_size=self.rank_batch, decode="rgb",
            map_fn=functools.partial(prepare_train_sample, cat_to_label=self.cat_to_label, seed=cfg.seed,
                                     epoch=epoch),
            shuffle=True, resampled=resampled, samples_per_epoch=per_epoch, num_workers=cfg.num_workers,
            seed=cfg.seed, epoch=epoch, rank=self.rank, world_size=self.world,
            expected_counts=self.loss.expected if self.loss else None,
        )
        seen = 0
        for batch in refill(loader, self.rank_batch):  # the step index is the same on every rank: merges line up
            seen = self.count_lost(loader.errors, seen)
            yield batch
        self.corrupt += int(loader.stats.get("skipped", 0))
        self.count_lost(loader.errors, seen)

    def count_lost(self, errors: list, seen: int = 0) -> int:
        """Fold the loader's new records into :attr:`loss` and stop (every rank, one line naming the shard) above
        ``detect.max_lost_fraction``; returns how many records are folded in."""
        if self.loss is not None:
            self.loss.add(errors[seen:])
            self.loss.check(self.cfg.max_lost_fraction, "detect", merge=self.world > 1)
        return len(errors)

    def prepare(self, batch: list[dict], device: torch.device) -> dict:
        for key, why in batch[0].get("skipped", ()):
            self.skipped[key] = why
        for s in batch:
            self.per_image[s["key"]] = s["counts"]
        return {"images": [to_float(s["image"], device) for s in batch],
                "targets": [{k: v.to(device, non_blocking=True) for k, v in s["target"].items()} for s in batch]}

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        loss_dict = model(batch["images"], batch["targets"])
        loss = sum(v.float() for v in loss_dict.values())
        return {"loss": loss, **{k: loss_dict[k].detach().float() for k in LOSS_KEYS[1:]}}

    def state_dict(self) -> dict[str, Any]:
        lost = {"ledger": self.loss.ledger.state_dict(), "reasons": self.loss.reasons} if self.loss else {}
        return {"skipped": dict(self.skipped), "per_image": dict(self.per_image), "corrupt": self.corrupt,
                "lost": lost}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = dict(state.get("skipped", {}))
        self.per_image = dict(state.get("per_image", {}))
        self.corrupt = int(state.get("corrupt", 0))
        lost = state.get("lost") or {}
        if self.loss is not None and lost:
            self.loss.ledger.load_state_dict(lost["ledger"])
            for reason, seen in lost.get("reasons", {}).items():
                for where, n in seen.items():
                    self.loss.note(reason, where, int(n))


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def _resolve_inits(cfg, backbone: str | os.PathLike) -> list[tuple[str, Path | None]]:
    """``[(label, backbone file or None)]``: the configured init first, then ``random`` if ``compare_random``."""
    first = ("random", None) if cfg.init == "random" else (
        "pretrained", Path(backbone) if cfg.init == "pretrained" else Path(cfg.init))
    inits = [first]
    if cfg.compare_random and first[0] != "random":
        inits.append(("random", None))
    return inits


def _check_data(shards, cfg, world: int) -> dict[str, Any]:
    """Everything about the shards that can be wrong, checked before any training."""
    index = read_index(shards)
    categories = index.get("categories") or []
    if not categories:
        raise UserError(f"{shards}/index.json: no categories; detection needs a labeled source (scenes or coco)")
    train_split, val_split = index.get("train"), index.get("val")
    if not train_split or not val_split:
        raise UserError(f"{shards}/index.json: needs 'train' and 'val' splits for detection (got {train_split!r}, "
                        f"{val_split!r}); re-run `slotcon shard`")
    if world > 1 and cfg.batch_size % world:
        raise UserError(f"detect.batch_size={cfg.batch_size} is not divisible by world size {world}")
    cat_to_label, label_to_cat = category_maps(categories)
    return {"categories": categories, "train_urls": split_urls(shards, train_split),
            "val_urls": split_urls(shards, val_split), "cat_to_label": cat_to_label, "label_to_cat": label_to_cat,
            "train_counts": expected_counts(shards, train_split), "train_split": train_split,
            "val_loss": SplitLoss(expected_counts(shards, val_split), val_split),
            "num_train": int(index["splits"][train_split].get("num_samples") or 0) or None,
            "index_sha1": hashlib.sha1(read_root_file(join_root(shards, INDEX_NAME)) or b"").hexdigest()[:16]}


def _sha1(path) -> str:
    return sha1_file(path)[:16]


def _load_inits(cfg, backbone) -> tuple[list[tuple[str, Path | None]], dict[str, tuple], str]:
    """The inits, their ``(arch, state_dict, source)``, and the arch of the random baseline."""
    inits = _resolve_inits(cfg, backbone)
    weights: dict[str, tuple[str, dict | None, str]] = {}
    for label, path in inits:
        if path is not None:
            a, sd = load_backbone(path)
            weights[label] = (a, sd, str(path))
    arch = next(iter(weights.values()))[0] if weights else load_backbone(backbone)[0]
    return inits, weights, arch


def train_one(cfg, label: str, arch: str, sd: dict | None, src: str, data: dict, checkpoints, tracker, *,
              on_step=None, stop_after_step: int | None = None):
    """Fine-tune one init through the engine; returns ``(method, FitResult)``."""
    kwargs = model_kwargs_of(cfg, arch=arch, num_classes=len(data["categories"]))
    method = DetectMethod(cfg, kwargs=kwargs, trunk_state=sd, trunk_source=src, train_urls=data["train_urls"],
                          cat_to_label=data["cat_to_label"], num_train_samples=data["num_train"],
                          loss=SplitLoss(data["train_counts"], data["train_split"]))
    if dist.get_rank() == 0:
        neck = "simple pyramid" if is_vit(arch) else "FPN"
        print(f"detect[{label}]: Mask R-CNN {arch} + {neck}, {len(data['categories'])} classes, trunk from {src}, "
              f"norm={cfg.norm}, world={dist.get_world_size()}, {cfg.iters} iterations at batch {cfg.batch_size}",
              flush=True)
    spec = RunSpec(total_steps=cfg.iters, steps_per_epoch=None, log_every=1, save_every=cfg.save_every,
                   amp=cfg.amp, label=f"detect[{label}]", metric_prefix=f"{label}/", keep_checkpoints=1)
    # max_lost_fraction changes no step: raising it after a stop resumes the same run
    fp = {**cfg.model_dump(exclude={"max_lost_fraction"}), "label": label, "arch": arch, "index": data["index_sha1"],
          "trunk": _sha1(src) if sd is not None else "random"}
    result = fit(method, spec, ckpt_dir=Path(checkpoints) / label if checkpoints else None, fingerprint=fp,
                 tracker=tracker, on_step=on_step, stop_after_step=stop_after_step)
    if not result.stopped:
        method.count_lost([])  # every rank: the final merged count (and the stop, if the last batches passed it)
    return method, result


def _init_metrics(label: str, m: dict, result, method: DetectMethod, cfg, first: bool) -> dict[str, Any]:
    out = {f"{label}/{k}": v for k, v in m.items()}
    if result.steps_this_run:
        sec = result.segment_time_s / result.steps_this_run
        out[f"{label}/sec_per_iter"] = sec
        out[f"{label}/images_per_sec"] = cfg.batch_size / sec
    losses = [r["loss"] for r in result.curve]
    if losses:
        out[f"{label}/loss_first"], out[f"{label}/loss_last"] = losses[0], losses[-1]
    if first:
        targets: Counter = Counter()
        for c in method.per_image.values():
            targets.update(c)
        out.update({f"train_targets/{k}": v for k, v in targets.items()})
        out.update({f"train_images_skipped/{k}": v for k, v in Counter(method.skipped.values()).items()})
        out["train_images_skipped/corrupt"] = method.corrupt
    return out


def run_detect(cfg, shards, backbone, out_dir, plots_dir, *, checkpoints=None, tracker=None) -> dict[str, Any]:
    """Fine-tune Mask R-CNN from each init of ``cfg`` on the train split of ``shards``; COCOeval on val.

    ``cfg`` is a :class:`~components.config.DetectConfig`. Returns the metrics dict (``bbox_AP``, ``segm_AP`` of
    the configured init, ``<label>/<bbox|segm>_<stat>`` for every trained init, timing and data counts). Writes
    ``<out>/model.pt`` (the configured init) and ``<out>/model_random.pt`` (the comparison) atomically,
    ``<plots>/predictions.png``, ``loss.csv`` and ``loss.png``; resumable checkpoints go under
    ``<checkpoints>/<init>/<fingerprint>/`` (outside DVC's outs). COCOeval (bbox and segm) runs on rank 0.
    """
    rank = dist.get_rank()
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    data = _check_data(shards, cfg, dist.get_world_size())
    inits, weights, arch = _load_inits(cfg, backbone)
    for a, sd, src in weights.values():  # strict key check now, not after training the first model
        build_model(**model_kwargs_of(cfg, arch=a, num_classes=len(data["categories"])), trunk_state=sd,
                    trunk_source=src)
    metrics: dict[str, Any] = {}
    curves: dict[int, dict[str, float]] = {}
    vis_rows = []
    for n, (label, _) in enumerate(inits):
        a, sd, src = weights.get(label, (arch, None, "random"))
        method, result = train_one(cfg, label, a, sd, src, data, checkpoints, tracker)
        for row in result.curve:
            curves.setdefault(int(row["step"]) - 1, {"iter": int(row["step"]) - 1})[label] = row["loss"]
        bare = result.extra["model"]
        if rank == 0:
            m, vis, summary = evaluate_detector(
                bare, counted_val(data, cfg.max_lost_fraction), categories=data["categories"],
                label_to_cat_id=data["label_to_cat"], device=result.extra["device"], test_size=cfg.test_size,
                amp=cfg.amp, batch_size=cfg.batch_size, num_vis=cfg.num_vis)
            print(f"detect[{label}]: COCOeval on {m['num_val_images']} val images\n{summary}", flush=True)
            metrics.update(_init_metrics(label, m, result, method, cfg, first=n == 0))
            if n == 0:
                metrics.update(loss_details([method.loss, data["val_loss"]]))
            vis_rows.append((f"{label} init: AP^b {m['bbox_AP']:.3f}, AP^m {m['segm_AP']:.3f}", vis))
            save_torch_atomic({"model": bare.state_dict(), "model_kwargs": method.kwargs, "test_size": cfg.test_size,
                               "init": label, "trunk": src, "categories": data["categories"],
                               "label_to_cat_id": data["label_to_cat"], "iters": cfg.iters, "metrics": dict(m)},
                              out_dir / ("model.pt" if n == 0 else f"model_{label}.pt"))
            tracker.log_metrics({f"{label}/{k}": v for k, v in m.items()})
            if n == 0 and cfg.log_model:
                _log_model(tracker, bare.cpu().eval())
        dist.barrier()
        del bare, result
    if rank != 0:
        return {}
    head = inits[0][0]
    metrics = {"bbox_AP": metrics[f"{head}/bbox_AP"], "segm_AP": metrics[f"{head}/segm_AP"], **metrics}
    labels = [label for label, _ in inits]
    write_loss_plot([curves[k] for k in sorted(curves)], plots_dir / "loss.csv", plots_dir / "loss.png", x="iter",
                    ys=labels, title="Mask R-CNN fine-tuning loss")
    if cfg.num_vis:
        import matplotlib.pyplot as plt  # lazy: matplotlib costs ~0.5 s; only a run that draws needs it

        plt.close(draw_predictions(vis_rows, data["categories"], data["label_to_cat"], plots_dir / "predictions.png"))
        tracker.log_artifact(plots_dir / "predictions.png", "plots")
    tracker.log_artifact(plots_dir / "loss.csv", "plots")
    tracker.log_artifact(plots_dir / "loss.png", "plots")
    tracker.log_metrics({"bbox_AP": metrics["bbox_AP"], "segm_AP": metrics["segm_AP"]})
    return metrics


def _log_model(tracker, model: nn.Module) -> None:
    """Log the fine-tuned detector in the stage's MLflow run (not registered)."""
    if not tracker.active:
        return
    import mlflow  # lazy: mlflow costs ~1 s at start-up; only detect.log_model needs its fluent API

    active = mlflow.active_run()
    started = active is None or active.info.run_id != tracker.run_id
    if started:
        mlflow.start_run(run_id=tracker.run_id)
    try:
        mlflow.pytorch.log_model(
            model, name="detector", serialization_format="pickle",  # MaskRCNN takes lists: not pt2-traceable
            # explicit: inferring requirements probes the environment and may try the network
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}", "pycocotools"],
        )
    finally:
        if started:
            mlflow.end_run()


def _run_stage(ctx) -> dict[str, Any]:
    a = ctx.args
    return run_detect(ctx.cfg, shards_root(a.shards, a.params), a.backbone, a.out, a.plots, checkpoints=a.checkpoints,
                      tracker=ctx.tracker)


def _summary(m: Mapping[str, Any]) -> str:
    return f"bbox AP {m['bbox_AP']:.4f}, segm AP {m['segm_AP']:.4f}"


STAGE = Stage(
    name="detect", section="detect", run=_run_stage, metrics="metrics/detect.json", distributed=True,
    summary=_summary, headline=("bbox_AP", "segm_AP", "random/bbox_AP", "random/segm_AP"),
    args=(Arg("shards", "data/shards", "shard root holding index.json"),
          Arg("backbone", "models/backbone.pt", "exported trunk (slotcon export)"),
          Arg("out", "models/detect", "folder for model.pt (+ model_random.pt)"),
          Arg("plots", "plots/detect", "folder for predictions.png, loss.csv and loss.png"),
          Arg("checkpoints", None, "resumable checkpoints (outside DVC's outs, e.g. checkpoints/detect)")),
)
