import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from components.config import SegmentConfig
from components.errors import UserError
from components.transfer.segment.models import FCN, build_trunk, load_trunk_
from components.transfer.segment.evaluation import predict
from components.transfer.segment.stage import run_segment
from components.transfer.segment.train import SegAugment, poly_lr


def _conv_geometry(net):
    return {n: (m.stride, m.dilation, m.padding) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("os_", [8, 16])
def test_dilated_trunk_matches_torchvision_and_keeps_output_stride(os_):
    ours = build_trunk("resnet50", os_)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, os_ == 8, True])
    assert _conv_geometry(ours) == _conv_geometry(ref)
    # BasicBlock trunks (which torchvision refuses to dilate) get the same output stride
    model = FCN(arch="resnet18", num_classes=3, output_stride=os_, head_channels=8).eval()
    logits, _ = model.forward_logits(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 3, 64 // os_, 64 // os_)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 3, 64, 48)


def test_trunk_load_is_strict(tmp_path):
    sd = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    model = FCN(arch="resnet18", num_classes=3, head_channels=8)
    load_trunk_(model, sd, "backbone.pt")
    assert torch.equal(model.backbone.conv1.weight, sd["conv1.weight"])
    del sd["layer4.1.bn2.weight"]
    with pytest.raises(UserError, match=r"backbone.pt: .*layer4.1.bn2.weight"):
        load_trunk_(model, sd, "backbone.pt")


def test_poly_lr_is_a_pure_function_of_the_step():
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert poly_lr(50, 100, 0.01, power=0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(100, 100, 0.01, min_lr=1e-4) == pytest.approx(1e-4)
    assert poly_lr(30, 100, 0.01) == poly_lr(30, 100, 0.01)


def test_augment_crops_pads_and_keeps_labels_aligned():
    img = torch.zeros(3, 40, 50, dtype=torch.uint8)
    img[0, :, 25:] = 255  # red right half
    lbl = torch.zeros(40, 50, dtype=torch.uint8)
    lbl[:, 25:] = 1
    aug = SegAugment(64, (0.5, 1.0), seed=0, epoch=0)
    draws = []
    for _ in range(5):
        out = aug({"key": "k", "image": img, "label": lbl})
        draws.append(out["image"])
        assert out["image"].shape == (3, 64, 64) and out["label"].shape == (64, 64)
        assert (out["label"] == 255).any()  # padded (the rescaled image is smaller than the crop)
        red = out["image"][0] > 1.0  # normalised red channel of the red half
        assert torch.equal(red[out["label"] != 255], (out["label"] == 1)[out["label"] != 255])
    # the draws are a function of (seed, epoch, key, visit): a new augmenter repeats them, another epoch does not
    again = SegAugment(64, (0.5, 1.0), seed=0, epoch=0)
    assert all(torch.equal(again({"key": "k", "image": img, "label": lbl})["image"], d) for d in draws)
    other = SegAugment(64, (0.5, 1.0), seed=0, epoch=1)
    assert not all(torch.equal(other({"key": "k", "image": img, "label": lbl})["image"], d) for d in draws)


def _toy_batch(n=4, size=64, seed=0):
    """Images whose label is given by colour: left / right halves of random colours, one class each."""
    g = torch.Generator().manual_seed(seed)
    imgs, lbls = [], []
    for i in range(n):
        lbl = torch.zeros(size, size, dtype=torch.long)
        cut = int(torch.randint(16, 48, (1,), generator=g))
        lbl[:, cut:] = 1 + i % 2
        palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
        img = palette[lbl].permute(2, 0, 1) + 0.05 * torch.randn(3, size, size, generator=g)
        imgs.append(img)
        lbls.append(lbl)
    return torch.stack(imgs), torch.stack(lbls)


class _ToySource:
    """A train split in memory: ``epoch_batches`` yields the same toy batch ``n`` times (the SegmentMethod contract)."""

    num_classes, class_names = 3, ["a", "b", "c"]

    def __init__(self, batch, n=8):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def epoch_batches(self, epoch, **kw):
        return iter([self.batch] * self.n)


def test_a_few_cpu_iterations_lower_the_loss():
    from components.engine.loop import RunSpec, fit
    from components.transfer.segment.train import SegmentMethod

    cfg = SegmentConfig(iters=8, batch_size=4, lr=0.05, aux_weight=0.4, head_channels=16, output_stride=16)
    method = SegmentMethod(cfg, source=_ToySource(_toy_batch(size=48)), num_classes=3, arch="resnet18",
                           trunk_state=None, trunk_source="random")
    seen = {}
    fit(method, RunSpec(total_steps=8, log_every=1, progress=False), ckpt_dir=None, fingerprint={},
        on_step=lambda s, st: seen.setdefault(s, st["loss"]))
    losses = [seen[s] for s in sorted(seen)]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses


def test_sliding_window_covers_the_image():
    torch.manual_seed(0)
    model = FCN(arch="resnet18", num_classes=2, head_channels=8).eval()
    x = torch.randn(1, 3, 50, 70)
    out = predict(model, x, mode="slide", crop=32)
    assert out.shape == (1, 2, 50, 70) and torch.isfinite(out).all()
    torch.testing.assert_close(predict(model, x, mode="slide", crop=128), predict(model, x, mode="whole"))


def test_run_segment_end_to_end_on_a_folder_with_random_comparison(tmp_path, scenes_folder):
    root = scenes_folder(tmp_path / "scenes")
    sd = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    torch.save({"arch": "resnet18", "state_dict": sd}, tmp_path / "backbone.pt")
    cfg = SegmentConfig(data_root=str(root), iters=3, batch_size=2, crop_size=32, head_channels=8)
    m = run_segment(cfg, None, tmp_path / "backbone.pt", tmp_path / "out", device="cpu")
    for key in ("mIoU", "pixel_acc", "mAcc", "random/mIoU", "random/pixel_acc", "gain/mIoU"):
        assert 0.0 <= m[key] <= 1.0 or key == "gain/mIoU"
    assert set(m["per_class_IoU"]) == {"red", "blue"} and m["num_val_images"] == 3 and m["dataset"] == "scenes"
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    assert saved["class_names"] == ["red", "blue"] and saved["num_classes"] == 2
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN in the metrics file
    # a missing backbone is a one-line error naming the file, before any training
    with pytest.raises(UserError, match="nope.pt"):
        run_segment(cfg, None, tmp_path / "nope.pt", tmp_path / "out", device="cpu")


@pytest.mark.slow
def test_stop_and_resume_equals_a_straight_run(tmp_path, scenes_folder):
    """6 iterations straight == 2 + 'kill' + resume + 4, losses and weights to 1e-6 (augmentation drawn per sample
    from (seed, epoch, key), the loader position and the RNG restored by the engine)."""
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.stage import train_one

    torch.set_num_threads(1)
    root = scenes_folder(tmp_path / "scenes", n=5)
    cfg = SegmentConfig(data_root=str(root), iters=6, batch_size=2, crop_size=32, head_channels=8, save_every=2)
    src = open_source(str(root), None, "auto", "train")
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        losses: dict[int, float] = {}
        for stop in stops:
            torch.manual_seed(777)
            model, result = train_one(cfg, init="random", arch="resnet18", state_dict=None, where="random",
                                      train_src=src, checkpoints=tmp_path / name, tracker=None, prefix="",
                                      on_step=lambda s, st: losses.setdefault(s, st["loss"]), stop_after_step=stop)
        runs[name] = (losses, model)
    (a, ma), (b, mb) = runs["straight"], runs["resumed"]
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-6, msg=k)
