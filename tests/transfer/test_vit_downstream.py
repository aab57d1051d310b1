"""A plain ViT downstream: ViTDet's simple feature pyramid under torchvision's Mask R-CNN, and the FCN head on the
stride-16 map; pretrained ViT weights load strictly (positions resized) and both models train a step and reload."""
from __future__ import annotations

import pytest
import torch

from components.backbone import build_vit
from components.errors import UserError


def test_simple_feature_pyramid_levels_and_names():
    import torchvision

    from components.transfer.detect.vit_pyramid import LayerNorm2d, SimpleFeaturePyramid

    fpn = SimpleFeaturePyramid(build_vit("vit_demo_16", 64), out_channels=32)
    out = fpn(torch.randn(2, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3", "pool"] and fpn.out_channels == 32
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(v.shape[:2] == (2, 32) for v in out.values())
    ln = LayerNorm2d(4)
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2))
    with pytest.raises(UserError, match="patch 16"):
        SimpleFeaturePyramid(torchvision.models.VisionTransformer(32, 8, 1, 1, 8, 16))


def _targets(n: int, size: int) -> list[dict]:
    out = []
    for i in range(n):
        masks = torch.zeros(1, size, size, dtype=torch.uint8)
        masks[0, 8 + i:40, 10:50 - i] = 1
        out.append({"boxes": torch.tensor([[10.0, 8.0 + i, 50.0 - i, 40.0]]), "labels": torch.tensor([1 + i % 2]),
                    "masks": masks})
    return out


@pytest.mark.slow
def test_vit_mask_rcnn_loads_trains_and_reloads(tmp_path):
    from components.config import DetectConfig
    from components.transfer.detect.maskrcnn import build_model, load_detector, model_kwargs_of, param_groups

    torch.manual_seed(0)
    sd = build_vit("vit_demo_16", 96, head="none").state_dict()  # pretrained at 96 px: a 6x6 position table
    cfg = DetectConfig(min_size=[64], max_size=96, test_size=64, mask_head=[8], rpn_batch_size=16, roi_batch_size=16,
                       proposals_train=50, proposals_test=20)
    kwargs = model_kwargs_of(cfg, arch="vit_demo_16", num_classes=2)
    assert kwargs["trunk_size"] == 64 and "trunk_size" not in model_kwargs_of(cfg, arch="resnet18", num_classes=2)
    model = build_model(**kwargs, trunk_state=sd, trunk_source="backbone.pt")
    trunk = model.backbone.trunk
    torch.testing.assert_close(trunk.encoder.layers.encoder_layer_3.ln_2.weight,
                               sd["encoder.layers.encoder_layer_3.ln_2.weight"])
    assert trunk.encoder.pos_embedding.shape == (1, 17, 192)  # resized to the 4x4 grid of 64 px
    # norm parameters (ViT LayerNorms, the pyramid's LayerNorm2d) are not weight-decayed
    n_norm = sum(p.numel() for g in param_groups(model, 1e-4) if g["weight_decay"] == 0 for p in g["params"])
    assert n_norm >= sum(p.numel() for n, p in trunk.named_parameters() if ".ln" in n)
    model.train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 80)], _targets(2, 64))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert trunk.conv_proj.weight.grad is not None and torch.isfinite(trunk.conv_proj.weight.grad).all()
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}
    torch.save({"model": model.state_dict(), "model_kwargs": kwargs, "test_size": 64}, tmp_path / "model.pt")
    again, meta = load_detector(tmp_path / "model.pt")
    assert meta["model_kwargs"]["arch"] == "vit_demo_16"
    with pytest.raises(UserError, match=r"backbone\.pt: .*vit_demo_16.*missing 1 keys: class_token"):
        build_model(**kwargs, trunk_state={k: v for k, v in sd.items() if k != "class_token"},
                    trunk_source="backbone.pt")


def test_vit_fcn_head_on_the_stride16_map():
    from components.config import SegmentConfig
    from components.transfer.segment.models import ViTFCN, build_segmenter, load_trunk_
    from components.transfer.segment.train import seg_loss

    torch.manual_seed(0)
    model = build_segmenter(SegmentConfig(crop_size=64, head_channels=8), arch="vit_demo_16", num_classes=3)
    assert isinstance(model, ViTFCN) and model.aux_block == 1
    sd = build_vit("vit_demo_16", 96, head="none").state_dict()
    load_trunk_(model, sd, "backbone.pt")
    torch.testing.assert_close(model.backbone.class_token, sd["class_token"])
    with pytest.raises(UserError, match=r"^backbone\.pt: .*unexpected"):
        load_trunk_(model, {**sd, "extra.weight": torch.zeros(1)}, "backbone.pt")
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x, train_logits=True)  # the contract every segmenter keeps (FCN, DeepLabv3+)
    assert set(out) == {"logits", "aux", "rep"} and out["rep"] is None
    assert out["logits"].shape == out["aux"].shape == (2, 3, 4, 4)
    loss = seg_loss(out["logits"], out["aux"], torch.randint(0, 3, (2, 64, 64)), 0.4)
    loss.backward()
    assert model.backbone.encoder.layers.encoder_layer_0.ln_1.weight.grad is not None
    model.eval()
    assert model(torch.randn(1, 3, 80, 96)).shape == (1, 3, 80, 96)
    assert model(x, train_logits=True)["aux"] is None  # no auxiliary head at test time


def test_vit_probe_features_are_the_token_map():
    """The frozen-trunk probes on a ViT: strict load at the weights' size, one stride-16 token map, RoI features of
    the boxes (so SIM lands in the comparison's probe rows like the ResNets)."""
    from components.backbone import vit_feature_map
    from components.transfer.probe import VIT_LAYERS, extract, frozen_trunk

    torch.manual_seed(0)
    sd = build_vit("vit_demo_16", 96, head="none").state_dict()
    net = frozen_trunk("vit_demo_16", sd, seed=1, source="backbone.pt")
    torch.testing.assert_close(net.encoder.pos_embedding, sd["encoder.pos_embedding"])
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(UserError, match=r"^backbone\.pt: "):
        frozen_trunk("vit_demo_16", {k: v for k, v in sd.items() if k != "class_token"}, seed=1, source="backbone.pt")
    meta = {"annotations": [{"bbox": [8, 8, 40, 30], "category_id": 7, "iscrowd": 0},
                            {"bbox": [0, 0, 64, 64], "category_id": 7, "iscrowd": 1}]}  # the crowd box is left out
    samples = [{"image": torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8),
                "label": torch.zeros(64, 80, dtype=torch.uint8), "meta": meta} for _ in range(3)]
    out = extract(net, samples, layers=VIT_LAYERS, resolution=64, batch_size=2, cat_index={7: 0},
                  device=torch.device("cpu"))
    assert out["dense"].shape == (3, 192, 4, 4) and out["labels"].shape == (3, 64, 64)
    assert out["obj"].shape == (3, 192) and out["obj_cls"].tolist() == [0, 0, 0]
    from components.constants import normalize_uint8
    from components.transfer.unsup.stage import resize_center_crop

    x = normalize_uint8(resize_center_crop(samples[0]["image"], samples[0]["label"], 64)[0][None])
    torch.testing.assert_close(out["dense"][:1].float(), vit_feature_map(net, x), atol=2e-3, rtol=1e-3)  # fp16 store


@pytest.mark.slow
def test_segment_stage_trains_a_vit_trunk(tmp_path, scenes_folder):
    """The segment stage's own training (`train_one`: the engine, SegmentMethod's loss) on a ViT trunk: the
    comparison's SIM cells go through it."""
    from components.config import SegmentConfig
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.stage import train_one

    root = scenes_folder(tmp_path / "scenes", n=4)
    cfg = SegmentConfig(data_root=str(root), iters=2, batch_size=2, crop_size=32, head_channels=8)
    sd = build_vit("vit_demo_16", 96, head="none").state_dict()
    torch.save({"arch": "vit_demo_16", "state_dict": sd}, tmp_path / "backbone.pt")
    model, result = train_one(cfg, init="pretrained", arch="vit_demo_16", state_dict=sd,
                              where=str(tmp_path / "backbone.pt"),
                              train_src=open_source(str(root), None, "auto", "train"), checkpoints=None,
                              tracker=None, prefix="")
    assert len(result.curve) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.curve)
