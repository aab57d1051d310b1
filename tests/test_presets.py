"""docs/presets: every paper preset is a valid params file with the paper's pretraining values."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from components.config import PretrainConfig, parse_section, read_params
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


# a comment's clean claim: "paper: 5", "paper and released scripts: 5", "released code: 0" -- a number that ends the
# comment or is followed by ";" / "," (a value with a qualifier, "paper: 256 (COCO)", claims nothing checkable)
CLAIM = re.compile(r"(?:^|; )(?:paper|released (?:code|scripts))(?: and released (?:code|scripts))?: "
                   r"([-+]?[0-9][0-9.e+-]*)(?=$|[;,])")


def _claims(section_class) -> dict[str, float]:
    """``{key: value}`` of the knobs of ``section_class`` whose comment claims a paper / released value."""
    out = {}
    for name, info in section_class.model_fields.items():
        match = CLAIM.search(info.description or "")
        if match:
            out[name] = float(match.group(1))
    return out


def _paper_scale(method: str) -> list[Path]:
    return [p for p in PRESETS if _method(p) == method]


@pytest.mark.parametrize("method", ["slotcon", "sim"])
def test_paper_claims_in_comments_match_the_paper_scale_presets(method):
    """Each knob of a method's subsection whose comment states the paper's (or released code's) number has that number
    in every paper-scale preset of the method: a "paper:" comment that names another method's value fails here."""
    section = getattr(PretrainConfig, "model_fields")[method].annotation
    claims = _claims(section)
    assert "warmup_epochs" in claims and "weight_decay" in claims  # the two every method states
    presets = _paper_scale(method)
    assert presets
    for path in presets:
        params = getattr(parse_section("pretrain", read_params(path)["pretrain"], path), method)
        wrong = {k: (getattr(params, k), v) for k, v in claims.items() if float(getattr(params, k)) != v}
        assert not wrong, f"{path.name}: preset value != comment's paper value: {wrong}"


def test_each_method_states_its_own_warmup():
    """The warm-up belongs to the method: SlotCon 5 epochs (released scripts), SIM 40 (of 1600), MoCo v2 none."""
    claims = {m: _claims(getattr(PretrainConfig, "model_fields")[m].annotation) for m in ("slotcon", "sim", "mocov2")}
    assert claims["slotcon"]["warmup_epochs"] == 5 and claims["mocov2"]["warmup_epochs"] == 0
    assert PretrainConfig(method="mocov2").warmup_epochs == 0  # the demo runs MoCo v2 as released: no warm-up
    assert "40" in (PretrainConfig.model_fields["sim"].annotation.model_fields["warmup_epochs"].description or "")
