"""docs/presets: every paper preset is a valid params file with the paper's pretraining values."""
from __future__ import annotations

from pathlib import Path

import pytest

from components.config import parse_section, read_params
from components.pretrain.methods.sim.masking import num_masked_patches

PRESETS = sorted((Path(__file__).resolve().parents[1] / "docs" / "presets").glob("*.yaml"))


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"coco_r50_800ep.yaml", "cocoplus_r50_800ep.yaml", "imagenet_r50_100ep.yaml",
                                         "imagenet_r50_200ep.yaml", "imagenet_sim_vitb16_1600ep.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(path):
    data = read_params(path)
    for name, raw in data.items():
        parse_section(name, raw, path)


def _method(path: Path) -> str | None:
    pre = read_params(path).get("pretrain")
    return None if pre is None else pre.get("method", "slotcon")


PRETRAIN_PRESETS = [p for p in PRESETS if _method(p) == "slotcon"]
SIM_PRESETS = [p for p in PRESETS if _method(p) == "sim"]


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


@pytest.mark.parametrize("path", SIM_PRESETS, ids=lambda p: p.stem)
def test_sim_preset_is_the_released_vitb16_recipe(path):
    """configs/pretrain/dist_sim_base_1600ep.sh of OpenGVLab/Siamese-Image-Modeling (+ main_pretrain.py defaults)."""
    sections = {name: parse_section(name, raw, path) for name, raw in read_params(path).items()}
    common = sections["pretrain"]
    sim = common.sim
    assert sections["data"].source == "imagenet" and sections["data"].root
    assert (common.method, sim.arch, common.image_size, common.batch_size, common.epochs, common.warmup_epochs) == (
        "sim", "vit_b_16", 224, 4096, 1600, 40)
    assert (sim.optimizer, sim.base_lr, sim.weight_decay, sim.beta2, sim.clip_grad, sim.min_lr) == (
        "adamw", 6.25e-5, 0.05, 0.95, 1.0, 0.0)
    assert sim.base_lr * common.batch_size / 256 == pytest.approx(1e-3)
    assert num_masked_patches((14, 14), sim.mask_ratio) == 118 and sim.teacher_momentum == 0.995
    assert (sim.decoder_dim, sim.decoder_heads, sim.projector_depth, sim.predictor_depth, sim.norm) == (
        768, 16, 2, 4, "bn")
    assert (sim.neg_weight, sim.global_weight, sim.dense_weight, sim.online_ln, sim.train_patch_embed) == (
        0.02, 0.0, 1.0, False, False)
