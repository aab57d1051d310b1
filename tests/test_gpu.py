"""The fast path on a CUDA device (marker ``gpu``; skipped without one; `make gpu-check` runs them):

- nvJPEG batch decode gives the CPU decoder's pixels (libjpeg-turbo and nvJPEG may round IDCTs differently: a few
  levels at most);
- the two-view augmentation on CUDA equals the same draws on the CPU;
- a bf16-autocast SlotCon step stays close to fp32 over a few steps;
- a ``torch.compile``d step equals the eager one.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 64 + 8 * i, 80 - 4 * i
        low = rng.uniform(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        if i == 1:
            img = img.convert("L")  # COCO has grayscale JPEGs
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def test_nvjpeg_batch_decode_matches_cpu_decode():
    from components.data.loading.decode import decode_images
    from components.data.loading.loader import decode_rgb

    data = _jpegs(4)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    gpu = decode_images(tensors, torch.device("cuda"))
    for b, g in zip(data, gpu):
        ref = decode_rgb(b)
        assert g.is_cuda and g.shape == ref.shape and g.dtype == torch.uint8
        assert (g.cpu().int() - ref.int()).abs().max().item() <= 4


def _views_inputs(b: int = 4):
    from components.pretrain.crops import collate_crop_params, sample_two_crops

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 72 + 4 * i, 96), generator=g, dtype=torch.uint8) for i in range(b)]
    params = collate_crop_params([sample_two_crops(im.shape[1], im.shape[2], g) for im in images])
    return images, params


def test_device_augmentation_on_cuda_equals_cpu():
    from components.pretrain.augment import TwoViewAugment

    images, params = _views_inputs()
    aug = TwoViewAugment(48)
    cpu = aug(images, params, generator=torch.Generator().manual_seed(5))
    cuda = aug.to("cuda")([im.cuda() for im in images], {k: v.cuda() for k, v in params.items()},
                          generator=torch.Generator().manual_seed(5))
    for k in cpu:
        torch.testing.assert_close(cuda[k].cpu().float(), cpu[k].float(), rtol=0, atol=2e-3, msg=k)


def _slotcon_steps(amp: bool, steps: int = 3, compiled: bool = False) -> list[float]:
    from components.pretrain.augment import TwoViewAugment
    from components.pretrain.methods.slotcon.model import SlotCon
    from components.engine.ema import ema_update_
    from components.engine.optim import LARS

    torch.manual_seed(0)
    model = SlotCon(**TINY).cuda().train()
    if compiled:
        model.student_encoder.compile()
        model.teacher_encoder.compile()
    opt = LARS([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=1e-5)
    images, params = _views_inputs(8)
    aug = TwoViewAugment(64).cuda()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        views = aug([im.cuda() for im in images], {k: v.cuda() for k, v in params.items()}, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(**views)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        ema_update_(*model.ema_parameters(), 0.99)
        losses.append(float(out["loss"]))
    return losses


def test_bf16_loss_stays_close_to_fp32_over_a_few_steps():
    fp32, bf16 = _slotcon_steps(False), _slotcon_steps(True)
    assert all(np.isfinite(bf16))
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.05 * abs(a) + 0.02, (fp32, bf16)


def test_compiled_step_equals_eager():
    eager, compiled = _slotcon_steps(False), _slotcon_steps(False, compiled=True)
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-4, (eager, compiled)
