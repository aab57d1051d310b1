"""ReCo's DeepLabv3+: the module structure of its ASPP (the released network has no dropout there) and that the
training forward is deterministic once BatchNorm statistics are fixed."""
from __future__ import annotations

import torch
from torch import nn

from components.transfer.segment.models import DeepLabV3Plus


def test_aspp_has_no_dropout_and_ends_in_conv_bn_relu():
    model = DeepLabV3Plus(arch="resnet18", num_classes=5, aspp_channels=32, low_channels=8, decoder_channels=16,
                          rep_dim=8)
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in model.modules())
    kinds = [type(m) for m in model.aspp.project]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert len(model.aspp.convs) == 5  # 1x1, three atrous rates, image pooling
    # train mode with frozen BN statistics: two forwards agree, so nothing random drops features
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = model(x, train_logits=True), model(x, train_logits=True)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["rep"], b["rep"], rtol=0, atol=0)
