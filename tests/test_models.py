"""Tests of wsss_core.models (backbones, DeepLab-V2, weights loader) and the CAM method + multi-scale inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from wsss_core.data.transforms import normalize, to_tensor
from wsss_core.errors import WeightsError
from wsss_core.methods import cam as cam_method
from wsss_core.methods import get_method
from wsss_core.methods.inference import multiscale_cams
from wsss_core.models import ASPP, build_deeplabv2, build_resnet, freeze_batchnorm, load_weights
from wsss_core.models.weights import resolve_weights_path, sha256_file

TINY = {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 8}


from conftest import random_images, randomize_bn as _randomize_bn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _x(b=2, h=64, w=64, seed=1):
    return random_images(b, h, w, seed)


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_bottleneck_backbone_output_stride(os_):
    bb = build_resnet(**TINY, output_stride=os_).eval()
    with torch.no_grad():
        feats = bb.forward_features(_x())
        out = bb(_x())
    assert bb.out_channels == 2048
    assert out.shape == (2, 2048, 64 // os_, 64 // os_)
    assert feats["layer1"].shape[-1] == 16 and feats["layer2"].shape[-1] == 8
    assert feats["layer3"].shape[-1] == 64 // min(os_, 16)
    assert torch.equal(feats["layer4"], out)


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_basic_block_backbone_dilated_by_surgery(os_):
    bb = build_resnet("resnet18", output_stride=os_).eval()
    with torch.no_grad():
        out = bb(_x(1))
    assert bb.out_channels == 512
    assert out.shape == (1, 512, 64 // os_, 64 // os_)
    expected = {8: (1, 2, 4), 16: (1, 1, 2), 32: (1, 1, 1)}[os_]
    for layer, d in zip((bb.layer2, bb.layer3, bb.layer4), expected):
        convs3 = [m for m in layer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(m.dilation == (d, d) and m.padding == (d, d) for m in convs3)
    # dilation only changes strides/dilations: the weights of OS32 fit OS8/OS16
    ref = build_resnet("resnet18", output_stride=32)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in bb.state_dict().items()}


def test_backbone_odd_size_and_bad_args():
    bb = build_resnet(**TINY, output_stride=16).eval()
    with torch.no_grad():
        assert bb(_x(1, 65, 50)).shape[-2:] == (5, 4)  # ceil(65/16), ceil(50/16)
    with pytest.raises(ValueError):
        build_resnet("resnet9")
    with pytest.raises(ValueError):
        build_resnet(**TINY, output_stride=4)


def test_freeze_batchnorm_replaces_all_and_fixes_outputs():
    bb = build_resnet(**TINY, output_stride=16)
    _randomize_bn(bb)
    x = _x()
    with torch.no_grad():
        ref = bb.eval()(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert n_bn > 0
    freeze_batchnorm(bb)
    from torchvision.ops import FrozenBatchNorm2d

    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in bb.modules()) == n_bn
    with torch.no_grad():
        y_train = bb.train()(x)
        y_eval = bb.eval()(x)
    assert torch.equal(y_train, y_eval)
    torch.testing.assert_close(y_eval, ref, rtol=1e-4, atol=1e-5)
    # BN affine parameters are no longer trainable parameters
    assert not any("bn" in name for name, _ in bb.named_parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_resnet(**TINY, frozen_bn=True).modules())


# ---------------------------------------------------------------- DeepLab-V2


def _deeplab(n_classes=5, frozen_bn=True):
    return build_deeplabv2(n_classes, {**TINY, "output_stride": 8, "weights": None, "frozen_bn": frozen_bn})


def test_deeplab_shapes():
    model = _deeplab().eval()
    x = _x()
    with torch.no_grad():
        logits = model(x)
        up = model(x, upsample=True)
    assert logits.shape == (2, 5, 8, 8)
    assert up.shape == (2, 5, 64, 64)
    torch.testing.assert_close(up, F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False))


def test_aspp_sums_dilated_branches():
    rates = (6, 12, 18, 24)
    aspp = ASPP(16, 3, rates)
    for conv in aspp.branches:
        assert float(conv.bias.detach().abs().max()) == 0.0
        assert 0.005 < float(conv.weight.detach().std()) < 0.02
        nn.init.normal_(conv.bias)  # non-zero biases so the sum of biases is checked too
    x = torch.randn(2, 16, 13, 11)
    with torch.no_grad():
        got = aspp(x)
        manual = sum(F.conv2d(x, b.weight, b.bias, padding=r, dilation=r) for b, r in zip(aspp.branches, rates))
    assert got.shape == (2, 3, 13, 11)
    torch.testing.assert_close(got, manual)


def test_deeplab_param_groups():
    model = _deeplab(frozen_bn=False)
    lr, wd = 2.5e-4, 5e-4
    groups = model.param_groups(lr, wd)
    assert [g["lr"] for g in groups] == pytest.approx([lr, 10 * lr, 20 * lr])
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0, 20.0]
    assert [g["weight_decay"] for g in groups] == [wd, wd, 0.0]
    bias_ids = {id(b.bias) for b in model.aspp.branches}
    assert {id(p) for p in groups[2]["params"]} == bias_ids
    assert {id(p) for p in groups[1]["params"]} == {id(b.weight) for b in model.aspp.branches}
    # the groups partition the trainable parameters
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.SGD(groups, lr=lr, momentum=0.9)  # accepted by an optimizer


# ---------------------------------------------------------------- weights


def _outputs(bb, x):
    with torch.no_grad():
        return bb.eval()(x)


def test_weights_round_trip(tmp_path):
    src = build_resnet(**TINY)
    _randomize_bn(src, 3)
    p = tmp_path / "bb.pth"
    torch.save(src.state_dict(), p)
    torch.manual_seed(123)
    dst = build_resnet(**TINY)
    x = _x()
    assert not torch.allclose(_outputs(src, x), _outputs(dst, x))
    info = load_weights(dst, {"path": str(p)})
    assert info["missing"] == [] and info["unexpected"] == []
    assert info["source"] == str(p)
    assert torch.equal(_outputs(src, x), _outputs(dst, x))
    # through build_resnet, with a pinned checksum
    bb = build_resnet(**TINY, weights={"path": str(p), "sha256": sha256_file(p)})
    assert bb.weights_info["missing"] == []
    assert torch.equal(_outputs(src, x), _outputs(bb, x))


def test_weights_nested_module_prefixed(tmp_path):
    src = build_resnet(**TINY)
    _randomize_bn(src, 4)
    p = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, p)
    dst = build_resnet(**TINY)
    info = load_weights(dst, {"path": str(p)})
    assert info["missing"] == [] and info["unexpected"] == []
    x = _x()
    assert torch.equal(_outputs(src, x), _outputs(dst, x))


def test_weights_torchvision_classifier_ignores_fc(tmp_path):
    net = tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], width_per_group=8)
    p = tmp_path / "full.pth"
    torch.save(net.state_dict(), p)
    dst = build_resnet(**TINY)
    info = load_weights(dst, {"path": str(p)}, strict=True)
    assert info == {"missing": [], "unexpected": [], "source": str(p)}
    assert torch.equal(dst.conv1.weight, net.conv1.weight)


def test_weights_missing_keys_reported_and_strict(tmp_path):
    sd = build_resnet(**TINY).state_dict()
    sd.pop("layer4.0.conv1.weight")
    sd["extra.thing"] = torch.zeros(1)
    p = tmp_path / "partial.pth"
    torch.save(sd, p)
    info = load_weights(build_resnet(**TINY), {"path": str(p)})
    assert info["missing"] == ["layer4.0.conv1.weight"]
    assert info["unexpected"] == ["extra.thing"]
    with pytest.raises(WeightsError, match="lack"):
        load_weights(build_resnet(**TINY), {"path": str(p)}, strict=True)


def test_weights_missing_file(tmp_path):
    p = tmp_path / "nope" / "resnet.pth"
    with pytest.raises(WeightsError, match=str(p)):
        load_weights(build_resnet(**TINY), {"path": str(p)})
    with pytest.raises(WeightsError, match="ResNet50_Weights.IMAGENET1K_V1.pth"):
        load_weights(build_resnet(**TINY), {"torchvision": "ResNet50_Weights.IMAGENET1K_V1"}, cache_dir=tmp_path)


def test_weights_wrong_shape(tmp_path):
    sd = build_resnet(**TINY).state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    dst = build_resnet(**TINY)
    before = dst.layer1[0].conv1.weight.detach().clone()
    with pytest.raises(WeightsError, match="conv1.weight"):
        load_weights(dst, {"path": str(p)})
    assert torch.equal(dst.layer1[0].conv1.weight, before)  # nothing loaded


def test_weights_wrong_sha256_and_corrupt_file(tmp_path):
    p = tmp_path / "w.pth"
    torch.save(build_resnet(**TINY).state_dict(), p)
    with pytest.raises(WeightsError, match="checksum"):
        load_weights(build_resnet(**TINY), {"path": str(p), "sha256": "0" * 64})
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a torch file")
    with pytest.raises(WeightsError, match="corrupt.pth"):
        load_weights(build_resnet(**TINY), {"path": str(bad)})


def test_resolve_weights_path(tmp_path):
    assert resolve_weights_path({"torchvision": "ResNet50_Weights.IMAGENET1K_V1"}, tmp_path) == \
        tmp_path / "ResNet50_Weights.IMAGENET1K_V1.pth"
    assert resolve_weights_path({"path": "/a/b.pth"}, tmp_path) == type(tmp_path)("/a/b.pth")
    assert resolve_weights_path(None, tmp_path) is None
    assert resolve_weights_path({"torchvision": None}, tmp_path) is None
    assert load_weights(build_resnet(**TINY), None)["source"] == "random init"


# ---------------------------------------------------------------- CAM method


CAM_CFG = {"backbone": {**TINY, "weights": None}, "lr": 0.05, "head_lr_mult": 10.0}


def test_cam_method_registered():
    assert get_method("cam") is cam_method
    with pytest.raises(KeyError):
        get_method("nope")


def test_cam_model_shapes_and_consistency():
    model = cam_method.build_model(CAM_CFG, 4).eval()
    x = _x()
    with torch.no_grad():
        logits = model(x)
        cams = cam_method.cam_forward(model, x)
        raw = model.classifier(model.backbone(x))
    assert logits.shape == (2, 4)
    assert cams.shape == (2, 4, 4, 4)  # output stride 16
    assert float(cams.min()) >= 0.0
    assert float(cams.max()) > 0.0
    # CAM = ReLU of the class maps whose spatial mean is the logit (GAP and 1x1 conv commute)
    torch.testing.assert_close(raw.mean((2, 3)), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cams, F.relu(raw))


def test_cam_param_groups():
    model = cam_method.build_model(CAM_CFG, 4)
    groups = cam_method.param_groups(model, CAM_CFG)
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.5])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_cam_training_step_decreases_loss():
    model = cam_method.build_model(CAM_CFG, 4).train()
    opt = torch.optim.SGD(cam_method.param_groups(model, {**CAM_CFG, "lr": 0.01}), lr=0.01, momentum=0.9)
    batch = {"image": _x(4, 48, 48, seed=5),
             "label": torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)}
    losses = []
    for step in range(20):
        out = cam_method.training_step(model, batch, step, CAM_CFG)
        assert set(out) >= {"loss", "label_acc"}
        assert 0.0 <= float(out["label_acc"]) <= 1.0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- multi-scale inference


def _test_image(h=40, w=52):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + 2 * yy) * 3) % 256], -1).astype(np.uint8)
    img[5:20, 8:30] = (250, 30, 30)  # an asymmetric object
    return img


@pytest.fixture(scope="module")
def cam_model():
    torch.manual_seed(0)
    model = cam_method.build_model(CAM_CFG, 4).eval()
    _randomize_bn(model, 9)
    return model


def test_multiscale_cams_range_and_normalisation(cam_model):
    img = _test_image()
    fn = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    with torch.no_grad():
        assert float(fn(to_tensor(normalize(img)).unsqueeze(0)).max()) > 1e-2  # maps are far from all-zero
    out = multiscale_cams(fn, img, [1.0, 0.75, 1.25], True, torch.device("cpu"))
    assert out.dtype == np.float32 and out.shape == (4, 40, 52)
    assert out.min() >= 0.0 and out.max() < 1.0
    for m in out:
        assert m.max() == 0.0 or m.max() >= 0.99
    assert sum(m.max() >= 0.99 for m in out) >= 1
    # class selection returns the same maps (normalisation is per map)
    sel = multiscale_cams(fn, img, [1.0, 0.75, 1.25], True, torch.device("cpu"), classes=[2, 0])
    assert sel.shape == (2, 40, 52)
    np.testing.assert_allclose(sel, out[[2, 0]], atol=1e-6)


def test_multiscale_cams_single_scale_matches_manual(cam_model):
    img = _test_image()
    fn = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    out = multiscale_cams(fn, img, [1.0], False, torch.device("cpu"))
    with torch.no_grad():
        c = F.interpolate(fn(to_tensor(normalize(img)).unsqueeze(0)), size=(40, 52), mode="bilinear",
                          align_corners=False)[0]
    c = c / (c.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    np.testing.assert_allclose(out, c.numpy(), atol=1e-5)


@pytest.mark.parametrize("scales", [[1.0], [1.0, 0.5, 1.5]])
def test_multiscale_cams_flip_equivariant(cam_model, scales):
    img = _test_image()
    flipped = np.ascontiguousarray(img[:, ::-1])
    fn = lambda x: cam_method.cam_forward(cam_model, x)  # noqa: E731
    a = multiscale_cams(fn, img, scales, True, torch.device("cpu"))
    b = multiscale_cams(fn, flipped, scales, True, torch.device("cpu"))
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-4)
    # without flip averaging the network itself is not flip-equivariant (so the check above is not vacuous)
    a1 = multiscale_cams(fn, img, scales, False, torch.device("cpu"))
    b1 = multiscale_cams(fn, flipped, scales, False, torch.device("cpu"))
    assert np.abs(b1 - a1[:, :, ::-1]).max() > 1e-2
