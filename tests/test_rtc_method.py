"""RTC: the transform half (cross-view prototypes, feedback, structure loss, InfoNCE), the network's gradient paths,
the single-stage inference, and resume after a kill. Oracles: the spec's closed forms and plain loops written in
the reference's structure (``ChunyanWang1/RTC`` ``contrast_train.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.methods import get_method, ppc_ops
from wsss_core.methods import rtc_ops as ops

K = 4  # foreground classes


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _cfg(**rtc):
    return {"backbone": {"arch": "resnet38", "width": 0.0625, "weights": None, "frozen_bn": False,
                         "frozen_stem": False},
            "lr": 0.01, "weight_decay": 5e-4, "fix_quirk": True, "momentum": 0.9, "max_steps": 4,
            "rtc": {"view2_size": 16, "refine_iters": 2, "refine_dilations": [1, 2], **rtc}}


def _batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(n, K)
    label[0, 0] = label[0, 2] = 1
    label[1, 1] = 1
    valid = torch.zeros(n, 1, size, size)
    valid[:, :, 2:30, 4:28] = 1
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": label, "valid": valid}


# ---- InfoNCE, max_onehot, top-k ------------------------------------------------------------------------------

def test_info_nce_sanity_values():
    """Orthonormal prototypes, features equal to their positive: log(1 + 20 e^-10); the wrong positive: ~10."""
    p = torch.eye(21, 32)
    y = torch.arange(21).repeat(3)
    f = p[y]
    assert ops.info_nce(f, p, y, 0.1).item() == pytest.approx(math.log(1 + 20 * math.exp(-10)), rel=1e-4)
    assert 0.1 * ops.info_nce(f, p, y, 0.1).item() == pytest.approx(9.08e-5, rel=1e-2)
    wrong = ops.info_nce(f, p, (y + 1) % 21, 0.1).item()
    assert wrong == pytest.approx(10 + math.log(1 + 20 * math.exp(-10)), rel=1e-4)


def test_max_onehot_idempotent_keeps_bg_and_input():
    x = torch.rand(2, 5, 6, 7)
    before = x.clone()
    y = ppc_ops.max_onehot(x, slice(1, None))
    assert torch.equal(x, before)                                    # the input is untouched (a clone)
    assert torch.equal(y[:, 0], x[:, 0])                             # bg unchanged
    assert ((y[:, 1:] != 0).sum(1) <= 1).all()                       # one fg value per pixel (no ties here)
    assert torch.equal(ppc_ops.max_onehot(y, slice(1, None)), y)     # idempotent


def test_topk_stable_breaks_ties_by_position():
    x = torch.tensor([[0.2, 0.5, 0.2, 0.2, 0.5, 0.2]])
    val, idx = ops.topk_stable(x, 4)
    assert idx.tolist() == [[1, 4, 0, 2]] and torch.equal(val, x[:, [1, 4, 0, 2]])
    const = torch.full((1, 50), 0.2)
    assert ops.topk_stable(const, 6)[1].tolist() == [list(range(6))]   # the constant bg row: the first k pixels


# ---- cross-view prototypes and feedback against the reference's loops ----------------------------------------

def _reference_transform(n1, n2, f1, f2, label_bg, k):
    """contrast_train.py's loop over classes (top-k by a stable sort, as :func:`ops.topk_stable`)."""
    n, c, h, w = n1.shape
    d = f1.shape[1]
    fea1, fea2 = f1.permute(0, 2, 3, 1).reshape(-1, d), f2.permute(0, 2, 3, 1).reshape(-1, d)
    v1, i1 = ops.topk_stable(n1.transpose(0, 1).reshape(c, -1), k)
    v2, i2 = ops.topk_stable(n2.transpose(0, 1).reshape(c, -1), k)
    p1, p2 = torch.zeros(c, d), torch.zeros(c, d)
    new1, new2 = torch.zeros_like(n1), torch.zeros_like(n2)
    counts = label_bg.sum(0)
    for i in range(c):
        top1, top2 = fea2[i1[i]], fea1[i2[i]]
        p1[i] = (v1[i][:, None] * top1).sum(0) / v1[i].sum()
        p2[i] = (v2[i][:, None] * top2).sum(0) / v2[i].sum()
        if counts[i] == 0:
            new1[:, i], new2[:, i] = n1[:, i], n2[:, i]
            continue
        att = torch.softmax(F.normalize(fea2, dim=-1) @ F.normalize(top1, dim=-1).t(), dim=1)
        new1[:, i] = n1[:, i] + (att @ v1[i][:, None]).view(n, h, w)
        att = torch.softmax(F.normalize(fea1, dim=-1) @ F.normalize(top2, dim=-1).t(), dim=1)
        new2[:, i] = n2[:, i] + (att @ v2[i][:, None]).view(n, h, w)
    return F.normalize(p1, dim=-1), F.normalize(p2, dim=-1), new1, new2


def test_cross_view_prototypes_and_feedback_match_the_reference_loop():
    g = torch.Generator().manual_seed(1)
    n, c, h, w, d, k = 2, K + 1, 4, 4, 8, 2
    n1, n2 = torch.rand(n, c, h, w, generator=g), torch.rand(n, c, h, w, generator=g)
    n1[:, 0] = n2[:, 0] = 0.2                                           # the constant bg channel: ties
    f1, f2 = torch.randn(n, d, h, w, generator=g), torch.randn(n, d, h, w, generator=g)
    label = torch.tensor([[1.0, 0, 1, 0], [1, 0, 0, 0]])                # class 2 (index 2) absent in the batch
    lb = ppc_ops.label_with_bg(label, 0)
    rp1, rp2, rn1, rn2 = _reference_transform(n1, n2, f1, f2, lb, k)
    p1, v1, i1 = ops.cross_view_prototypes(n1, f2, k)
    p2, v2, i2 = ops.cross_view_prototypes(n2, f1, k)
    present = lb.sum(0) > 0
    torch.testing.assert_close(p1, rp1)
    torch.testing.assert_close(p2, rp2)
    torch.testing.assert_close(ops.context_feedback(n1, f2, v1, i1, present), rn1)
    torch.testing.assert_close(ops.context_feedback(n2, f1, v2, i2, present), rn2)
    assert torch.equal(ops.context_feedback(n1, f2, v1, i1, present)[:, 2], n1[:, 2])   # absent: copied
    assert i1[0].tolist() == [0, 1]                                                     # bg: first pixels


def test_transform_losses_gradient_paths():
    """Structure loss: gradient only through the CAM maps c1/c2; InfoNCE: only through the projected features."""
    g = torch.Generator().manual_seed(2)
    n, c = 2, K + 1
    cam_rv1, cam_rv2 = torch.rand(n, c, 8, 8, generator=g), torch.rand(n, c, 4, 4, generator=g)
    f1 = torch.randn(n, 6, 8, 8, generator=g, requires_grad=True)
    f2 = torch.randn(n, 6, 4, 4, generator=g, requires_grad=True)
    c1 = torch.rand(n, c, 16, 16, generator=g, requires_grad=True)
    c2 = torch.rand(n, c, 16, 16, generator=g, requires_grad=True)
    label = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    p = {"bg_thr": 0.2, "proto_div": 8, "tau": 0.1, "nce_weight": 0.1, "struct_topk": 0.8, "stable_topk": True}
    out = ops.transform_losses(cam_rv1, f1, cam_rv2, f2, c1, c2, label, p)
    gs = torch.autograd.grad(out["loss_struct"], [c1, c2, f1, f2], allow_unused=True)
    assert gs[0] is not None and gs[0].abs().sum() > 0 and gs[1].abs().sum() > 0
    assert gs[2] is None and gs[3] is None
    gn = torch.autograd.grad(out["loss_nce"], [c1, f1, f2], allow_unused=True)
    assert gn[0] is None and gn[1].abs().sum() > 0 and gn[2].abs().sum() > 0
    total = out["intra"] + out["cross_label"] + out["cross_proto"]
    assert torch.allclose(out["loss_nce"], total) and out["loss_struct"] > 0


# ---- the network ---------------------------------------------------------------------------------------------

def test_training_step_segmentation_starts_late_and_trains_only_its_paths():
    rtc = get_method("rtc")
    cfg = _cfg(seg_start=0.5)
    torch.manual_seed(0)
    model = rtc.build_model(cfg, K).train()
    batch = _batch()
    early = rtc.training_step(model, batch, 1, cfg)
    assert early["loss_seg"].item() == 0.0
    late = rtc.training_step(model, batch, 2, cfg)                   # step 2 >= 0.5 * 4
    assert late["loss_seg"].item() > 0
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(late["loss_seg"], list(params.values()), allow_unused=True)
    reached = {n for (n, _), gr in zip(params.items(), grads) if gr is not None and gr.abs().sum() > 0}
    assert any(n.startswith("seg_head.") for n in reached) and any(n.startswith("backbone.b7") for n in reached)
    assert not any(n.startswith(("fcm.", "proj1.", "classifier1.")) for n in reached)
    keys = {"loss", "loss_cls", "loss_er", "loss_ecr", "loss_struct", "loss_nce", "loss_seg"}
    assert set(late) == keys and all(torch.isfinite(v) for v in late.values())
    total = sum(late[k] for k in keys - {"loss"})
    assert torch.allclose(late["loss"], total)


def test_fcm_convs_learn_only_from_ecr_and_rvmin():
    """The FCM's seed and backbone taps are detached: the structure, InfoNCE and ER terms never reach f8/f9."""
    rtc = get_method("rtc")
    cfg = _cfg(seg_start=1.0)
    model = rtc.build_model(cfg, K).train()
    out = rtc.training_step(model, _batch(), 0, cfg)
    fcm = list(model.fcm.parameters())
    for name in ("loss_struct", "loss_nce", "loss_er"):
        gs = torch.autograd.grad(out[name], fcm, allow_unused=True, retain_graph=True)
        assert all(g is None or g.abs().sum() == 0 for g in gs), name
    gs = torch.autograd.grad(out["loss_ecr"] + out["loss_cls"], fcm, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in gs)


def test_infer_seg_gates_by_scores_or_labels():
    rtc = get_method("rtc")
    model = rtc.build_model(_cfg(), K).eval()
    image = np.random.default_rng(0).integers(0, 255, (30, 26, 3), dtype=np.uint8)
    keys, maps = rtc.infer_seg(model, image, [1.0, 0.5], True, torch.device("cpu"))
    assert keys.tolist() == [1, 2, 3, 4] and maps.shape == (K, 30, 26)
    assert (maps >= 0).all() and (maps.sum(0) <= 1 + 1e-5).all()   # gated fg probabilities
    keys_l, maps_l = rtc.infer_seg(model, image, [1.0, 0.5], True, torch.device("cpu"), keys=[2, 4])
    assert keys_l.tolist() == [2, 4] and maps_l.shape == (2, 30, 26)
    assert (maps_l >= maps[[1, 3]] - 1e-6).all()                     # label gate 1 >= any sigmoid score


def test_rtc_settings_reject_unknown_keys():
    from wsss_core.errors import ConfigError

    with pytest.raises(ConfigError, match="seg_strat"):
        get_method("rtc").build_model(_cfg(seg_strat=0.1), K)


def test_rtc_training_resumes_bit_identically(tmp_path):
    """Kill after 2 of 4 steps (the segmentation loss on from step 2) and resume: the weights equal an
    uninterrupted run exactly."""
    from wsss_core.engine.trainer import fit

    rtc = get_method("rtc")
    cfg = _cfg(seg_start=0.5)

    def run(ckpt_dir, max_steps):
        torch.manual_seed(0)
        model = rtc.build_model(cfg, K)
        opt = rtc.build_optimizer(model, cfg)
        batches = lambda start: (_batch(seed=s) for s in range(start, 10))  # noqa: E731

        def step_fn(m, b, step):
            torch.manual_seed(step)  # dropout masks are a function of the step
            return rtc.training_step(m, b, step, cfg)

        fit(model, step_fn, batches, opt, None, max_steps, ckpt_dir, checkpoint_every=2)
        return model

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
