"""Tests of the ResNet-38 (resnet38d) backbone and the MXNet ``.params`` reader / key map.

Upstream: ``usr922/wseg`` ``network/resnet38d.py`` (``Net``, ``convert_mxnet_to_torch``; the same file as
``jiwoon-ahn/psa`` ``network/resnet38d.py``). Small inputs (64x64), one torch thread; the full model
(~105 M parameters) is built only a few times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.errors import WeightsError
from wsss_core.models import ResNet38, build_resnet38, freeze_stem, load_weights
from wsss_core.models.mxnet_params import (
    V1_MAGIC, V2_MAGIC, V3_MAGIC, load_params_file, mxnet_to_resnet38_name, mxnet_to_resnet38_state_dict,
    read_mxnet_params,
)
from wsss_core.models.weights import sha256_file

from conftest import random_images, randomize_bn as _randomize_bn  # noqa: E402
from mxnet_fixture import resnet38_to_mxnet_name, resnet38_to_mxnet_names, write_mxnet_params  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEM = {"conv1a", "b2", "b2_1", "b2_2"}


def _x(b=1, h=64, w=64, seed=1):
    return random_images(b, h, w, seed)


@pytest.fixture(scope="module")
def net() -> ResNet38:
    """One randomly initialised ResNet-38 with random BN statistics, in eval mode. Tests must not alter it."""
    torch.manual_seed(0)
    model = ResNet38()
    _randomize_bn(model)
    return model.eval()


# ------------------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("hw", [(64, 64), (50, 70)])
def test_output_shapes_and_stride_8(net, hw):
    h, w = hw
    with torch.no_grad():
        feats = net.forward_features(_x(1, h, w))
        out = net(_x(1, h, w))
    s8 = (-(-h // 8), -(-w // 8))
    assert feats["conv3"].shape == (1, 256, -(-h // 4), -(-w // 4))
    assert feats["conv4"].shape == (1, 512, *s8)
    assert feats["conv5"].shape == (1, 1024, *s8)
    assert feats["conv6"].shape == (1, 4096, *s8)
    assert torch.equal(out, feats["conv6"])
    assert (out >= 0).all() and (feats["conv4"] >= 0).all()  # ReLU'd taps
    assert net.out_channels == 4096 and net.output_stride == 8


def _expected_param_count() -> tuple[int, int]:
    """(parameters, BN running-stat elements) computed independently from the layer table of
    ``network/resnet38d.py::Net``."""
    basic = ([(64, 128, 128, True)] + [(128, 128, 128, False)] * 2
             + [(128, 256, 256, True)] + [(256, 256, 256, False)] * 2
             + [(256, 512, 512, True)] + [(512, 512, 512, False)] * 5
             + [(512, 512, 1024, True)] + [(1024, 512, 1024, False)] * 2)
    params, stats = 3 * 64 * 3 * 3, 0
    for cin, mid, cout, proj in basic:
        params += 3 * 3 * cin * mid + 3 * 3 * mid * cout + (cin * cout if proj else 0)
        params += 2 * (cin + mid)
        stats += 2 * (cin + mid)
    for cin, cout in [(1024, 2048), (2048, 4096)]:
        params += cin * cout // 4 + 9 * (cout // 4) * (cout // 2) + (cout // 2) * cout + cin * cout
        params += 2 * (cin + cout // 4 + cout // 2)
        stats += 2 * (cin + cout // 4 + cout // 2)
    params += 2 * 4096  # bn7
    stats += 2 * 4096
    return params, stats


def test_parameter_count(net):
    n_params = sum(p.numel() for p in net.parameters())
    n_stats = sum(b.numel() for n, b in net.named_buffers() if not n.endswith("num_batches_tracked"))
    assert (n_params, n_stats) == _expected_param_count()
    assert n_params == 105_070_912  # ~105.1 M without a classifier
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in net.modules())
    # 17 blocks + conv1a + bn7; bottlenecks b6, b7 have a third BN/conv
    keys = net.state_dict().keys()
    assert sum(k.endswith(".running_var") for k in keys) == 2 * 15 + 3 * 2 + 1
    assert sum(k.endswith("conv_branch1.weight") for k in keys) == 6  # b2, b3, b4, b5, b6, b7


def test_state_dict_names(net):
    keys = set(net.state_dict())
    for k in ["conv1a.weight", "b2.bn_branch2a.weight", "b2.bn_branch2a.running_mean", "b2.conv_branch2a.weight",
              "b2.bn_branch2b1.bias", "b2.conv_branch2b1.weight", "b2.conv_branch1.weight",
              "b4_5.conv_branch2b1.weight", "b5_2.bn_branch2b1.running_var", "b6.conv_branch2b2.weight", "b6.bn_branch2b2.weight",
              "b7.conv_branch1.weight", "bn7.weight", "bn7.running_var"]:
        assert k in keys, k
    assert "b2_1.conv_branch1.weight" not in keys and "b5_1.conv_branch1.weight" not in keys
    assert net.b7.conv_branch2b1.weight.shape == (2048, 1024, 3, 3)
    assert net.b5.conv_branch2a.dilation == (1, 1) and net.b5.conv_branch2b1.dilation == (2, 2)
    assert net.b5_1.conv_branch2a.dilation == (2, 2) and net.b6.conv_branch2b1.dilation == (4, 4)


def test_pre_activation_structure(net):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # projection unit: the 1x1 shortcut reads a = ReLU(BN(x)), not x
        blk = net.b3
        x = torch.randn(1, 128, 16, 16, generator=g)
        a = F.relu(blk.bn_branch2a(x))
        main = blk.conv_branch2b1(F.relu(blk.bn_branch2b1(blk.conv_branch2a(a))))
        out, pre = blk(x, return_preact=True)
        assert torch.allclose(out, main + blk.conv_branch1(a), atol=1e-5)
        assert not torch.allclose(out, main + blk.conv_branch1(x), atol=1e-3)
        assert torch.equal(pre, a)
        # identity unit: raw x is added
        blk = net.b3_1
        x = torch.randn(1, 256, 8, 8, generator=g)
        a = F.relu(blk.bn_branch2a(x))
        main = blk.conv_branch2b1(F.relu(blk.bn_branch2b1(blk.conv_branch2a(a))))
        assert torch.allclose(blk(x), main + x, atol=1e-5)
        # bottleneck (eval: no dropout)
        blk = net.b6
        x = torch.randn(1, 1024, 4, 4, generator=g)
        a = F.relu(blk.bn_branch2a(x))
        y = blk.conv_branch2b1(F.relu(blk.bn_branch2b1(blk.conv_branch2a(a))))
        y = blk.conv_branch2b2(F.relu(blk.bn_branch2b2(y)))
        assert torch.allclose(blk(x), y + blk.conv_branch1(a), atol=1e-4)

        # taps: conv4/conv5 are the BN-ReLU'd inputs of b5/b6, conv6 = ReLU(bn7(b7 output))
        seen = {}
        hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
                 for n in ("b4", "b5", "b6", "b7")]
        try:
            feats = net.forward_features(_x())
        finally:
            for h in hooks:
                h.remove()
    out_b7 = seen["b7"][1][0] if isinstance(seen["b7"][1], tuple) else seen["b7"][1]
    assert torch.equal(feats["conv3"], F.relu(net.b4.bn_branch2a(seen["b4"][0])))
    assert torch.equal(feats["conv4"], F.relu(net.b5.bn_branch2a(seen["b5"][0])))
    assert torch.equal(feats["conv5"], F.relu(net.b6.bn_branch2a(seen["b6"][0])))
    assert torch.equal(feats["conv6"], F.relu(net.bn7(out_b7)))


def test_freeze_stem_exactly_stem():
    torch.manual_seed(0)
    model = ResNet38(frozen_bn=False, frozen_stem=False)
    assert all(p.requires_grad for p in model.parameters())
    assert freeze_stem(model) is model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    stem = {n for n, _ in model.named_parameters() if n.split(".")[0] in STEM}
    assert frozen == stem and "b2_2.conv_branch2b1.weight" in stem and "b3.conv_branch2a.weight" not in stem
    # the constructor option does the same, and train() keeps it; with frozen BN all BN affines are frozen too
    model.frozen_bn, model.frozen_stem = True, True
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert frozen == stem | {f"{b}.{p}" for b in bn for p in ("weight", "bias")}
    # gradients reach the rest (b3's conv) but not the stem
    model(_x(1, 32, 32)).mean().backward()
    assert model.conv1a.weight.grad is None and model.b2_2.conv_branch2b1.weight.grad is None
    assert model.b3.conv_branch2a.weight.grad is not None and model.b7.conv_branch2b2.weight.grad is not None


def test_frozen_bn_train_equals_eval_and_dropout(net):
    model = ResNet38(dropout=(0.3, 0.5))
    model.load_state_dict(net.state_dict())
    x = _x(2, 32, 32)
    with torch.no_grad():
        ref = model.eval().forward_features(x)
        model.train()
        assert model.training and all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert model.b6.dropout_2b1.training and model.b7.dropout_2b2.training
        before = model.b4.bn_branch2a.running_mean.clone()
        t1, t2 = model.forward_features(x), model.forward_features(x)
        assert torch.equal(model.b4.bn_branch2a.running_mean, before)  # BN statistics never update
        # frozen BN: everything before the first dropout (b6) is identical in train and eval mode
        for k in ("conv3", "conv4", "conv5"):
            assert torch.equal(t1[k], ref[k])
        # dropout in b6/b7 is active in train mode only
        assert not torch.equal(t1["conv6"], t2["conv6"]) and not torch.equal(t1["conv6"], ref["conv6"])
        model.eval()
        assert torch.equal(model(x), ref["conv6"]) and torch.equal(model(x), model(x))
        # without dropout the whole network gives identical outputs in train() and eval()
        for m in model.modules():
            if isinstance(m, nn.Dropout2d):
                m.p = 0.0
        assert torch.equal(model.train()(x), ref["conv6"])
        # control: BN not frozen -> batch statistics in train mode change the output and the running stats
        model.frozen_bn = False
        model.train()
        assert model.b4.bn_branch2a.training
        assert not torch.allclose(model(x), ref["conv6"], atol=1e-3)
        assert not torch.equal(model.b4.bn_branch2a.running_mean, before)


# ------------------------------------------------------------------------------------------ MXNet reader


def _sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "conv1a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal((5, 2)).astype(np.float16),
        "double": np.array([np.pi, -0.0, np.inf, np.nan]),
        "ints": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "bytes": np.arange(7, dtype=np.uint8),
        "long": np.array([2 ** 40, -1], dtype=np.int64),
        "empty_dim": np.zeros((0, 3), dtype=np.float32),
        "bn7_moving_mean": rng.standard_normal(6).astype(np.float32),
        "bn7_moving_var": rng.random(6).astype(np.float32),
    }


def _assert_bit_exact(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("version", [2, 1, 0])
def test_mxnet_write_read_bit_exact(tmp_path, version):
    arrays = _sample_arrays()
    if version == 0:
        arrays.pop("empty_dim")
    p = write_mxnet_params(tmp_path / "a.params", arrays, aux_names={"bn7_moving_mean", "bn7_moving_var"},
                           version=version)
    raw = p.read_bytes()
    assert int.from_bytes(raw[:8], "little") == 0x112 and raw[8:16] == b"\0" * 8
    assert int.from_bytes(raw[24:28], "little") == {2: V2_MAGIC, 1: V1_MAGIC, 0: 4}[version]
    assert b"arg:conv1a_weight" in raw and b"aux:bn7_moving_var" in raw
    got = read_mxnet_params(p)
    _assert_bit_exact(got, arrays)
    assert got.aux_names == {"bn7_moving_mean", "bn7_moving_var"}
    assert all(a.flags.writeable for a in got.values())


def test_mxnet_scalar_uses_v3_and_unprefixed_names(tmp_path):
    arrays = {"scalar": np.array(2.5, dtype=np.float32), "vec": np.arange(3, dtype=np.float64)}
    p = write_mxnet_params(tmp_path / "s.params", arrays, prefix=False)
    raw = p.read_bytes()
    assert int.from_bytes(raw[24:28], "little") == V3_MAGIC
    got = read_mxnet_params(p)
    _assert_bit_exact(got, arrays)
    assert got["scalar"].shape == () and got.aux_names == frozenset()


def test_mxnet_duplicate_after_prefix_strip(tmp_path):
    p = write_mxnet_params(tmp_path / "d.params", {"arg:x": np.zeros(1, np.float32), "aux:x": np.ones(1, np.float32)})
    with pytest.raises(WeightsError, match="twice"):
        read_mxnet_params(p)


def test_mxnet_corrupt_files_raise_weights_error_naming_path(tmp_path):
    p = write_mxnet_params(tmp_path / "good.params", _sample_arrays())
    raw = p.read_bytes()
    # truncated at various points: header, inside an array header, inside data, inside the names
    for cut in (4, 20, 30, 60, len(raw) // 2, len(raw) - 3):
        bad = tmp_path / f"cut{cut}.params"
        bad.write_bytes(raw[:cut])
        with pytest.raises(WeightsError, match="truncated") as ei:
            read_mxnet_params(bad)
        assert str(bad) in str(ei.value)
    # bad list magic
    bad = tmp_path / "magic.params"
    bad.write_bytes((0x113).to_bytes(8, "little") + raw[8:])
    with pytest.raises(WeightsError, match="bad magic") as ei:
        read_mxnet_params(bad)
    assert str(bad) in str(ei.value)
    # bad NDArray magic (not a V1/V2/V3 magic nor a plausible legacy ndim)
    bad = tmp_path / "ndmagic.params"
    bad.write_bytes(raw[:24] + (0xDEADBEEF).to_bytes(4, "little") + raw[28:])
    with pytest.raises(WeightsError, match="0xDEADBEEF") as ei:
        read_mxnet_params(bad)
    assert str(bad) in str(ei.value)
    # a .pth file renamed to .params goes through the same checks, via the project loader
    bad = tmp_path / "torch.params"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError) as ei:
        load_weights(nn.Identity(), {"path": str(bad)})
    assert str(bad) in str(ei.value)


# ------------------------------------------------------------------------------------------ key map


def test_mxnet_key_map_spec_examples():
    assert mxnet_to_resnet38_name("res2b1_branch2a_weight") == "b2_1.conv_branch2a.weight"
    assert mxnet_to_resnet38_name("aux:bn4a_branch2b1_moving_var") == "b4.bn_branch2b1.running_var"
    assert mxnet_to_resnet38_name("arg:bn7_gamma") == "bn7.weight"
    assert mxnet_to_resnet38_name("arg:conv1a_weight") == "conv1a.weight"
    assert mxnet_to_resnet38_name("res2a_branch1_weight") == "b2.conv_branch1.weight"
    assert mxnet_to_resnet38_name("bn6a_branch2b2_beta") == "b6.bn_branch2b2.bias"
    assert mxnet_to_resnet38_name("res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
    assert mxnet_to_resnet38_name("arg:linear1000_weight") is None
    for bad in ("fc8_weight", "res2a_branch2a_gamma", "bn2a_branch2a_weight", "res2b_branch2a_weight", "conv1a_bias"):
        with pytest.raises(WeightsError, match="unrecognised"):
            mxnet_to_resnet38_name(bad)


def test_mxnet_key_map_inverse_covers_model(net):
    keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    names = [resnet38_to_mxnet_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert [mxnet_to_resnet38_name(n) for n in names] == keys
    assert "res5b2_branch2b1_weight" in names and "bn7_moving_var" in names and "bn3a_branch2a_moving_mean" in names
    with pytest.raises(KeyError):
        resnet38_to_mxnet_name("fc8.weight")


def test_params_round_trip_through_load_weights(net, tmp_path):
    arrays, aux = resnet38_to_mxnet_names(net.state_dict())
    arrays["linear1000_weight"] = np.zeros((1000, 4096), np.float32)  # the ImageNet head is dropped
    arrays["linear1000_bias"] = np.zeros(1000, np.float32)
    assert len(aux) == 2 * 37 and all("_moving_" in n for n in aux)  # 37 BatchNorms
    p = write_mxnet_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", arrays, aux_names=aux)
    del arrays

    torch.manual_seed(1)
    fresh = ResNet38()
    info = load_weights(fresh, {"path": str(p)}, strict=True)
    assert info["missing"] == [] and info["unexpected"] == [] and info["source"] == str(p)
    sd_a, sd_b = net.state_dict(), fresh.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if not k.endswith("num_batches_tracked"))
    x = _x()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net(x))


def test_params_checksum_and_build(tmp_path):
    a = np.arange(4, dtype=np.float32)
    p = write_mxnet_params(tmp_path / "w.params", {"bn7_gamma": a, "linear1000_bias": a}, aux_names=())
    sd = load_params_file(p)
    assert list(sd) == ["bn7.weight"] and torch.equal(sd["bn7.weight"], torch.from_numpy(a))
    with pytest.raises(WeightsError, match="checksum") as ei:  # refused before parsing
        load_weights(nn.Identity(), {"path": str(p), "sha256": "0" * 64})
    assert str(p) in str(ei.value)
    model = nn.Module()
    model.bn7 = nn.BatchNorm2d(4)
    info = load_weights(model, {"path": str(p), "sha256": sha256_file(p)})
    assert torch.equal(model.bn7.weight.data, torch.from_numpy(a)) and "bn7.bias" in info["missing"]
    bad = write_mxnet_params(tmp_path / "unknown.params", {"fc8_weight": a})
    with pytest.raises(WeightsError, match="unrecognised") as ei:
        load_params_file(bad)
    assert str(bad) in str(ei.value)


def test_converted_pth_state_dict_loads(net, tmp_path):
    # like PSA's converted files: no num_batches_tracked, DataParallel prefix, an extra head key
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.fc8.weight"] = torch.zeros(21, 4096, 1, 1)
    p = tmp_path / "resnet38d.pth"
    torch.save(state, p)
    del state
    model = build_resnet38({"path": str(p)}, strict=True)
    assert model.weights_info["missing"] == [] and model.weights_info["unexpected"] == ["fc8.weight"]
    with torch.no_grad():
        assert torch.equal(model.eval()(_x()), net(_x()))


def test_mxnet_to_state_dict_rejects_collisions():
    a = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="two MXNet parameters"):
        mxnet_to_resnet38_state_dict({"arg:bn7_gamma": a, "bn7_gamma": a})
    sd = mxnet_to_resnet38_state_dict({"aux:bn7_moving_mean": a, "linear1000_bias": a})
    assert list(sd) == ["bn7.running_mean"] and sd["bn7.running_mean"].dtype == torch.float32
