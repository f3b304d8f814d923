"""GPU paths (skipped without CUDA): training steps with bf16 autocast, the GPU lease with real devices."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cam_training_step_bf16_on_cuda():
    from wsss_core.methods import get_method

    m = get_method("cam")
    cfg = {"backbone": {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 16, "weights": None},
           "lr": 0.01, "head_lr_mult": 10.0}
    dev = torch.device("cuda")
    model = m.build_model(cfg, 20).to(dev)
    opt = torch.optim.SGD(m.param_groups(model, cfg), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 128, 128, device=dev)
    y = (torch.rand(4, 20, device=dev) > 0.8).float()
    losses = []
    for step in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.training_step(model, {"image": x, "label": y}, step, cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    cams = m.cam_forward(model, x)
    assert cams.device.type == "cuda" and cams.shape == (4, 20, 8, 8) and (cams >= 0).all()


def test_deeplab_forward_backward_on_cuda():
    from wsss_core.models import build_deeplabv2

    model = build_deeplabv2(21, {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 16}).cuda()
    x = torch.randn(2, 3, 96, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x, upsample=True)
    assert logits.shape == (2, 21, 96, 96)
    logits.float().mean().backward()
