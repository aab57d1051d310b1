"""SIM through the engine and the stages: exact resume, the CLI demo run (loss falls, targets do not collapse), the DDP
path (2 gloo processes == 1 process on the whole batch), and the export of the online ViT into torchvision."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

from components.config import PretrainConfig

SIM_TINY = dict(arch="vit_demo_16", decoder_dim=32, decoder_heads=2, projector_depth=1, predictor_depth=1)
# 8x the demo's base lr: 9 steps at batch 16 must show the loss falling
TINY = dict(method="sim", image_size=64, num_workers=0, log_every_steps=1, sim=dict(SIM_TINY, base_lr=1.2e-2, warmup_epochs=1))


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------------
# exact resume through the engine
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sim_exact_resume_equals_straight_run(shards, tmp_path, run_pretrain_in):
    """6 steps straight == 2 steps + 'kill' + resume + 4 steps: per-step losses, the masks/crops drawn by the loader
    workers, the augmentation generator, AdamW's moments, clipping and the EMA target all continue exactly."""
    cfg = PretrainConfig(**TINY, batch_size=8, epochs=2, samples_per_epoch=24, save_every_steps=2)
    keys = ("loss", "loss_dense", "loss_global", "target_std", "target_erank", "lr", "momentum")
    straight: dict[int, dict] = {}
    run_pretrain_in(cfg, shards, tmp_path / "a", on_step=lambda s, st: straight.setdefault(s, st))
    resumed: dict[int, dict] = {}
    out = run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st),
                          stop_after_step=2)
    assert out == {"stopped_at_step": 2}
    torch.manual_seed(4321)
    metrics = run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st))
    assert metrics["resumed"] and metrics["steps_this_run"] == 4 and metrics["method"] == "sim"
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for s in straight:
        for k in keys:
            assert resumed[s][k] == pytest.approx(straight[s][k], rel=1e-5, abs=1e-6), (s, k)
    a = torch.load(tmp_path / "a" / "models" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "models" / "last.pt", weights_only=False)
    assert a["method"] == b["method"] == "sim" and a["backbone_prefix"] == "student_encoder."
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------------------------
# the demo run through the CLI, then export + registry
# --------------------------------------------------------------------------------------------------------------------
def _effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised eigenvalues of the centred feature covariance (Roy & Vetterli 2007)."""
    x = features.double() - features.double().mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).clamp_min(0)
    p = eig / eig.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


@pytest.mark.slow
def test_sim_demo_cli_loss_falls_without_collapse_and_exports(shards, tmp_path, mlflow_store, monkeypatch):
    import mlflow
    import torchvision
    import yaml

    from components.pretrain import stage as loop
    from components.pretrain.registry import load_pretrained
    from components.transfer import export as convert

    monkeypatch.chdir(tmp_path)
    pre = dict(TINY, batch_size=16, epochs=3, samples_per_epoch=48, save_every_steps=100)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"artifact_location": mlflow_store.artifact_location,
                                                   "registered_model": "test-backbone"},
                                      "pretrain": pre, "export": {"register_model": True}}))
    args = argparse.Namespace(params=str(params), shards=str(shards), out="models/pretrain",
                              checkpoints="checkpoints/pretrain", metrics="metrics/pretrain.json",
                              plots="plots/pretrain")
    assert loop.STAGE.main(args) == 0
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["method"] == "sim" and metrics["steps"] == 9 and metrics["epochs"] == 3
    assert metrics["loss"] < 0.9 * metrics["first_epoch_loss"]  # it learns
    # no collapse: normalised targets still differ between tokens, and span more than one direction
    assert metrics["target_std"] > 0.5 and metrics["target_erank"] > 2.0
    rows = list(csv.DictReader(Path("plots/pretrain/loss.csv").open()))
    assert list(rows[0]) == ["epoch", "loss", "loss_dense", "loss_global"] and len(rows) == 3

    model = load_pretrained("models/pretrain/last.pt")  # the downstream contract
    from components.pretrain.registry import method_class

    feats = method_class("sim").dense_features(model, torch.randn(4, 3, 128, 128))
    assert feats.shape == (4, 192, 8, 8)
    target = model.target(torch.randn(8, 3, 64, 64)).reshape(-1, 32)  # the EMA branch's (B * L, D) tokens
    assert _effective_rank(torch.nn.functional.layer_norm(target, (32,))) > 2.0

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("slotcon-pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "sim"
    for key in ("loss", "loss_dense", "loss_global", "target_std", "target_erank", "lr", "momentum"):
        assert key in run.data.metrics, key
    assert run.data.params["pretrain.sim.arch"] == "vit_demo_16"

    # export: the ONLINE encoder, strictly into torchvision's VisionTransformer; a sibling registered model
    out = tmp_path / "models" / "backbone.pt"
    rc = convert.STAGE.main(argparse.Namespace(params=str(params), checkpoint="models/pretrain/last.pt",
                                               out=str(out)))
    assert rc == 0
    obj = torch.load(out, weights_only=True)
    assert obj["arch"] == "vit_demo_16" and obj["source"]["method"] == "sim" and obj["source"]["image_size"] == 64
    net = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=3,
                                               hidden_dim=192, mlp_dim=768)
    net.heads = torch.nn.Identity()
    net.load_state_dict(obj["state_dict"], strict=True)
    torch.testing.assert_close(obj["state_dict"]["encoder.layers.encoder_layer_0.ln_1.weight"],
                               model.student_encoder.encoder.layers.encoder_layer_0.ln_1.weight)
    assert client.search_model_versions("name='test-backbone'") == []
    (version,) = client.search_model_versions("name='test-backbone-sim'")
    loaded = mlflow.pytorch.load_model(f"models:/test-backbone-sim/{version.version}")
    assert isinstance(loaded, torchvision.models.VisionTransformer)
    assert "online encoder of sim pretraining" in version.description and "VisionTransformer keys" in version.description
    sig = mlflow.models.get_model_info(f"models:/test-backbone-sim/{version.version}").signature
    assert sig is not None and list(sig.inputs.to_dict()[0]["tensor-spec"]["shape"])[1:] == [3, 64, 64]  # its size


# --------------------------------------------------------------------------------------------------------------------
# export of a crafted checkpoint (fast)
# --------------------------------------------------------------------------------------------------------------------
def test_sim_export_loads_strictly_into_torchvision_vit(tmp_path):
    import torchvision

    from components.config import ExportConfig
    from components.pretrain.methods.sim.model import SIM
    from components.transfer import export as convert

    torch.manual_seed(0)
    kwargs = dict(SIM_TINY, image_size=64)
    model = SIM(**kwargs).eval()
    with torch.no_grad():  # teacher != student, so we can tell which one was exported
        for p in model.teacher_encoder.parameters():
            p.add_(1.0)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_kwargs": kwargs, "arch": "vit_demo_16", "method": "sim",
                "backbone_prefix": "student_encoder.", "epoch": 1, "step": 3}, path)
    out = tmp_path / "backbone.pt"
    summary = convert.run_export(ExportConfig(register_model=False), path, out)
    assert summary["arch"] == "vit_demo_16" and summary["method"] == "sim"
    arch, sd = convert.load_backbone(out)
    assert arch == "vit_demo_16" and not any(k.startswith("heads.") for k in sd)
    net = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=3,
                                               hidden_dim=192, mlp_dim=768)
    net.heads = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    from components.backbone import vit_tokens

    torch.testing.assert_close(net(x), vit_tokens(model.student_encoder, x)[:, 0], rtol=1e-4, atol=1e-5)
    assert convert.checkpoint_method(path) == "sim" and convert.checkpoint_method(tmp_path / "nope.pt") == "slotcon"
    assert convert.registered_model_name("m", "sim") == "m-sim" and convert.registered_model_name("m", "slotcon") == "m"


@pytest.mark.slow
def test_vit_table_matches_torchvision_vit_b_16():
    """Our vit_b_16 is torchvision's ViT-B/16: its exported keys load strictly into torchvision.models.vit_b_16."""
    import torchvision

    from components.backbone import build_vit
    from components.transfer.export import build_backbone

    sd = build_vit("vit_b_16", 224).state_dict()
    ref = torchvision.models.vit_b_16(weights=None)
    ref.heads = torch.nn.Identity()
    ref.load_state_dict(sd, strict=True)
    assert sum(v.numel() for v in sd.values()) == pytest.approx(85.8e6, rel=0.01)
    build_backbone("vit_b_16", sd)


# --------------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == 1 process on the whole batch
# --------------------------------------------------------------------------------------------------------------------
def _ddp_inputs(b: int, seed: int = 0) -> dict:
    from components.pretrain.methods.sim.masking import block_mask

    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[4, 6, 50, 60], [20, 0, 64, 40]], dtype=torch.float32).repeat(b, 1, 1)
    boxes += torch.randint(0, 8, (b, 2, 4), generator=g).float()
    return {
        "views": {"view1": torch.randn(b, 3, 64, 64, generator=g), "view2": torch.randn(b, 3, 64, 64, generator=g),
                  "mask": torch.stack([block_mask((4, 4), 10, g).flatten() for _ in range(b)]), "boxes": boxes,
                  "flip1": torch.rand(b, generator=g) < 0.5, "flip2": torch.rand(b, generator=g) < 0.5},
        "loss": {"pred": torch.randn(b, 6, 16, generator=g), "target": torch.randn(b, 6, 16, generator=g)},
    }


def _ddp_worker(rank: int, world: int, inputs: dict) -> dict:
    from components import dist
    from components.pretrain.methods.sim.losses import correlation, sim_loss
    from components.pretrain.methods.sim.model import SIM

    b = inputs["views"]["view1"].shape[0] // world
    half = slice(rank * b, (rank + 1) * b)
    # (a) the loss path: the all-reduced correlation matrix and the loss
    pred, target = inputs["loss"]["pred"][half], inputs["loss"]["target"][half]
    t = torch.nn.functional.layer_norm(target, (16,)).reshape(-1, 16)
    corr = correlation(t, dist.all_reduce_mean)
    losses = {a1: sim_loss(pred, target, global_weight=a1, dense_weight=4.0, all_reduce=dist.all_reduce_mean)[0]
              for a1 in (0.0, 1.0)}
    # (b) the whole model under DDP (LayerNorm blocks: per-sample computation, only F couples the ranks)
    torch.manual_seed(0)
    model = SIM(**SIM_TINY, image_size=64, norm="ln", global_weight=1.0, dense_weight=4.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    views = {k: v[half] for k, v in inputs["views"].items()}
    out = ddp(**views, all_reduce=dist.all_reduce_mean)
    out["loss"].backward()
    return {
        "corr": corr, "loss_a0": dist.all_reduce_mean(losses[0.0].detach()),
        "loss_a1": dist.all_reduce_mean(losses[1.0].detach()),
        "loss": dist.all_reduce_mean(out["loss"].detach()), "erank": out["target_erank"],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


@pytest.mark.ddp
def test_sim_ddp_two_processes_equal_one_process(gloo_ranks):
    from components.pretrain.methods.sim.losses import correlation, sim_loss
    from components.pretrain.methods.sim.model import SIM

    world, b = 2, 3
    inputs = _ddp_inputs(world * b)
    ranks = gloo_ranks(_ddp_worker, inputs, world)

    pred, target = inputs["loss"]["pred"], inputs["loss"]["target"]
    full_corr = correlation(torch.nn.functional.layer_norm(target, (16,)).reshape(-1, 16))
    for r in ranks:
        torch.testing.assert_close(r["corr"], full_corr, rtol=0, atol=1e-6)
        for a1 in (0.0, 1.0):
            full = sim_loss(pred, target, global_weight=a1, dense_weight=4.0)[0]
            assert r[f"loss_a{int(a1)}"].item() == pytest.approx(full.item(), rel=1e-5)

    torch.manual_seed(0)
    model = SIM(**SIM_TINY, image_size=64, norm="ln", global_weight=1.0, dense_weight=4.0)
    out = model(**inputs["views"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"])
    for r in ranks:
        assert r["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5)
        assert r["erank"].item() == pytest.approx(out["target_erank"].item(), rel=1e-5)
        for name, g in grads.items():  # DDP averaged the rank gradients == the whole batch's gradient
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
