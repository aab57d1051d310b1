"""SlotCon model: tiny forward/backward, which parameters learn, teacher/EMA bookkeeping, torchvision key names,
downstream accessors, channels_last, and the augmentation → model hand-off."""
from __future__ import annotations

import pytest
import torch
import torchvision

from components.config import PretrainConfig
from components.pretrain.augment import TwoViewAugment
from components.pretrain.methods.slotcon.model import SlotCon, model_kwargs_from_config
from components.pretrain.crops import collate_crop_params, sample_two_crops

TINY = dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)


def _views(batch=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, 72 + 8 * i, 80), generator=g, dtype=torch.uint8) for i in range(batch)]
    params = collate_crop_params([sample_two_crops(im.shape[1], im.shape[2], g) for im in images])
    return TwoViewAugment(size)(images, params, g)


@pytest.fixture(scope="module")
def views():
    return _views()


def test_forward_backward_tiny(views):
    torch.manual_seed(0)
    model = SlotCon(**TINY).train()
    center0 = model.center.clone()
    out = model(**views)
    assert set(out) >= {"loss", "loss_group", "loss_slot", "num_slots", "assign_entropy"}
    for k, v in out.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert out["loss"].requires_grad and not out["loss_group"].requires_grad
    expected = 0.5 * out["loss_group"] + 0.5 * out["loss_slot"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert 0 < out["assign_entropy"] <= torch.log(torch.tensor(8.0)) + 1e-5
    assert 0 < out["num_slots"] <= 8
    assert not torch.equal(model.center, center0)  # the center moved inside forward
    out["loss"].backward()
    student = list(model.student_encoder.parameters()) + [model.student_prototypes] + list(model.predictor.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    assert model.student_prototypes.grad.abs().sum() > 0
    teacher = list(model.teacher_encoder.parameters()) + [model.teacher_prototypes]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in student}


def test_teacher_is_student_copy_and_ema_lists():
    model = SlotCon(**TINY)
    teacher, student = model.ema_parameters()
    assert len(teacher) == len(student) > 0
    for t, s in zip(teacher, student):
        assert t.shape == s.shape and torch.equal(t, s) and t is not s and t.data_ptr() != s.data_ptr()
        assert not t.requires_grad and s.requires_grad
    # a foreach EMA step through these lists moves the teacher that forward uses
    torch._foreach_mul_(teacher, 0.0)
    assert model.teacher_prototypes.abs().sum() == 0 and model.student_prototypes.abs().sum() > 0


def test_backbone_keys_are_torchvision_without_fc():
    model = SlotCon(**TINY)
    tv = torchvision.models.resnet18(weights=None)
    expected = {k for k in tv.state_dict() if not k.startswith("fc.")}
    for enc in (model.student_encoder, model.teacher_encoder):
        sd = enc.backbone.state_dict()
        assert set(sd) == expected
        missing, unexpected = tv.load_state_dict(sd, strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    assert model.student_encoder.backbone(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 2, 3)


def test_teacher_scores_and_features_shapes():
    model = SlotCon(**TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    scores = model.teacher_scores(x)
    assert scores.shape == (2, 8, 2, 3) and scores.abs().max() <= 1 + 1e-5 and not scores.requires_grad
    assert model.teacher_features(x).shape == (2, 16, 2, 3)


def test_channels_last_and_identity_collectives_give_the_same_outputs(views):
    """channels_last model + inputs, and explicit identity gather/all_reduce, change nothing on one process."""
    torch.manual_seed(0)
    model = SlotCon(**TINY).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(**views)
    center_a = model.center.clone()
    model.load_state_dict(state)
    model = model.to(memory_format=torch.channels_last)
    cl = {k: (v.contiguous(memory_format=torch.channels_last) if k.startswith("view") else v) for k, v in views.items()}
    b = model(**cl, gather=lambda t: t, all_reduce=lambda t: t)
    for k in a:
        torch.testing.assert_close(a[k].detach(), b[k].detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.center, center_a, atol=1e-5, rtol=1e-5)


def test_model_kwargs_from_config_builds_the_demo_model():
    kwargs = model_kwargs_from_config(PretrainConfig())
    model = SlotCon(**kwargs)
    assert model.num_prototypes == PretrainConfig().slotcon.num_prototypes == 32
    assert model.student_prototypes.shape == (kwargs["num_prototypes"], kwargs["dim_out"])


@pytest.mark.slow
def test_bf16_autocast_forward_backward(views):
    """The GPU recipe runs under bf16 autocast: grouping and losses stay fp32, gradients are finite (CPU autocast)."""
    torch.manual_seed(0)
    model = SlotCon(**TINY).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def _force_one_slot(model: SlotCon, student_proto: int, teacher_proto: int) -> None:
    """Every pixel of every image projects to the same unit vector c (last projector conv: weight 0, bias c), and c
    is the student's prototype ``student_proto`` and the teacher's ``teacher_proto`` (the other prototypes are
    orthogonal to it): each image keeps exactly one slot per view, and a query survives only if the two agree."""
    k, d = model.student_prototypes.shape
    eye = torch.eye(d)
    with torch.no_grad():
        for enc in (model.student_encoder, model.teacher_encoder):
            enc.projector.mlp[-1].weight.zero_()
            enc.projector.mlp[-1].bias.copy_(eye[0])
        for protos, chosen in ((model.student_prototypes, student_proto), (model.teacher_prototypes, teacher_proto)):
            protos.copy_(eye[1 : k + 1])
            protos[chosen] = eye[0]


@pytest.mark.parametrize("batch,agree,queries", [(1, True, 1), (2, False, 0)])
def test_fewer_than_two_kept_queries_train_without_crash(batch, agree, queries):
    """One kept query (batch 1) would make the predictor's BatchNorm1d raise in training: the slot loss is zero there
    (and with none), and every trainable parameter still gets a gradient (DDP needs them all)."""
    torch.manual_seed(0)
    model = SlotCon(**TINY).train()
    _force_one_slot(model, 3, 3 if agree else 5)
    out = model(**_views(batch=batch, seed=batch))
    assert out["num_slots"].item() == pytest.approx(queries / batch)
    assert out["loss_slot"].item() == 0.0 and out["loss_group"].item() > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
