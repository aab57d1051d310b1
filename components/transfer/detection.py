"""Stage ``detect``: Mask R-CNN with a ResNet-FPN backbone on the pretrained trunk; COCO AP^b / AP^m on val.

The paper's headline transfer (SlotCon Table 1): Mask R-CNN R50-FPN, COCO 1x schedule, AP^b 41.0 / AP^m 37.0 after
800 epochs of COCO pretraining. The official code runs detectron2 by hand; here it is one stage on torchvision:

- **Model** (:func:`build_model`): ``torchvision.models.detection.MaskRCNN`` on ``_resnet_fpn_extractor`` of a
  torchvision ResNet whose trunk is loaded *strictly* from ``models/backbone.pt`` (every trunk weight must be there;
  a mismatch is a one-line :class:`UserError` naming the missing/unexpected keys). ``init: random`` builds the same
  network without loading, so the baseline runs the same way; ``compare_random`` trains both with one schedule.
- **Normalisation** as the SSL transfer protocols use it (MoCo/SlotCon detectron2 configs ``*_syncbn``): BN in train
  mode in the trunk, FPN and (with ``box_head: 4conv1fc``) the ROI heads, every layer fine-tuned. ``norm: syncbn``
  (default) converts them to SyncBN under DDP on GPUs and is plain train-mode BN on one device; ``bn`` never syncs;
  ``frozen`` is torchvision's supervised default (FrozenBN, stem + layer1 frozen, no norm in FPN/heads).
- **Data** (:func:`_prepare_train_sample`): the labeled train split from the shards via the shared loader; targets
  from COCO annotations as torchvision's reference training makes them (crowds left out, zero-area boxes dropped and
  counted, images without a usable annotation skipped and counted); horizontal flip with p = 0.5; multi-scale short
  side drawn per image from ``min_size`` by ``GeneralizedRCNNTransform``.
- **Optimisation**: SGD (momentum 0.9, weight decay 1e-4, none on norm parameters as detectron2's
  ``WEIGHT_DECAY_NORM=0``), linear warm-up from ``lr * 0.001`` then x0.1 at each of ``steps`` (:func:`lr_at`, a pure
  function of the iteration, so resume is exact). COCO 1x: 90k iterations at batch 16, lr 0.02, steps 60k/80k,
  short side 640-800, test 800 (docstring of :class:`~components.config.DetectConfig`).
- **Evaluation**: pycocotools ``COCOeval`` (bbox and segm) on the val split -> the 12 COCO numbers of each.

Outputs: ``<out>/model.pt`` (the configured init) and ``<out>/model_random.pt`` (the comparison), written
atomically; resumable checkpoints under ``--checkpoints`` (outside DVC's outs, which DVC deletes before a run);
``<plots>/predictions.png`` and ``<plots>/loss.csv``; metrics ``bbox_AP``/``segm_AP`` (the configured init) plus
``pretrained/bbox_AP``, ``random/segm_AP75``, ... for each trained init.

Multi-process: under ``torchrun`` each rank reads its part of the shards (the loader's rank split), gradients are
all-reduced by DDP, SyncBN on GPUs; ``nproc_per_node > 1`` makes the stage launch ``torch.distributed.run`` itself.
Rank 0 evaluates and writes everything.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from components.errors import UserError

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
WARMUP_FACTOR = 0.001  # detectron2 WARMUP_FACTOR: warm-up starts at lr / 1000
GAMMA = 0.1  # step decay factor


# --------------------------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------------------------
def lr_at(it: int, *, base_lr: float, warmup_iters: int, steps: Sequence[int], warmup_factor: float = WARMUP_FACTOR,
          gamma: float = GAMMA) -> float:
    """Learning rate of iteration ``it`` (0-based): detectron2's WarmupMultiStepLR as a pure function.

    ``base_lr * gamma ** #{s in steps: s <= it} * w`` with ``w = f + (1 - f) * it / warmup_iters`` for
    ``it < warmup_iters`` (f = ``warmup_factor``), else 1.
    """
    decay = gamma ** sum(1 for s in steps if it >= s)
    if it < warmup_iters:
        alpha = it / warmup_iters
        return base_lr * decay * (warmup_factor * (1.0 - alpha) + alpha)
    return base_lr * decay


# --------------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------------
def _norm_layer(norm: str) -> Callable[..., nn.Module]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d  # syncbn: converted once a group exists


def _short(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_trunk(trunk: nn.Module, state_dict: Mapping[str, torch.Tensor], *, arch: str, source: str) -> None:
    """Copy ``state_dict`` (torchvision ResNet keys, ``fc.*`` optional) into ``trunk``, strictly.

    Every trunk tensor except ``fc.*`` must be present with the same shape; BN's ``num_batches_tracked`` counters are
    not weights and may be absent (FrozenBN has none). Otherwise raises one line naming the missing / unexpected /
    mismatched keys and the fix.
    """
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    given = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    counter = "num_batches_tracked"
    missing = sorted(k for k in own if k not in given and not k.endswith(counter))
    unexpected = sorted(k for k in given if k not in own and not k.endswith(counter))
    shapes = sorted(k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_short(unexpected)}")
        if shapes:
            pairs = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
            parts.append(f"shape mismatch: {_short(pairs, 2)}")
        raise UserError(f"{source}: backbone weights do not fit a torchvision {arch} trunk ({'; '.join(parts)}); "
                        f"export a {arch} backbone with `slotcon export` or set detect.init: random")
    with torch.no_grad():
        for k, v in own.items():
            if k in given:
                v.copy_(given[k].to(v.dtype))


def build_model(
    *,
    arch: str,
    num_classes: int,
    norm: str = "bn",
    box_head: str = "2fc",
    min_size: Sequence[int] = (800,),
    max_size: int = 1333,
    rpn_batch_size: int = 256,
    roi_batch_size: int = 512,
    proposals_train: int = 2000,
    proposals_test: int = 1000,
    mask_head: Sequence[int] = (256, 256, 256, 256),
    detections_per_img: int = 100,
    trunk_state: Mapping[str, torch.Tensor] | None = None,
    trunk_source: str = "backbone",
) -> nn.Module:
    """Mask R-CNN, ResNet-FPN (P2-P6, 256 channels), ``num_classes`` foreground classes (+ background).

    Input: a list of float images ``(3, H_i, W_i)`` in [0, 1]; training also takes targets (see
    :func:`components.transfer.targets.coco_to_target`). ``trunk_state`` (torchvision ResNet keys) is loaded strictly
    into the trunk (:func:`load_trunk`); None keeps torchvision's random init. ``box_head="4conv1fc"`` uses the
    normalised heads of the SSL transfer configs (torchvision's ``maskrcnn_resnet50_fpn_v2`` layout). ``mask_head``
    are the widths of the mask head's 3x3 convs at 14x14 (COCO: four of 256; on a CPU it dominates the step).
    """
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator, RPNHead

    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise UserError(f"{trunk_source}: unknown trunk arch {arch!r}; expected a torchvision resnet")
    trunk = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(norm))
    if trunk_state is not None:
        load_trunk(trunk, trunk_state, arch=arch, source=trunk_source)
    frozen = norm == "frozen"
    head_norm = None if frozen else nn.BatchNorm2d
    # SSL transfer fine-tunes every layer (detectron2 FREEZE_AT=0); the supervised/FrozenBN recipe freezes stem+res2
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=3 if frozen else 5, norm_layer=head_norm)
    kwargs: dict[str, Any] = {}
    if box_head == "4conv1fc":
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        kwargs.update(
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256] * 4, [1024], norm_layer=head_norm),
        )
    elif box_head == "2fc":
        kwargs["box_head"] = TwoMLPHead(backbone.out_channels * 7 * 7, 1024)
    else:
        raise ValueError(f"box_head={box_head!r} must be '2fc' or '4conv1fc'")
    kwargs["box_predictor"] = FastRCNNPredictor(1024, num_classes + 1)  # both heads end in a 1024-d representation
    widths = [int(c) for c in mask_head]
    kwargs["mask_head"] = MaskRCNNHeads(backbone.out_channels, widths, 1,
                                        norm_layer=head_norm if box_head == "4conv1fc" else None)
    kwargs["mask_predictor"] = MaskRCNNPredictor(widths[-1], widths[-1], num_classes + 1)
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors above carry num_classes + 1 (background)
        min_size=tuple(int(s) for s in min_size),
        max_size=max_size,
        rpn_batch_size_per_image=rpn_batch_size,
        box_batch_size_per_image=roi_batch_size,
        rpn_pre_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_train=proposals_train,
        rpn_pre_nms_top_n_test=proposals_test,
        rpn_post_nms_top_n_test=proposals_test,
        box_detections_per_img=detections_per_img,
        **kwargs,
    )


def model_kwargs_of(cfg, *, arch: str, num_classes: int) -> dict[str, Any]:
    """The :func:`build_model` keyword arguments a :class:`DetectConfig` implies (stored in ``model.pt``)."""
    return dict(arch=arch, num_classes=num_classes, norm=cfg.norm, box_head=cfg.box_head, min_size=list(cfg.min_size),
                max_size=cfg.max_size, rpn_batch_size=cfg.rpn_batch_size, roi_batch_size=cfg.roi_batch_size,
                proposals_train=cfg.proposals_train, proposals_test=cfg.proposals_test, mask_head=list(cfg.mask_head),
                detections_per_img=cfg.detections_per_img)


def load_detector(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``models/detect/model.pt`` -> (Mask R-CNN in eval mode on the CPU, the file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: detector not found; run `dvc repro detect` first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(**state["model_kwargs"])
    model.load_state_dict(state["model"], strict=True)
    model.transform.min_size = (state.get("test_size", model.transform.min_size[-1]),)
    return model.eval(), {k: v for k, v in state.items() if k != "model"}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: norm-layer parameters without weight decay (detectron2 WEIGHT_DECAY_NORM=0), the rest with."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in norm_ids], "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def _prepare_train_sample(sample: dict, *, cat_to_label: Mapping[int, int], seed: int, epoch: int) -> dict:
    """Loader ``map_fn`` (runs in the worker): uint8 image ``(3, H, W)`` + target, or ``{"skip": reason}``.

    The flip is drawn from ``(seed, epoch, key)``, so it is the same on a resumed run and independent of workers.
    """
    from components.transfer.targets import coco_to_target, has_valid_annotation, hflip

    key = sample.get("key", "?")
    try:
        image = sample["image"]
        meta = sample["meta"] or {}
        anns = meta.get("annotations") or []
        if not has_valid_annotation(anns):  # reference: _coco_remove_images_without_annotations
            return {"key": key, "skip": "no_valid_annotation"}
        h, w = int(image.shape[-2]), int(image.shape[-1])
        image_id = int((meta.get("image") or {}).get("id", -1))
        target, counts = coco_to_target(anns, height=h, width=w, cat_to_label=cat_to_label, image_id=image_id)
    except (KeyError, TypeError, ValueError) as exc:  # a corrupt annotation: skip and count, with the key and URL
        print(f"detect: skipping {key} ({sample.get('url', '?')}): bad annotation ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return {"key": key, "skip": "bad_annotation"}
    # an image whose only usable objects are crowds trains with empty targets (all proposals background), as the
    # reference does: its filter runs before crowds are removed
    if random.Random(f"{seed}:{epoch}:{key}").random() < 0.5:
        image, target = hflip(image, target)
    return {"key": key, "image": image, "target": target, "counts": counts}


def _batches(it: Iterable[dict], size: int) -> Iterable[list[dict]]:
    batch: list[dict] = []
    for s in it:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _to_float(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    return image.to(device, non_blocking=True).float().div_(255.0)


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_detector(
    model: nn.Module,
    *,
    cfg,
    label: str,
    train_urls: Sequence[str],
    cat_to_label: Mapping[int, int],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    tracker=None,
    ckpt_dir: str | os.PathLike | None = None,
    num_train_samples: int | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``cfg.iters`` SGD iterations of ``model`` (already on ``device``, maybe DDP-wrapped) on the train shards.

    Returns ``{"losses": [total loss per iteration], "sec_per_iter", "images_per_sec", "skipped": Counter,
    "targets": Counter}``. Resumes from the newest checkpoint of the same configuration under ``ckpt_dir``.
    """
    from components import dist
    from components.data.loader import make_loader
    from components.train import checkpoint as ckpt

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    bare = ckpt.unwrap(model)
    optimizer = torch.optim.SGD(param_groups(bare, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    it, epoch, consumed = 0, 0, 0
    losses: list[float] = []
    times: list[float] = []  # seconds per iteration (data + step), kept in checkpoints so a resumed run reports them
    skipped: dict[str, str] = {}  # image key -> why it was left out (per image, not per epoch)
    per_image: dict[str, Counter] = {}
    run_dir = None
    if ckpt_dir is not None:
        fp, _ = ckpt.fingerprint(cfg.model_dump(), {"label": label, "world_size": world_size,
                                                          **(fingerprint_extra or {})})
        run_dir = Path(ckpt_dir) / f"{label}-{fp}"
        found = ckpt.find_latest(run_dir)
        if found is not None:
            path, state = found
            bare.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            it, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["consumed"])
            losses = list(state.get("losses", []))
            skipped = dict(state.get("skipped", {}))
            times = list(state.get("times", []))
            ckpt.set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            print(f"detect[{label}]: resuming from {path} at iteration {it}/{cfg.iters}")

    def save() -> None:
        if run_dir is None:
            return
        rngs = [ckpt.rng_state()]
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if rank == 0:
            ckpt.save_checkpoint({"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "step": it,
                                  "epoch": epoch, "consumed": consumed, "losses": losses, "skipped": dict(skipped),
                                  "rng": rngs, "times": times, "config": cfg.model_dump(), "label": label},
                                 run_dir, it, keep=1)

    model.train()
    bar = tqdm(total=cfg.iters, initial=it, desc=f"detect[{label}]", disable=rank != 0 or tqdm is None,
               dynamic_ncols=True) if tqdm else None
    # one pass per epoch on one process; resampled (equal batch counts on every rank) under DDP or when there are
    # fewer shards than workers
    resampled = world_size > 1 or len(train_urls) < max(1, cfg.num_workers)
    corrupt = 0
    while it < cfg.iters:
        loader = make_loader(
            list(train_urls), batch_size=max(1, cfg.batch_size // world_size), decode="rgb",
            map_fn=functools.partial(_prepare_train_sample, cat_to_label=dict(cat_to_label), seed=cfg.seed,
                                     epoch=epoch),
            shuffle=True, resampled=resampled, samples_per_epoch=num_train_samples if resampled else None,
            num_workers=cfg.num_workers, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
        )
        batches_this_epoch = 0
        t_last = time.perf_counter()
        for batch in loader:
            batches_this_epoch += 1
            if batches_this_epoch <= consumed:  # resume: skip what the checkpointed run already trained on
                continue
            consumed += 1
            for s in batch:
                if "counts" in s:
                    per_image[s["key"]] = s["counts"]
                if "skip" in s:
                    skipped[s["key"]] = s["skip"]
            batch = [s for s in batch if "skip" not in s]
            if not batch:  # a rank with nothing to train on this step: draw the next batch (no collective missed)
                continue
            lr = lr_at(it, base_lr=cfg.lr, warmup_iters=cfg.warmup_iters, steps=cfg.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = [_to_float(s["image"], device) for s in batch]
            targets = [{k: v.to(device, non_blocking=True) for k, v in s["target"].items()} for s in batch]
            with _autocast(device, cfg.amp):
                loss_dict = model(images, targets)
            loss = sum(v.float() for v in loss_dict.values())
            if dist.any_rank(not bool(torch.isfinite(loss)), device=device):
                parts = ", ".join(f"{k}={float(v):.3g}" for k, v in loss_dict.items())
                raise UserError(f"detect[{label}]: non-finite loss at iteration {it} ({parts}); lower detect.lr "
                                f"or raise detect.warmup_iters")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            times.append(now - t_last)  # data + step: what an iteration costs end to end
            t_last = now
            # logged values are means over ranks (each rank saw its own part of the global batch)
            values = {k: float(dist.all_reduce_mean(v.detach().float())) for k, v in loss_dict.items()}
            losses.append(float(dist.all_reduce_mean(loss.detach())))
            if tracker is not None:
                tracker.log_metrics({f"{label}/loss": losses[-1], f"{label}/lr": lr,
                                     **{f"{label}/{k}": v for k, v in values.items()}}, step=it)
            it += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2g}", s_it=f"{times[-1]:.2f}")
            if it % cfg.save_every == 0 or it == cfg.iters:
                save()
            if it >= cfg.iters:
                break
        corrupt = max(corrupt, int(loader.stats.get("skipped", 0)))
        if batches_this_epoch == 0:
            raise UserError(f"{train_urls[0] if train_urls else '<no shards>'}: the train split yielded no samples "
                            f"on rank {rank}; check the shards (slotcon shard --verify)")
        if it < cfg.iters:
            epoch, consumed = epoch + 1, 0
    if bar is not None:
        bar.close()
    steady = times[2:] if len(times) > 4 else times  # the first iterations pay for allocation and worker start-up
    sec = sum(steady) / len(steady) if steady else float("nan")
    targets_counts: Counter = Counter()
    for c in per_image.values():
        targets_counts.update(c)
    return {"losses": losses, "sec_per_iter": sec,
            "images_per_sec": (cfg.batch_size / sec) if steady else float("nan"),
            "skipped": Counter(skipped.values()), "targets": targets_counts, "corrupt_samples": corrupt,
            "iterations_run": len(times)}


# --------------------------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    samples: Iterable[dict],
    *,
    categories: Sequence[Mapping[str, Any]],
    label_to_cat_id: Mapping[int, int],
    device: torch.device,
    test_size: int,
    amp: bool = True,
    batch_size: int = 4,
    num_vis: int = 0,
) -> tuple[dict[str, float], list[tuple[torch.Tensor, dict]], str]:
    """COCOeval (bbox, segm) of ``model`` on ``samples`` (the val split in fixed order).

    Returns ``(metrics, vis, summary)``: the 24 named COCO numbers, the first ``num_vis`` ``(uint8 image (3, H, W),
    output on CPU)`` pairs for the picture, and COCO's printed summary tables.
    """
    from components.transfer.coco_eval import evaluate, make_coco, predictions_to_results

    model.eval()
    old_size = model.transform.min_size
    model.transform.min_size = (test_size,)
    images, anns, results, vis = [], [], [], []
    try:
        for batch in _batches(samples, batch_size):
            for s in batch:
                meta = s["meta"] or {}
                rec = dict(meta.get("image") or {})
                rec.setdefault("id", len(images) + 1)
                rec["height"], rec["width"] = int(s["image"].shape[-2]), int(s["image"].shape[-1])
                images.append(rec)
                anns += [dict(a, image_id=rec["id"]) for a in meta.get("annotations") or []]
            with _autocast(device, amp):
                outputs = model([_to_float(s["image"], device) for s in batch])
            for s, rec, out in zip(batch, images[-len(batch):], outputs):
                out = {k: v.float().cpu() for k, v in out.items()}
                results += predictions_to_results(rec["id"], out, label_to_cat_id)
                if len(vis) < num_vis:
                    vis.append((s["image"].cpu(), out))
    finally:
        model.transform.min_size = old_size
    if not images:
        raise UserError("the val split yielded no samples; check the shards (slotcon shard --verify)")
    summary: list[str] = []
    metrics = evaluate(make_coco(images, anns, categories), results, summary=summary)
    metrics["num_val_images"] = len(images)
    metrics["num_detections"] = len(results)
    return metrics, vis, "".join(summary)


# --------------------------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------------------------
def draw_predictions(rows: Sequence[tuple[str, Sequence[tuple[torch.Tensor, dict]]]],
                     categories: Sequence[Mapping[str, Any]], label_to_cat_id: Mapping[int, int],
                     path: str | os.PathLike, *, score_threshold: float = 0.5):
    """One row per model (``(title, [(uint8 image (3, H, W), output), ...])``): masks, boxes, class and score.

    Writes a PNG atomically to ``path`` and returns the matplotlib figure (closed by the caller).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from components.io import write_bytes_atomic

    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    ncols = max((len(r[1]) for r in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3 * ncols, 3 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r, (title, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                continue
            image, out = items[c]
            canvas = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
            keep = (out["scores"] >= score_threshold).nonzero().flatten().tolist()
            if not keep:  # an early model scores low everywhere: show its best 3 (their scores say how unsure)
                keep = list(range(min(3, len(out["scores"]))))
            for j, i in enumerate(keep):
                color = np.array(cmap(j % 10)[:3], dtype=np.float32)
                if "masks" in out:
                    m = (out["masks"][i, 0] > 0.5).numpy()
                    canvas[m] = 0.5 * canvas[m] + 0.5 * color
            ax.imshow(canvas)
            for j, i in enumerate(keep):
                x1, y1, x2, y2 = out["boxes"][i].tolist()
                color = cmap(j % 10)
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.2))
                name = names.get(label_to_cat_id.get(int(out["labels"][i]), -1), "?")
                ax.text(x1, y1, f"{name} {float(out['scores'][i]):.2f}", fontsize=6, color="white",
                        bbox=dict(facecolor=color, alpha=0.7, pad=0.5, linewidth=0), va="bottom")
            if c == 0:
                ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
    return fig


def _write_loss_csv(path: Path, curves: Mapping[str, Sequence[float]]) -> None:
    from components.io import write_text_atomic

    labels = list(curves)
    n = max((len(v) for v in curves.values()), default=0)
    lines = ["iter," + ",".join(labels)]
    for i in range(n):
        lines.append(f"{i}," + ",".join(f"{curves[k][i]:.6g}" if i < len(curves[k]) else "" for k in labels))
    write_text_atomic(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def _file_hash(path: str | os.PathLike) -> str:
    """sha1 of a file's bytes: a re-exported backbone or re-written shards must not resume an old checkpoint."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _resolve_inits(cfg, backbone: str | os.PathLike) -> list[tuple[str, Path | None]]:
    """``[(label, backbone file or None)]``: the configured init first, then ``random`` if ``compare_random``."""
    first = ("random", None) if cfg.init == "random" else (
        "pretrained", Path(backbone) if cfg.init == "pretrained" else Path(cfg.init))
    inits = [first]
    if cfg.compare_random and first[0] != "random":
        inits.append(("random", None))
    return inits


def run_detect(
    cfg,
    shards: str | os.PathLike,
    backbone: str | os.PathLike,
    out_dir: str | os.PathLike,
    plots_dir: str | os.PathLike,
    *,
    checkpoints: str | os.PathLike | None = None,
    tracker=None,
) -> dict[str, Any]:
    """Fine-tune Mask R-CNN from each init of ``cfg`` on the train split of ``shards``; COCOeval on val.

    ``cfg`` is a :class:`~components.config.DetectConfig`. Returns the metrics dict (``bbox_AP``, ``segm_AP`` of
    the configured init, ``<label>/<bbox|segm>_<stat>`` for every trained init, timing and data counts).
    """
    from components import dist
    from components.data.loader import iterate_samples
    from components.data.shards import read_index, split_urls
    from components.io import save_torch_atomic
    from components.transfer.convert import load_backbone
    from components.transfer.targets import category_maps

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", dist.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)

    # ---- everything that can be wrong is checked before training -------------------------------------------------
    index = read_index(shards)
    categories = index.get("categories") or []
    if not categories:
        raise UserError(f"{shards}/index.json: no categories; detection needs a labeled source (scenes or coco)")
    train_split, val_split = index.get("train"), index.get("val")
    if not train_split or not val_split:
        raise UserError(f"{shards}/index.json: needs 'train' and 'val' splits for detection (got {train_split!r}, "
                        f"{val_split!r}); re-run `slotcon shard`")
    train_urls, val_urls = split_urls(shards, train_split), split_urls(shards, val_split)
    if world > 1 and cfg.batch_size % world:
        raise UserError(f"detect.batch_size={cfg.batch_size} is not divisible by world size {world}")
    cat_to_label, label_to_cat = category_maps(categories)
    inits = _resolve_inits(cfg, backbone)
    weights: dict[str, tuple[str, dict | None, str]] = {}
    arch = None
    for label, path in inits:
        if path is not None:
            a, sd = load_backbone(path)
            weights[label] = (a, sd, str(path))
            arch = arch or a
    if arch is None:  # random only: take the architecture of the exported backbone, so the baseline matches
        arch = load_backbone(backbone)[0]
    for label, (a, sd, src) in weights.items():  # strict key check now, not after training the first model
        build_model(**model_kwargs_of(cfg, arch=a, num_classes=len(categories)), trunk_state=sd, trunk_source=src)

    metrics: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    vis_rows = []
    for label, _ in inits:
        a, sd, src = weights.get(label, (arch, None, "random"))
        kwargs = model_kwargs_of(cfg, arch=a, num_classes=len(categories))
        torch.manual_seed(cfg.seed)  # same head init for every init: only the trunk differs
        model = build_model(**kwargs, trunk_state=sd, trunk_source=src).to(device)
        if world > 1:
            if cfg.norm == "syncbn" and device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif cfg.norm == "syncbn" and rank == 0:  # torch's SyncBN runs on GPUs only
                print("detect: norm=syncbn on CPU ranks: BN statistics stay per rank (SyncBatchNorm needs CUDA)")
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + rank)  # sampling in RPN/ROI heads and the scale draw differ per rank
        print(f"detect[{label}]: Mask R-CNN {a}-FPN, {len(categories)} classes, trunk from {src}, norm={cfg.norm}, "
              f"device={device}, world={world}, {cfg.iters} iterations at batch {cfg.batch_size}")
        hist = train_detector(model, cfg=cfg, label=label, train_urls=train_urls, cat_to_label=cat_to_label,
                              device=device, rank=rank, world_size=world, tracker=tracker, ckpt_dir=checkpoints,
                              num_train_samples=int(index["splits"][train_split].get("num_samples") or 0) or None,
                              fingerprint_extra={"arch": a, "trunk": _file_hash(src) if sd is not None else "random",
                                                 "index": _file_hash(Path(shards) / "index.json")})
        curves[label] = hist["losses"]
        bare = model.module if world > 1 else model
        if rank == 0:
            if hist["losses"]:
                print(f"detect[{label}]: {hist['sec_per_iter']:.3f} s/iteration ({hist['images_per_sec']:.1f} img/s) "
                      f"on {device}; loss {hist['losses'][0]:.3f} -> {hist['losses'][-1]:.3f}")
            m, vis, summary = evaluate_detector(
                bare, iterate_samples(val_urls, decode="rgb"), categories=categories, label_to_cat_id=label_to_cat,
                device=device, test_size=cfg.test_size, amp=cfg.amp, batch_size=cfg.batch_size, num_vis=cfg.num_vis)
            print(f"detect[{label}]: COCOeval on {m['num_val_images']} val images\n{summary}")
            metrics.update({f"{label}/{k}": v for k, v in m.items()})
            if math.isfinite(hist["sec_per_iter"]):  # (NaN is not JSON: leave it out)
                metrics[f"{label}/sec_per_iter"] = hist["sec_per_iter"]
                metrics[f"{label}/images_per_sec"] = hist["images_per_sec"]
            if hist["losses"]:
                metrics[f"{label}/loss_first"] = hist["losses"][0]
                metrics[f"{label}/loss_last"] = hist["losses"][-1]
            if label == inits[0][0]:
                for k, v in hist["targets"].items():
                    metrics[f"train_targets/{k}"] = v
                for k, v in hist["skipped"].items():
                    metrics[f"train_images_skipped/{k}"] = v
                metrics["train_images_skipped/corrupt"] = hist["corrupt_samples"]
            vis_rows.append((f"{label} init: AP^b {m['bbox_AP']:.3f}, AP^m {m['segm_AP']:.3f}", vis))
            name = "model.pt" if label == inits[0][0] else f"model_{label}.pt"
            save_torch_atomic({"model": bare.state_dict(), "model_kwargs": kwargs, "test_size": cfg.test_size,
                               "init": label, "trunk": src, "categories": categories,
                               "label_to_cat_id": label_to_cat, "iters": cfg.iters,
                               "metrics": {k: v for k, v in m.items()}}, out_dir / name)
            if tracker is not None:
                tracker.log_metrics({f"{label}/{k}": v for k, v in m.items()})
                if label == inits[0][0] and cfg.log_model:
                    _log_model(tracker, bare.cpu().eval())
        dist.barrier()
        del model, bare

    if rank == 0:
        head = inits[0][0]
        metrics = {"bbox_AP": metrics[f"{head}/bbox_AP"], "segm_AP": metrics[f"{head}/segm_AP"], **metrics}
        _write_loss_csv(plots_dir / "loss.csv", curves)
        if cfg.num_vis:
            import matplotlib.pyplot as plt

            fig = draw_predictions(vis_rows, categories, label_to_cat, plots_dir / "predictions.png")
            if tracker is not None:
                tracker.log_artifact(plots_dir / "predictions.png", "plots")
            plt.close(fig)
        if tracker is not None:
            tracker.log_artifact(plots_dir / "loss.csv", "plots")
            tracker.log_metrics({"bbox_AP": metrics["bbox_AP"], "segm_AP": metrics["segm_AP"]})
    return metrics


def _log_model(tracker, model: nn.Module) -> None:
    """Log the fine-tuned detector in the stage's MLflow run (not registered)."""
    if not tracker.active:
        return
    import mlflow
    import torchvision

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


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="data/shards", help="shard root holding index.json")
    parser.add_argument("--backbone", default="models/backbone.pt", help="exported trunk (slotcon export)")
    parser.add_argument("--out", default="models/detect", help="folder for model.pt (+ model_random.pt)")
    parser.add_argument("--metrics", default="metrics/detect.json", help="DVC metrics file")
    parser.add_argument("--plots", default="plots/detect", help="folder for predictions.png and loss.csv")
    parser.add_argument("--checkpoints", default=None,
                        help="resumable checkpoints (outside DVC's outs, e.g. checkpoints/detect); none if omitted")


def _launch(args: argparse.Namespace, nproc: int) -> int:
    """Re-run this stage under ``torch.distributed.run`` with ``nproc`` processes on this node."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "components.cli", "detect", "--params", args.params, "--shards", args.shards,
           "--backbone", args.backbone, "--out", args.out, "--metrics", args.metrics, "--plots", args.plots]
    if args.checkpoints:
        cmd += ["--checkpoints", args.checkpoints]
    print("detect: launching", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def main(args: argparse.Namespace) -> int:
    from components import dist, tracking
    from components.config import load_section
    from components.io import write_json_atomic

    cfg = load_section("detect", args.params)
    tcfg = load_section("tracking", args.params)
    if cfg.nproc_per_node > 1 and dist.get_world_size() == 1 and "LOCAL_RANK" not in os.environ:
        tracking.ensure_experiment(tcfg)  # before the ranks start: they would race the SQLite migration
        return _launch(args, cfg.nproc_per_node)
    dist.init_distributed()
    try:
        with tracking.stage_run("detect", cfg, tcfg) as tracker:
            metrics = run_detect(cfg, args.shards, args.backbone, args.out, args.plots,
                                 checkpoints=args.checkpoints, tracker=tracker)
        if dist.is_main_process():
            write_json_atomic(args.metrics, metrics)
            print(f"detect: bbox AP {metrics['bbox_AP']:.4f}, segm AP {metrics['segm_AP']:.4f} -> {args.metrics}")
    finally:
        dist.destroy()
    return 0
