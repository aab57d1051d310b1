"""Inverse augmentation: a view's map, cropped from a known image-level map by known boxes and flips, is brought back
onto the overlap region of the two crops (paper Sec. 3.2, the official ``invaug``)."""
from __future__ import annotations

import itertools

import pytest
import torch

from components.pretrain.methods.slotcon.align import align_scores
from components.pretrain.crops import flip_coords, overlap_coords, sample_two_crops


def _ramp(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """A known image-level map: 3 channels, linear in the image's (x, y) so bilinear resampling is exact."""
    return torch.stack([xs, ys, 0.5 * xs - 0.25 * ys + 3.0])


def _view_map(box: torch.Tensor, h: int, w: int, flip: bool) -> torch.Tensor:
    """The (3, h, w) map a network would see on the crop ``box`` (pixel centres), flipped with the view."""
    x0, y0, x1, y1 = box.tolist()
    xs = x0 + (torch.arange(w, dtype=torch.float64) + 0.5) * (x1 - x0) / w
    ys = y0 + (torch.arange(h, dtype=torch.float64) + 0.5) * (y1 - y0) / h
    m = _ramp(xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w))
    return m.flip(-1) if flip else m


def _overlap_grid(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The image-level map sampled on an h x w grid of the overlap box (un-flipped orientation)."""
    inter = torch.cat([torch.maximum(boxes[0, :2], boxes[1, :2]), torch.minimum(boxes[0, 2:], boxes[1, 2:])])
    return _view_map(inter, h, w, False)


@pytest.mark.parametrize("flips", list(itertools.product([False, True], repeat=2)))
def test_known_boxes_map_back_onto_overlap(flips):
    boxes = torch.tensor([[20.0, 10.0, 220.0, 170.0], [100.0, 50.0, 280.0, 190.0]], dtype=torch.float64)
    h, w = 12, 16
    coords = overlap_coords(boxes)
    expected = _overlap_grid(boxes, h, w)
    aligned = []
    for v in range(2):
        c = flip_coords(coords[v]) if flips[v] else coords[v]
        out = align_scores(_view_map(boxes[v], h, w, flips[v]).unsqueeze(0), c.unsqueeze(0), torch.tensor([flips[v]]))
        assert out.shape == (1, 3, h, w)
        aligned.append(out[0])
        # interior pixels: every bilinear sample lies inside the view map, so the ramp is reproduced exactly;
        # the outer ring may clamp at the view's border by < half a map pixel
        torch.testing.assert_close(out[0, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-6, rtol=1e-9)
        map_pixel = max((boxes[v, 2] - boxes[v, 0]) / w, (boxes[v, 3] - boxes[v, 1]) / h).item()
        assert (out[0] - expected).abs().max() <= 0.5 * map_pixel + 1e-6
    # both views now look at the same place pixel for pixel
    torch.testing.assert_close(aligned[0][:, 1:-1, 1:-1], aligned[1][:, 1:-1, 1:-1], atol=1e-6, rtol=1e-9)


def test_sampled_crops_map_back_batched():
    """Boxes and flips from the sampler, a batch of several images, float32 like training."""
    g = torch.Generator().manual_seed(5)
    h, w = 14, 14
    maps1, maps2, c1, c2, f1, f2, expected = [], [], [], [], [], [], []
    while len(expected) < 6:
        p = sample_two_crops(240, 320, g)
        boxes = p["boxes"].double()
        inter = torch.cat([torch.maximum(boxes[0, :2], boxes[1, :2]), torch.minimum(boxes[0, 2:], boxes[1, 2:])])
        # keep pairs whose overlap spans >= half a map pixel per output pixel, so the interior check below is exact
        if p["fallback"] or ((inter[2:] - inter[:2]) < 0.5 * (boxes[:, 2:] - boxes[:, :2])).any():
            continue
        maps1.append(_view_map(boxes[0], h, w, bool(p["flips"][0])))
        maps2.append(_view_map(boxes[1], h, w, bool(p["flips"][1])))
        c1.append(p["coords"][0]), c2.append(p["coords"][1]), f1.append(p["flips"][0]), f2.append(p["flips"][1])
        expected.append(_overlap_grid(boxes, h, w))
    expected = torch.stack(expected).float()
    a1 = align_scores(torch.stack(maps1).float(), torch.stack(c1), torch.stack(f1))
    a2 = align_scores(torch.stack(maps2).float(), torch.stack(c2), torch.stack(f2))
    for a in (a1, a2):
        torch.testing.assert_close(a[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=2e-3, rtol=1e-5)


def test_identity_box_and_flip():
    x = torch.randn(3, 5, 7, 6)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(3, 1)
    torch.testing.assert_close(align_scores(x, full, torch.zeros(3, dtype=torch.bool)), x)
    flips = torch.tensor([True, False, True])
    out = align_scores(x, full, flips)
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])


def test_gradient_flows():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    coords = torch.tensor([[0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 0.5, 0.5]])
    align_scores(x, coords, torch.tensor([True, False])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
