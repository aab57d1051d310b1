"""Pretraining through the engine: exact resume, the DDP path (2 gloo processes == 1 process on the whole batch), the CLI demo
run (loss falls, no collapse, records written), non-finite loss handling, and the torchrun launcher."""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from components.config import PretrainConfig

TINY = dict(image_size=64, num_workers=0, log_every_steps=1,
            slotcon=dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16, warmup_epochs=1))
NO_WARMUP = dict(TINY, slotcon=dict(TINY["slotcon"], warmup_epochs=0))  # one-epoch runs


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_exact_resume_equals_straight_run(shards, tmp_path, run_pretrain_in):
    """6 steps straight == 2 steps + 'kill' + resume + 4 steps: per-step losses to 1e-6, final weights equal.

    2 epochs x 3 steps; the stop falls mid-epoch (the resumed loader must skip the consumed batches, whose samples
    carry their own crop and augmentation draws) and the rest crosses an epoch boundary.
    """
    cfg = PretrainConfig(**TINY, batch_size=8, epochs=2, samples_per_epoch=24, save_every_steps=2)
    straight: dict[int, dict] = {}
    run_pretrain_in(cfg, shards, tmp_path / "a", on_step=lambda s, st: straight.setdefault(s, st))

    resumed: dict[int, dict] = {}
    out = run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st),
                          stop_after_step=2)
    assert out == {"stopped_at_step": 2}
    assert not (tmp_path / "b" / "models" / "last.pt").exists()
    torch.manual_seed(12345)  # the process's RNG moved on: resume must restore what it needs
    metrics = run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st))
    assert metrics["resumed"] and metrics["steps_this_run"] == 4

    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for s in straight:
        for k in ("loss", "loss_group", "loss_slot", "assign_entropy", "lr", "momentum"):
            assert resumed[s][k] == pytest.approx(straight[s][k], abs=1e-6), (s, k)
    a = torch.load(tmp_path / "a" / "models" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "models" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert len(a["history"]) == len(b["history"]) == 2
    for ra, rb in zip(a["history"], b["history"]):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-6)

    # a changed run-defining param restarts cleanly in its own folder; the old checkpoints stay
    cfg2 = cfg.model_copy(update={"slotcon": cfg.slotcon.model_copy(update={"base_lr": 0.5}), "epochs": 1})
    out2 = run_pretrain_in(cfg2, shards, tmp_path / "b", stop_after_step=2)
    assert out2 == {"stopped_at_step": 2}
    runs = sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir())
    assert len(runs) == 2
    # another length is another run (the cosine schedules span it): a fresh start in a third folder
    cfg3 = cfg.model_copy(update={"epochs": 3})
    m3 = run_pretrain_in(cfg3, shards, tmp_path / "b")
    assert not m3["resumed"] and m3["steps"] == 9 and m3["steps_this_run"] == 9 and m3["epochs"] == 3
    assert len(list((tmp_path / "b" / "ckpt").iterdir())) == 3


# --------------------------------------------------------------------------------------------------------------------
# non-finite loss
# --------------------------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(shards, tmp_path, monkeypatch, run_pretrain_in):
    from components.pretrain.methods.slotcon import model as model_mod
    from components.engine.loop import NonFiniteLossError

    real_forward = model_mod.SlotCon.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the third step blows up
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(model_mod.SlotCon, "forward", forward)
    cfg = PretrainConfig(**NO_WARMUP, batch_size=8, epochs=1, samples_per_epoch=32, save_every_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 .*step_000000002\.pt"):
        run_pretrain_in(cfg, shards, tmp_path)
    ckpts = sorted(p.name for p in next((tmp_path / "ckpt").iterdir()).iterdir())
    assert ckpts[-1] == "step_000000002.pt"  # the last good one; nothing written after the bad step


# --------------------------------------------------------------------------------------------------------------------
# demo run through the CLI: loss falls, no collapse, records
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_run_cli_loss_falls_and_records(shards, tmp_path, mlflow_store, monkeypatch):
    import mlflow
    import yaml

    from components.pretrain import stage as loop
    from components.pretrain.registry import load_pretrained

    monkeypatch.chdir(tmp_path)
    pre = dict(TINY, batch_size=16, epochs=3, samples_per_epoch=48, save_every_steps=100)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"artifact_location": mlflow_store.artifact_location},
                                      "pretrain": pre}))
    args = argparse.Namespace(params=str(params), shards=str(shards), out="models/pretrain",
                              checkpoints="checkpoints/pretrain", metrics="metrics/pretrain.json",
                              plots="plots/pretrain")
    assert loop.STAGE.main(args) == 0

    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["steps"] == 9 and metrics["epochs"] == 3
    assert metrics["loss"] < metrics["first_epoch_loss"]  # it learns something
    assert metrics["assign_entropy"] > 0.5 * math.log(8)  # far from collapse (0 = one prototype for everything)
    rows = list(csv.DictReader(Path("plots/pretrain/loss.csv").open()))
    assert list(rows[0]) == ["epoch", "loss", "loss_group", "loss_slot"] and len(rows) == 3
    assert Path("plots/pretrain/loss.png").stat().st_size > 1000

    model = load_pretrained("models/pretrain/last.pt")  # the downstream contract
    assert model.teacher_scores(torch.randn(1, 3, 64, 64)).shape == (1, 8, 2, 2)
    last = torch.load("models/pretrain/last.pt", weights_only=False)
    assert last["step"] == 9 and last["arch"] == "resnet18" and not any(k.startswith("module.") for k in last["model"])

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("slotcon-pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("loss", "loss_group", "loss_slot", "lr", "momentum", "num_slots", "assign_entropy", "img_per_s",
                "gpu_mem_gb"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 9
    assert run.data.params["pretrain.slotcon.base_lr"] == "1.0" and run.data.tags["method"] == "slotcon"


# --------------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == 1 process on the whole batch
# --------------------------------------------------------------------------------------------------------------------
MODEL_KW = dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)


def _bn_eval(model: torch.nn.Module) -> None:
    """BatchNorm layers use their (shared, identical) running statistics: each sample's features no longer depend on
    which rank's half-batch it is in, so a 2-rank step must equal the 1-rank step on the whole batch exactly."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _ddp_inputs(b: int, seed: int = 0) -> dict:
    from components.pretrain.augment import TwoViewAugment
    from components.pretrain.crops import collate_crop_params, sample_two_crops

    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, 80, 96), generator=g, dtype=torch.uint8) for _ in range(b)]
    crops = collate_crop_params([sample_two_crops(80, 96, g) for _ in range(b)])
    views = TwoViewAugment(64)(images, crops, generator=g)
    k, d = 8, 16  # loss-path inputs: scores with a few pixels so several slots survive
    return {
        "views": views,
        "loss": {"student_slots": torch.randn(b, k, d, generator=g), "teacher_slots": torch.randn(b, k, d, generator=g),
                 "student_scores": torch.randn(b, k, 3, 3, generator=g),
                 "teacher_scores": torch.randn(b, k, 3, 3, generator=g), "center": torch.randn(1, k, generator=g)},
    }


def _ddp_worker(rank: int, world: int, inputs: dict) -> dict:
    from components import dist
    from components.pretrain.methods.slotcon.grouping import slot_keep_mask
    from components.pretrain.methods.slotcon.losses import slot_contrastive_loss, update_center
    from components.pretrain.methods.slotcon.model import SlotCon

    b = inputs["views"]["view1"].shape[0] // world
    half = slice(rank * b, (rank + 1) * b)
    # (a) the loss path with identical inputs: gathered negatives, all-reduced center
    li = {k: (v[half] if k != "center" else v) for k, v in inputs["loss"].items()}
    slot = slot_contrastive_loss(li["student_slots"], li["teacher_slots"], li["student_scores"],
                                 li["teacher_scores"], temperature=0.2, gather=dist.gather_cat)
    n_query = (slot_keep_mask(li["student_scores"]) & slot_keep_mask(li["teacher_scores"])).sum()
    center = update_center(li["center"], li["teacher_scores"], 0.9, all_reduce=dist.all_reduce_mean)
    # (b) the whole model under DDP, BN on running stats (see _bn_eval); group loss only (lambda = 1), whose
    # per-rank mean over equally many pixels averages to the global mean exactly
    torch.manual_seed(0)
    model = SlotCon(**MODEL_KW, group_loss_weight=1.0)
    model.train()
    _bn_eval(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    views = {k: v[half] for k, v in inputs["views"].items()}
    out = ddp(**views, gather=dist.gather_cat, all_reduce=dist.all_reduce_mean)
    out["loss"].backward()
    return {
        "slot": slot.detach(), "n_query": n_query, "center": center,
        "loss": dist.all_reduce_mean(out["loss"].detach()), "entropy": out["assign_entropy"],
        "model_center": model.center.clone(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


@pytest.mark.ddp
def test_ddp_two_processes_equal_one_process(gloo_ranks):
    from components.pretrain.methods.slotcon.grouping import slot_keep_mask
    from components.pretrain.methods.slotcon.losses import slot_contrastive_loss, update_center
    from components.pretrain.methods.slotcon.model import SlotCon

    world, b = 2, 3
    inputs = _ddp_inputs(world * b)
    ranks = gloo_ranks(_ddp_worker, inputs, world)

    # (a) loss path: kept-query-weighted mean of the rank losses == the loss on the whole batch; centers equal
    li = inputs["loss"]
    full = slot_contrastive_loss(li["student_slots"], li["teacher_slots"], li["student_scores"],
                                 li["teacher_scores"], temperature=0.2)
    n = torch.stack([r["n_query"] for r in ranks]).double()
    combined = (torch.stack([r["slot"] for r in ranks]).double() * n).sum() / n.sum()
    assert n.min() > 0 and combined.item() == pytest.approx(full.item(), abs=1e-5)
    full_center = update_center(li["center"], li["teacher_scores"], 0.9)
    for r in ranks:
        torch.testing.assert_close(r["center"], full_center, rtol=0, atol=1e-6)
    assert int((slot_keep_mask(li["student_scores"]) & slot_keep_mask(li["teacher_scores"])).sum()) == int(n.sum())

    # (b) model under DDP == one process on the whole batch: loss, center, entropy and the averaged gradients
    torch.manual_seed(0)
    model = SlotCon(**MODEL_KW, group_loss_weight=1.0)
    model.train()
    _bn_eval(model)
    out = model(**inputs["views"])
    out["loss"].backward()
    for r in ranks:
        assert r["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-5)
        torch.testing.assert_close(r["model_center"], model.center, rtol=0, atol=1e-6)
        assert r["entropy"].item() == pytest.approx(out["assign_entropy"].item(), abs=1e-5)
    grads = {n_: p.grad for n_, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"])
    for name, g in grads.items():
        for r in ranks:  # DDP averaged the rank gradients: identical on both ranks and equal to the full batch's
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.ddp
@pytest.mark.slow
def test_cli_launches_torchrun_for_two_processes(shards, tmp_path, monkeypatch):
    """`slotcon pretrain` with nproc_per_node=2 launches torch.distributed.run itself; DDP on gloo trains, rank 0
    writes last.pt, metrics and a checkpoint holding both ranks' RNG states; a second run resumes on both ranks
    from rank 0's choice of checkpoint (here the final one: nothing left to train)."""
    import yaml

    from components.pretrain import stage as loop

    monkeypatch.chdir(tmp_path)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    pre = dict(NO_WARMUP, batch_size=8, epochs=1, samples_per_epoch=16, nproc_per_node=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"enabled": False}, "pretrain": pre}))
    args = argparse.Namespace(params=str(params), shards=str(shards), out="models/pretrain",
                              checkpoints="checkpoints/pretrain", metrics="metrics/pretrain.json",
                              plots="plots/pretrain")
    assert loop.STAGE.main(args) == 0
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    (run_dir,) = list(Path("checkpoints/pretrain").iterdir())
    state = torch.load(sorted(run_dir.iterdir())[-1], weights_only=False)
    assert len(state["rank_states"]) == 2
    assert all(isinstance(r["torch"], torch.Tensor) for r in state["rank_states"])  # each rank's own RNG states
    assert Path("models/pretrain/last.pt").is_file()

    # the same run again: both ranks resume from rank 0's choice of checkpoint, at step 2 of 2
    assert loop.STAGE.main(args) == 0
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["resumed"] and metrics["steps"] == 2 and metrics["steps_this_run"] == 0 and metrics["epochs"] == 1


def test_cpu_threads_leave_a_core_per_worker():
    from components.pretrain.stage import cpu_threads

    assert cpu_threads(2, 1, cores=2) == 1
    assert cpu_threads(2, 0, cores=2) == 2
    assert cpu_threads(8, 4, cores=16) == 8
    assert cpu_threads(4, 8, cores=4) == 1


def test_bad_shards_and_batch_are_user_errors(shards, tmp_path, run_pretrain_in):
    from components.errors import UserError

    cfg = PretrainConfig(**NO_WARMUP, batch_size=8, epochs=1)
    with pytest.raises(UserError, match="index.json"):
        run_pretrain_in(cfg, tmp_path / "nowhere", tmp_path)
    with pytest.raises(UserError, match="exceeds"):
        run_pretrain_in(cfg.model_copy(update={"batch_size": 64}), shards, tmp_path)
