"""SIPE method module (``chenqi1126/SIPE``): backbone strides, freezing, fixed BN, training loss, inference, FSAE
view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_core.methods import fsae, sipe
from wsss_core.methods import sipe_ops as ops
from wsss_core.models.backbones import build_resnet

CFG = {"backbone": {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 16, "weights": None},
       "lr": 0.1, "weight_decay": 1e-4, "head_lr_mult": 10.0}


def _model(n=5, seed=0):
    torch.manual_seed(seed)
    return sipe.build_model(CFG, n)


def _batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.zeros(n, 5)
    y[0, [0, 3]] = 1
    y[1:, 1] = 1
    valid = torch.ones(n, 1, size, size)
    valid[:, :, size - 16:] = 0
    return {"image": x, "label": y, "valid": valid}


def test_backbone_strides_are_2221_without_dilation():
    b = build_resnet("resnet50", layers=[1, 1, 1, 1], width_per_group=16, dilated=False).eval()
    f = b.forward_features(torch.zeros(1, 3, 281, 500))
    assert tuple(f["layer3"].shape[-2:]) == (18, 32) and tuple(f["layer4"].shape[-2:]) == (18, 32)
    assert tuple(f["layer2"].shape[-2:]) == (36, 63)
    assert all(m.dilation == (1, 1) for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError):
        build_resnet("resnet50", output_stride=8, dilated=False)


def test_forward_shapes_512_and_odd_size():
    m = _model().eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 512, 512))
        assert out["norm_cam"].shape == (1, 6, 32, 32) and out["is_cam"].shape == (1, 6, 32, 32)
        assert out["hie_fea"].shape == (1, 768, 32, 32) and out["score"].shape == (1, 5)
        assert m(torch.randn(1, 3, 281, 500))["is_cam"].shape[-2:] == (18, 32)


def test_bn_stays_in_eval_mode_and_affine_is_trainable():
    m = _model().train()
    bns = [x for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns)
    assert all(bn.weight.requires_grad for bn in bns if bn is not m.backbone.bn1)
    assert not m.backbone.bn1.weight.requires_grad and not m.backbone.conv1.weight.requires_grad
    before = [bn.running_mean.clone() for bn in bns]
    sipe.training_step(m, _batch(), 0, CFG)["loss"].backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))  # fixed statistics


def test_gradients_reach_layer3_4_heads_but_not_stem_layer1_layer2():
    m = _model().train()
    out = sipe.training_step(m, _batch(), 0, CFG)
    assert torch.isfinite(out["loss"]) and torch.allclose(out["loss"], out["loss_cls"] + out["loss_gsc"])
    out["loss"].backward()
    b = m.backbone
    for mod in (b.conv1, b.layer1, b.layer2):
        assert all(p.grad is None for p in mod.parameters())
    for mod in (b.layer3, b.layer4, m.classifier, m.side1, m.side2, m.side3, m.side4):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_side_convs_only_get_gradients_from_the_is_cam_side():
    """hie_fea reads detached stage outputs: a loss on hie_fea alone trains side1-4 and nothing else."""
    m = _model().train()
    f = m.features(torch.randn(1, 3, 64, 64))
    f["hie_fea"].sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for s in (m.side1, m.side2, m.side3, m.side4) for p in s.parameters())


def test_lowres_valid_masks_absent_classes_and_padding():
    batch = _batch(size=64)
    v = sipe.lowres_valid(batch["valid"], batch["label"], (4, 4), batch["image"])
    assert v.shape == (2, 6, 4, 4)
    assert torch.all(v[0, [2, 3, 5]] == 0) and torch.all(v[0, [0, 1, 4], :3] == 1)
    assert torch.all(v[:, :, 3] == 0)  # the padded bottom rows (48..63 -> row 3)


def test_training_norm_cam_is_masked_and_gsc_matches_ops():
    m = _model().train()
    batch = _batch()
    mask = sipe.lowres_valid(batch["valid"], batch["label"], (4, 4), batch["image"])
    out = m(batch["image"], mask)
    assert torch.all(out["norm_cam"][mask == 0] == 0)
    assert torch.all(out["is_cam"][:, 1:][mask[:, 1:].amax((2, 3)) == 0] == 0)  # absent class: zero prototype
    loss = sipe.training_step(m, batch, 0, CFG)
    assert torch.allclose(loss["loss_gsc"], ops.gsc_loss(out["norm_cam"], out["is_cam"]))


def test_param_groups_poly_sgd_quirk():
    m = _model()
    g = sipe.build_optimizer(m, CFG).param_groups
    assert [x["lr"] for x in g] == [0.1, 1.0] and all(x["momentum"] == 1e-4 for x in g)
    assert all(x["weight_decay"] == 1e-4 for x in g)
    assert sipe.build_optimizer(m, {**CFG, "fix_quirk": True, "momentum": 0.9}).param_groups[0]["momentum"] == 0.9
    n_new = sum(p.numel() for x in m.new_layers for p in x.parameters())
    assert sum(p.numel() for p in g[1]["params"]) == n_new


def test_infer_cams_keys_range_and_flip_fusion():
    m = _model().eval()
    rng = np.random.default_rng(0)
    img = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    keys, cams, aux = sipe.infer_cams(m, img, [2, 4], [1.0, 0.5], True, torch.device("cpu"))
    assert keys.tolist() == [0, 2, 4] and aux is None
    assert cams.shape == (3, 40, 56) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    # flip fusion sums logits of [img, flip img]: a symmetric image gives a symmetric fused map
    sym = np.concatenate([img[:, :28], img[:, :28][:, ::-1]], 1)
    _, c_sym, _ = sipe.infer_cams(m, np.ascontiguousarray(sym), [1, 2, 3, 4, 5], [1.0], True, torch.device("cpu"))
    assert np.allclose(c_sym, c_sym[:, :, ::-1], atol=1e-4)


def test_fuse_scales_sums_then_max_normalises():
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0, 0, 0] = 2.0
    a[0, 1] = 1.0
    b = torch.zeros(1, 2, 1, 1)
    out = sipe.fuse_scales([a, b], (2, 2))
    assert torch.isclose(out[0].max(), torch.tensor(2 / (2 + 1e-5))) and torch.allclose(out[1], torch.full((2, 2), 1 / (1 + 1e-5)))


def test_cam_logits_for_fsae_bg_first_and_confident_after_tau():
    m = _model().eval()
    batch = _batch()
    with torch.no_grad():
        z, bg = sipe.cam_logits(m, batch["image"], label=batch["label"], valid=batch["valid"])
    assert bg == 0 and z.shape == (2, 6, 4, 4)
    assert z.min() >= 0 and z.max() <= 1 / sipe.FSAE_TAU + 1e-4
    with pytest.raises(ValueError):
        sipe.cam_logits(m, batch["image"])


def test_fsae_wraps_sipe_and_passes_labels_and_valid():
    cfg = {**CFG, "fsae": {"base": "sipe"}}
    torch.manual_seed(0)
    model = fsae.build_model(cfg, 5)
    batch = _batch()
    batch["image_strong"] = batch["image"] + 0.1 * torch.randn_like(batch["image"])
    out = fsae.training_step(model, batch, 0, cfg)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["loss_sup"] + out["loss_pl"])
    assert fsae.data_needs(cfg)["valid"] and fsae.data_needs(cfg)["strong"]
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    img = (np.random.default_rng(1).random((32, 40, 3)) * 255).astype(np.uint8)
    keys, cams, _ = fsae.infer_cams(model.eval(), img, [1, 2], [1.0], True, torch.device("cpu"))
    assert keys.tolist() == [0, 1, 2] and cams.shape == (3, 32, 40)


def test_is_cam_in_unit_interval_with_max_one_per_seeded_class_after_fusion():
    """SIPE ``Net.reactivate`` + ``make_cam.py::_work``: IS-CAM = ReLU(cos) in [0, 1]; after the scale fusion each
    channel with a seed peaks at ~1."""
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 16, 6, 7, generator=g)
    cams = torch.rand(1, 4, 6, 7, generator=g)
    seeds = ops.structure_seeds(cams, feat, torch.ones(1, 4, 1, 1))
    iscam = ops.is_cam(feat, ops.prototypes(seeds, feat))
    assert iscam.min() >= 0 and iscam.max() <= 1 + 1e-6
    fused = sipe.fuse_scales([iscam, iscam[:, :, ::2, ::2]], (12, 14))
    seeded = seeds.flatten(2).amax(-1)[0] > 0
    assert seeded.any()
    peaks = fused.flatten(1).amax(1)
    assert torch.all(peaks[seeded] >= 0.9999) and torch.all(peaks <= 1) and fused.min() >= 0
    # a seed pixel's own feature is where its prototype points when the seed is a single pixel
    one = torch.zeros(1, 4, 6, 7)
    one[0, 2, 3, 4] = 1
    proto_cam = ops.is_cam(feat, ops.prototypes(one, feat))
    assert torch.isclose(proto_cam[0, 2, 3, 4], torch.tensor(1.0), atol=1e-5) and torch.all(proto_cam[0, [0, 1, 3]] == 0)
