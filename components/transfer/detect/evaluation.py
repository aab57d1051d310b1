"""Evaluation of a fine-tuned detector: COCOeval (bbox, segm) on the val split read in a fixed order, each image's
ground truth checked before pycocotools sees it, and the val samples lost on the way counted against ``index.json``
(:func:`counted_val`: the stage stops before evaluating on a part above ``detect.max_lost_fraction``).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from components.data.loading.ledger import SplitLoss
from components.data.loading.loader import iterate_samples
from components.engine.loop import autocast
from components.errors import UserError
from components.transfer.detect.coco_eval import evaluate, make_coco, predictions_to_results
from components.transfer.detect.targets import usable_annotations


def to_float(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float in [0, 1] on ``device``."""
    return image.to(device, non_blocking=True).float().div_(255.0)


def counted_val(data: dict, max_lost_fraction: float) -> Iterator[dict]:
    """The val samples in a fixed order; after the last one, what the pass lost is counted (``data["val_loss"]``)
    and above ``max_lost_fraction`` the stage stops (one line naming the shard) before COCOeval runs on a part."""
    loss: SplitLoss = data["val_loss"]
    it = iterate_samples(data["val_urls"], decode="rgb", expected_counts=loss.expected)
    yield from it
    loss.add(it.errors)
    loss.check(max_lost_fraction, "detect")


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
    model.eval()
    old_size = model.transform.min_size
    model.transform.min_size = (test_size,)
    images, anns, results, vis = [], [], [], []
    invalid = 0
    try:
        for batch in _chunks(samples, batch_size):
            for s in batch:
                meta = s["meta"] or {}
                rec = dict(meta.get("image") or {})
                rec.setdefault("id", len(images) + 1)
                rec["height"], rec["width"] = int(s["image"].shape[-2]), int(s["image"].shape[-1])
                images.append(rec)
                kept, bad = usable_annotations(meta.get("annotations") or [], rec["height"], rec["width"])
                invalid += bad
                anns += [dict(a, image_id=rec["id"]) for a in kept]
            with autocast(device, amp):
                outputs = model([to_float(s["image"], device) for s in batch])
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
    metrics["val_annotations_invalid"] = invalid
    return metrics, vis, "".join(summary)


def _chunks(it: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in it:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
