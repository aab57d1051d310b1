"""The CPU crop + resize is the authors' filter: each crop resized with antialiased bicubic (SlotCon, SIM) or bilinear
(MoCo) from the uint8 image, equal to PIL's ``Image.resize`` (what the released ``RandomResizedCrop`` runs on PIL
images) up to fixed-point rounding, and close to ``torchvision.transforms.functional.resized_crop`` on tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from components.pretrain import augment as A
from components.pretrain.resize import resize_crops

PIL_FILTER = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
TV_FILTER = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}


def _pil(image: torch.Tensor, box, size: int, interpolation: str) -> np.ndarray:
    """The authors' way: PIL crop, then PIL resize; (S, S, 3) int."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop(box).resize((size, size), PIL_FILTER[interpolation])
    return np.asarray(pil).astype(np.int64)


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(h // 12, 2), max(w // 12, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return ((img + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


BOXES = [(0, 0, 150, 110), (13, 7, 61, 55), (40, 30, 200, 150), (100, 80, 124, 104)]  # down, down, down, up


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crops_equal_torchvision_and_match_pil(interpolation):
    images = [_image(150, 200, 1), _image(160, 220, 2)]
    boxes = torch.tensor([[BOXES[0], BOXES[1]], [BOXES[2], BOXES[3]]], dtype=torch.float32)  # (B=2, V=2, 4)
    got = resize_crops(images, boxes, 48, interpolation)
    assert got.dtype == torch.uint8 and got.shape == (4, 3, 48, 48)
    for v in range(2):
        for i in range(2):
            x0, y0, x1, y1 = boxes[i, v].int().tolist()
            row = got[v * 2 + i]  # view-major
            ref = TF.resized_crop(images[i], y0, x0, y1 - y0, x1 - x0, [48, 48], interpolation=TV_FILTER[interpolation],
                                  antialias=True)
            assert (row.int() - ref.int()).abs().max() <= 2, (i, v)  # torchvision's tensor path rounds in float
            diff = np.abs(_pil(images[i], (x0, y0, x1, y1), 48, interpolation) - row.permute(1, 2, 0).numpy().astype(np.int64))
            assert diff.max() <= 1 and diff.mean() < 0.02, (i, v, diff.mean(), diff.max())


def test_roi_align_resize_differs_from_the_filter_but_stays_close():
    """The one-kernel GPU resize approximates the same filter (so CPU and GPU runs see nearly the same pixels)."""
    images = [_image(150, 200, 3)]
    boxes = torch.tensor([[BOXES[0], BOXES[2]]], dtype=torch.float32)
    aug_filter, aug_roi = A.TwoViewAugment(48, resize="filter"), A.TwoViewAugment(48, resize="roi_align")
    cpu = torch.device("cpu")
    a, b = aug_filter.crops(images, boxes, cpu), aug_roi.crops(images, boxes, cpu)
    assert a.shape == b.shape == (2, 3, 48, 48) and a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b) and (a - b).abs().mean() < 4.0  # on a 0..255 scale
    assert A.TwoViewAugment(48).crops(images, boxes, cpu).equal(a)  # "auto" on the CPU is the filter


def test_boxes_are_clipped_to_the_image_and_bad_names_refused():
    im = _image(40, 50, 4)
    out = resize_crops([im], torch.tensor([[[-3.0, -2.0, 60.0, 45.0]]]), 16)
    assert np.abs(_pil(im, (0, 0, 50, 40), 16, "bicubic") - out[0].permute(1, 2, 0).numpy().astype(np.int64)).max() <= 1
    with pytest.raises(ValueError, match="interpolation"):
        resize_crops([im], torch.zeros(1, 1, 4), 16, "nearest")
    with pytest.raises(ValueError, match="resize"):
        A.TwoViewAugment(16, resize="pil")
