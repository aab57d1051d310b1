"""docs/presets: every paper preset is a valid params file with the paper's pretraining values."""
from __future__ import annotations

from pathlib import Path

import pytest

from components.config import parse_section, read_params

PRESETS = sorted((Path(__file__).resolve().parents[1] / "docs" / "presets").glob("*.yaml"))


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"coco_r50_800ep.yaml", "cocoplus_r50_800ep.yaml", "imagenet_r50_100ep.yaml",
                                         "imagenet_r50_200ep.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(path):
    data = read_params(path)
    for name, raw in data.items():
        parse_section(name, raw, path)


PRETRAIN_PRESETS = [p for p in PRESETS if "pretrain" in read_params(p)]


@pytest.mark.parametrize("path", PRETRAIN_PRESETS, ids=lambda p: p.stem)
def test_pretrain_preset_is_faithful(path):
    data = read_params(path)
    sections = {name: parse_section(name, raw, path) for name, raw in data.items()}
    pre = sections["pretrain"].slotcon
    assert pre.arch == sections["pretrain"].arch and sections["pretrain"].method == "slotcon"
    common = sections["pretrain"]
    assert (pre.arch, common.image_size, common.batch_size, pre.base_lr, pre.weight_decay, pre.optimizer) == (
        "resnet50", 224, 512, 1.0, 1e-5, "lars")
    assert (pre.dim_hidden, pre.dim_out, pre.teacher_temp, pre.student_temp, pre.teacher_momentum) == (
        4096, 256, 0.07, 0.1, 0.99)
    assert (pre.group_loss_weight, common.warmup_epochs, pre.slot_temp, pre.center_momentum) == (0.5, 5, 0.2, 0.9)
    if path.stem.startswith("coco"):
        assert pre.num_prototypes == 256 and common.epochs == 800
        assert sections["data"].source == ("cocoplus" if "plus" in path.stem else "coco")
    else:
        assert pre.num_prototypes == 2048 and common.epochs in (100, 200)
        assert sections["data"].source == "imagenet" and sections["data"].root  # no manual shard writing
