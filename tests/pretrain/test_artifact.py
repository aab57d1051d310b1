"""``last.pt`` as :class:`PretrainArtifact` (round trip, files without ``method``, compare's random init, step
checkpoints), :func:`load_pretrained`, and the EMA teacher of :class:`PretrainMethod`."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from components import compare as cmp
from components.config import PretrainConfig
from components.engine import checkpoint as ckpt
from components.engine.ema import ema_update_
from components.errors import UserError
from components.pretrain.artifact import LEGACY_METHOD, PretrainArtifact
from components.pretrain.method import PretrainMethod
from components.pretrain.registry import load_pretrained, method_class, open_pretrained
from components.pretrain.methods.mocov2.method import MocoV2Method
from components.pretrain.plan import Plan

SLOTCON_KWARGS = dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)
KEYS = ["model", "model_kwargs", "method", "arch", "backbone_prefix", "epoch", "step", "history", "config",
        "fingerprint_hash", "metrics"]


def _plan() -> Plan:
    return Plan(urls=("s.tar",), num_images=4, samples_per_epoch=4, world_size=1, rank=0, global_batch=4,
                rank_batch=4, steps_per_epoch=1, total_steps=10, warmup_steps=0, data_signature="x",
                shard_samples=(4,))


# --------------------------------------------------------------------------------------------------------------------
# the artifact
# --------------------------------------------------------------------------------------------------------------------
def test_round_trip_writes_the_same_keys_and_loads_back(tmp_path):
    cfg = PretrainConfig()
    model = torch.nn.Linear(3, 2)
    art = PretrainArtifact(model=model.state_dict(), model_kwargs={"arch": "resnet18", "dims": (3, 2)},
                           method="sim", arch="resnet18", backbone_prefix="student_encoder.", epoch=2, step=6,
                           history=[{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 1.25}], config=cfg.model_dump(),
                           fingerprint_hash="abc123", metrics={"loss": 1.25, "lost_fraction": float("nan"),
                                                                "resumed": False, "method": "sim"})
    path = tmp_path / "last.pt"
    art.save(path)
    raw = torch.load(path, weights_only=True)  # plain tensors and containers: the restricted unpickler reads it
    assert list(raw) == KEYS
    assert raw["method"] == "sim" and raw["step"] == 6 and raw["history"] == art.history
    back = PretrainArtifact.load(path)
    assert back.method == "sim" and back.backbone_prefix == "student_encoder." and back.config == art.config
    assert back.epoch == 2 and back.fingerprint_hash == "abc123" and back.extra == {}
    assert math.isnan(back.metrics["lost_fraction"]) and back.metrics["loss"] == 1.25
    assert back.model.keys() == art.model.keys()
    assert all(torch.equal(back.model[k], v) for k, v in art.model.items())
    assert PretrainArtifact.method_of(path) == "sim"


def test_a_file_without_method_loads_as_slotcon(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_kwargs": SLOTCON_KWARGS, "arch": "resnet18", "step": 3}, path)
    art = PretrainArtifact.load(path)
    assert art.method == LEGACY_METHOD == "slotcon"
    assert art.step == 3 and art.backbone_prefix is None and art.history is None and art.extra == {}
    assert PretrainArtifact.method_of(path) == "slotcon"
    assert PretrainArtifact.method_of(tmp_path / "missing.pt") == "slotcon"
    art.save(tmp_path / "again.pt")  # unset fields stay absent on disk
    assert set(torch.load(tmp_path / "again.pt", weights_only=True)) == {"model", "model_kwargs", "method", "arch",
                                                                         "step"}


def test_random_init_of_compare_is_an_artifact(tmp_path):
    path = cmp.write_random_init(tmp_path, arch="resnet18", seed=3)
    art = PretrainArtifact.load(path)
    assert art.method == "mocov2" and art.arch == "resnet18" and art.step == 0 and art.epoch == 0
    assert art.backbone_prefix == MocoV2Method.backbone_prefix and art.extra == {"init": "random", "seed": 3}
    loaded = open_pretrained(path)
    assert loaded.method is MocoV2Method and loaded.artifact.model_kwargs == art.model_kwargs
    assert not loaded.model.training


def test_a_step_checkpoint_still_loads_and_says_what_it_lacks(tmp_path):
    """RNG states (numpy arrays, Python tuples) need the full unpickler: the artifact falls back to it, so such a
    file gets the message about what it lacks, not an unpickling error."""
    state = {"model": {"w": torch.zeros(2)}, "step": 4, "rank_states": [{"python": random.getstate(),
                                                                         "numpy": np.random.get_state()}]}
    ckpt.save_checkpoint(state, tmp_path, 4)
    path = ckpt.checkpoint_path(tmp_path, 4)
    art = PretrainArtifact.load(path)
    assert art.step == 4 and "rank_states" in art.extra and art.extra["format"] == ckpt.FORMAT_VERSION
    with pytest.raises(UserError, match="no 'model_kwargs' entry"):
        load_pretrained(path)


def test_load_pretrained_roundtrip_and_errors(tmp_path):
    from components.pretrain.methods.slotcon.model import SlotCon

    kwargs = SLOTCON_KWARGS
    torch.manual_seed(0)
    model = SlotCon(**kwargs)
    path = tmp_path / "last.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "model_kwargs": kwargs}, path)
    loaded = load_pretrained(path)
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(loaded.teacher_scores(x), model.teacher_scores(x))

    with pytest.raises(UserError, match="not found"):
        load_pretrained(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.pt"):
        load_pretrained(tmp_path / "bad.pt")
    torch.save({"model": model.state_dict(), "model_kwargs": dict(kwargs, num_prototypes=4)}, tmp_path / "mis.pt")
    with pytest.raises(UserError, match="do not match"):
        load_pretrained(tmp_path / "mis.pt")


# --------------------------------------------------------------------------------------------------------------------
# the EMA teacher
# --------------------------------------------------------------------------------------------------------------------
class _TeacherStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student, self.teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def ema_parameters(self):
        return list(self.teacher.parameters()), list(self.student.parameters())


class _Tiny(PretrainMethod):
    name = "tiny"
    model_class = _TeacherStudent


@pytest.mark.parametrize("m", [0.5, 0.9, 0.996])
def test_ema_helper_is_the_plain_formula(m):
    method = _Tiny(PretrainConfig(), _plan(), torch.device("cpu"))
    torch.manual_seed(0)
    model = method.model_from_kwargs({})
    for _ in range(3):  # the lists are built once, then reused: still the same tensors
        t0 = [p.detach().clone() for p in model.teacher.parameters()]
        s0 = [p.detach().clone() for p in model.student.parameters()]
        method.after_update(model, 0, m)
        for p, t, s in zip(model.teacher.parameters(), t0, s0):
            torch.testing.assert_close(p.detach(), m * t + (1 - m) * s, rtol=0, atol=1e-6)
        with torch.no_grad():
            for p in model.student.parameters():
                p.add_(1.0)  # the student moves between steps
    other = method.model_from_kwargs({})  # a new model object: its own lists
    before = [p.detach().clone() for p in other.teacher.parameters()]
    method.after_update(other, 1, 0.0)
    assert all(torch.equal(p.detach(), s.detach()) for p, s in zip(other.teacher.parameters(),
                                                                     other.student.parameters()))
    assert not all(torch.equal(p.detach(), b) for p, b in zip(other.teacher.parameters(), before))


def test_ema_helper_matches_ema_update_bitwise_for_every_method():
    """Each method's pairs (MoCo v2: the key encoder follows the query encoder) through the shared helper are the
    exact arithmetic of components.engine.ema.ema_update_."""
    cfgs = {"slotcon": PretrainConfig(image_size=64, slotcon=SLOTCON_KWARGS),
            "mocov2": PretrainConfig(method="mocov2", image_size=64, batch_size=4,  # the plan's batch
                                     mocov2=dict(arch="resnet18", dim_hidden=16, dim=8, queue_size=4, bn_splits=1)),
            "sim": PretrainConfig(method="sim", image_size=64, sim=dict(arch="vit_demo_16", decoder_dim=32,
                                                                        decoder_heads=2))}
    for name, pairs in (("slotcon", lambda mdl: mdl.ema_parameters()), ("sim", lambda mdl: mdl.ema_parameters()),
                        ("mocov2", lambda mdl: mdl.momentum_parameters())):
        method = method_class(name)(cfgs[name], _plan(), torch.device("cpu"))
        torch.manual_seed(0)
        a, b = method.build_model(), method.build_model()
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            for mdl in (a, b):
                for p in pairs(mdl)[1]:
                    p.add_(0.1)  # student != teacher
        method.after_update(a, 0, 0.99)
        ema_update_(*pairs(b), 0.99)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), name


# --------------------------------------------------------------------------------------------------------------------
# each method's optimiser rule and warm-up, as its released code
# --------------------------------------------------------------------------------------------------------------------
def test_each_method_decays_and_warms_up_as_its_released_code():
    """MoCo v2: SGD decays every parameter (BN and biases too: ``SGD(model.parameters(), weight_decay=1e-4)``), no
    warm-up. SlotCon: LARS exempts 1-D tensors, warm-up from lr/100. SIM: warm-up from 0 (``util/lr_sched.py``)."""
    from components.pretrain.methods.sim.method import SimMethod
    from components.pretrain.methods.slotcon.method import SlotConMethod

    plan = Plan(urls=("s.tar",), num_images=40, samples_per_epoch=40, world_size=1, rank=0, global_batch=4,
                rank_batch=4, steps_per_epoch=10, total_steps=30, warmup_steps=10, data_signature="x",
                shard_samples=(40,))
    cfg = PretrainConfig(method="mocov2", image_size=64, batch_size=4,
                         mocov2=dict(arch="resnet18", dim_hidden=32, dim=16, queue_size=8, bn_splits=1))
    moco = MocoV2Method(cfg, plan, torch.device("cpu"))
    model = moco.build_model()
    opt = moco.optimizer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for g in opt.param_groups if g["weight_decay"] == cfg.mocov2.weight_decay for p in g["params"]]
    assert len(decayed) == len(trainable) and any(p.ndim == 1 for p in decayed)  # BN weights and biases included
    assert PretrainConfig(method="mocov2").warmup_epochs == 0
    assert moco.lr_at(0) == pytest.approx(moco.peak_lr / 100)  # the engine's shared start, when a warm-up is set
    sim = SimMethod(PretrainConfig(method="sim", image_size=64, batch_size=4, sim=dict(decoder_dim=32, decoder_heads=2)),
                    plan, torch.device("cpu"))
    assert sim.lr_at(0) == 0.0 and sim.lr_at(5) == pytest.approx(sim.peak_lr * 0.5)
    assert SlotConMethod.warmup_start_factor == pytest.approx(0.01)
