"""IRN refinement (``chenqi1126/SIPE`` IRN stage): network, losses, random walk, cam2ir, and the stage functions on
a toy dataset.

Tiny CPU tensors. Transition-matrix convention of the code: ``T`` is column-normalised (every column sums to 1) and
scores are row vectors, ``rw = v @ T``.
"""

from __future__ import annotations

import itertools
import json

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.data.io import read_label_png
from wsss_core.data.prepare import DatasetInfo, prepare_dataset
from wsss_core.data.toy import make_toy_dataset
from wsss_core.engine.trainer import load_final
from wsss_core.errors import ConfigError, DataError
from wsss_core.refine import affinity as aff
from wsss_core.refine import irn
from wsss_core.refine.crf import crf_params
from wsss_core.refine.irn_ops import edge_to_affinity, search_directions
from wsss_core.store.shards import ShardedStore, ShardWriter, shard_ids

TOY_BB = {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 16, "weights": None}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return irn.build_irnet(TOY_BB)


# --------------------------------------------------------------------------------------------- path index / pairs

def test_radius10_directions_and_sources_at_128():
    assert len(search_directions(10)) == 152
    assert edge_to_affinity(torch.zeros(1, 128, 128), 10).shape == (1, 152, 13090)  # 119 x 110 sources
    bg, fg, neg = irn.irn_pair_labels(torch.zeros(1, 128, 128, dtype=torch.long), 10, 21)
    assert bg.shape == (1, 152, 13090) and float(bg.sum()) == 152 * 13090 and float(fg.sum() + neg.sum()) == 0
    assert irn.pair_displacement(torch.zeros(1, 2, 128, 128), 10).shape == (1, 2, 152, 13090)


def test_pair_labels_disjoint_and_invalid_at_n_classes():
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([0, 5, 7, 21, 255])[torch.randint(0, 5, (2, 8, 12), generator=g)]
    bg, fg, neg = irn.irn_pair_labels(lab, 5, 21)
    assert float((bg * fg).sum() + (bg * neg).sum() + (fg * neg).sum()) == 0
    frm, to = aff.pair_indices(8, 12, 5, irn.irn_offsets(5))
    flat = lab.reshape(2, -1)
    valid = (flat[:, frm][:, None] < 21) & (flat[:, to] < 21)
    assert torch.equal((bg + fg + neg).bool(), valid)  # 21 and 255 are both invalid


def test_downsample_labels_is_pil_nearest():
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 256, (97, 75), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(a).resize((19, 25), Image.NEAREST))
    out = irn.downsample_labels(torch.from_numpy(a)[None].long(), (25, 19))[0].numpy()
    np.testing.assert_array_equal(out, pil)
    lab = torch.arange(16).reshape(1, 4, 4)
    assert irn.downsample_labels(lab, (1, 1)).item() == 10  # the centre cell (2, 2)


# --------------------------------------------------------------------------------------------- losses

def _pair_masks(b, h, w, radius, value=1.0):
    n_src = (h - radius + 1) * (w - 2 * radius + 2)
    return torch.full((b, len(search_directions(radius)), n_src), value)


def test_displacement_loss_zero_cases():
    b, h, w, r = 2, 12, 14, 5
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    centre = torch.stack([3.5 - ys, 6.0 - xs])[None].expand(b, -1, -1, -1)  # D(p) = c - p
    ones, zeros = _pair_masks(b, h, w, r), _pair_masks(b, h, w, r, 0.0)
    edge = torch.zeros(b, 1, h, w)
    delta = irn.pair_displacement(centre, r)
    target = torch.tensor(irn.irn_offsets(r), dtype=torch.float32).t()[None, :, :, None]
    assert torch.allclose(delta, target.expand_as(delta))  # delta = o for every pair
    out = irn.irn_loss(edge, centre, zeros, ones, zeros, r)
    assert float(out["loss_dfg"]) == pytest.approx(0.0, abs=1e-6)
    const = torch.full((b, 2, h, w), 0.7)
    out = irn.irn_loss(edge, const, ones, zeros, zeros, r)
    assert float(out["loss_dbg"]) == 0.0
    assert float(irn.irn_loss(edge, const, zeros, ones, zeros, r)["loss_dfg"]) > 0.5  # |o| > 0 for a constant field
    assert float(irn.irn_loss(edge, centre, ones, zeros, zeros, r)["loss_dbg"]) > 0.5


def test_affinity_losses_and_total():
    b, h, w, r = 1, 10, 14, 5
    bg, fg, neg = _pair_masks(b, h, w, r), _pair_masks(b, h, w, r, 0.0), _pair_masks(b, h, w, r, 0.0)
    low = torch.full((b, 1, h, w), -20.0)  # sigmoid ~ 0: affinity ~ 1
    out = irn.irn_loss(low, torch.zeros(b, 2, h, w), bg, fg, neg, r)
    assert float(out["loss_pos"]) == pytest.approx(0.5 * -np.log(1 - torch.sigmoid(torch.tensor(-20.0)).item() + 1e-5),
                                                   abs=1e-6)  # bg half only; the empty fg half is 0
    out = irn.irn_loss(low, torch.zeros(b, 2, h, w), fg, fg, bg, r)  # all pairs negative, affinity 1
    assert float(out["loss_neg"]) == pytest.approx(-np.log(1e-5), rel=1e-3)
    total = (out["loss_pos"] + out["loss_neg"]) / 2 + (out["loss_dfg"] + out["loss_dbg"]) / 2
    assert torch.equal(out["loss"], total)


# --------------------------------------------------------------------------------------------- network

def test_irnet_shapes_at_os4(net):
    net.eval()
    with torch.no_grad():
        for hw in ((512, 512), (97, 75), (33, 130)):
            edge, disp = net(torch.randn(1, 3, *hw))
            want = (-(-hw[0] // 4), -(-hw[1] // 4))
            assert edge.shape == (1, 1, *want) and disp.shape == (1, 2, *want)


def test_backbone_frozen_heads_trained(net):
    net.train()
    assert not net.backbone.training and all(not m.training for m in net.backbone.modules())
    assert net.edge1.training and net.disp7.training
    assert all(not p.requires_grad for p in net.backbone.parameters())
    bn = net.backbone.bn1
    before = bn.running_mean.clone()
    for p in net.parameters():
        p.grad = None
    edge, disp = net(torch.randn(2, 3, 64, 64))
    (edge.sum() + disp.sum()).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.edge_layers.parameters())
    assert all(p.grad is not None for p in net.disp_layers.parameters())
    assert torch.equal(bn.running_mean, before)  # BN statistics untouched in train mode
    for p in net.parameters():
        p.grad = None


def test_mean_shift_identity_in_train_subtracts_in_eval(net):
    ms = irn.MeanShift(2)
    ms.running_mean.copy_(torch.tensor([0.5, -2.0]))
    x = torch.randn(3, 2, 4, 5)
    assert torch.equal(ms.train()(x), x)
    assert torch.allclose(ms.eval()(x), x - torch.tensor([0.5, -2.0]).view(1, 2, 1, 1))
    assert "mean_shift.running_mean" in net.state_dict()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        d_train = net.train()(x)[1]
        net.mean_shift.running_mean.fill_(1.0)
        d_eval = net.eval()(x)[1]
        net.mean_shift.running_mean.zero_()
    assert torch.allclose(d_eval, d_train - 1.0, atol=1e-6)


def test_edge_inference_averages_flipped_logits(net):
    net.eval()
    img = torch.randn(3, 30, 22)
    edge = irn.edge_inference(net, img, pad_to=48)
    assert edge.shape == (8, 6) and float(edge.min()) >= 0 and float(edge.max()) <= 1
    with torch.no_grad():
        x = F.pad(torch.stack([img, img.flip(-1)]), (0, 26, 0, 18))
        e = net(x)[0][:, 0, :8, :6]
    assert torch.allclose(edge, torch.sigmoid((e[0] + e[1].flip(-1)) / 2), atol=1e-6)


def test_copy_backbone_from_classifier_state(net):
    src = irn.build_irnet(TOY_BB).backbone
    for p in src.parameters():
        torch.nn.init.normal_(p)
    state = {f"student.backbone.{k}": v for k, v in src.state_dict().items()}
    state.update({f"teacher.backbone.{k}": v * 0 for k, v in src.state_dict().items()})
    state["student.head.weight"] = torch.zeros(3)
    dst = irn.build_irnet(TOY_BB).backbone
    assert irn.copy_backbone_from(dst, state) == "student.backbone."
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert irn.copy_backbone_from(dst, {f"backbone.{k}": v for k, v in src.state_dict().items()}) == "backbone."
    other = irn.build_irnet({**TOY_BB, "width_per_group": 8}).backbone
    with pytest.raises(ValueError, match="shapes differ"):
        irn.copy_backbone_from(dst, {f"backbone.{k}": v for k, v in other.state_dict().items()})
    with pytest.raises(KeyError):
        irn.copy_backbone_from(dst, {"fc.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- random walk

def _brute_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """Every pair (p, p + d) inside the image: 1 - max edge on the path; symmetric; 1 on the diagonal."""
    h, w = edge.shape
    a = torch.eye(h * w, dtype=edge.dtype)
    for (dy, dx), path in search_directions(radius):
        for y, x in itertools.product(range(h), range(w)):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                v = 1 - max(float(edge[y + py, x + px]) for py, px in path)
                a[y * w + x, (y + dy) * w + x + dx] = a[(y + dy) * w + x + dx, y * w + x] = v
    return a


def test_rw_affinity_matches_brute_force():
    edge = torch.rand(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(irn.rw_affinity(edge, 5), _brute_affinity(edge, 5))


def test_transition_columns_sum_to_one_and_constant_stays_constant():
    g = torch.Generator().manual_seed(0)
    # fp64: exact to 1e-9 after the 8 squarings; fp32 (the reference's precision) drifts to ~4e-5 over them
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        edge = (torch.rand(7, 9, generator=g) * 0.6).to(dtype)
        t = irn.rw_transition(edge, 5, 10, 8)
        torch.testing.assert_close(t.sum(0), torch.ones(63, dtype=dtype), atol=tol, rtol=0)
        v = torch.full((3, 63), 0.37, dtype=dtype)
        torch.testing.assert_close(v @ t, v, atol=tol, rtol=0)
    t1 = irn.rw_transition(edge, 5, 10, 0)  # before squaring: within 1e-5 in fp32
    torch.testing.assert_close(t1.sum(0), torch.ones(63), atol=1e-6, rtol=0)


def test_all_edge_gives_identity():
    t = irn.rw_transition(torch.ones(5, 6), 5, 10, 8)
    assert torch.equal(t, torch.eye(30))
    cams = torch.rand(3, 20, 24)
    out = irn.sem_seg_labels(cams, [0, 4, 9], torch.ones(5, 6))
    assert out.shape == (20, 24) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 4, 9}


def _reference_rw(x, edge, power, radius=5, beta=10, exp_times=8):
    """``make_seg_labels.py::_work`` / ``tool/indexing.py::propagate_to_edge`` by brute force: resize, power,
    v = X (1 - B), v T^(2^exp_times), x4 up, crop, / global max."""
    k, hh, ww = x.shape
    h, w = edge.shape
    a = _brute_affinity(edge.double(), radius).pow(beta)
    t = torch.linalg.matrix_power(a / a.sum(0, keepdim=True), 2 ** exp_times)
    xs = F.interpolate(x[None].double(), size=(h, w), mode="bilinear", align_corners=False)[0]
    return xs, lambda v: (lambda up: up / up.max())(
        F.interpolate(((v * (1 - edge.double())).reshape(v.shape[0], -1) @ t).reshape(-1, h, w)[None],
                      scale_factor=4, mode="bilinear", align_corners=False)[0, :, :hh, :ww])


def test_single_pass_equals_spec_formula():
    g = torch.Generator().manual_seed(3)
    x, edge, keys = torch.rand(3, 18, 21, generator=g), torch.rand(5, 6, generator=g) * 0.5, np.array([0, 2, 7])
    xs, walk = _reference_rw(x, edge, 1.5)
    want = keys[walk(xs.pow(1.5)).argmax(0).numpy()]
    np.testing.assert_array_equal(irn.sem_seg_labels(x.double(), keys, edge.double(), power=1.5), want)


def test_sfc_two_pass_equals_spec_formula():
    g = torch.Generator().manual_seed(4)
    x, edge, keys = torch.rand(3, 18, 21, generator=g) * 1.5, torch.rand(5, 6, generator=g) * 0.5, np.array([0, 3, 5])
    xs, walk = _reference_rw(x, edge, 1.3)
    p1 = xs.pow(1.3)
    r1 = walk(p1[1:])
    b1 = torch.cat([torch.full_like(r1[:1], 0.25), r1])
    r2 = walk(p1.pow(1.3))  # X^1.69 overall
    want = keys[(b1 + r2).argmax(0).numpy()]
    got = irn.sem_seg_labels(x.double(), keys, edge.double(), power=1.3, two_pass=True, bg_const=0.25)
    np.testing.assert_array_equal(got, want)
    single = irn.sem_seg_labels(x.double(), keys, edge.double(), power=1.3)
    assert got.shape == single.shape == (18, 21)


def test_sem_seg_labels_checks_inputs():
    with pytest.raises(ValueError, match="background map first"):
        irn.sem_seg_labels(torch.rand(2, 8, 8), [3, 4], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        irn.sem_seg_labels(torch.rand(2, 8, 8), [0, 4], torch.zeros(3, 2))
    assert (irn.sem_seg_labels(torch.rand(1, 8, 8), [0], torch.zeros(2, 2)) == 0).all()


# --------------------------------------------------------------------------------------------- cam2ir

def _identity_crf(image, labels, params, n):
    return labels


def test_cam2ir_combination_with_identity_crf():
    x = np.array([[[0.6, 0.6, 0.9]], [[0.8, 0.5, 0.1]]], np.float32)  # (2, 1, 3): bg, class 15
    image = np.zeros((1, 3, 3), np.uint8)
    conf = irn.cam_to_ir_label(image, x, [0, 15], crf_params("seam_label"), 0.5, crf=_identity_crf)
    np.testing.assert_array_equal(conf, [[15, 255, 0]])


def test_cam2ir_real_crf():
    pytest.importorskip("pydensecrf")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    x = np.zeros((3, 24, 32), np.float32)
    x[0] = 0.5
    x[1, 2:12, 2:14] = 1.0
    x[2, 14:22, 18:30] = 0.7  # bg x 0.5 = 0.25 < 0.7 but the fg map wins too
    x[2, 2:6, 20:24] = 0.4  # fg map says bg (0.5 > 0.4), bg map says fg (0.25 < 0.4): uncertain
    conf = irn.cam_to_ir_label(image, x, [0, 3, 8], crf_params("seam_label"))
    assert conf.dtype == np.uint8 and set(np.unique(conf)) <= {0, 3, 8, 255}
    assert conf[6, 8] == 3 and conf[18, 24] == 8 and conf[20, 4] == 0 and conf[4, 22] == 255
    with pytest.raises(ValueError, match="background map first"):
        irn.cam_to_ir_label(image, x[1:], [3, 8], crf_params("seam_label"))


# --------------------------------------------------------------------------------------------- stages (toy data)

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    pytest.importorskip("pydensecrf")
    tmp = tmp_path_factory.mktemp("irn")
    make_toy_dataset(tmp / "toy", seed=5, image_size=64, n_train_aug=8, n_train=4, n_val=2, n_classes=3)
    prepare_dataset({"kind": "toy", "root": str(tmp / "toy")}, "toy", tmp / "prepared")
    info = DatasetInfo(tmp / "prepared")
    rng = np.random.default_rng(0)
    shards = {"bg": [], "nobg": []}
    for kind in shards:
        for k in range(2):
            path = tmp / f"cams_{kind}" / f"{k}-of-2.h5"
            with ShardWriter(path, "cams", {"split": "train_aug"}) as w:
                for i in shard_ids(info.ids("train_aug"), k, 2):
                    gt = read_label_png(info.mask_path(i))
                    keys = np.array(info.labels(i))
                    fg = np.stack([cv2.GaussianBlur((gt == c).astype(np.float32) * 0.8, (5, 5), 0) for c in keys])
                    fg += rng.uniform(0, 0.15, fg.shape).astype(np.float32)
                    if kind == "bg":  # SFC-like: bg map first, and an aux stack
                        maps = np.concatenate([np.full((1, *gt.shape), 0.4, np.float32), fg])
                        w.add_cams(i, np.concatenate([[0], keys]), maps, aux=maps * 0.5)
                    else:
                        w.add_cams(i, keys, fg)
            shards[kind].append(str(path))
    (tmp / "cams.json").write_text(json.dumps({"threshold": {"value": 0.3, "source": {"split": "train"}}}))
    return tmp, info, shards


CFG = {
    "backbone": TOY_BB, "init_from_classifier": False, "cam_combine": {"cams": 1.0, "aux": 0.7}, "bg_scale": 0.5,
    "bg_threshold": "auto", "crf": {"preset": "seam_label", "params": {}}, "radius": 10, "batch_size": 2,
    "crop_size": 96, "scale_range": [0.9, 1.1], "max_steps": 2, "lr": 0.1, "disp_lr_mult": 10,
    "weight_decay": 1e-4, "fix_quirk": False, "momentum": 0.9, "poly_power": 0.9, "checkpoint_every": 100,
    "keep_checkpoints": 1, "num_workers": 0, "n_workers": 1,
    "rw": {"radius": 5, "beta": 10, "exp_times": 8, "power": 1.3, "combine": {"cams": 0.3, "aux": 1.0},
           "two_pass": True, "bg_const": 0.25},
    "n_shards": 2,
}


def _job(tmp, cfg, shard=0, **kw):
    """Settings of a job on the toy dataset: train split train_aug, mean shift on train, shard ``shard`` of 2."""
    from wsss_core.stages.job import JobSettings

    return JobSettings(prepared=str(tmp / "prepared"), splits={"train": "train_aug", "mask_eval": "train"}, cfg=cfg,
                       device="cpu", wildcards={"shard": shard, "nshards": 2}, **kw)


def _ir_label(tmp, cams, cam_eval, k, cfg, out, **kw):
    from wsss_core.stages.irn import cam_to_ir_label
    from wsss_core.stages.job import Files

    cam_to_ir_label(_job(tmp, cfg, k, **kw), Files(cams=cams, cam_eval=cam_eval), Files(masks=out))


def test_stage_cam_to_ir_label_and_eval(toy):
    from wsss_core.stages.irn import ir_label_scores as eval_ir_labels

    tmp, info, shards = toy
    for kind in ("bg", "nobg"):
        cfg = CFG if kind == "bg" else {**CFG, "cam_combine": {"cams": 1.0, "aux": 0.0}}
        paths = [str(tmp / f"ir_{kind}" / f"{k}-of-2.h5") for k in range(2)]
        for k, out in enumerate(paths):
            _ir_label(tmp, shards[kind], str(tmp / "cams.json"), k, cfg, out)
        with h5py.File(paths[0]) as fh:
            assert fh.attrs["bg_threshold"] == 0.3 and "eval_cams" in fh.attrs["bg_threshold_source"]
        with ShardedStore(paths) as store:
            assert set(store.ids()) == set(info.ids("train_aug"))
            for i, m in store.items():
                assert set(np.unique(m)) <= {0, 255, *info.labels(i)}
        res = eval_ir_labels(str(tmp / "prepared"), paths, "train", str(tmp / f"ir_{kind}.json"))
        assert res["n_images"] == 4 and 0.3 < res["labelled_fraction"] <= 1.0
        assert res["miou_labelled"] > 0.6
    par = str(tmp / "ir_par.h5")  # a worker pool gives the same labels
    _ir_label(tmp, shards["bg"], str(tmp / "cams.json"), 0, {**CFG, "n_workers": 2}, par, threads=2)
    with ShardedStore([par]) as a, ShardedStore([str(tmp / "ir_bg" / "0-of-2.h5")]) as b:
        assert a.ids() == b.ids() and all(np.array_equal(a[i], b[i]) for i in a.ids())
    with pytest.raises(DataError, match="no 'aux' maps"):
        _ir_label(tmp, shards["nobg"], str(tmp / "cams.json"), 0, CFG, str(tmp / "bad.h5"))


def test_stage_train_irn_and_random_walk(toy, tmp_path):
    from wsss_core.stages.irn import make_sem_seg_labels, train_irn
    from wsss_core.stages.job import Files

    tmp, info, shards = toy
    ir = [str(tmp_path / "ir" / f"{k}-of-2.h5") for k in range(2)]
    for k, out in enumerate(ir):
        _ir_label(tmp, shards["bg"], None, k, CFG, out)
    model_path = tmp_path / "irn" / "model.pt"
    train_irn(_job(tmp, CFG, lock_dir=str(tmp_path / "locks")), Files(ir_labels=ir, classifier=[]),
              Files(model=str(model_path)))
    ckpt = load_final(model_path)
    assert ckpt["meta"]["mean_shift_split"] == "train"
    assert torch.allclose(ckpt["model"]["mean_shift.running_mean"], torch.tensor(ckpt["meta"]["mean_shift"]))
    assert float(ckpt["model"]["mean_shift.running_mean"].abs().sum()) > 0
    lines = [json.loads(x) for x in (tmp_path / "irn" / "state" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"loss", "loss_pos", "loss_neg", "loss_dfg", "loss_dbg", "n_bg_pos", "n_fg_pos",
                                "n_neg"} <= set(lines[0])
    assert lines[0]["n_bg_pos"] + lines[0]["n_fg_pos"] + lines[0]["n_neg"] > 0
    for kind, cams in (("bg", shards["bg"]), ("nobg", shards["nobg"])):
        cfg = CFG if kind == "bg" else {**CFG, "bg_threshold": 0.2,
                                        "rw": {**CFG["rw"], "combine": {"cams": 1.0, "aux": 0.0}, "two_pass": False}}
        out = tmp_path / f"pm_{kind}.h5"
        make_sem_seg_labels(_job(tmp, cfg, lock_dir=str(tmp_path / "locks")),
                            Files(cams=cams, cam_eval=None, model=str(model_path)), Files(masks=str(out)))
        with ShardedStore([out]) as store:
            assert set(store.ids()) == set(shard_ids(info.ids("train_aug"), 0, 2))
            for i, m in store.items():
                assert m.shape == (64, 64) and set(np.unique(m)) <= {0, *info.labels(i)}


def test_train_irn_init_from_classifier_errors(toy, tmp_path):
    from wsss_core.stages.irn import train_irn
    from wsss_core.stages.job import Files

    tmp, info, shards = toy
    cfg = {**CFG, "init_from_classifier": True}
    job, out = _job(tmp, cfg, lock_dir=str(tmp_path / "locks")), Files(model=str(tmp_path / "m.pt"))
    with pytest.raises(ConfigError, match="no classifier model"):
        train_irn(job, Files(ir_labels=[], classifier=[]), out)
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "meta": {}}, tmp_path / "clf.pt")
    with pytest.raises(ConfigError, match="must match the classifier"):
        train_irn(job, Files(ir_labels=[], classifier=[str(tmp_path / "clf.pt")]), out)


def test_resolve_bg(tmp_path):
    from wsss_core.stages.irn import resolve_bg

    assert resolve_bg({"bg_threshold": 0.2}, None) == (0.2, "set in config (irn.bg_threshold)")
    assert resolve_bg({"bg_threshold": "auto"}, None)[0] is None
    p = tmp_path / "cams.json"
    p.write_text(json.dumps({"threshold": {"value": 0.35, "source": {"split": "train"}}}))
    assert resolve_bg({"bg_threshold": "auto"}, str(p))[0] == 0.35
    p.write_text(json.dumps({"threshold": {"value": 0.0, "own_bg": True, "source": {"split": "train"}}}))
    assert resolve_bg({"bg_threshold": "auto"}, str(p))[0] is None


def test_train_irn_rejects_a_crop_too_small_for_the_radius():
    from wsss_core.errors import ConfigError
    from wsss_core.stages.irn import check_pair_grid

    check_pair_grid(96, 10)     # 24 cells > 18
    check_pair_grid(64, 5)      # 16 cells > 8
    with pytest.raises(ConfigError, match="crop_size"):
        check_pair_grid(64, 10)  # 16 cells: no source column at radius 10 (the reference's 512 crop has 128)
