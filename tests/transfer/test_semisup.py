"""Semi-supervised segmentation: mixing, the mean teacher, the labelled/unlabelled split (labels of the unlabelled
images never read), the methods on the engine, the stage end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import SegmentConfig
from components.transfer.segment.mixing import class_mix_masks, cut_mix_masks, mix_pairs, strong_augment
from components.transfer.segment.semisup import ema_momentum, ema_update_, split_labeled, unsup_ce

TINY = dict(crop_size=32, batch_size=2, iters=3, head_channels=8, save_every=2, compare_random=False,
            reco={"rep_dim": 8, "num_queries": 8, "num_negatives": 8})


# ---------------------------------------------------------------------------------------------------------------------
# mixing
# ---------------------------------------------------------------------------------------------------------------------
def test_classmix_mixes_images_labels_and_confidences_with_one_mask_of_half_the_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (5, 12, 12), generator=g)
    labels[0] = 2  # one class only: nothing chosen
    labels[1, :, :6] = 255  # ignored pixels are never chosen
    images = torch.randn(5, 3, 12, 12, generator=g)
    conf = torch.rand(5, 12, 12, generator=g)
    mask = class_mix_masks(labels, 6, generator=torch.Generator().manual_seed(1))
    for i in range(5):
        present = [c for c in torch.unique(labels[i]).tolist() if c != 255]
        chosen = torch.unique(labels[i][mask[i]]).tolist()
        assert len(chosen) == len(present) // 2 and set(chosen) <= set(present)
        assert torch.equal(mask[i], torch.isin(labels[i], torch.tensor(chosen, dtype=torch.long)))  # whole classes
    img_m, lab_m, conf_m = mix_pairs(mask, images, labels, conf)
    nxt = [(i + 1) % 5 for i in range(5)]
    for i in range(5):
        m = mask[i]
        assert torch.equal(lab_m[i], torch.where(m, labels[i], labels[nxt[i]]))
        assert torch.equal(conf_m[i], torch.where(m, conf[i], conf[nxt[i]]))
        assert torch.equal(img_m[i], torch.where(m[None], images[i], images[nxt[i]]))
    # the draw is a function of the generator: same seed -> same mask; the chosen half varies with the seed
    assert torch.equal(mask, class_mix_masks(labels, 6, generator=torch.Generator().manual_seed(1)))
    others = [class_mix_masks(labels, 6, generator=torch.Generator().manual_seed(s)) for s in range(2, 8)]
    assert any(not torch.equal(mask, o) for o in others)


def test_classmix_chooses_each_present_class_about_half_the_time():
    labels = torch.arange(4).repeat_interleave(4).view(1, 4, 4).repeat(4000, 1, 1)  # classes 0..3 present
    mask = class_mix_masks(labels, 5, generator=torch.Generator().manual_seed(0))
    chosen = torch.stack([mask[:, k, 0] for k in range(4)], 1).float()  # row k holds class k
    assert (chosen.sum(1) == 2).all()
    assert torch.allclose(chosen.mean(0), torch.full((4,), 0.5), atol=0.03)


def test_cutmix_box_covers_half_the_image():
    m = cut_mix_masks(64, 20, 30, generator=torch.Generator().manual_seed(0))
    inside = (~m).float().sum((1, 2))
    assert ((inside - 300).abs() <= 20).all()  # half of 600 px, up to the rounding of the box height
    for i in range(4):  # one rectangle
        ys, xs = (~m[i]).nonzero(as_tuple=True)
        assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys)


def test_strong_augment_flips_images_and_labels_together():
    labels = torch.zeros(8, 6, 6, dtype=torch.long)
    labels[:, :, :2] = 1
    images = labels[:, None].float().repeat(1, 3, 1, 1)
    img, lab, conf = strong_augment(images, labels, labels.float(), generator=torch.Generator().manual_seed(0),
                                    jitter=False)
    flipped = lab[:, 0, -1] == 1
    assert 0 < flipped.sum() < 8
    assert torch.equal(img[:, 0] > 0.5, lab == 1) and torch.equal(conf, lab.float())
    jittered, = strong_augment(torch.randn(8, 3, 6, 6), generator=torch.Generator().manual_seed(0))[:1]
    assert torch.isfinite(jittered).all()


def test_unsup_ce_weights_each_image_by_its_share_of_confident_pixels():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[1, 0] = 255
    conf = torch.zeros(2, 4, 4)
    conf[0, :2] = 0.99  # image 0: 8 of 16 confident; image 1: none
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    expected = (0.5 * ce[0][valid[0]].sum() + 0.0) / valid.sum()
    assert unsup_ce(logits, labels, conf, 0.97).item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the mean teacher
# ---------------------------------------------------------------------------------------------------------------------
def test_teacher_momentum_schedule_and_update():
    assert [ema_momentum(t) for t in (0, 1, 3, 49, 99, 5000)] == pytest.approx([0.0, 0.5, 0.75, 0.98, 0.99, 0.99])
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    student(torch.randn(2, 3, 8, 8))  # move the student's running stats
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        want = s if not v.is_floating_point() else 0.9 * t0[k] + 0.1 * s
        torch.testing.assert_close(v, want, msg=k)
    ema_update_(teacher, student, ema_momentum(0))  # the first update copies the student
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# the split and the data
# ---------------------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_complete():
    keys = [f"{i:04d}" for i in range(50)]
    lab, unl = split_labeled(reversed(keys), 8, seed=3)
    assert (lab, unl) == split_labeled(keys, 8, seed=3)
    assert len(lab) == 8 and not set(lab) & set(unl) and sorted(lab + unl) == keys
    assert split_labeled(keys, 8, seed=4)[0] != lab
    assert len(split_labeled(keys, 0.1, seed=0)[0]) == 5 and len(split_labeled(keys, 0.001, seed=0)[0]) == 1
    from components.errors import UserError

    with pytest.raises(UserError, match="labeled=60"):
        split_labeled(keys, 60, seed=0)


def scenes_folder(root, n=10, size=40, classes=4, seed=0):
    """A tiny scenes-layout dataset: a background class with rectangles of other classes, each class its colour."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]], np.uint8)
    for split, count in (("train2017", n), ("val2017", 3)):
        (root / split).mkdir(parents=True)
        (root / "stuffthingmaps_trainval2017" / split).mkdir(parents=True)
        for i in range(count):
            lbl = np.full((size, size), 0, np.uint8)
            for k in range(1, classes):
                y, x = rng.integers(0, size - 12, 2)
                lbl[y : y + 12, x : x + 12] = k
            img = palette[lbl] + rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"{i:012d}.jpg")
            Image.fromarray(lbl).save(root / "stuffthingmaps_trainval2017" / split / f"{i:012d}.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "semantic_classes.json").write_text(
        json.dumps([{"id": k, "name": f"c{k}", "isthing": int(k > 0)} for k in range(classes)]))
    return root


def test_folder_subsets_keep_or_drop_labels(tmp_path):
    from components.data.segmentation.sources import open_source

    src = open_source(str(scenes_folder(tmp_path / "s")), None, "auto", "train")
    lab, unl = split_labeled(src.keys(), 3, seed=0)
    ls, us = src.subset(lab, labels=True), src.subset(unl, labels=False)
    assert ls.keys() == lab and us.keys() == unl and len(ls) == 3 and len(us) == 7
    assert "label" in ls.read(0) and set(us.read(0)) == {"key", "image"}
    assert all(p is None for _, _, p in us.items)  # nothing downstream can open an unlabelled image's label


def _poison_unlabeled(root, unl):
    """Overwrite the label maps of the unlabelled images with garbage bytes."""
    for k in unl:
        (root / "stuffthingmaps_trainval2017" / "train2017" / f"{k}.png").write_bytes(b"poison, not a PNG")


def test_labels_of_unlabeled_images_are_never_read(tmp_path, monkeypatch, method="reco"):
    """Training (ReCo: every path classmix takes, plus the ReCo term) on a split whose unlabelled images carry garbage
    label files is bit-identical to training with the clean files, and no unlabelled label map is ever decoded."""
    import components.data.segmentation.sources as sd
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.stage import split_train, train_one
    from components.tracking import Tracker

    opened = []
    real = sd.decode_label
    monkeypatch.setattr(sd, "decode_label", lambda data, where="": opened.append(str(where)) or real(data, where))
    cfg = SegmentConfig(method=method, labeled=3, **{**TINY, "iters": 2})
    runs = {}
    for name in ("clean", "poisoned"):
        root = scenes_folder(tmp_path / name)
        src = open_source(str(root), None, "auto", "train")
        labeled, unlabeled, info = split_train(cfg, src, tmp_path / f"out_{name}", Tracker())
        unl = unlabeled.keys()
        if name == "poisoned":
            _poison_unlabeled(root, unl)
        losses = {}
        torch.manual_seed(0)
        model, _ = train_one(cfg, init="random", arch="resnet18", state_dict=None, where="random",
                             train_src=labeled, checkpoints=None, tracker=None, prefix="", method=method,
                             unlabeled_src=unlabeled, on_step=lambda s, st: losses.setdefault(s, st["loss"]))
        runs[name] = (losses, model.state_dict())
    assert info["labeled_images"] == 3 and info["unlabeled_images"] == 7
    assert (tmp_path / "out_poisoned" / "labeled.txt").read_text().split() == labeled.keys()
    assert not any(k in p for p in opened for k in unl), "an unlabelled image's label was decoded"
    assert runs["clean"][0] == runs["poisoned"][0] and len(runs["clean"][0]) == 2
    for k, v in runs["clean"][1].items():
        assert torch.equal(v, runs["poisoned"][1][k]), k


def test_shard_subsets_read_only_the_labeled_maps(tmp_path, monkeypatch, coco_shards):
    """From shards: the labelled part is read once (only its members); the unlabelled stream never decodes a map."""
    import components.data.loading.loader as loader
    from components.data.segmentation.sources import open_source

    src = open_source("", coco_shards(tmp_path), "auto", "train")
    keys = src.keys()
    lab, unl = split_labeled(keys, 2, seed=0)
    labeled = src.subset(lab, labels=True)
    assert labeled.keys() == lab and all(s["label"].dtype == torch.uint8 for s in map(labeled.read, range(2)))
    decoded = []
    monkeypatch.setattr(loader, "decode_seg", lambda data: decoded.append(1) or pytest.fail("map decoded"))
    unlabeled = src.subset(unl, labels=False)
    seen = [s["key"] for b in unlabeled.epoch_batches(0, batch_size=1, map_fn=None, collate_fn=lambda b: b, seed=0)
            for s in b]
    assert sorted(seen) == sorted(unl) and not decoded


# ---------------------------------------------------------------------------------------------------------------------
# the methods on the engine and the stage
# ---------------------------------------------------------------------------------------------------------------------
def test_reco_run_end_to_end_with_supervised_baseline_and_picture(tmp_path):
    import torchvision

    from components.transfer.segment.stage import run_segment

    root = scenes_folder(tmp_path / "s")
    sd = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    torch.save({"arch": "resnet18", "state_dict": sd}, tmp_path / "backbone.pt")
    cfg = SegmentConfig(data_root=str(root), method="reco", labeled=0.3, num_vis=2, **{**TINY, "iters": 2})
    m = run_segment(cfg, None, tmp_path / "backbone.pt", tmp_path / "out", device="cpu", plots_dir=tmp_path / "p")
    assert m["method"] == "reco" and m["head"] == "deeplabv3plus"
    assert m["labeled_images"] == 3 and m["unlabeled_images"] == 7 and m["labeled_sha1"]
    for key in ("mIoU", "supervised/mIoU", "semisup_gain/mIoU", "pixel_acc", "supervised/pixel_acc"):
        assert key in m
    assert (tmp_path / "p" / "predictions.png").stat().st_size > 1000
    assert (tmp_path / "out" / "labeled.txt").read_text().count("\n") == 3
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    assert saved["method"] == "reco" and saved["head"] == "deeplabv3plus" and saved["rep_dim"] == 8
    json.dumps(m, allow_nan=False)


def test_mean_teacher_runs_on_the_fcn_head_with_cutmix(tmp_path):
    """FCN stays available to the semi-supervised methods (auxiliary loss on the labelled part only)."""
    from components.data.segmentation.sources import open_source
    from components.tracking import Tracker
    from components.transfer.segment.models import FCN
    from components.transfer.segment.stage import split_train, train_one

    cfg = SegmentConfig(method="classmix", labeled=3, head="fcn", semisup={"mix": "cutmix"}, **{**TINY, "iters": 1})
    src = open_source(str(scenes_folder(tmp_path / "s", n=6)), None, "auto", "train")
    labeled, unlabeled, _ = split_train(cfg, src, None, Tracker())
    stats = {}
    teacher, result = train_one(cfg, init="random", arch="resnet18", state_dict=None, where="random",
                                train_src=labeled, checkpoints=None, tracker=None, prefix="", method="classmix",
                                unlabeled_src=unlabeled, on_step=lambda s, st: stats.update(st))
    assert isinstance(teacher, FCN) and teacher is not result.extra["model"] and not teacher.training
    assert set(stats) >= {"loss", "sup", "unsup", "confident", "momentum"} and stats["momentum"] == 0.0
    for k, v in teacher.state_dict().items():  # the first update copies the student
        assert torch.equal(v, result.extra["model"].state_dict()[k]), k


def test_semisup_config_errors_are_one_line():
    from components.config import ConfigError, parse_section

    for raw, match in (({"method": "reco"}, "needs unlabelled images"), ({"labeled": 0}, "count >= 1"),
                       ({"method": "reco", "labeled": 4, "head": "fcn"}, "representation head"),
                       ({"labeled": 1.5}, "fraction")):
        with pytest.raises(ConfigError, match=match) as e:
            parse_section("segment", raw)
        assert "\n" not in str(e.value)
    assert parse_section("segment", {"labeled": 8}).labeled == 8
    assert parse_section("segment", {"method": "classmix", "labeled": 0.1}).resolved_head == "deeplabv3plus"
    assert parse_section("segment", {}).resolved_head == "fcn"


@pytest.mark.slow
def test_reco_stop_and_resume_equals_a_straight_run(tmp_path):
    """ReCo, 6 iterations straight == 2 + 'kill' + resume + 4: losses, student and teacher to 1e-6 (teacher and the
    mixing/sampling generator in the checkpoint, per-sample crops from (seed, epoch, key))."""
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.stage import split_train, train_one
    from components.tracking import Tracker

    torch.set_num_threads(1)
    root = scenes_folder(tmp_path / "s", n=8)
    cfg = SegmentConfig(method="reco", labeled=3, **{**TINY, "iters": 6})
    src = open_source(str(root), None, "auto", "train")
    labeled, unlabeled, _ = split_train(cfg, src, None, Tracker())
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        losses: dict[int, float] = {}
        for stop in stops:
            torch.manual_seed(777)
            teacher, result = train_one(cfg, init="random", arch="resnet18", state_dict=None, where="random",
                                        train_src=labeled, checkpoints=tmp_path / name, tracker=None, prefix="",
                                        method="reco", unlabeled_src=unlabeled, stop_after_step=stop,
                                        on_step=lambda s, st: losses.setdefault(s, (st["loss"], st["reco"])))
        runs[name] = (losses, teacher, result.extra["model"])
    (a, ta, sa), (b, tb, sb) = runs["straight"], runs["resumed"]
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert any(v[1] > 0 for v in a.values())  # the ReCo term ran
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    for m1, m2 in ((ta, tb), (sa, sb)):
        for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
            torch.testing.assert_close(w, v, rtol=0, atol=1e-6, msg=k)


def _ddp_reco_worker(rank, world, port, root, out):
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from components.data.segmentation.sources import open_source
        from components.transfer.segment.stage import split_train, train_one
        from components.tracking import Tracker

        torch.set_num_threads(1)
        cfg = SegmentConfig(method="reco", labeled=4, nproc_per_node=2, **{**TINY, "iters": 2, "batch_size": 4})
        src = open_source(root, None, "auto", "train")
        labeled, unlabeled, _ = split_train(cfg, src, None, Tracker())
        teacher, result = train_one(cfg, init="random", arch="resnet18", state_dict=None, where="random",
                                    train_src=labeled, checkpoints=None, tracker=None, prefix="", method="reco",
                                    unlabeled_src=unlabeled, device="cpu")
        torch.save({"teacher": dict(teacher.named_parameters()), "step": result.step,
                    "student": dict(result.extra["model"].named_parameters())}, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_reco_under_ddp_keeps_student_and_teacher_identical_on_every_rank(tmp_path):
    """2 gloo ranks: the ReCo loss and the mixing run per rank (as the authors' one-GPU batch), gradients are
    averaged by DDP, so the students' parameters (and the teachers' built from them) stay identical across ranks.
    (BN running statistics are rank-local on CPU, where torch has no SyncBN: DDP re-broadcasts rank 0's before each
    forward, and only rank 0's teacher is evaluated.)"""
    import socket

    import torch.multiprocessing as mp

    root = scenes_folder(tmp_path / "s", n=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_reco_worker, args=(2, port, str(root), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["step"] == b["step"] == 2
    for part in ("student", "teacher"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, msg=f"{part}.{k}")
