"""SP-CAM, its EPS stage 1 and MSA: the frozen Q inside the model, optimizer groups, superpixel inference, ResNeSt."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.methods import eps_cam, msa, spcam
from wsss_core.models.backbones import ResNeStBackbone, backbone_from_config
from wsss_core.superpixel import ops, scn
from wsss_core.superpixel.cams import QModule, superpixel_cams
from wsss_core.superpixel.providers import SuperpixelProvider

TINY_RESNEST = {"arch": "resnest50", "layers": [1, 1, 1, 1], "width_per_group": 8, "stem_width": 8, "weights": None}
TINY_RESNET = {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 8, "weights": None}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture()
def scn_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "scn.pth"
    torch.save(scn.SpixelNet().state_dict(), path)
    return str(path)


def _cfg(backbone, **extra):
    return {"backbone": dict(backbone), "lr": 0.01, "weight_decay": 4e-5, "nesterov": True, **extra}


def test_spcam_with_a_frozen_scn(scn_file):
    cfg = _cfg(TINY_RESNEST, superpixels={"backend": "scn", "weights": {"path": scn_file}})
    model = spcam.build_model(cfg, n_classes=3)
    model.train()
    assert not model.q.scn.training                                   # the SCN stays in eval mode
    groups = spcam.build_optimizer(model, cfg).param_groups
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.q.scn.parameters())
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone_w"] == pytest.approx(0.01) and lrs["backbone_b"] == pytest.approx(0.02)
    assert lrs["classifier_w"] == pytest.approx(0.1) and lrs["qfeats_w"] == pytest.approx(0.1)
    assert lrs["drm_w"] == pytest.approx(5.0) and lrs["drm_b"] == pytest.approx(10.0)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("_b"))
    g0 = groups[0]
    assert g0["momentum"] == pytest.approx(4e-5) and g0["nesterov"]   # ESC's PolyOptimizer quirk, Nesterov
    x = torch.randn(2, 3, 64, 48)
    z = model(x)
    assert z.shape == (2, 4, 4, 3)
    w_bg, w_fg = model.drm_weights(model.backbone(x), model.q(x))
    torch.testing.assert_close(w_bg.sum(1), torch.ones(2, 4, 3))
    # DRM conserves each channel's total up to what leaves the grid: zero weight off-grid -> exact
    batch = {"image": x, "label": torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]]), "saliency": torch.rand(2, 1, 64, 48)}
    out = spcam.training_step(model, batch, 0, cfg)
    out["loss"].backward()
    assert model.q.scn.conv0a[0].weight.grad is None                  # no gradient reaches the SCN
    assert model.tran[0][0].weight.grad is not None


def test_msa_variants_train_and_ap_changes_the_map():
    torch.manual_seed(0)
    for target in ("image", "saliency"):
        cfg = _cfg(TINY_RESNET, msa={"target": target, "patches": 1})
        s = msa.msa_settings(cfg)
        assert s["ap_train"] == (8 if target == "image" else 0) and s["ig_th"] == (0.1 if target == "image" else 0.01)
        assert msa.data_needs(cfg)["saliency"] is (target == "saliency")
        model = msa.build_model(cfg, n_classes=2).train()
        x = torch.randn(2, 3, 48, 64)
        x[..., -16:] = 0                                              # crop padding on the last superpixel column
        batch = {"image": x, "label": torch.tensor([[1.0, 0], [1.0, 1.0]]), "saliency": torch.rand(2, 1, 48, 64)}
        out = msa.training_step(model, batch, 0, cfg)
        assert torch.isfinite(out["loss"]) and out["loss_ipc"] > 0
        t = msa.ipc_target(batch, model.q(x), target)
        assert t.shape == (2, 3 if target == "image" else 2, 3, 4) and (t[..., -1] == 0).all()
    model.eval()
    z0, gap = model(x, None, 0)
    z8, _ = model(x, None, 8)
    assert z0.shape == (2, 3, 3, 4) and gap.shape == (2, 3) and not torch.allclose(z0, z8)
    with pytest.raises(Exception, match="image or saliency"):
        msa.msa_settings(_cfg(TINY_RESNET, msa={"target": "lab"}))


def test_eps_cam_groups_and_loss_terms():
    cfg = _cfg(TINY_RESNEST)
    model = eps_cam.build_model(cfg, n_classes=2).train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    groups = {g["name"]: g for g in eps_cam.build_optimizer(model, cfg).param_groups}
    assert groups["classifier_w"]["lr"] == pytest.approx(0.1) and "classifier_b" not in groups
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([[1.0, 0], [0, 1.0]]),
             "saliency": torch.rand(2, 1, 32, 32)}
    out = eps_cam.training_step(model, batch, 0, cfg)
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 0.5 * out["loss_sal"])
    with pytest.raises(Exception, match="unknown classifier.eps key"):
        eps_cam.build_model(_cfg(TINY_RESNEST, eps={"tao": 0.4}), 2)


def test_superpixel_cams_flip_equivariance_and_normalisation():
    """With a flip-equivariant model and Q, the CAMs of the mirrored image are the mirrored CAMs (checks which passes
    are un-flipped); each map peaks just under 1; ``q_fn=None`` resizes to the image itself."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)

    def spread_q(x):                                                  # a soft, mirror-symmetric Q: ASAM != identity
        q = torch.full((x.shape[0], 9, *x.shape[-2:]), 0.5 / 8)
        q[:, ops.CENTER9] = 0.5
        return q

    def model_fn(x, q):                                               # (1, 3, h, w): 'bg' + 2 fg channels
        return F.avg_pool2d(x, ops.CELL)

    args = dict(keys=[1, 2], scales=[1.0, 0.75], flip=True, device=torch.device("cpu"))
    for q_fn, rw in ((spread_q, 3), (None, 0)):
        keys, a = superpixel_cams(model_fn, q_fn, img, rw_steps=rw, **args)
        _, b = superpixel_cams(model_fn, q_fn, np.ascontiguousarray(img[:, ::-1]), rw_steps=rw, **args)
        assert keys.tolist() == [1, 2] and a.shape == (2, 40, 56)
        np.testing.assert_allclose(a, b[:, :, ::-1], atol=2e-5)
        assert a.max() <= 1 and a.reshape(2, -1).max(1).min() > 0.9


def test_qmodule_keeps_the_scn_frozen_and_saved(scn_file):
    net, _ = scn.load_scn({"path": scn_file})
    q = QModule(SuperpixelProvider("scn", net))
    q.train()
    assert not q.scn.training and all(not p.requires_grad for p in q.parameters())
    assert any(k.startswith("scn.") for k in q.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(q(x), net(x))


def test_resnest_backbone_layout():
    """The official dilated layer4 (stride-1 3x3 average pooling in the first block, identity pool in its shortcut)
    on timm's parameter layout; output stride 16; an official-style file (with ``fc.``) loads with nothing missing."""
    bb = ResNeStBackbone((1, 1, 1, 1), 8, 8).eval()
    first = bb.layer4[0]
    assert isinstance(first.avd_last, torch.nn.AvgPool2d) and first.avd_last.stride == 1
    assert isinstance(first.downsample[0], torch.nn.Identity)
    assert bb(torch.randn(1, 3, 64, 80)).shape == (1, 2048, 4, 5)
    assert bb.forward_features(torch.randn(1, 3, 64, 64))["layer3"].shape == (1, 1024, 4, 4)
    with pytest.raises(ValueError, match="resnest50"):
        backbone_from_config({"arch": "resnest101"})


def test_resnest_loads_an_official_style_file(tmp_path):
    src = ResNeStBackbone((1, 1, 1, 1), 8, 8)
    state = dict(src.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "resnest50-tiny.pth")
    net = backbone_from_config({**TINY_RESNEST, "weights": {"path": str(tmp_path / "resnest50-tiny.pth")}})
    assert net.weights_info["missing"] == [] and net.weights_info["unexpected"] == []
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), src.eval()(x))
