"""SFC as a method plug-in (``Barrett-python/SFC`` ``network/resnet50_SFC.py``, ``train_resnet50_SFC.py``,
``make_cam.py``): PCM, prototype seeds, T, the weighted loss terms, the image bank, and the method interface end to end
on a tiny CPU ResNet-50."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_images, randomize_bn
from wsss_core.errors import ConfigError
from wsss_core.methods import get_method, sfc, sipe, sipe_ops
from wsss_core.methods import sfc_ops as ops

K = 4        # foreground classes
CROP = 64


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _cfg(**sfc_kw):
    return {"backbone": {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 16, "weights": None},
            "lr": 0.01, "weight_decay": 1e-4, "crop_size": CROP, "sfc": sfc_kw}


def _model(seed=0, bn=False, **kw):
    """A tiny SFCNet; ``bn``: random BN statistics (seed 2 then gives fg seeds on image 1 of :func:`_batch`)."""
    torch.manual_seed(seed)
    model = sfc.build_model(_cfg(**kw), K)
    if bn:
        randomize_bn(model, seed)
    return model


def _batch(b=2, size=CROP, seed=0):
    label = torch.zeros(b, K)
    label[:, 0] = 1
    label[1, 2] = 1
    valid = torch.ones(b, 1, size, size)
    valid[0, :, size // 2:] = 0  # padded bottom half
    return {"image": random_images(b, size, size, seed), "label": label, "valid": valid}


# ---- PCM (network/resnet50_SFC.py::Net.PCM) ------------------------------------------------------------------

def test_pcm_affinity_column_sums_and_propagation_invariants():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 8, 3, 5, generator=g)
    aff = ops.pcm_affinity(emb)
    assert aff.shape == (2, 15, 15) and (aff >= 0).all()
    e = emb.reshape(2, 8, 15)
    e = e / (e.norm(dim=1, keepdim=True) + 1e-5)
    s = torch.relu(e.transpose(1, 2) @ e).sum(1)                     # column sums before normalising
    torch.testing.assert_close(aff.sum(1), s / (s + 1e-5))
    cam = torch.rand(2, 4, 3, 5, generator=g)
    cam[:, 1] = 0.7                                                    # spatially constant channel
    cam[:, 2] = 0.0                                                    # all-zero channel
    out = ops.pcm_refine(cam, emb)
    assert out.shape == cam.shape
    torch.testing.assert_close(out[:, 1], torch.full_like(out[:, 1], 0.7), atol=1e-4, rtol=0)
    assert out[:, 2].abs().max() == 0
    # each output pixel is a weighted average of input pixels (up to the eps): within the channel's range
    assert (out[:, 3] <= cam[:, 3].amax((1, 2))[:, None, None] + 1e-6).all()
    assert (out[:, 3] >= cam[:, 3].amin((1, 2))[:, None, None] * (1 - 1e-3)).all()
    # propagated twice: M A A
    m = cam.reshape(2, 4, 15)
    torch.testing.assert_close(out.reshape(2, 4, 15), m @ aff @ aff)


def test_pcm_with_one_hot_orthogonal_guide_is_a_scaled_identity():
    emb = torch.eye(6).reshape(1, 6, 2, 3)                            # pixel i has feature e_i
    cam = torch.rand(1, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    aff = ops.pcm_affinity(emb)
    s = (1 / (1 + 1e-5)) ** 2
    torch.testing.assert_close(aff[0], torch.eye(6) * s / (s + 1e-5))   # ~ I / (1 + 1e-5)
    torch.testing.assert_close(ops.pcm_refine(cam, emb), cam / (1 + 1e-5) ** 2, atol=1e-6, rtol=1e-6)


def test_model_pcm_guide_is_resized_image_and_undetached_x4():
    model = _model()
    x = random_images(1, 48, 40)
    x4 = model.features(x)["x4"].detach().requires_grad_(True)
    ncam = torch.rand(1, K + 1, *x4.shape[-2:])
    cam1 = model.pcm(ncam, x, x4)
    img = F.interpolate(x, size=x4.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(cam1, ops.pcm_refine(ncam, model.f9(torch.cat([img, x4], 1))))
    cam1.sum().backward()
    assert x4.grad is not None and x4.grad.abs().sum() > 0 and model.f9.weight.grad.abs().sum() > 0


# ---- prototype seeds (Net.prototype) ---------------------------------------------------------------------------

def test_prototype_seeds_bg_factor_and_masking():
    cam = torch.zeros(1, 21, 2, 2)
    cam[0, 0] = 0.9
    cam[0, 5, 0, 1] = 0.5                      # 0.9 * 0.3 = 0.27 < 0.5 -> fg seed
    before = cam.clone()
    seeds = ops.prototype_seeds(cam, torch.ones(1, 21, 1, 1))
    assert torch.equal(cam, before)           # the input is not modified
    assert seeds[0, 5, 0, 1] == 1 and seeds[0, 0, 0, 1] == 0 and seeds[0, 0].sum() == 3
    assert torch.equal(seeds.sum(1), torch.ones(1, 2, 2))
    cam[0, 7, 1, 1] = 0.8
    mask = torch.ones(1, 21, 1, 1)
    mask[0, 7] = 0                             # class 7 absent: its best pixel gets no seed at all
    seeds = ops.prototype_seeds(cam, mask)
    assert seeds[0, 7].sum() == 0 and seeds[0, :, 1, 1].sum() == 0 and seeds[0, 5, 0, 1] == 1
    # SIPE's factor 0.5 would keep the bg: 0.45 < 0.5 too, but 0.9 * 0.6 = 0.54 > 0.5 -> bg
    assert ops.prototype_seeds(cam, torch.ones(1, 21, 1, 1), bg_scale=0.6)[0, 0, 0, 1] == 1


# ---- T (make_cam.py::_work) ------------------------------------------------------------------------------------

def test_transform_t_argmax_and_ranges():
    x = torch.rand(5, 6, 7, generator=torch.Generator().manual_seed(2))
    t = ops.transform_t(x)
    ref = torch.cat([x[:1] / 2 + 0.2, x[1:]])
    assert torch.equal(t.argmax(0), ref.argmax(0))
    assert t[0].min() >= 0.4 and t[0].max() <= 1.4 and t[1:].min() >= 0 and t[1:].max() <= 2
    torch.testing.assert_close(t[0], x[0] + 0.4)
    torch.testing.assert_close(t[1:], 2 * x[1:])
    t4 = ops.transform_t(x[None], bg_add=0.1, fg_mul=3.0)
    torch.testing.assert_close(t4[0, 0], x[0] + 0.1)
    torch.testing.assert_close(t4[0, 1:], 3 * x[1:])


# ---- loss terms (train_resnet50_SFC.py::train) -------------------------------------------------------------------

def test_cross_scale_loss_zero_for_the_masked_downsample_and_linear_in_weights():
    g = torch.Generator().manual_seed(3)
    cam_a = torch.rand(2, K + 1, 8, 8, generator=g)
    label = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    down = F.interpolate(cam_a, scale_factor=0.5, mode="bilinear", align_corners=True)
    w = torch.ones(K)
    assert ops.cross_scale_loss(cam_a, down, label, w) == 0
    # absent classes do not count, whatever the second map holds there
    other = down.clone()
    other[:, 1:] += (1 - label)[:, :, None, None] * 5
    assert ops.cross_scale_loss(cam_a, other, label, w) == 0
    cam_b = torch.rand(2, K + 1, 4, 4, generator=g)
    y = label[:, :, None, None]
    per_c = ((down[:, 1:] * y - cam_b[:, 1:] * y).abs()).mean((0, 2, 3)) / K     # channel c's share of the mean
    torch.testing.assert_close(ops.cross_scale_loss(cam_a, cam_b, label, w), per_c.sum())
    w2 = torch.tensor([1.0, 3.0, 1.0, 1.0])
    torch.testing.assert_close(ops.cross_scale_loss(cam_a, cam_b, label, w2), per_c.sum() + 2 * per_c[1])


def test_weighted_gsc_equals_sipe_gsc_with_unit_weights_and_is_linear():
    g = torch.Generator().manual_seed(4)
    cam1 = torch.rand(2, K + 1, 4, 4, generator=g)
    cam2 = torch.rand(2, K + 1, 4, 4, generator=g)
    ones = torch.ones(K + 1)
    torch.testing.assert_close(ops.weighted_gsc_loss(cam1, cam2, ones), sipe_ops.gsc_loss(cam1, cam2))
    base = ops.weighted_gsc_loss(cam1, cam2, ones)
    diff = (cam1 - ops.max_normalise(cam2)).abs()
    share = diff[:, 2].mean() / (K + 1)
    w = ones.clone()
    w[2] = 0.25
    torch.testing.assert_close(ops.weighted_gsc_loss(cam1, cam2, w), base - 0.75 * share)
    w[2] = 1.0
    w[0] = 2.0  # the bg channel counts too
    torch.testing.assert_close(ops.weighted_gsc_loss(cam1, cam2, w), base + diff[:, 0].mean() / (K + 1))


# ---- image bank (train_resnet50_SFC.py::train) -----------------------------------------------------------------

def _bank(s=20, size=4):
    return torch.zeros(s, 3, size, size), torch.zeros(s, 1, size, size), torch.zeros(s, s)


def test_bank_update_last_writer_wins():
    img, val, lab = _bank()
    image = torch.arange(10.0)[:, None, None, None].expand(10, 3, 4, 4).clone()
    valid = torch.ones(10, 1, 4, 4)
    label = torch.zeros(10, 20)
    label[3, [14, 2]] = 1
    label[7, 14] = 1
    rows = ops.bank_update_(img, val, lab, image, valid, label)
    assert rows[14] == 7 and rows[2] == 3 and (rows[[0, 1, 3]] == -1).all()
    assert (img[14] == 7).all() and (img[2] == 3).all() and torch.equal(lab[14], label[7])
    assert img[0].abs().sum() == 0 and val[0].sum() == 0 and val[14].sum() == 16


def test_bank_resample_appends_chosen_slots_deterministically():
    img, val, lab = _bank()
    for s in range(20):                                           # pre-filled slots, slot s holds value s
        img[s], lab[s, s] = float(s), 1
        val[s] = s % 2
    image = 100 + torch.arange(16.0)[:, None, None, None].expand(16, 3, 4, 4).clone()
    valid = torch.ones(16, 1, 4, 4)
    label = torch.zeros(16, 20)
    label[:, 0] = 1                                               # every image contains class 0
    bank = (img.clone(), val.clone(), lab.clone())
    x, v, y = ops.bank_resample(*bank, image, valid, label, 4, ops.bank_generator(5))
    assert x.shape == (20, 3, 4, 4) and v.shape == (20, 1, 4, 4) and y.shape == (20, 20)
    g = ops.bank_generator(5)
    perm = torch.randperm(16, generator=g)
    picks = torch.randint(0, 20, (4,), generator=g)
    assert torch.equal(x[:16], image[perm]) and torch.equal(y[:16], label[perm])
    assert (bank[0][0] == image[perm][-1]).all()                   # slot 0: the last image of the permuted batch
    for j, p in enumerate(picks.tolist()):
        assert torch.equal(x[16 + j], bank[0][p]) and torch.equal(v[16 + j], bank[1][p])
        assert torch.equal(y[16 + j], bank[2][p])
    again = (img.clone(), val.clone(), lab.clone())
    x2, v2, y2 = ops.bank_resample(*again, image, valid, label, 4, ops.bank_generator(5))
    assert torch.equal(x, x2) and torch.equal(v, v2) and torch.equal(y, y2)


def test_image_bank_module_sizes_and_state_dict():
    bank = sfc.ImageBank(K)
    assert bank.image.shape == (K, 3, 0, 0)
    b = _batch()
    x, v, y = bank.resample(b["image"], b["valid"], b["label"], step=0, n_draw=3)
    assert bank.image.shape == (K, 3, CROP, CROP) and x.shape[0] == 5 and v.shape[0] == 5 and y.shape == (5, K)
    assert bank.label[0].sum() > 0 and bank.label[1].sum() == 0    # class 0 seen; class 1 never
    with pytest.raises(ValueError, match="fixed size"):
        bank.resample(b["image"][..., :32, :32], b["valid"][..., :32, :32], b["label"], step=1, n_draw=3)
    fresh = sfc.ImageBank(K)                                       # unsized: adopts the loaded shape
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.image, bank.image) and torch.equal(fresh.label, bank.label)
    sized = sfc.ImageBank(K, CROP)
    sized.load_state_dict({})                                      # a state dict without the bank loads (strict)
    assert sized.image.shape == (K, 3, CROP, CROP) and sized.image.abs().sum() == 0


# ---- the method interface ----------------------------------------------------------------------------------------

def test_settings_registry_groups_and_needs():
    assert get_method("sfc") is sfc
    s = sfc.sfc_settings({})
    assert (s["gsc_weight"], s["ms_weight"], s["bg_seed_scale"], s["scale2"], s["n_bank"]) == (1.6, 0.8, 0.3, 0.5, 4)
    assert s["bank_correction"] == 396 and (s["infer_bg_add"], s["infer_fg_mul"]) == (0.4, 2.0)
    assert sfc.sfc_settings({"sfc": {"n_bank": 2, "ms_weight": None}})["ms_weight"] == 0.8
    for bad in ({"nbank": 2}, {"scale2": 0}, {"n_bank": -1}, {"n_bank": 1.5}):
        with pytest.raises(ConfigError):
            sfc.sfc_settings({"sfc": bad})
    model = _model(bg_seed_scale=0.4, infer_bg_add=0.3, fsae_tau=0.2)
    assert model.bg_seed_scale == 0.4 and model.infer_t == (0.3, 2.0) and model.fsae_tau == 0.2
    groups = sfc.build_optimizer(model, _cfg()).param_groups
    new = {id(p) for p in groups[1]["params"]}
    assert id(model.f9.weight) in new and id(model.classifier.weight) in new and id(model.side4.weight) in new
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["momentum"] == 1e-4
    assert not new & {id(p) for p in groups[0]["params"]}
    assert sfc.data_needs({}) == {"views": False, "saliency": False, "strong": False, "valid": True, "jitter": False}


def test_forward_shapes_and_masking():
    model = _model()
    x = random_images(2, 64, 48)
    mask = torch.ones(2, K + 1, 4, 3)
    mask[:, 2] = 0
    out = model(x, mask)
    assert out["score"].shape == (2, K) and out["hie_fea"].shape == (2, 768, 4, 3)
    for k in ("norm_cam", "cam1", "cam2"):
        assert out[k].shape == (2, K + 1, 4, 3) and torch.isfinite(out[k]).all()
    assert out["cam1"][:, 2].abs().max() == 0 and out["cam2"][:, 2].abs().max() == 0   # masked class: no map
    assert (out["cam2"] >= 0).all() and (out["cam2"] <= 1 + 1e-5).all()
    assert model(x)["cam2"].shape == (2, K + 1, 4, 3)


def test_setup_stores_occurrence_weights():
    model = _model()
    labels = np.zeros((30, K), np.float32)
    labels[:20, 0] = 1
    labels[:5, 1] = 1
    labels[:8, 2] = 1
    labels[:2, 3] = 1
    sfc.setup(model, labels, _cfg(bank_correction=10))
    w = model.class_weights
    assert w[0] == 1 and w[1:].mean().item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(w[1:].numpy(), ops.occurrence_weights([20, 5, 8, 2], 10.0), rtol=1e-6)
    with pytest.raises(ValueError):
        sfc.setup(model, labels[:, :3], _cfg())


def test_training_step_losses_gradients_and_bank():
    model = _model(2, bn=True)
    sfc.setup(model, np.eye(K, dtype=np.float32)[[0, 0, 1, 2, 3, 2]], _cfg())
    batch = _batch()
    out = sfc.training_step(model, batch, 0, _cfg())
    assert set(out) == {"loss", "loss_cls", "loss_gsc", "loss_ms"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_cls"] + out["loss_gsc"] + out["loss_ms"])
    assert out["loss_gsc"] > 0
    out["loss"].backward()
    b = model.backbone

    def grad(mod):
        gs = [p.grad for p in mod.parameters() if p.grad is not None]
        return sum(float(g.abs().sum()) for g in gs) if gs else 0.0

    for m in (model.f9, model.classifier, model.side1, model.side2, model.side3, model.side4, b.layer3, b.layer4):
        assert grad(m) > 0
    for m in (b.conv1, b.bn1, b.layer1, b.layer2):
        assert all(p.grad is None for p in m.parameters())
    assert model.bank.label[0].sum() == 1 and model.bank.label[2].sum() == 2 and model.bank.label[1].sum() == 0
    assert model.bank.valid[2].sum() == CROP * CROP                 # image 1 (unpadded) holds slot 2


def test_supervised_loss_sees_the_resampled_batch(monkeypatch):
    model = _model()
    seen = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda x, m=None: seen.append((x.shape, m.shape)) or real(x, m))
    sfc.supervised_loss(model, _batch(b=3), 7, _cfg(n_bank=2))
    assert seen == [((5, 3, CROP, CROP), (5, K + 1, 4, 4)), ((5, 3, CROP // 2, CROP // 2), (5, K + 1, 2, 2))]


def test_cam_logits_and_cam_forward():
    model = _model(2, bn=True)
    b = _batch()
    z, bg = sfc.cam_logits(model, b["image"], label=b["label"], valid=b["valid"])
    assert bg == 0 and z.shape == (2, K + 1, 4, 4) and (z >= 0).all() and z.max() <= 1 / model.fsae_tau + 1e-4
    out = model(b["image"], sipe.lowres_valid(b["valid"], b["label"], (4, 4), b["image"]))
    torch.testing.assert_close(z, ops.max_normalise(out["cam2"]) / model.fsae_tau)
    assert z[1, 3].amax().item() == pytest.approx(1 / model.fsae_tau, rel=1e-3)   # image 1's class 2 has seeds
    assert z[:, 2].abs().max() == 0                                 # class 1 is in neither image: no seed
    with pytest.raises(ValueError):
        sfc.cam_logits(model, b["image"])
    assert sfc.cam_forward(model, b["image"]).shape == (2, K, 4, 4)


def test_infer_cams_keys_shapes_ranges():
    model = _model()
    image = (np.random.default_rng(0).random((37, 50, 3)) * 255).astype(np.uint8)
    keys, cams, aux = sfc.infer_cams(model, image, [1, 3], (1.0, 0.5), True, torch.device("cpu"))
    assert keys.tolist() == [0, 1, 3] and keys.dtype == np.int64
    for m in (cams, aux):
        assert m.shape == (3, 37, 50) and m.dtype == np.float32 and np.isfinite(m).all()
        assert m[1:].min() >= 0 and m[1:].max() <= 2
        assert m[0].min() >= 0.4 - 1e-6 and m[0].max() <= 1.4 + 1e-6
    k2, c2, a2 = sfc.infer_cams(model, image, [2], (1.0,), False, torch.device("cpu"))
    assert k2.tolist() == [0, 2] and c2.shape == a2.shape == (2, 37, 50)


def test_state_dict_round_trip_keeps_the_bank_and_weights():
    model = _model()
    sfc.setup(model, np.eye(K, dtype=np.float32)[[0, 1, 1, 2, 3]], _cfg())
    sfc.training_step(model, _batch(), 3, _cfg())
    sd = model.state_dict()
    assert {"bank.image", "bank.valid", "bank.label", "class_weights", "f9.weight"} <= set(sd)
    cfg = _cfg()
    del cfg["crop_size"]                                            # e.g. rebuilt without the crop size
    torch.manual_seed(1)
    other = sfc.build_model(cfg, K)
    other.load_state_dict(sd)
    for k in ("bank.image", "bank.valid", "bank.label", "class_weights"):
        assert torch.equal(other.state_dict()[k], sd[k])
    assert other.bank.label.sum() > 0


def test_fsae_wraps_sfc_with_the_bank_copied_to_the_teacher():
    from wsss_core.methods import fsae

    cfg = {**_cfg(), "fsae": {"base": "sfc"}}
    torch.manual_seed(0)
    model = fsae.build_model(cfg, K)
    fsae.setup(model, np.eye(K, dtype=np.float32)[[0, 1, 2, 3, 1]], cfg)
    assert torch.equal(model.teacher.class_weights, model.student.class_weights)
    batch = {**_batch(), "image_strong": random_images(2, CROP, CROP, 5)}
    out = fsae.training_step(model, batch, 0, cfg)
    assert {"loss_cls", "loss_gsc", "loss_ms", "loss_pl"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    fsae.after_step(model, 0, cfg)
    assert model.student.bank.label.sum() > 0 and torch.equal(model.teacher.bank.image, model.student.bank.image)
