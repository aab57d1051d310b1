"""COCO annotations -> torchvision targets: masks/boxes equal pycocotools', zero-area and crowd handling, flips."""
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools import mask as mask_utils

from components.transfer.detect.targets import (
    category_maps,
    coco_to_target,
    has_valid_annotation,
    hflip,
    segmentation_to_mask,
)

H, W = 40, 56


def _coco_dict():
    square = np.zeros((H, W), dtype=np.uint8)
    square[5:20, 30:50] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    # uncompressed RLE (column-major run lengths), as COCO's crowd regions are stored
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[25:38, 2:20] = 1
    flat = crowd.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [2.0, 3.0, 20.0, 15.0], "area": 200.0,
         "segmentation": [[2, 3, 22, 3, 22, 18, 2, 18], [4.5, 20, 10, 20, 7, 24]]},  # two polygon parts
        {"id": 2, "image_id": 7, "category_id": 11, "iscrowd": 0, "bbox": [30.0, 5.0, 20.0, 15.0], "area": 300.0,
         "segmentation": compressed},
        {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "bbox": [2.0, 25.0, 18.0, 13.0], "area": 234.0,
         "segmentation": {"size": [H, W], "counts": runs}},
        {"id": 4, "image_id": 7, "category_id": 11, "iscrowd": 0, "bbox": [10.0, 10.0, 0.0, 5.0], "area": 0.0,
         "segmentation": [[10, 10, 10, 15, 10, 12]]},  # zero width
        {"id": 5, "image_id": 7, "category_id": 11, "iscrowd": 0, "bbox": [50.0, 30.0, 20.0, 20.0], "area": 60.0,
         "segmentation": [[50, 30, 56, 30, 56, 40, 50, 40]]},  # sticks out of the image: clamped
    ]
    cats = [{"id": 3, "name": "a"}, {"id": 11, "name": "b"}]
    return {"images": [{"id": 7, "height": H, "width": W, "file_name": "x.jpg"}], "annotations": anns,
            "categories": cats}


def _coco(d):
    c = COCO()
    c.dataset = d
    c.createIndex()
    return c


def test_masks_equal_pycocotools_for_polygons_rle_and_crowd():
    d = _coco_dict()
    coco = _coco(d)
    for ann in d["annotations"]:
        np.testing.assert_array_equal(segmentation_to_mask(ann["segmentation"], H, W), coco.annToMask(ann))
    assert segmentation_to_mask(d["annotations"][2]["segmentation"], H, W).sum() == 13 * 18


def test_target_boxes_labels_masks_and_counts():
    d = _coco_dict()
    coco = _coco(d)
    c2l, l2c = category_maps(d["categories"])
    assert c2l == {3: 1, 11: 2} and l2c == {1: 3, 2: 11}
    t, counts = coco_to_target(d["annotations"], height=H, width=W, cat_to_label=c2l, image_id=7)
    assert counts["annotations"] == 5 and counts["kept"] == 3
    assert counts["crowd"] == 1 and counts["zero_area"] == 1
    assert t["boxes"].shape == (3, 4) and t["masks"].shape == (3, H, W) and t["masks"].dtype == torch.uint8
    torch.testing.assert_close(t["boxes"][0], torch.tensor([2.0, 3.0, 22.0, 18.0]))
    torch.testing.assert_close(t["boxes"][2], torch.tensor([50.0, 30.0, 56.0, 40.0]))  # clamped to the image
    assert t["labels"].tolist() == [1, 2, 2]
    kept = [d["annotations"][i] for i in (0, 1, 4)]
    for m, ann in zip(t["masks"], kept):
        np.testing.assert_array_equal(m.numpy(), coco.annToMask(ann))
    assert int(t["image_id"]) == 7 and t["iscrowd"].sum() == 0


def test_unknown_category_and_empty_image():
    c2l, _ = category_maps([{"id": 1}])
    t, counts = coco_to_target([{"bbox": [0, 0, 5, 5], "category_id": 9, "segmentation": []}], height=8, width=8,
                               cat_to_label=c2l)
    assert counts["unknown_category"] == 1 and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 8, 8)
    assert not has_valid_annotation([])
    assert not has_valid_annotation([{"bbox": [0, 0, 1, 9]}])
    assert has_valid_annotation([{"bbox": [0, 0, 1, 9]}, {"bbox": [0, 0, 2, 2]}])


def test_missing_segmentation_fills_the_box():
    t, counts = coco_to_target([{"bbox": [1, 2, 3, 4], "category_id": 1}], height=8, width=8, cat_to_label={1: 1})
    assert counts["no_segmentation"] == 1 and int(t["masks"][0].sum()) == 12


def test_hflip_mirrors_boxes_and_masks():
    d = _coco_dict()
    c2l, _ = category_maps(d["categories"])
    t, _ = coco_to_target(d["annotations"], height=H, width=W, cat_to_label=c2l)
    img = torch.arange(3 * H * W, dtype=torch.float32).reshape(3, H, W)
    img2, t2 = hflip(img, t)
    torch.testing.assert_close(img2[..., 0], img[..., -1])
    torch.testing.assert_close(t2["boxes"][0], torch.tensor([W - 22.0, 3.0, W - 2.0, 18.0]))
    # the flipped mask's tight box equals the flipped box (polygon 0 spans x 2..22)
    ys, xs = torch.nonzero(t2["masks"][1], as_tuple=True)
    assert xs.min() >= t2["boxes"][1, 0] - 1 and xs.max() <= t2["boxes"][1, 2]
    back, t3 = hflip(img2, t2)
    torch.testing.assert_close(t3["boxes"], t["boxes"])
    assert torch.equal(t3["masks"], t["masks"])
