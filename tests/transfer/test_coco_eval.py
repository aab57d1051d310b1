"""COCO evaluation: GT fed back scores 1.0, jittered boxes score lower, empty predictions score 0 without crashing."""
import numpy as np
import pytest
import torch

from components.transfer.detect.coco_eval import STAT_NAMES, evaluate, make_coco, predictions_to_results
from components.transfer.detect.targets import category_maps, segmentation_to_mask

CATS = [{"id": 2, "name": "disc"}, {"id": 5, "name": "square"}, {"id": 9, "name": "tri"}]


def _gt(num_images=4, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        h, w = 64, 80
        images.append({"id": 100 + i, "height": h, "width": w, "file_name": f"{i}.jpg"})
        for _ in range(3):
            bw, bh = rng.integers(8, 30, size=2)
            x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
            poly = [float(v) for v in (x, y, x + bw, y, x + bw, y + bh, x, y + bh)]
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.choice([2, 5, 9])),
                         "bbox": [float(x), float(y), float(bw), float(bh)], "segmentation": [poly],
                         "area": float(bw * bh), "iscrowd": 0})
    # a crowd region: matching it or not must not change AP
    anns.append({"id": len(anns) + 1, "image_id": 100, "category_id": 2, "bbox": [0.0, 0.0, 10.0, 10.0],
                 "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "area": 100.0, "iscrowd": 1})
    return images, anns


def _gt_as_predictions(images, anns, jitter=0.0, seed=1):
    """Torchvision-style outputs made from the ground truth (optionally with jittered boxes and masks)."""
    rng = np.random.default_rng(seed)
    c2l, l2c = category_maps(CATS)
    results = []
    for im in images:
        mine = [a for a in anns if a["image_id"] == im["id"] and not a["iscrowd"]]
        boxes, masks = [], []
        for a in mine:
            x, y, w, h = a["bbox"]
            dx, dy = (rng.uniform(-jitter, jitter, size=2) * np.array([w, h])) if jitter else (0.0, 0.0)
            boxes.append([x + dx, y + dy, x + w + dx, y + h + dy])
            m = segmentation_to_mask(a["segmentation"], im["height"], im["width"]).astype(np.float32)
            if jitter:
                m = np.roll(m, (int(round(dy)), int(round(dx))), axis=(0, 1))
            masks.append(m[None])
        out = {"boxes": torch.tensor(boxes), "scores": torch.ones(len(mine)),
               "labels": torch.tensor([c2l[a["category_id"]] for a in mine]),
               "masks": torch.tensor(np.stack(masks))}
        results += predictions_to_results(im["id"], out, l2c)
    return results


def test_ground_truth_as_predictions_scores_one():
    images, anns = _gt()
    coco = make_coco(images, anns, CATS)
    m = evaluate(coco, _gt_as_predictions(images, anns))
    assert set(m) == {f"{t}_{s}" for t in ("bbox", "segm") for s in STAT_NAMES}
    for t in ("bbox", "segm"):
        assert m[f"{t}_AP"] == pytest.approx(1.0) and m[f"{t}_AP50"] == pytest.approx(1.0)
        assert m[f"{t}_AP75"] == pytest.approx(1.0) and m[f"{t}_AR100"] == pytest.approx(1.0)


def test_jittered_boxes_score_lower():
    images, anns = _gt()
    coco = make_coco(images, anns, CATS)
    m = evaluate(coco, _gt_as_predictions(images, anns, jitter=0.25))
    assert 0.0 < m["bbox_AP"] < 0.9 and 0.0 < m["segm_AP"] < 0.9
    assert m["bbox_AP50"] >= m["bbox_AP75"]


def test_empty_predictions_score_zero():
    images, anns = _gt()
    coco = make_coco(images, anns, CATS)
    summary = []
    m = evaluate(coco, [], summary=summary)
    assert m["bbox_AP"] == 0.0 and m["segm_AP"] == 0.0 and m["bbox_AR100"] == 0.0
    assert "Average Precision" in summary[0]
    empty = predictions_to_results(1, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                       "labels": torch.zeros(0, dtype=torch.int64),
                                       "masks": torch.zeros(0, 1, 8, 8)}, {1: 2})
    assert empty == []


def test_results_are_json_and_category_ids_map_back():
    import json

    out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([3]), "masks": torch.zeros(1, 1, 10, 12)}
    out["masks"][0, 0, 2:7, 1:11] = 0.9
    r = predictions_to_results(4, out, {1: 2, 2: 5, 3: 9})
    json.dumps(r)
    assert r[0]["category_id"] == 9 and r[0]["bbox"] == [1.0, 2.0, 10.0, 5.0]
    from pycocotools import mask as mask_utils

    rle = dict(r[0]["segmentation"], counts=r[0]["segmentation"]["counts"].encode())
    assert mask_utils.area(rle) == 50


def test_make_coco_fills_area_and_ids():
    images = [{"id": 1, "height": 20, "width": 20}]
    anns = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 5], "segmentation": [[0, 0, 4, 0, 4, 5, 0, 5]]}]
    coco = make_coco(images, anns, CATS)
    a = coco.loadAnns(coco.getAnnIds())[0]
    assert a["id"] == 1 and a["iscrowd"] == 0 and a["area"] == 20
