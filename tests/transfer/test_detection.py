"""Stage ``detect``: schedule, strict trunk loading, and a few CPU iterations on tiny scenes end to end."""
import json

import pytest
import torch
import torchvision
import yaml

from components.errors import UserError
from components.transfer.detect.maskrcnn import build_model, load_detector, lr_at, param_groups

TINY = dict(min_size=[64], max_size=96, rpn_batch_size=32, roi_batch_size=32, proposals_train=100,
            proposals_test=50, mask_head=[32], detections_per_img=20)


def _trunk_state(arch="resnet18", seed=1):
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)(weights=None)
    # distinct non-default BN statistics, so a copy is told apart from torchvision's init
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}


def _save_backbone(path, arch="resnet18", sd=None):
    torch.save({"arch": arch, "state_dict": sd if sd is not None else _trunk_state(arch)}, path)
    return path


def test_lr_is_warmup_then_steps():
    kw = dict(base_lr=0.02, warmup_iters=10, steps=[40, 53])
    assert lr_at(0, **kw) == pytest.approx(0.02 * 0.001)
    assert lr_at(5, **kw) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(10, **kw) == pytest.approx(0.02) and lr_at(39, **kw) == pytest.approx(0.02)
    assert lr_at(40, **kw) == pytest.approx(0.002) and lr_at(53, **kw) == pytest.approx(0.0002)
    assert lr_at(3, base_lr=1.0, warmup_iters=0, steps=[]) == 1.0
    values = [lr_at(i, **kw) for i in range(10)]
    assert values == sorted(values)  # linear warm-up rises monotonically


@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_pretrained_weights_land_in_the_trunk(norm):
    sd = _trunk_state()
    model = build_model(arch="resnet18", num_classes=3, norm=norm, trunk_state=sd, **TINY)
    body = model.backbone.body.state_dict()
    compared = 0
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body[k], v), k
        compared += 1
    assert compared == len([k for k in sd if not k.endswith("num_batches_tracked")]) > 60
    random = build_model(arch="resnet18", num_classes=3, norm=norm, **TINY).backbone.body.state_dict()
    assert not torch.equal(random["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])
    if norm == "bn":  # SSL transfer: BN trains; the norm params carry no weight decay
        assert model.backbone.body.conv1.weight.requires_grad and isinstance(model.backbone.body.bn1,
                                                                               torch.nn.BatchNorm2d)
        groups = param_groups(model, 1e-4)
        assert groups[1]["weight_decay"] == 0 and any(p is model.backbone.body.bn1.weight for p in groups[1]["params"])
    else:  # torchvision's supervised recipe: FrozenBN, stem and layer1 frozen
        assert not model.backbone.body.conv1.weight.requires_grad


def test_wrong_trunk_weights_fail_in_one_line():
    sd = _trunk_state()
    broken = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    broken["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as exc:
        build_model(arch="resnet18", num_classes=3, trunk_state=broken, trunk_source="models/backbone.pt", **TINY)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("models/backbone.pt: ")
    assert "missing" in msg and "layer4.0.bn1.bias" in msg and "unexpected 1 keys: head.extra.weight" in msg
    with pytest.raises(UserError, match="shape mismatch"):  # resnet50 weights into a resnet18 trunk
        build_model(arch="resnet18", num_classes=3, trunk_state=_trunk_state("resnet50"), **TINY)


# --------------------------------------------------------------------------------------------------------------------
# end to end on tiny scenes
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from components.config import DataConfig, ScenesConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.scenes.stage import generate_scenes
    from components.data.shards.stage import run_shard

    root = tmp_path_factory.mktemp("detect_data")
    generate_scenes(ScenesConfig(num_train=12, num_val=6, image_size=64, min_objects=1, max_objects=3,
                                 num_thing_classes=3, num_stuff_classes=2, min_object_frac=0.3,
                                 max_object_frac=0.6), root / "scenes")
    run_prepare(DataConfig(source="scenes", workers=1), root / "scenes", root / "raw", progress=False)
    run_shard(ShardConfig(workers=1, max_count=8), root / "raw", root / "shards", progress=False)
    return root / "shards"


def _params(tmp_path, **detect):
    cfg = dict(iters=10, batch_size=2, lr=0.01, warmup_iters=2, steps=[8], compare_random=False, num_vis=2,
               save_every=10, **TINY, test_size=64)
    cfg.update(detect)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"detect": cfg, "tracking": {"enabled": False}}))
    return p


def _args(tmp_path, shards, backbone, params):
    import argparse

    return argparse.Namespace(params=str(params), shards=str(shards), backbone=str(backbone),
                              out=str(tmp_path / "models/detect"), metrics=str(tmp_path / "metrics/detect.json"),
                              plots=str(tmp_path / "plots/detect"), checkpoints=str(tmp_path / "ck"))


def test_a_wrong_backbone_file_stops_the_stage_before_training(tmp_path, tiny_shards, capsys):
    from components.cli import main

    bad = tmp_path / "bad.pt"
    _save_backbone(bad, sd={k: v for k, v in _trunk_state().items() if not k.startswith("layer3.")})
    params = _params(tmp_path)
    argv = ["detect", "--params", str(params), "--shards", str(tiny_shards), "--backbone", str(bad),
            "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "missing" in err and "layer3." in err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(argv[:6] + [str(tmp_path / "junk.pt")] + argv[7:]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_few_cpu_iterations_lower_the_loss_and_write_metrics(tmp_path, tiny_shards, mlflow_store):
    from components.transfer.detect import stage as detection

    torch.set_num_threads(1)  # the shared 2-core CI box: spinning OpenMP threads cost 5-10x under contention
    backbone = _save_backbone(tmp_path / "backbone.pt")
    params = _params(tmp_path)
    cfg_raw = yaml.safe_load(params.read_text())
    cfg_raw["tracking"] = {"enabled": True, "artifact_location": mlflow_store.artifact_location}
    cfg_raw["detect"]["log_model"] = True
    params.write_text(yaml.safe_dump(cfg_raw))
    args = _args(tmp_path, tiny_shards, backbone, params)
    assert detection.STAGE.main(args) == 0

    metrics = json.loads((tmp_path / "metrics/detect.json").read_text())
    for k in ("bbox_AP", "segm_AP", "pretrained/bbox_AP50", "pretrained/segm_APs", "pretrained/sec_per_iter"):
        assert k in metrics and isinstance(metrics[k], float), k
    assert metrics["bbox_AP"] == metrics["pretrained/bbox_AP"] and 0.0 <= metrics["bbox_AP"] <= 1.0
    assert metrics["pretrained/num_val_images"] == 6
    losses = [float(r.split(",")[1]) for r in (tmp_path / "plots/detect/loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 10 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (tmp_path / "plots/detect/predictions.png").stat().st_size > 1000

    # the saved detector reloads and keeps the pretrained trunk's shapes; the trunk moved away from its init
    model, meta = load_detector(tmp_path / "models/detect/model.pt")
    assert meta["init"] == "pretrained" and meta["label_to_cat_id"] == {1: 1, 2: 2, 3: 3}
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}

    # MLflow: params, a loss curve per iteration, the AP metrics, the picture and the model
    import mlflow

    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("slotcon-pipeline").experiment_id])[0]
    assert run.data.params["detect.iters"] == "10"
    assert len(client.get_metric_history(run.info.run_id, "pretrained/loss")) == 10
    assert "bbox_AP" in run.data.metrics and "pretrained/segm_AP" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/predictions.png" in arts
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")

    # a re-run finds the finished checkpoint and skips straight to evaluation with the same numbers
    cfg_raw["tracking"] = {"enabled": False}
    params.write_text(yaml.safe_dump(cfg_raw))
    assert detection.STAGE.main(args) == 0
    again = json.loads((tmp_path / "metrics/detect.json").read_text())
    assert again["bbox_AP"] == metrics["bbox_AP"] and again["segm_AP"] == metrics["segm_AP"]


def test_train_samples_follow_the_reference_filters_and_flip_repeatably():
    from components.transfer.detect.stage import prepare_train_sample as _prepare_train_sample

    img = torch.zeros(3, 20, 30, dtype=torch.uint8)
    img[:, :, :5] = 255
    obj = {"bbox": [2, 3, 10, 8], "category_id": 7, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]}
    crowd = dict(obj, iscrowd=1)

    def sample(key, anns):
        return {"key": key, "url": "u", "image": img, "meta": {"image": {"id": 5}, "annotations": anns}}

    kw = dict(cat_to_label={7: 1}, seed=0, epoch=0)
    assert _prepare_train_sample(sample("a", []), **kw)["skip"] == "no_valid_annotation"
    assert _prepare_train_sample(sample("b", [dict(obj, bbox=[0, 0, 1, 5])]), **kw)["skip"] == "no_valid_annotation"
    only_crowd = _prepare_train_sample(sample("c", [crowd]), **kw)  # kept with empty targets, as the reference
    assert "skip" not in only_crowd and only_crowd["target"]["boxes"].shape == (0, 4)
    assert only_crowd["counts"]["crowd"] == 1
    flips = []
    for i in range(40):
        out = _prepare_train_sample(sample(f"k{i}", [obj]), **kw)
        again = _prepare_train_sample(sample(f"k{i}", [obj]), **kw)
        assert torch.equal(out["image"], again["image"])  # the flip is a function of (seed, epoch, key)
        flipped = bool(out["image"][0, 0, -1] == 255)
        flips.append(flipped)
        expect = [30 - 12.0, 3.0, 30 - 2.0, 11.0] if flipped else [2.0, 3.0, 12.0, 11.0]
        assert out["target"]["boxes"][0].tolist() == expect
    assert 5 < sum(flips) < 35


@pytest.mark.gpu
def test_one_bf16_step_on_cuda():
    from components.engine.loop import autocast as _autocast

    device = torch.device("cuda")
    model = build_model(arch="resnet18", num_classes=3, trunk_state=_trunk_state(), **TINY).to(device).train()
    images = [torch.rand(3, 64, 64, device=device) for _ in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8, device=device)
    masks[0, 10:40, 12:50] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]], device=device),
                "labels": torch.tensor([2], device=device), "masks": masks} for _ in images]
    with _autocast(device, True):
        losses = model(images, targets)
    loss = sum(v.float() for v in losses.values())
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.body.conv1.weight.grad is not None


@pytest.mark.slow
def test_stop_and_resume_equals_a_straight_run(tmp_path, tiny_shards):
    """6 iterations straight == 3 + 'kill' + resume + 3 (per-iteration losses and final weights to 1e-6): the engine
    restores the RPN/ROI samplers' RNG, the scale draws and the loader position."""
    from components.config import DetectConfig
    from components.transfer.detect.stage import _check_data, train_one

    torch.set_num_threads(1)
    cfg = DetectConfig(iters=6, batch_size=2, lr=0.01, warmup_iters=2, steps=[5], save_every=3, compare_random=False,
                       **TINY, test_size=64)
    data = _check_data(tiny_shards, cfg, 1)
    sd, src = _trunk_state(), str(_save_backbone(tmp_path / "bb.pt"))
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [3, None])):
        losses: dict[int, float] = {}
        for stop in stops:
            torch.manual_seed(4321)  # whatever the process did before: the run restores its own state
            _, result = train_one(cfg, "pretrained", "resnet18", sd, src, data, tmp_path / name, None,
                                  on_step=lambda s, st: losses.setdefault(s, st["loss"]), stop_after_step=stop)
        runs[name] = (losses, result)
    (a, ra), (b, rb) = runs["straight"], runs["resumed"]
    assert rb.resumed_from is not None and rb.steps_this_run == 3
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    wa, wb = ra.extra["model"].state_dict(), rb.extra["model"].state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def _nan_rank_worker(rank, world, port, shards, tmpdir):
    import os

    import torch.distributed as tdist

    from components.config import DetectConfig
    from components.engine.loop import NonFiniteLossError
    from components.transfer.detect import stage as detection

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real = detection.DetectMethod.forward

        def forward(self, model, batch, step):
            out = real(self, model, batch, step)
            return dict(out, loss=out["loss"] * float("nan")) if (rank == 1 and step == 2) else out

        detection.DetectMethod.forward = forward
        cfg = DetectConfig(iters=5, batch_size=2, lr=0.01, warmup_iters=1, steps=[4], save_every=1,
                           compare_random=False, norm="bn", **TINY, test_size=64)
        data = detection._check_data(shards, cfg, world)
        try:
            detection.train_one(cfg, "random", "resnet18", None, "random", data, tmpdir, None)
            msg = "finished"
        except NonFiniteLossError as exc:
            msg = str(exc)
        open(f"{tmpdir}/rank{rank}.txt", "w").write(msg)
    finally:
        tdist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path, tiny_shards):
    import socket

    import torch.multiprocessing as mp

    from components.engine import checkpoint as ckpt

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nan_rank_worker, args=(2, port, str(tiny_shards), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert "non-finite loss at step 2 on 2 rank(s)" in (tmp_path / f"rank{r}.txt").read_text()
    (run_dir,) = (tmp_path / "random").iterdir()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)][-1] == 2  # nothing after the bad step was saved
