import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from components.config import UnsupConfig
from components.transfer.unsup.stage import cluster_confusion, resize_center_crop, run_unsup_seg, score_clusters

COLORS = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230]], dtype=torch.float32)


class ColourPrototypes(nn.Module):
    """A stand-in teacher whose K prototypes are colours: score = -distance of the pixel colour (full resolution)."""

    def __init__(self, k: int = 5):
        super().__init__()
        self.num_prototypes = k
        self.anchor = nn.Parameter(torch.zeros(1))

    def teacher_scores(self, x):  # x: ImageNet-normalised (B,3,H,W)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = (x * std + mean) * 255
        return -torch.cdist(rgb.permute(0, 2, 3, 1).reshape(-1, 3), COLORS[: self.num_prototypes]).view(
            x.shape[0], x.shape[2], x.shape[3], -1
        ).permute(0, 3, 1, 2)


def _samples(n=4, size=32, num_classes=3, perm=(2, 0, 4), seed=0):
    """Label maps of 3 classes; class c is painted with prototype colour perm[c] (prototypes 1 and 3 unused)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lbl = torch.randint(0, num_classes, (size // 8, size // 8), generator=g).repeat_interleave(8, 0)
        lbl = lbl.repeat_interleave(8, 1).to(torch.uint8)
        img = COLORS[torch.tensor(perm)[lbl.long()]].permute(2, 0, 1).to(torch.uint8)
        lbl[0, :3] = 255
        out.append({"key": f"{i}", "image": img, "label": lbl})
    return out


class ColourMethod:
    """The two PretrainMethod hooks for the stand-in: prototype scores, and the raw RGB as dense features."""

    @staticmethod
    def prototype_scores(model, x):
        return model.teacher_scores(x)

    @staticmethod
    def dense_features(model, x):
        return x


class ColourFeatures(ColourMethod):
    """The same stand-in without prototypes: downstream must cluster its dense features."""

    @staticmethod
    def prototype_scores(model, x):
        return None


def _head(method, k=3, samples=None, resolution=32):
    from components.transfer.unsup.clusters import ClusterHead
    from components.transfer.unsup.stage import image_batches

    samples = samples or _samples()
    return ClusterHead(ColourPrototypes(5), method, k).fit(
        image_batches(lambda: iter(samples), 2, resolution, torch.device("cpu")), len(samples))


def test_matched_prototypes_score_one_and_unused_prototypes_do_not_fool_the_matching():
    head = _head(ColourMethod)
    assert head.kind == "prototypes" and head.k == 5
    conf, n = cluster_confusion(head, _samples(), num_classes=3, resolution=32, batch_size=3)
    assert n == 4 and conf.shape == (5, 3)
    assert conf[[1, 3]].sum() == 0  # two prototypes never win a pixel
    m = score_clusters(conf, ["a", "b", "c"])
    assert m["mIoU"] == pytest.approx(1.0) and m["pixel_acc"] == pytest.approx(1.0)
    assert m["majority/mIoU"] == pytest.approx(1.0) and m["clusters_used"] == 3


def test_resize_center_crop_keeps_labels_aligned():
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    lbl = torch.zeros(40, 60, dtype=torch.uint8)
    img[:, :, 30:] = 255
    lbl[:, 30:] = 1
    i2, l2 = resize_center_crop(img, lbl, 20)
    assert i2.shape == (3, 20, 20) and l2.shape == (20, 20)
    assert torch.equal(i2[0] > 127, l2 == 1)


def _tiny_checkpoint(path):
    from components.pretrain.methods.slotcon.model import SlotCon

    kw = dict(arch="resnet18", num_prototypes=4, dim_hidden=16, dim_out=8)
    torch.manual_seed(1)
    torch.save({"model": SlotCon(**kw).state_dict(), "model_kwargs": kw, "epoch": 1, "step": 1}, path)


def _folder(tmp_path):
    root = tmp_path / "scenes"
    (root / "val2017").mkdir(parents=True)
    (root / "stuffthingmaps_trainval2017" / "val2017").mkdir(parents=True)
    for i, s in enumerate(_samples(n=3, size=64)):
        Image.fromarray(s["image"].permute(1, 2, 0).numpy()).save(root / "val2017" / f"{i:012d}.jpg")
        Image.fromarray(s["label"].numpy()).save(root / "stuffthingmaps_trainval2017" / "val2017" / f"{i:012d}.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "semantic_classes.json").write_text(
        json.dumps([{"id": i, "name": n, "isthing": 0} for i, n in enumerate(["a", "b", "c"])])
    )
    return root


def test_run_unsup_seg_on_a_folder_with_a_real_slotcon_checkpoint(tmp_path):
    root = _folder(tmp_path)
    _tiny_checkpoint(tmp_path / "last.pt")
    cfg = UnsupConfig(data_root=str(root), resolution=64, batch_size=2)
    m = run_unsup_seg(cfg, None, tmp_path / "last.pt", device="cpu")
    assert m["num_images"] == 3 and m["clusters"] == "prototypes" and m["num_clusters"] == 4 and m["num_classes"] == 3
    for key in ("mIoU", "pixel_acc", "random/mIoU", "random/pixel_acc", "majority/mIoU"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["majority/pixel_acc"] >= m["pixel_acc"] - 1e-9  # many-to-one can only match more pixels
    json.dumps(m, allow_nan=False)


def test_kmeans_path_finds_the_colour_classes_of_a_method_without_prototypes():
    """No prototypes -> k-means (K = 3 classes) on the dense features (here the pixels' colours): a perfect match."""
    head = _head(ColourFeatures, k=3)
    assert head.kind == "kmeans" and head.k == 3 and head.centers.shape == (3, 3)
    conf, n = cluster_confusion(head, _samples(), num_classes=3, resolution=32, batch_size=3)
    assert conf.shape == (3, 3) and n == 4
    m = score_clusters(conf, ["a", "b", "c"])
    assert m["mIoU"] == pytest.approx(1.0) and m["clusters_used"] == 3
    again = _head(ColourFeatures, k=3)  # deterministic: the same seed gives the same centroids
    torch.testing.assert_close(again.centers, head.centers, rtol=0, atol=0)


def test_spherical_kmeans_separates_directions_and_chunking_changes_nothing():
    from components.transfer.unsup.clusters import spherical_kmeans

    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(400) % 4
    x = dirs[labels] + 0.05 * torch.randn(400, 16, generator=g)
    c = spherical_kmeans(x, 4, seed=1)
    assert torch.allclose(c.norm(dim=1), torch.ones(4), atol=1e-5)
    match = (c @ dirs.t()).argmax(dim=1)  # every true direction has its own centroid, close to it
    assert sorted(match.tolist()) == [0, 1, 2, 3] and (c @ dirs.t()).max(dim=1).values.min() > 0.99
    torch.testing.assert_close(spherical_kmeans(x, 4, seed=1, chunk=7), c)
    with pytest.raises(ValueError, match="3 feature vectors for 4 clusters"):
        spherical_kmeans(x[:3], 4)


def _tiny_mocov2_checkpoint(path):
    from components.pretrain.methods.mocov2.model import MoCoV2

    kw = dict(arch="resnet18", dim_hidden=16, dim=8, queue_size=8, temperature=0.2, bn_splits=1)
    torch.manual_seed(1)
    torch.save({"model": MoCoV2(**kw).state_dict(), "model_kwargs": kw, "method": "mocov2", "epoch": 1, "step": 1},
               path)


def test_run_unsup_seg_on_a_mocov2_checkpoint_uses_kmeans(tmp_path):
    root = _folder(tmp_path)
    _tiny_mocov2_checkpoint(tmp_path / "last.pt")
    cfg = UnsupConfig(data_root=str(root), resolution=64, batch_size=2)
    m = run_unsup_seg(cfg, None, tmp_path / "last.pt", device="cpu")
    assert m["method"] == "mocov2" and m["clusters"] == "kmeans" and m["num_clusters"] == 3
    for key in ("mIoU", "pixel_acc", "random/mIoU"):
        assert 0.0 <= m[key] <= 1.0, key
    assert "majority/mIoU" not in m  # K == C: many-to-one is the Hungarian matching
    json.dumps(m, allow_nan=False)
