"""One arch list for every stage: whatever params accept, export, detect and segment accept; one error format."""
from __future__ import annotations

import typing

import pytest
import torch

from components.backbone import ARCHS, build_resnet, build_vit, check_arch, dilate_resnet_, is_vit, load_trunk
from components.config import PretrainConfig
from components.errors import UserError


def test_params_accept_exactly_the_backbone_archs():
    """Every method subsection's ``arch`` choices together are exactly the arch table (no arch params accept that the
    stages don't, none the stages know that no method can produce)."""
    allowed: set[str] = set()
    for name, field in PretrainConfig.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and "arch" in getattr(sub, "model_fields", {}):
            allowed |= set(typing.get_args(sub.model_fields["arch"].annotation))
    assert allowed == set(ARCHS)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_params_accept_is_accepted_by_export_detect_and_segment(arch):
    from components.transfer.export import build_backbone
    from components.transfer.detect.maskrcnn import build_model
    from components.transfer.segment.models import FCN, load_trunk_

    torch.manual_seed(0)
    if is_vit(arch):  # what `slotcon export` writes for a ViT: torchvision VisionTransformer keys minus heads
        from components.transfer.segment.models import ViTFCN

        sd = build_vit(arch, 64, head="none").state_dict()
        key = "encoder.layers.encoder_layer_0.mlp.0.weight"
        exported = build_backbone(arch, sd)  # loads strictly into VisionTransformer(64 px) with heads = Identity
        assert torch.equal(exported.encoder.layers.encoder_layer_0.mlp[0].weight, sd[key])
        det = build_model(arch=arch, num_classes=2, trunk_state=sd, min_size=[64], max_size=96, mask_head=[8],
                          trunk_size=96)
        assert torch.equal(det.backbone.trunk.encoder.layers.encoder_layer_0.mlp[0].weight, sd[key])
        seg = ViTFCN(arch=arch, num_classes=2, image_size=96, head_channels=8)
        load_trunk_(seg, sd, "backbone.pt")
        assert torch.equal(seg.backbone.encoder.layers.encoder_layer_0.mlp[0].weight, sd[key])
        return
    sd = build_resnet(arch, head="none").state_dict()  # what `slotcon export` writes: torchvision keys minus fc
    exported = build_backbone(arch, sd)  # export: loads strictly into torchvision <arch>() with fc = Identity
    assert torch.equal(exported.conv1.weight, sd["conv1.weight"])
    det = build_model(arch=arch, num_classes=2, trunk_state=sd, min_size=[64], max_size=96, mask_head=[8])
    assert torch.equal(det.backbone.body.layer4[0].conv1.weight, sd["layer4.0.conv1.weight"])
    seg = FCN(arch=arch, num_classes=2, output_stride=16, head_channels=8)
    load_trunk_(seg, sd, "backbone.pt")
    assert torch.equal(seg.backbone.layer4[0].conv1.weight, sd["layer4.0.conv1.weight"])


def test_unknown_arch_and_misfit_weights_are_one_line_errors():
    with pytest.raises(UserError, match=r"^params\.yaml: unknown trunk arch 'vgg16' \(allowed: resnet18"):
        check_arch("vgg16", "params.yaml")
    trunk = build_resnet("resnet18", head="none")
    sd = build_resnet("resnet34", head="none").state_dict()
    with pytest.raises(UserError) as exc:
        load_trunk(trunk, sd, arch="resnet18", source="models/backbone.pt")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("models/backbone.pt: ") and "unexpected" in msg


def test_dilation_keeps_keys_and_changes_output_stride():
    net = build_resnet("resnet18", head="none")
    keys = list(net.state_dict())
    dilate_resnet_(net, 8)
    assert list(net.state_dict()) == keys
    from components.backbone import trunk_forward

    assert trunk_forward(net, torch.randn(1, 3, 64, 64)).shape[-1] == 8
