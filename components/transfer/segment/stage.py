"""Stage ``segment``: semantic segmentation on the pretrained trunk, supervised (SlotCon's transfer protocol,
:mod:`.train`) or semi-supervised (``segment.method: classmix | reco``, ReCo's protocol, :mod:`.semisup`), with the
labelled part of the train split (:func:`split_train`). Besides the configured run it trains the supervised baseline
on the same labels (``compare_supervised``) and from random init (``compare_random``), so each gain is one
subtraction. Trunk init: ``pretrained`` = ``models/backbone.pt`` (strict), a ``.pt`` path, or ``random``.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from components import dist
from components.data.loading.ledger import loss_details
from components.data.segmentation.sources import open_source
from components.data.shards.index import shards_root
from components.engine.loop import RunSpec, fit, write_loss_plot
from components.errors import UserError
from components.io import save_torch_atomic, sha1_file, write_text_atomic
from components.stage import Arg, Stage, summary_line
from components.tracking import Tracker
from components.transfer.draw import draw_segmentation
from components.transfer.export import load_backbone
from components.transfer.segment.evaluation import evaluate, normalize, predict
from components.transfer.segment.semisup import SEMISUP_METHODS, split_labeled
from components.transfer.segment.train import SegmentMethod

log = logging.getLogger(__name__)


def _flat(m: dict, prefix: str = "") -> dict:
    out = {f"{prefix}{k}": m[k] for k in ("mIoU", "mAcc", "pixel_acc")}
    out[f"{prefix}per_class_IoU"] = {n: v["IoU"] for n, v in m["per_class"].items()}
    return out


#: what changes no training step (left out of the checkpoint fingerprint, so changing it keeps the checkpoints)
_NOT_TRAINING = ("compare_random", "compare_supervised", "num_vis", "test_mode", "save_every", "num_workers",
                 "max_lost_fraction")


def train_one(cfg, *, init: str, arch: str, state_dict: dict | None, where: str, train_src, checkpoints, tracker,
              prefix: str, device=None, on_step=None, stop_after_step: int | None = None,
              method: str = "supervised", unlabeled_src=None):
    """Train one (init, method) through the engine on ``train_src`` (the labelled images) and, for a
    semi-supervised ``method``, ``unlabeled_src``; returns ``(model to evaluate, FitResult)``."""
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
    return sha1_file(path)[:16]


def _keys_sha1(src) -> str | None:
    """A short hash of the source's sample keys (None when it cannot list them)."""
    try:
        keys = src.keys()
    except (AttributeError, UserError):
        return None
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def split_train(cfg, train_src, out_dir: str | Path | None, tracker) -> tuple[Any, Any, dict]:
    """``(labelled source, unlabelled source or None, split metrics)``: ``segment.labeled`` images (a count or a
    fraction, drawn uniformly from ``split_seed``) keep their labels. Writes ``<out_dir>/labeled.txt`` (one key a line)
    and logs it, with the split's size and key hash, to MLflow. ``labeled: 1.0`` keeps the whole split labelled."""
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


_TITLES = {"supervised": "supervised", "classmix": "ClassMix (teacher)", "reco": "ReCo+ClassMix (teacher)"}


def _run_metrics(m: dict, result, train_s: float, prefix: str) -> dict:
    """One run's figures under ``prefix``: its evaluation, first/last loss, throughput and training time."""
    losses = [r["loss"] for r in result.curve]
    out = _flat(m, prefix)
    out[f"{prefix}loss_first"] = losses[0] if losses else float("nan")
    out[f"{prefix}loss_last"] = losses[-1] if losses else float("nan")
    out[f"{prefix}train_img_per_s"] = result.img_per_s if result.steps_this_run else 0.0
    out[f"{prefix}train_s"] = round(train_s, 3)
    return out


def _save_model(cfg, model: nn.Module, arch: str, val_src, path: Path) -> None:
    """The main run's model (the teacher of a semi-supervised run) with what rebuilding it needs."""
    save_torch_atomic(
        {"arch": arch, "num_classes": val_src.num_classes, "class_names": val_src.class_names, "method": cfg.method,
         "head": cfg.resolved_head, "output_stride": cfg.output_stride, "head_channels": cfg.head_channels,
         "num_convs": cfg.num_convs, "concat_input": cfg.concat_input,
         "rep_dim": cfg.reco.rep_dim if cfg.method == "reco" else 0, "crop_size": cfg.crop_size,
         "state_dict": model.cpu().state_dict()},
        path,
    )


def run_segment(cfg, shards: str | Path | None, backbone: str | Path, out_dir: str | Path, *, tracker=None,
                device: str | None = None, checkpoints: str | Path | None = None,
                plots_dir: str | Path | None = None) -> dict:
    """Train every (init, method) of :func:`_runs`, evaluate each, return the metrics dict.

    Writes ``out_dir/model.pt`` (the main run's model; the teacher of a semi-supervised run), ``labeled.txt`` and,
    with ``plots_dir``, ``loss.csv``, ``loss.png`` and ``predictions.png``. Pure: reads only its arguments.
    """
    tracker = tracker or Tracker()
    device = torch.device(device) if device else None
    lost = dict(max_lost_fraction=cfg.max_lost_fraction, what="segment")
    train_src = open_source(cfg.data_root, shards, cfg.dataset, "train", **lost)  # cheap checks: layout, backbone
    val_src = open_source(cfg.data_root, shards, cfg.dataset, "val", **lost)
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
        metrics.update(_run_metrics(m, result, train_s, prefix))
        tracker.log_metrics({f"{prefix}{k}": m[k] for k in ("mIoU", "mAcc", "pixel_acc")})
        models.append((("random init: " if prefix.startswith("random/") else "") + _TITLES[method], model))
        if prefix == "":
            metrics["init"] = init if not init.endswith(".pt") else "path"
            metrics["num_val_images"] = m["num_images"]
    if dist.get_rank() != 0:
        return {}
    if "random/mIoU" in metrics:
        metrics["gain/mIoU"] = metrics["mIoU"] - metrics["random/mIoU"]
    if "supervised/mIoU" in metrics:
        metrics["semisup_gain/mIoU"] = metrics["mIoU"] - metrics["supervised/mIoU"]
    _save_model(cfg, models[0][1], arch, val_src, Path(out_dir) / "model.pt")
    if plots_dir is not None:
        _plots(cfg, runs, curves, models, val_src, Path(plots_dir), tracker)
    metrics["skipped_samples"] = sum(s.skipped for s in (labeled_src, unlabeled_src, val_src) if s is not None)
    losses = [s.loss for s in (train_src, val_src) if getattr(s, "loss", None) is not None]
    if losses:  # shards: what was lost of each split (a dataset folder counts its unreadable files in skipped)
        metrics.update(loss_details(losses))
    return metrics


def _plots(cfg, runs, curves: dict[int, dict], models, val_src, plots_dir: Path, tracker) -> None:
    """``loss.csv`` / ``loss.png`` (one curve per run) and, with ``num_vis``, ``predictions.png``; logged to MLflow."""
    names = [r[2].rstrip("/") or cfg.method for r in runs]
    write_loss_plot([curves[k] for k in sorted(curves)], plots_dir / "loss.csv", plots_dir / "loss.png", x="iter",
                    ys=names, title="segmentation training loss")
    tracker.log_artifact(plots_dir / "loss.png", "plots")
    if cfg.num_vis:
        _draw(models, val_src, cfg, plots_dir / "predictions.png", tracker)


def _draw(models, val_src, cfg, path: Path, tracker) -> None:
    """image / ground truth / each model's prediction on the first ``num_vis`` val images -> ``path`` + MLflow."""
    samples = list(itertools.islice(val_src.iterate(), cfg.num_vis))
    columns = []
    for title, model in models:
        model.eval()
        columns.append((title, [predict(model, normalize(s["image"][None].to(next(model.parameters()).device)),
                                        mode=cfg.test_mode, crop=cfg.crop_size).argmax(1)[0].cpu()
                                for s in samples]))
    fig = draw_segmentation([s["image"] for s in samples], [s["label"] for s in samples], columns,
                            val_src.class_names, path)
    import matplotlib.pyplot as plt  # lazy: matplotlib costs ~0.5 s; only a run that draws needs it

    plt.close(fig)
    tracker.log_artifact(path, "plots")


def _run_stage(ctx) -> dict:
    a = ctx.args
    return run_segment(ctx.cfg, shards_root(a.shards, a.params), a.backbone, a.out, tracker=ctx.tracker, checkpoints=a.checkpoints,
                       plots_dir=a.plots)


def _summary(m: Mapping[str, Any]) -> str:
    return summary_line({"method": "supervised", **m}, "{method}: mIoU {mIoU:.4f} pixel acc {pixel_acc:.4f}",
                        ("supervised/mIoU",
                         " (supervised on the same {labeled_images} labels: mIoU {supervised/mIoU:.4f})"),
                        ("random/mIoU", " (random init: mIoU {random/mIoU:.4f})"))


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
