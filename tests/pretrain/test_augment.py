"""Batched two-view augmentation: shapes, seeds, per-sample randomness, and each op against torchvision's own."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from components.pretrain import augment as A
from components.pretrain.crops import collate_crop_params, sample_two_crops

OFF = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))


def _smooth_image(h, w, seed):
    """A uint8 image with structure at several scales (so crops and blurs are visible, none is flat)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img + 0.15 * torch.rand(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [_smooth_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    params = collate_crop_params([sample_two_crops(im.shape[1], im.shape[2], g) for im in images])
    return images, params


def _unnormalise(x):
    return x * torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)


SIZES = [(96, 128), (128, 100), (120, 120), (80, 64)]


def test_output_shapes_dtypes_ranges():
    images, params = _batch(SIZES)
    out = A.TwoViewAugment(48)(images, params, torch.Generator().manual_seed(0))
    assert set(out) == {"view1", "view2", "coords1", "coords2", "flip1", "flip2"}
    for v in ("view1", "view2"):
        assert out[v].shape == (4, 3, 48, 48) and out[v].dtype == torch.float32
        x = _unnormalise(out[v])
        assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    assert out["coords1"].shape == (4, 4) and out["flip1"].dtype == torch.bool
    torch.testing.assert_close(out["coords2"], params["coords"][:, 1])
    assert torch.equal(out["flip1"], params["flips"][:, 0])


def test_determinism_by_seed():
    images, params = _batch(SIZES)
    aug = A.TwoViewAugment(32)
    a = aug(images, params, torch.Generator().manual_seed(3))
    b = aug(images, params, torch.Generator().manual_seed(3))
    c = aug(images, params, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["view1"], c["view1"])


def test_per_sample_randomness():
    """Same image and same crop eight times: every sample gets its own colour/blur parameters."""
    img = _smooth_image(64, 64, 0)
    p = sample_two_crops(64, 64, torch.Generator().manual_seed(0))
    params = collate_crop_params([p] * 8)
    out = A.TwoViewAugment(32)([img] * 8, params, torch.Generator().manual_seed(0))
    v1 = out["view1"].flatten(1)
    dists = torch.cdist(v1, v1)
    assert (dists + torch.eye(8) * 1e9).min() > 1e-3
    # while with every random op off the eight views are identical
    out = A.TwoViewAugment(32, **OFF)([img] * 8, params, torch.Generator().manual_seed(0))
    assert (out["view1"] - out["view1"][:1]).abs().max() < 1e-6


def test_draw_probabilities():
    r = A.TwoViewAugment(224).draw(4000, torch.Generator().manual_seed(0))
    assert abs(r["jitter"].float().mean() - 0.8) < 0.03
    assert abs(r["gray"].float().mean() - 0.2) < 0.03
    assert r["blur"][0].all() and abs(r["blur"][1].float().mean() - 0.1) < 0.02
    assert not r["solarize"][0].any() and abs(r["solarize"][1].float().mean() - 0.2) < 0.03
    f = r["factors"]
    assert f[..., 0].min() >= 0.6 and f[..., 0].max() <= 1.4 and f[..., 2].min() >= 0.8 and f[..., 3].abs().max() <= 0.1
    assert r["sigma"].min() >= 0.1 and r["sigma"].max() <= 2.0
    assert torch.equal(r["order"].sort(dim=-1).values, torch.arange(4).expand_as(r["order"]))
    assert len({tuple(o) for o in r["order"].reshape(-1, 4).tolist()}) == 24  # every order occurs
    assert A.blur_kernel_size(224) == 23 and A.blur_kernel_size(64) == 13 and A.blur_kernel_size(32) % 2 == 1


@pytest.mark.parametrize(
    "box,size",
    [((10, 20, 40, 44), 48), ((0, 0, 30, 24), 40), ((76, 72, 100, 96), 48),  # up-sampling
     ((16, 8, 80, 72), 32), ((36, 32, 100, 96), 32), ((0, 0, 64, 64), 32)],  # halving
)
def test_crop_matches_torchvision_resized_crop(box, size):
    """RoIAlign crops == torchvision's bilinear resized_crop when up-sampling or halving (the filter's exact cases),
    from a variable-size (padded) batch, including crops touching the image border (edge clamping)."""
    images = [_smooth_image(96, 100, 1), _smooth_image(72, 120, 2)]  # image 0 is the one cropped
    x0, y0, x1, y1 = box
    boxes = torch.tensor([[box], [(0, 0, 16, 16)]], dtype=torch.float32)
    got = A.crop_resize(images, boxes, size)[0]
    ref = TF.resized_crop(images[0].float(), y0, x0, y1 - y0, x1 - x0, [size, size],
                          interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    if (x1 - x0) == 2 * size:  # halving: every sample lies inside the crop, exact everywhere
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-5)
        return
    # up-sampling: the outer ring of a crop inside the image reads the true neighbouring pixels (RoIAlign) where
    # torchvision clamps to the crop's edge; where the crop edge is the image border both clamp alike
    rows = slice(0 if y0 == 0 else 1, size if y1 == 96 else size - 1)
    cols = slice(0 if x0 == 0 else 1, size if x1 == 100 else size - 1)
    torch.testing.assert_close(got[:, rows, cols], ref[:, rows, cols], atol=1e-3, rtol=1e-5)
    assert (got - ref).abs().max() < 40  # the ring differs by at most a sub-pixel shift of a smooth image


def test_crop_downsample_is_antialiased():
    """Down-sampling by a non-integer factor averages samples: close to torchvision's antialiased bilinear."""
    im = _smooth_image(200, 200, 3)
    got = A.crop_resize([im], torch.tensor([[[5.0, 7.0, 185.0, 187.0]]]), 40)[0]
    ref = TF.resized_crop(im.float(), 7, 5, 180, 180, [40, 40], antialias=True)
    assert (got - ref).abs().mean() < 2.0  # on a 0..255 scale


def test_flip_actually_flips():
    images, params = _batch([(64, 80)] * 3)
    params["flips"] = torch.tensor([[False, False], [True, False], [False, True]])
    out = A.TwoViewAugment(32, **OFF)(images, params, torch.Generator().manual_seed(0))
    plain = A.resize_crops(images, params["boxes"], 32).float() / 255.0  # the CPU resize
    plain = (plain - torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out["view1"][0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["view1"][1], plain[1].flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["view2"][2], plain[3 + 2].flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["view2"][1], plain[3 + 1], atol=1e-5, rtol=1e-5)


def test_grayscale_and_solarize_do_what_they_say():
    images, params = _batch([(64, 64)] * 3)
    plain = A.resize_crops(images, params["boxes"], 32).float() / 255.0  # the CPU resize
    flips = params["flips"].transpose(0, 1).reshape(-1).view(-1, 1, 1, 1)
    plain = torch.where(flips, plain.flip(-1), plain)
    gray = _unnormalise(A.TwoViewAugment(32, **{**OFF, "grayscale_prob": 1.0})(
        images, params, torch.Generator().manual_seed(0))["view1"])
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(plain[:3], 3), atol=1e-5, rtol=0)
    sol = A.TwoViewAugment(32, **{**OFF, "solarize_prob": (0.0, 1.0)})(images, params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_unnormalise(sol["view2"]), TF.solarize(plain[3:], 128 / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(_unnormalise(sol["view1"]), plain[:3], atol=1e-5, rtol=0)  # view 1 never solarized


def test_blur_matches_torchvision_per_sample():
    x = torch.stack([_smooth_image(40, 40, s).float() / 255 for s in range(3)])
    sigma = torch.tensor([0.1, 0.9, 2.0])
    got = A.gaussian_blur(x, sigma, 13)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [13, 13], [sigma[i].item()] * 2)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
    blurred = A.TwoViewAugment(32, **{**OFF, "blur_prob": (1.0, 0.0)})
    images, params = _batch([(64, 64)] * 2)
    out = blurred(images, params, torch.Generator().manual_seed(0))
    plain = A.TwoViewAugment(32, **OFF)(images, params, torch.Generator().manual_seed(0))
    assert (out["view1"] - plain["view1"]).abs().max() > 1e-3  # view 1 is always blurred
    torch.testing.assert_close(out["view2"], plain["view2"])  # view 2 not (p = 0 here)


def test_colour_ops_match_torchvision():
    x = torch.stack([_smooth_image(24, 20, s).float() / 255 for s in range(4)])
    f = torch.tensor([0.6, 1.0, 1.3, 1.4])
    h = torch.tensor([-0.1, 0.0, 0.05, 0.5])
    for i in range(4):
        torch.testing.assert_close(A.adjust_brightness(x, f)[i], TF.adjust_brightness(x[i], f[i].item()))
        torch.testing.assert_close(A.adjust_contrast(x, f)[i], TF.adjust_contrast(x[i], f[i].item()))
        torch.testing.assert_close(A.adjust_saturation(x, f)[i], TF.adjust_saturation(x[i], f[i].item()))
        torch.testing.assert_close(A.adjust_hue(x, h)[i], TF.adjust_hue(x[i], h[i].item()), atol=1e-5, rtol=1e-5)


def test_color_jitter_order_per_sample_matches_torchvision():
    x = torch.stack([_smooth_image(16, 16, s).float() / 255 for s in range(5)])
    g = torch.Generator().manual_seed(0)
    factors = torch.stack([0.6 + 0.8 * torch.rand(5, generator=g), 0.6 + 0.8 * torch.rand(5, generator=g),
                           0.8 + 0.4 * torch.rand(5, generator=g), -0.1 + 0.2 * torch.rand(5, generator=g)], 1)
    order = torch.rand(5, 4, generator=g).argsort(1)
    apply = torch.tensor([True, True, False, True, True])
    got = A.color_jitter(x, factors, order, apply)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(5):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = fns[op](ref, factors[i, op].item())
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_batched_tensor_input_and_model_ready():
    images = torch.stack([_smooth_image(64, 64, s) for s in range(2)])
    g = torch.Generator().manual_seed(0)
    params = collate_crop_params([sample_two_crops(64, 64, g) for _ in range(2)])
    out = A.TwoViewAugment(32)(images, params, g)
    assert out["view1"].shape == (2, 3, 32, 32) and torch.isfinite(out["view2"]).all()


def test_uneven_sizes_take_the_per_image_path_with_the_same_result():
    """One huge image among small ones is cropped image by image (no giant padded batch), with identical crops."""
    images = [_smooth_image(40, 48, 1), _smooth_image(300, 320, 2), _smooth_image(36, 40, 3)]
    g = torch.Generator().manual_seed(0)
    boxes = collate_crop_params([sample_two_crops(im.shape[1], im.shape[2], g) for im in images])["boxes"]
    got = A.crop_resize(images, boxes, 24)
    for i, im in enumerate(images):
        alone = A.crop_resize([im], boxes[i:i + 1], 24)  # a single image: the stacked path
        torch.testing.assert_close(got[i], alone[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got[3 + i], alone[1], atol=1e-4, rtol=1e-5)
