"""`slotcon export`: the teacher backbone loads strictly into torchvision's ResNet minus fc, and is registered."""
from __future__ import annotations

import argparse

import pytest
import torch
import torchvision

from components.errors import UserError
from components.transfer import export as convert

KWARGS = dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)


@pytest.fixture
def pretrain_ckpt(tmp_path):
    from components.pretrain.methods.slotcon.model import SlotCon

    torch.manual_seed(0)
    model = SlotCon(**KWARGS)
    with torch.no_grad():  # make teacher != student, so we can tell which one was exported
        for p in model.teacher_encoder.parameters():
            p.add_(1.0)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_kwargs": KWARGS, "arch": "resnet18", "epoch": 3, "step": 18}, path)
    return path, model


def test_export_loads_strictly_into_torchvision(tmp_path, pretrain_ckpt):
    from components.config import ExportConfig

    path, model = pretrain_ckpt
    out = tmp_path / "backbone.pt"
    summary = convert.run_export(ExportConfig(register_model=False), path, out)
    assert summary["arch"] == "resnet18" and summary["step"] == 18
    obj = torch.load(out, weights_only=True)
    assert set(obj) >= {"arch", "state_dict"}
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict(obj["state_dict"], strict=True)  # every key, no fc
    assert not any(k.startswith("fc.") for k in obj["state_dict"])
    # it is the TEACHER's backbone
    torch.testing.assert_close(obj["state_dict"]["conv1.weight"], model.teacher_encoder.backbone.conv1.weight)
    arch, sd = convert.load_backbone(out)
    assert arch == "resnet18" and sd.keys() == obj["state_dict"].keys()
    # features agree with the teacher trunk's pooled map
    model.eval()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), model.teacher_encoder.backbone(x).mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        convert.load_backbone(tmp_path / "nope.pt")
    torch.save({"arch": "vit", "state_dict": {}}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="b.pt"):
        convert.load_backbone(tmp_path / "b.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "arch": "resnet18"}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="teacher_encoder.backbone"):
        convert.convert_checkpoint(tmp_path / "c.pt")


@pytest.mark.slow
def test_export_cli_registers_model(tmp_path, pretrain_ckpt, mlflow_store, monkeypatch):
    import mlflow
    import yaml

    path, _ = pretrain_ckpt
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"artifact_location": str(tmp_path / "art"),
                                                   "registered_model": "test-backbone"},
                                      "export": {"register_model": True}}))
    out = tmp_path / "models" / "backbone.pt"
    rc = convert.STAGE.main(argparse.Namespace(params=str(params), checkpoint=str(path), out=str(out)))
    assert rc == 0 and out.is_file()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='test-backbone'")
    assert len(versions) == 1
    loaded = mlflow.pytorch.load_model(f"models:/test-backbone/{versions[0].version}")
    assert isinstance(loaded, torchvision.models.ResNet)
