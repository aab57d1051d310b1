"""Every stage that reads shards after pretraining (detect, segment, probe, unsup_seg, viz) counts the samples a
damaged shard did not deliver against ``index.json``, reports them in its details (``lost_samples``,
``lost_fraction``, per split and per reason) and stops above its ``max_lost_fraction`` with one line naming the
shard; below it, the figures say how many images the evaluation ran on."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from components.config import DetectConfig, ProbeConfig, SegmentConfig, UnsupConfig, VizConfig
from components.errors import UserError
from components.tracking.tracker import Tracker

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # tiny trainings: a few seconds each
LOST = 2  # each damaged shard keeps its first 2 of 4 samples


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """8 + 8 COCO-layout images with semantic maps in shards of 4, a tiny SlotCon ``last.pt`` and its trunk."""
    from components.config import DataConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.shards.stage import run_shard
    from components.pretrain.methods.slotcon.model import SlotCon
    from fixtures.coco import write_coco

    tmp = tmp_path_factory.mktemp("lost")
    root = write_coco(tmp / "src", n_train=8, n_val=8)
    run_prepare(DataConfig(workers=1), root, tmp / "raw", progress=False)
    run_shard(ShardConfig(max_count=4, workers=1), tmp / "raw", tmp / "shards", progress=False)
    kw = dict(arch="resnet18", num_prototypes=4, dim_hidden=16, dim_out=8)
    torch.manual_seed(0)
    model = SlotCon(**kw)
    torch.save({"model": model.state_dict(), "model_kwargs": kw, "epoch": 1, "step": 1}, tmp / "last.pt")
    torch.save({"arch": "resnet18", "state_dict": model.teacher_encoder.backbone.state_dict()}, tmp / "bb.pt")
    return tmp


def _damaged(clean: Path, tmp_path: Path, splits=("val2017",), how: str = "header") -> Path:
    """A copy of the shards whose first shard of each split in ``splits`` ends after sample ``LOST - 1``: on a
    member header boundary (tarfile reads that as a complete archive: nothing raises) or, ``how="seg"``, just
    before the next sample's ``seg.png`` (that sample is read without its map: lost too)."""
    out = tmp_path / "shards"
    shutil.copytree(clean / "shards", out)
    for split in splits:
        url = out / split / f"{split}-000000.tar"
        with tarfile.open(url) as tf:
            members = tf.getmembers()
        names = [m.name for m in members]
        assert names[3 * LOST:3 * LOST + 3] == [names[3 * LOST].split(".")[0] + e for e in (".jpg", ".json", ".seg.png")]
        cut = members[3 * LOST].offset if how == "header" else members[3 * LOST + 2].offset
        url.write_bytes(url.read_bytes()[:cut])
    return out


def _lost(metrics: dict, split: str) -> int:
    return metrics["lost_by_split"][split]["lost_samples"]


def _detect_cfg(**kw) -> DetectConfig:
    return DetectConfig(**{**dict(iters=2, batch_size=2, lr=0.01, warmup_iters=1, steps=[1], compare_random=False,
                                  num_vis=0, save_every=10, min_size=[64], max_size=96, rpn_batch_size=32,
                                  roi_batch_size=32, proposals_train=50, proposals_test=20, mask_head=[16],
                                  detections_per_img=10, test_size=64, log_model=False), **kw})


def test_detect_refuses_coco_eval_on_a_partial_val_split(clean, tmp_path):
    from components.transfer.detect.stage import run_detect

    torch.set_num_threads(1)
    shards = _damaged(clean, tmp_path)
    args = (shards, clean / "bb.pt", tmp_path / "out", tmp_path / "plots")
    with pytest.raises(UserError) as e:
        run_detect(_detect_cfg(), *args, checkpoints=tmp_path / "ck", tracker=Tracker())
    msg = str(e.value)
    assert "\n" not in msg and "val2017-000000.tar" in msg and f"{LOST} of 8" in msg and "max_lost_fraction" in msg
    # below the threshold: it evaluates on what is there and says so (the finished checkpoint is reused)
    m = run_detect(_detect_cfg(max_lost_fraction=0.5), *args, checkpoints=tmp_path / "ck", tracker=Tracker())
    assert _lost(m, "val2017") == LOST and m["pretrained/num_val_images"] == 8 - LOST
    assert m["lost_by_split"]["val2017"]["lost_by_reason"] == {"truncated_tar": LOST}
    assert m["lost_samples"] == LOST and m["lost_fraction"] == LOST / 16


def test_detect_counts_what_its_train_split_lost(clean, tmp_path):
    from components.transfer.detect.stage import run_detect

    torch.set_num_threads(1)
    shards = _damaged(clean, tmp_path, ("train2017",))
    args = (shards, clean / "bb.pt", tmp_path / "out", tmp_path / "plots")
    with pytest.raises(UserError, match=r"detect: train2017: 2 of 8 .*train2017-000000\.tar"):
        run_detect(_detect_cfg(), *args, tracker=Tracker())
    m = run_detect(_detect_cfg(iters=4, steps=[3], max_lost_fraction=0.5), *args, tracker=Tracker())
    assert _lost(m, "train2017") == LOST and _lost(m, "val2017") == 0 and m["pretrained/num_val_images"] == 8


def _segment_cfg(**kw) -> SegmentConfig:
    return SegmentConfig(iters=3, batch_size=2, crop_size=32, head_channels=8, compare_random=False, num_vis=0, **kw)


def test_segment_counts_train_and_val_losses_and_stops_above_the_threshold(clean, tmp_path):
    from components.transfer.segment.stage import run_segment

    torch.set_num_threads(1)
    shards = _damaged(clean, tmp_path, ("train2017", "val2017"), how="seg")
    with pytest.raises(UserError, match=r"segment: train2017: 2 of 8 .*train2017-000000\.tar"):
        run_segment(_segment_cfg(), shards, clean / "bb.pt", tmp_path / "out")
    m = run_segment(_segment_cfg(max_lost_fraction=0.5), shards, clean / "bb.pt", tmp_path / "out")
    assert _lost(m, "train2017") == LOST and _lost(m, "val2017") == LOST and m["num_val_images"] == 8 - LOST
    # the cut falls just before a map: the sample left without its seg.png is lost too, whichever reader sees it
    # first (the shard's identity check drops it with the tail; a streaming read would report it as no_seg)
    reasons = m["lost_by_split"]["val2017"]["lost_by_reason"]
    assert sum(reasons.values()) == LOST and set(reasons) <= {"no_seg", "truncated_tar"}


def test_probe_counts_a_cut_sample_instead_of_a_misleading_error(clean, tmp_path):
    from components.transfer.probe import run_probe

    torch.set_num_threads(1)
    shards = _damaged(clean, tmp_path, ("val2017",), how="seg")
    cfg = dict(resolution=64, label_size=16, steps=3, probe_batch=4, batch_size=4, compare_random=False)
    with pytest.raises(UserError, match=r"probe: val2017: 2 of 8 .*val2017-000000\.tar"):
        run_probe(ProbeConfig(**cfg), shards, clean / "bb.pt")
    m = run_probe(ProbeConfig(max_lost_fraction=0.5, **cfg), shards, clean / "bb.pt")
    assert _lost(m, "val2017") == LOST and _lost(m, "train2017") == 0


def test_unsup_seg_and_viz_count_their_lost_val_samples(clean, tmp_path):
    from components.transfer.unsup.stage import run_unsup_seg
    from components.transfer.unsup.viz import run_viz

    torch.set_num_threads(1)
    shards = _damaged(clean, tmp_path, ("val2017",), how="seg")
    unsup = dict(resolution=64, batch_size=4, compare_random=False)
    with pytest.raises(UserError, match=r"unsup_seg: val2017: 2 of 8 .*val2017-000000\.tar"):
        run_unsup_seg(UnsupConfig(**unsup), shards, clean / "last.pt")
    m = run_unsup_seg(UnsupConfig(max_lost_fraction=0.5, **unsup), shards, clean / "last.pt")
    assert _lost(m, "val2017") == LOST and m["num_images"] == 8 - LOST
    viz = dict(num_images=2, top_prototypes=2, num_neighbors=2, resolution=64, batch_size=4)
    shards = _damaged(clean, tmp_path / "v", ("val2017",))
    with pytest.raises(UserError, match=r"viz: val2017: 2 of 8 .*val2017-000000\.tar"):
        run_viz(VizConfig(**viz), shards, clean / "last.pt", tmp_path / "slots")
    m = run_viz(VizConfig(max_lost_fraction=0.5, **viz), shards, clean / "last.pt", tmp_path / "slots")
    assert _lost(m, "val2017") == LOST and m["lost_fraction"] == LOST / 8
