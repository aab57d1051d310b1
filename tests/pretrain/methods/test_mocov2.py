"""MoCo v2 (the image-level baseline): the loss against the paper's formula written as a loop, the queue as a ring
buffer, shuffle BN, 2 gloo ranks == 1 process on the concatenated batch, and runs through the engine (the loss
falls, exact resume, export into torchvision, unsup_seg / viz on its last.pt)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from components.config import PretrainConfig
from components.pretrain.methods.mocov2.losses import enqueue, info_nce_queue, shuffle_plan
from components.engine.trainer import ddp_ready, uses_sync_bn, wrap_model
from components.pretrain.methods.mocov2.method import MocoV2Method
from components.pretrain.methods.mocov2.model import MoCoV2
from components.pretrain.methods.slotcon.method import SlotConMethod

MODEL_KW = dict(arch="resnet18", dim_hidden=32, dim=16, queue_size=12, temperature=0.2)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------------
# the loss and the queue, against plain formulas
# --------------------------------------------------------------------------------------------------------------------
def _loop_info_nce(q, k, queue, tau):
    """MoCo Eq. 1 sample by sample: -log(exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t))), averaged."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("n,kq,d,tau", [(1, 1, 4, 0.2), (5, 7, 8, 0.2), (6, 32, 16, 0.07), (3, 9, 128, 1.0)])
def test_info_nce_matches_the_loop_formula(n, kq, d, tau):
    g = torch.Generator().manual_seed(n * 100 + kq)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(kq, d, generator=g, dtype=torch.float64), dim=1)
    loss, logits = info_nce_queue(q.float(), k.float(), queue.float(), tau)
    assert loss.item() == pytest.approx(_loop_info_nce(q, k, queue, tau), rel=1e-5, abs=1e-5)
    assert logits.shape == (n, 1 + kq)
    torch.testing.assert_close(logits[:, 0], ((q * k).sum(1) / tau).float(), rtol=1e-5, atol=1e-5)


def test_info_nce_gradient_flows_to_the_query_only():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    info_nce_queue(q, k, queue, 0.2)[0].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None  # keys and negatives are constants (stop-gradient)


def test_enqueue_is_a_ring_buffer_of_the_newest_keys():
    queue = torch.zeros(6, 2)
    ptr = torch.zeros((), dtype=torch.long)
    seen = []
    for step in range(5):
        keys = torch.full((2, 2), float(step + 1))
        queue, ptr = enqueue(queue, ptr, keys)
        seen.append(step + 1)
        assert int(ptr) == 2 * (step + 1) % 6
        # the queue holds exactly the last three batches, each where it was written
        newest = seen[-3:]
        assert sorted(set(queue[:, 0].tolist()) - {0.0}) == sorted(newest)
    assert queue[:, 0].tolist() == [4, 4, 5, 5, 3, 3]  # step 4 overwrote slots 0-1, step 5 slots 2-3
    with pytest.raises(ValueError, match="not a multiple"):
        enqueue(torch.zeros(5, 2), torch.zeros((), dtype=torch.long), torch.zeros(2, 2))


def test_shuffle_plan_is_a_permutation_with_its_inverse():
    perm, unperm = shuffle_plan(12, 4, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(12)) and torch.equal(perm[unperm], torch.arange(12))
    again, _ = shuffle_plan(12, 4, torch.Generator().manual_seed(3))
    assert torch.equal(perm, again)  # same seed on every rank -> same permutation, no broadcast needed
    with pytest.raises(ValueError, match="not divisible"):
        shuffle_plan(10, 4, torch.Generator())


def test_shuffle_bn_keys_do_not_depend_on_the_permutation_in_eval_mode():
    """Shuffling only changes which samples share BN statistics: with BN on running stats, keys are identical."""
    torch.manual_seed(0)
    model = MoCoV2(**MODEL_KW, bn_splits=2).eval()
    x = torch.randn(4, 3, 64, 64)
    a = model._keys(x, torch.tensor([2, 0, 3, 1]), None, 0, 1)
    b = model._keys(x, None, None, 0, 1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == 1 process on the whole batch
# --------------------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, inp: dict) -> dict:
    from components import dist

    device = torch.device("cuda", rank) if inp.get("backend") == "nccl" else torch.device("cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare at float32
    inp = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) if k != "backend" else v
           for k, v in inp.items()}
    b = inp["view1"].shape[0] // world
    half = slice(rank * b, (rank + 1) * b)
    # (a) the queue alone: every rank enqueues its own keys -> the queue of the concatenated batch, everywhere
    q_alone, p_alone = enqueue(inp["queue"], inp["ptr"], inp["keys"][half], gather=dist.gather_cat)
    # (b) the whole model as the engine wraps it, BN in train mode: one BN group per rank == 2 groups in one process
    torch.manual_seed(0)
    model = MoCoV2(**MODEL_KW, bn_splits=1).to(device)
    model.train()
    ddp, model = wrap_model(model, device, sync_bn=MocoV2Method.sync_bn)
    sync_bn_modules = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in ddp.modules())
    outs = []
    for step in range(2):  # two steps: the second sees the keys the first enqueued
        out = ddp(inp["view1"][half], inp["view2"][half], perm=inp["perms"][step], gather=dist.gather_cat,
                  rank=rank, world=world)
        if step == 0:
            out["loss"].backward()
        outs.append({k: dist.all_reduce_mean(v.detach()).cpu() for k, v in out.items()})
    return {"queue_alone": q_alone.cpu(), "ptr_alone": p_alone.cpu(), "outs": outs, "queue": model.queue.cpu(),
            "ptr": model.queue_ptr.cpu(), "sync_bn_modules": sync_bn_modules,
            "grads": {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}}


def _ddp_inputs(world: int, b: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"view1": torch.randn(world * b, 3, 64, 64, generator=g),
            "view2": torch.randn(world * b, 3, 64, 64, generator=g),
            "keys": F.normalize(torch.randn(world * b, 16, generator=g), dim=1),
            "queue": F.normalize(torch.randn(12, 16, generator=g), dim=1), "ptr": torch.tensor(6),
            "perms": [torch.randperm(world * b, generator=g) for _ in range(2)]}


@pytest.mark.ddp
def test_ddp_two_processes_equal_one_process(gloo_ranks):
    world, b = 2, 3
    inp = _ddp_inputs(world, b)
    _check_two_ranks_equal_one_process(inp, gloo_ranks(_ddp_worker, inp, world))


@pytest.mark.gpu
@pytest.mark.ddp
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_ddp_keeps_per_process_batchnorm(gloo_ranks):
    """On NCCL the engine's wrapping keeps plain per-process BatchNorm for MoCo v2 (shuffle BN needs it): 2 GPU
    processes equal one process with two BN groups, as on gloo."""
    world, b = 2, 3
    inp = _ddp_inputs(world, b)
    ranks = gloo_ranks(_ddp_worker, {**inp, "backend": "nccl"}, world, backend="nccl")
    assert all(r["sync_bn_modules"] == 0 for r in ranks)
    _check_two_ranks_equal_one_process(inp, ranks, atol=1e-4)


def test_moco_keeps_per_process_batchnorm_under_cuda_ddp():
    """The engine's BN decision for a 2-process CUDA run: MoCo v2's model keeps plain BatchNorm (per-process
    statistics, as the released code's plain DDP), while SlotCon's converts to SyncBatchNorm (as its release)."""
    cuda_ready = ddp_ready(MoCoV2(**MODEL_KW), "cuda", 2, sync_bn=MocoV2Method.sync_bn)
    kinds = {type(m) for m in cuda_ready.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds
    slotcon_ready = ddp_ready(MoCoV2(**MODEL_KW), "cuda", 2, sync_bn=SlotConMethod.sync_bn)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in slotcon_ready.modules())
    assert not uses_sync_bn("cpu", 2, True) and not uses_sync_bn("cuda", 1, True) and uses_sync_bn("cuda", 2, True)


def _check_two_ranks_equal_one_process(inp: dict, ranks: list[dict], atol: float = 1e-5) -> None:
    """What 2 ranks of :func:`_ddp_worker` returned equals one CPU process on the concatenated batch."""
    # (a) enqueue across ranks == enqueue of the concatenated keys (wrapping to slot 0 after slot 11)
    q_full, p_full = enqueue(inp["queue"], inp["ptr"], inp["keys"])
    assert int(p_full) == 0
    for r in ranks:
        torch.testing.assert_close(r["queue_alone"], q_full, rtol=0, atol=0)
        assert int(r["ptr_alone"]) == 0

    # (b) one process, two BN groups (= the two ranks' halves; keys on the same shuffled groups): same losses,
    # same statistics, same queue after two steps, and DDP's averaged gradients == the full batch's gradients
    torch.manual_seed(0)
    model = MoCoV2(**MODEL_KW, bn_splits=2)
    model.train()
    outs = []
    for step in range(2):
        out = model(inp["view1"], inp["view2"], perm=inp["perms"][step])
        if step == 0:
            out["loss"].backward()
        outs.append({k: v.detach() for k, v in out.items()})
    for r in ranks:
        for step in range(2):
            for k in ("loss", "acc", "pos_sim", "neg_sim"):
                assert r["outs"][step][k].item() == pytest.approx(outs[step][k].item(), abs=atol), (step, k)
        torch.testing.assert_close(r["queue"], model.queue, rtol=0, atol=1e-6 if atol <= 1e-5 else atol)
        assert int(r["ptr"]) == int(model.queue_ptr) == 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"]) and not any(n.startswith("key_encoder") for n in grads)
    for name, gr in grads.items():
        for r in ranks:  # train-mode BN subtracts batch means: small true gradients carry float32 cancellation
            diff = (r["grads"][name] - gr).abs().max().item()
            assert diff <= 10 * atol * gr.abs().max().item() + 1e-7, (name, diff, gr.abs().max().item())


# --------------------------------------------------------------------------------------------------------------------
# through the engine: learning, exact resume, export, downstream
# --------------------------------------------------------------------------------------------------------------------
TINY = dict(method="mocov2", image_size=64, num_workers=0, log_every_steps=1, batch_size=16,
            mocov2=dict(arch="resnet18", dim_hidden=128, dim=32, queue_size=16, base_lr=1.0, bn_splits=2))


def _fixed_views(shards, n=16, offset=0):
    """Two augmented views of n train images from ``offset`` on (fixed seed), as the method makes them."""
    from components.data.loading.loader import iterate_samples
    from components.data.shards.stage import read_index, split_urls
    from components.pretrain.methods.mocov2.method import MOCOV2_AUGMENT
    from components.pretrain.augment import TwoViewAugment
    from components.pretrain.crops import collate_crop_params, sample_two_crops

    urls = split_urls(shards, read_index(shards)["train"])
    images = [s["image"] for _, s in zip(range(offset + n), iterate_samples(urls))][offset:]
    g = torch.Generator().manual_seed(0)
    crops = collate_crop_params([sample_two_crops(*im.shape[-2:], g, scale=(0.2, 1.0), min_overlap=0.0)
                                 for im in images])
    v = TwoViewAugment(64, **MOCOV2_AUGMENT)(images, crops, generator=g)
    return v["view1"], v["view2"]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory, run_pretrain_in):
    """A tiny MoCo v2 run through the engine (2 epochs x 3 steps) and the model it started from."""
    from components.pretrain.methods.mocov2.model import model_kwargs_from_params

    out = tmp_path_factory.mktemp("mocov2_run")
    cfg = PretrainConfig(**TINY, epochs=2, samples_per_epoch=48)
    torch.manual_seed(cfg.seed)  # what PretrainMethod.build does: the run starts from this model
    init = MoCoV2(**model_kwargs_from_params(cfg.mocov2))
    metrics = run_pretrain_in(cfg, shards, out)
    return {"out": out, "metrics": metrics, "init": init, "cfg": cfg}


@pytest.mark.slow
def test_engine_run_fills_the_queue_and_moves_the_key_encoder_by_momentum(trained):
    m = trained["metrics"]
    assert m["method"] == "mocov2" and m["steps"] == 6 and m["epochs"] == 2 and math.isfinite(m["loss"])
    last = torch.load(trained["out"] / "models" / "last.pt", weights_only=False)
    assert last["method"] == "mocov2" and last["backbone_prefix"] == "query_encoder.backbone."
    sd, init = last["model"], trained["init"].state_dict()
    assert int(sd["queue_ptr"]) == 6 * 16 % 16 == 0 and sd["queue"].shape == (16, 32)
    assert not torch.equal(sd["queue"], init["queue"])  # real keys replaced the random start
    torch.testing.assert_close(sd["queue"].norm(dim=1), torch.ones(16))
    # the key encoder moved, by momentum only: k_6 = m^6 k_0 + (1 - m) sum_s m^(5-s) q_s, so it stays close to init
    name = "backbone.conv1.weight"
    k0, k6, q6 = init[f"key_encoder.{name}"], sd[f"key_encoder.{name}"], sd[f"query_encoder.{name}"]
    assert not torch.equal(k6, k0) and not torch.equal(k6, q6)
    assert (k6 - k0).norm() < (q6 - k0).norm()
    rows = list(csv.DictReader((trained["out"] / "plots" / "loss.csv").open()))
    assert list(rows[0]) == ["epoch", "loss"] and len(rows) == 2


@pytest.mark.slow
def test_repeated_steps_lower_the_loss(shards):
    """Two fixed batches of 16 images, alternated (the queue then always holds the other batch's keys): 16 SGD steps
    with the momentum update must lower the InfoNCE loss. (A short run on fresh crops stays near chance,
    log(1 + K): MoCo's random-init embeddings are nearly parallel, cos ~0.8, and it needs far more steps.)"""
    from components.engine.ema import ema_update_
    from components.engine.optim import build_optimizer

    batches = [_fixed_views(shards, 16, offset=0), _fixed_views(shards, 16, offset=16)]
    torch.manual_seed(0)
    model = MoCoV2(arch="resnet18", dim_hidden=128, dim=32, queue_size=16, bn_splits=2).train()
    opt = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(16):
        v1, v2 = batches[step % 2]
        out = model(v1, v2, perm=torch.randperm(16, generator=g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ema_update_(*model.momentum_parameters(), 0.99)
        losses.append(out["loss"].item())
    early, late = sum(losses[1:5]) / 4, sum(losses[-4:]) / 4  # step 0 met the random initial queue
    assert late < early - 0.05, losses


@pytest.mark.slow
def test_export_loads_strictly_into_torchvision(trained, tmp_path):
    import torchvision

    from components.config import ExportConfig
    from components.transfer.export import load_backbone, run_export

    ckpt = trained["out"] / "models" / "last.pt"
    run_export(ExportConfig(register_model=False), ckpt, tmp_path / "backbone.pt")
    _, sd = load_backbone(tmp_path / "backbone.pt")
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)  # every trunk key, nothing else
    state = torch.load(ckpt, weights_only=False)["model"]
    for k, v in net.state_dict().items():  # the QUERY encoder's trunk (MoCo transfers it), not the key encoder's
        torch.testing.assert_close(v, state[f"query_encoder.backbone.{k}"], rtol=0, atol=0, msg=k)
    assert not torch.equal(state["query_encoder.backbone.conv1.weight"], state["key_encoder.backbone.conv1.weight"])


@pytest.mark.slow
def test_unsup_seg_and_viz_run_on_a_mocov2_last_pt(shards, trained, tmp_path, mlflow_store):
    import yaml

    from components.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "tracking": {"artifact_location": mlflow_store.artifact_location},
        "unsup": {"resolution": 64, "batch_size": 4},
        "viz": {"num_images": 2, "top_prototypes": 3, "num_neighbors": 2, "resolution": 64, "batch_size": 4},
    }))
    ckpt = str(trained["out"] / "models" / "last.pt")
    common = ["--params", str(params), "--shards", str(shards), "--checkpoint", ckpt]
    assert main(["unsup_seg", *common, "--metrics", str(tmp_path / "unsup.json")]) == 0
    assert main(["viz", *common, "--out", str(tmp_path / "slots"), "--metrics", str(tmp_path / "viz.json")]) == 0
    unsup, viz = json.loads((tmp_path / "unsup.json").read_text()), json.loads((tmp_path / "viz.json").read_text())
    assert unsup["clusters"] == "kmeans" and unsup["num_clusters"] == unsup["num_classes"] == 9
    assert 0 <= unsup["mIoU"] <= 1 and 0 <= unsup["random/mIoU"] <= 1 and unsup["num_images"] == 8
    assert viz["clusters"] == "kmeans" and viz["num_clusters"] == 9 and viz["num_images"] == 8
    assert (tmp_path / "slots" / "assignments.png").stat().st_size > 0


@pytest.mark.slow
def test_exact_resume_equals_straight_run(shards, tmp_path, run_pretrain_in):
    """6 steps straight == 2 steps + 'kill' + resume + 4 steps: per-step figures, weights, queue and pointer."""
    cfg = PretrainConfig(**{**TINY, "mocov2": dict(TINY["mocov2"], warmup_epochs=1)}, epochs=2,
                         samples_per_epoch=48, save_every_steps=2)
    straight: dict[int, dict] = {}
    run_pretrain_in(cfg, shards, tmp_path / "a", on_step=lambda s, st: straight.setdefault(s, st))
    resumed: dict[int, dict] = {}
    assert run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st),
                           stop_after_step=2) == {"stopped_at_step": 2}
    torch.manual_seed(12345)  # the process's RNG moved on: resume must restore what it needs
    metrics = run_pretrain_in(cfg, shards, tmp_path / "b", on_step=lambda s, st: resumed.setdefault(s, st))
    assert metrics["resumed"] and metrics["steps_this_run"] == 4
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for s in straight:
        for k in ("loss", "acc", "pos_sim", "neg_sim", "lr", "momentum"):
            assert resumed[s][k] == pytest.approx(straight[s][k], abs=1e-6), (s, k)
    a = torch.load(tmp_path / "a" / "models" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "models" / "last.pt", weights_only=False)["model"]
    assert set(a) == set(b) and int(a["queue_ptr"]) == int(b["queue_ptr"])
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6, msg=k)


def test_bad_queue_and_splits_are_user_errors(shards, tmp_path, run_pretrain_in):
    from components.errors import UserError

    from components.config import parse_section

    base = dict(TINY, epochs=1, samples_per_epoch=48)
    # the batch rules are the params validator's (what `slotcon check` runs too); the data-dependent one the stage's
    with pytest.raises(UserError, match="pretrain.mocov2.queue_size=24 must be a multiple of batch_size=16"):
        parse_section("pretrain", dict(base, mocov2=dict(TINY["mocov2"], queue_size=24)))
    with pytest.raises(UserError, match="exceeds the 48 samples per epoch"):
        run_pretrain_in(PretrainConfig(**dict(base, mocov2=dict(TINY["mocov2"], queue_size=64))), shards, tmp_path)
    with pytest.raises(UserError, match="pretrain.mocov2.bn_splits=3 must divide"):
        parse_section("pretrain", dict(base, mocov2=dict(TINY["mocov2"], bn_splits=3)))
