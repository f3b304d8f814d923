"""PPC and FSAE as pipeline methods: model shapes, losses end to end, optimizer groups, the EMA teacher,
the FSAE loss composition, weak/strong training views, stand-in saliency, and resumable FSAE training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_images
from wsss_core.config import stage_config
from wsss_core.errors import ConfigError, DatasetError
from wsss_core.methods import fsae, fsae_ops, get_method, ppc
from wsss_core.models.resnet38 import ResNet38, build_resnet38

K = 4  # foreground classes


def _cfg(variant="eps", **fsae_kw):
    return {"backbone": {"arch": "resnet38", "width": 0.0625, "weights": None, "frozen_bn": True,
                         "frozen_stem": True},
            "lr": 0.01, "weight_decay": 5e-4, "ppc": {"variant": variant, "view2_size": 32},
            "fsae": {"base": "ppc", **fsae_kw}}


def _batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(b, K)
    label[:, 0] = 1
    label[1, 2] = 1
    return {"image": random_images(b, size, size, seed), "label": label,
            "saliency": torch.rand(b, 1, size, size, generator=g),
            "image_strong": random_images(b, size, size, seed + 1)}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def test_resnet38_width_scales_channels_and_refuses_pretrained_weights():
    net = ResNet38(width=0.125)
    assert net.out_channels == 512 and net.tap_channels == {"conv3": 32, "conv4": 64, "conv5": 128}
    feats = net.forward_features(random_images(1, 32, 32))
    assert feats["conv6"].shape == (1, 512, 4, 4) and feats["conv4"].shape == (1, 64, 4, 4)
    assert ResNet38().out_channels == 4096
    with pytest.raises(ConfigError, match="width 1.0"):
        build_resnet38(weights={"path": "x.params"}, width=0.5)


@pytest.mark.parametrize("variant,bg", [("eps", -1), ("seam", 0)])
def test_ppc_model_shapes_and_cam_forward(variant, bg):
    torch.manual_seed(0)
    model = ppc.build_model(_cfg(variant), K).eval()
    assert model.bg_index == bg
    x = random_images(2, 64, 48)
    out = model(x)
    for k in ("cam", "cam_rv"):
        assert out[k].shape == (2, K + 1, 8, 6)
    assert out["f_proj"].shape == (2, 128, 8, 6) and (out["f_proj"] >= 0).all()
    logits, b = ppc.cam_logits(model, x)
    assert b == bg and logits.shape == (2, K + 1, 8, 6)
    cams = ppc.cam_forward(model, x)
    assert cams.shape == (2, K, 8, 6) and (cams >= 0).all()
    if variant == "eps":  # fg softmax probabilities: with the bg probability they sum to 1
        bgp = torch.softmax(logits, 1)[:, -1]
        torch.testing.assert_close(cams.sum(1) + bgp, torch.ones_like(bgp))


@pytest.mark.parametrize("variant", ["eps", "seam"])
def test_ppc_training_step_terms_and_gradients(variant):
    torch.manual_seed(0)
    cfg = _cfg(variant)
    model = ppc.build_model(cfg, K).train()
    out = ppc.training_step(model, _batch(), 0, cfg)
    terms = ["loss_cls", "loss_er", "loss_ecr", "loss_nce"] + (["loss_sal"] if variant == "eps" else [])
    assert set(out) == {"loss", *terms}
    assert all(torch.isfinite(out[t]) and out[t] >= 0 for t in terms)
    torch.testing.assert_close(out["loss"], sum(out[t] for t in terms))
    out["loss"].backward()
    assert model.fc8.weight.grad.abs().sum() > 0 and model.fc_proj.weight.grad.abs().sum() > 0
    assert model.pcm.f9.weight.grad.abs().sum() > 0
    assert model.backbone.conv1a.weight.grad is None  # frozen stem
    assert model.backbone.b4.conv_branch2a.weight.grad.abs().sum() > 0


def test_ppc_eps_without_saliency_says_so():
    cfg = _cfg("eps")
    model = ppc.build_model(cfg, K)
    batch = _batch()
    del batch["saliency"]
    with pytest.raises(ConfigError, match="saliency"):
        ppc.training_step(model, batch, 0, cfg)


@pytest.mark.parametrize("variant", ["eps", "seam"])
def test_ppc_proto_safe_denominator_defaults_to_the_reference_and_reaches_the_contrast_loss(variant, monkeypatch):
    assert ppc.ppc_settings({"ppc": {"variant": variant}})["proto_safe_denominator"] is False
    assert ppc.ppc_settings({"ppc": {"variant": variant, "proto_safe_denominator": None}})[
        "proto_safe_denominator"] is False
    seen = []
    real = ppc.ops.ppc_contrast_loss

    def spy(*a, **kw):
        seen.append(kw["proto_safe_denominator"])
        return real(*a, **kw)

    monkeypatch.setattr(ppc.ops, "ppc_contrast_loss", spy)
    torch.manual_seed(0)
    cfg = _cfg(variant)
    model = ppc.build_model(cfg, K).train()
    ppc.training_step(model, _batch(), 0, cfg)
    safe_cfg = {**cfg, "ppc": {**cfg["ppc"], "proto_safe_denominator": True}}
    out = ppc.training_step(model, _batch(), 0, safe_cfg)
    assert seen == [False, True] and torch.isfinite(out["loss_nce"])


def test_ppc_param_groups_reproduce_or_fix_the_momentum_quirk():
    cfg = _cfg()
    model = ppc.build_model(cfg, K)
    groups = {g["name"]: g for g in ppc.build_optimizer(model, cfg).param_groups}
    assert set(groups) == {"bw", "nw"}  # every conv is bias-free
    assert groups["bw"]["lr"] == 0.01 and groups["nw"]["lr"] == pytest.approx(0.1)
    assert groups["bw"]["momentum"] == 5e-4 and groups["bw"]["weight_decay"] == 5e-4
    head_ids = {id(p) for m in model.new_layers for p in m.parameters()}
    assert {id(p) for p in groups["nw"]["params"]} == head_ids
    fixed = {g["name"]: g for g in ppc.build_optimizer(model, {**cfg, "fix_quirk": True, "momentum": 0.9}).param_groups}
    assert fixed["bw"]["momentum"] == 0.9 and fixed["nw"]["weight_decay"] == 5e-4


def test_fsae_model_teacher_is_a_frozen_copy_and_ema_matches_the_formula():
    torch.manual_seed(0)
    cfg = _cfg()
    model = fsae.build_model(cfg, K)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for (n, s), (_, t) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(s, t), n
    group_ids = {id(p) for g in fsae.param_groups(model, cfg) for p in g["params"]}
    assert not group_ids & {id(p) for p in model.teacher.parameters()}
    assert model.registered and "backbone.conv1a.weight" not in model.registered  # frozen: not registered
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    fsae.after_step(model, 0, cfg)
    s = dict(model.student.named_parameters())
    for n, t in model.teacher.named_parameters():
        want = 0.999 * before[n] + 0.001 * s[n] if n in model.registered else s[n]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)


def test_fsae_step_is_base_loss_plus_pixel_ce_and_cam_forward_is_the_students():
    torch.manual_seed(0)
    cfg = _cfg()
    model = fsae.build_model(cfg, K).train()
    batch = _batch()
    torch.manual_seed(1)
    out = fsae.training_step(model, batch, 0, cfg)
    for k in ("loss_sup", "loss_pl", "loss_ring", "teacher_conf", "mask_ratio", "ring_ratio", "agreement",
              "loss_sal", "loss_nce"):
        assert k in out
    torch.testing.assert_close(out["loss"], out["loss_sup"] + out["loss_pl"])
    # no confident pixel at all (p_cutoff above 1, ring off): the FSAE term is exactly zero
    cfg0 = _cfg(p_cutoff=1.01, bdry=False)
    out0 = fsae.training_step(model, batch, 0, cfg0)
    assert out0["loss_pl"] == 0 and out0["mask_ratio"] == 0
    model.eval()
    x = random_images(1, 64, 64, 5)
    torch.testing.assert_close(fsae.cam_forward(model, x), ppc.cam_forward(model.student, x))


def test_fsae_pixel_ce_follows_teacher_labels_on_the_strong_view():
    """With the teacher's labels made confident, L_pl equals pixel_ce of the student's masked strong logits."""
    torch.manual_seed(0)
    cfg = _cfg(p_cutoff=0.5)
    model = fsae.build_model(cfg, K).eval()  # eval: no dropout, so forwards are repeatable
    batch = _batch()
    with torch.no_grad():
        model.teacher.fc8.weight.normal_(0, 1000.0)  # a sharp teacher: many confident pixels
    out = fsae.training_step(model, batch, 0, cfg)
    with torch.no_grad():
        zw = model.teacher.logits(batch["image"])
        t = fsae_ops.teacher_pseudo_labels(zw, batch["label"], 0.5, True, 3, 0.8, bg_index=-1)
        zs = fsae_ops.mask_absent_classes(model.student.logits(batch["image_strong"]), batch["label"])
        want = fsae_ops.pixel_ce(zs, t["target"])
    assert t["mask"].float().mean() > 0.2
    torch.testing.assert_close(out["loss_pl"], want)


@pytest.mark.parametrize("shared", [True, False])
def test_fsae_teacher_forward_and_bn_running_statistics_as_the_one_module_upstream(shared):
    """``obeychoi0120/PixMatch`` ``module/train.py::train_ssl`` runs the teacher on the student module itself
    (``EMA.apply_shadow`` swaps parameters, not buffers), in train mode: with trainable BN its weak-view forward updates
    the one set of running statistics. ``shared_bn_stats`` (default) reproduces that bit for bit; off, the student's
    statistics come from its own forwards only."""
    import copy

    cfg = _cfg()
    cfg["backbone"].update(frozen_bn=False, frozen_stem=False)
    cfg["fsae"]["shared_bn_stats"] = shared
    torch.manual_seed(0)
    model = fsae.build_model(cfg, K).train()
    assert model.updates_bn_stats()
    with torch.no_grad():  # an EMA teacher that differs from the student
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model.student)  # the reference's single module
    shadow = {n: p.detach().clone() for n, p in model.teacher.named_parameters() if n in model.registered}
    teacher_bufs = {n: b.clone() for n, b in model.teacher.named_buffers()}
    batch = _batch()
    torch.manual_seed(1)
    fsae.training_step(model, batch, 0, cfg)
    # train_ssl: student on both weak views; apply_shadow; teacher forward_cam(img_w); restore; student strong view
    torch.manual_seed(1)
    ppc.supervised_loss(ref, batch, 0, cfg, sal_view2="direct")
    params = dict(ref.named_parameters())
    backup = {n: params[n].data for n in shadow}
    for n, p in shadow.items():
        params[n].data = p
    with torch.no_grad():
        if shared:
            ref.logits(batch["image"])
        else:  # what the separate teacher does with its own buffers: the same forward, statistics not kept
            saved = {n: b.clone() for n, b in ref.named_buffers()}
            ref.logits(batch["image"])
            for n, b in ref.named_buffers():
                b.copy_(saved[n])
    for n in shadow:
        params[n].data = backup[n]
    ref.logits(batch["image_strong"])
    ref_bufs = dict(ref.named_buffers())
    for n, b in model.student.named_buffers():
        assert torch.equal(b, ref_bufs[n]), n
    for n, b in model.teacher.named_buffers():  # the teacher's own copy: untouched when shared
        if shared:
            assert torch.equal(b, teacher_bufs[n]), n
    fsae.after_step(model, 0, cfg)  # EMA update: buffers copied from the student
    for n, b in model.teacher.named_buffers():
        assert torch.equal(b, ref_bufs[n]), n
    frozen = fsae.build_model(_cfg(), K).train()  # VOC-like frozen BN: nothing to share
    assert not frozen.updates_bn_stats()


def test_fsae_rejects_unknown_keys_and_bad_base():
    with pytest.raises(ConfigError, match="bdry_sizee"):
        fsae.fsae_settings({"fsae": {"bdry_sizee": 3}})
    with pytest.raises(ConfigError):
        fsae.fsae_settings({"fsae": {"base": "fsae"}})
    assert get_method("fsae") is fsae and get_method("ppc") is ppc


def test_fsae_training_resumes_bit_identically_with_its_teacher(tmp_path):
    """Kill after 2 of 4 steps and resume: student and EMA teacher equal an uninterrupted run exactly."""
    from wsss_core.engine.trainer import fit

    cfg = _cfg()

    def run(ckpt_dir, max_steps):
        torch.manual_seed(0)
        model = fsae.build_model(cfg, K)
        opt = torch.optim.SGD(fsae.param_groups(model, cfg), lr=0.01)
        batches = lambda start: (_batch(seed=s) for s in range(start, 10))  # noqa: E731

        def step_fn(m, b, step):
            torch.manual_seed(step)  # dropout masks are a function of the step
            return fsae.training_step(m, b, step, cfg)

        fit(model, step_fn, batches, opt, None, max_steps, ckpt_dir, checkpoint_every=2,
            after_step=lambda m, s: fsae.after_step(m, s, cfg))
        return model

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)  # "killed" right after the step-2 checkpoint
    resumed = run(tmp_path / "b", 4)
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(full.teacher.fc8.weight, full.student.fc8.weight)


def test_views_dataset_weak_strong_and_saliency(tmp_path):
    from wsss_core.data.datasets import ViewsDataset
    from wsss_core.data.io import write_image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "sal").mkdir()
    for i in ("a", "b"):
        write_image(tmp_path / "img" / f"{i}.jpg", rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
        write_image(tmp_path / "sal" / f"{i}.png", np.full((50, 70, 3), 255, np.uint8))
    labels = np.eye(2, K, dtype=np.float32)
    ds = ViewsDataset(tmp_path / "img", ["a", "b"], labels, 64, (60, 80), seed=3, saliency_dir=tmp_path / "sal",
                      strong=True, strong_cfg={"n_strong_augs": 5, "blur_kernel": 1})
    item = ds[0]
    assert item["image"].shape == item["image_strong"].shape == (3, 64, 64)
    assert item["saliency"].shape == (1, 64, 64)
    sal = item["saliency"]
    assert sal.min() == 0 and sal.max() == 1  # the crop pads with 0 around the all-salient image
    assert not torch.equal(item["image"], item["image_strong"])
    again = ds[0]
    assert torch.equal(item["image_strong"], again["image_strong"])  # a pure function of (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], item["image"])
    plain = ViewsDataset(tmp_path / "img", ["a"], labels[:1], 64, (60, 80))
    assert set(plain[0]) == {"image", "label", "id"}


def test_standin_saliency_is_class_agnostic_and_degraded():
    from wsss_core.data.saliency import standin_saliency

    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    other = np.where(mask == 1, 3, 0).astype(np.uint8)
    a = standin_saliency(mask, np.random.default_rng(0))
    b = standin_saliency(other, np.random.default_rng(0))
    assert np.array_equal(a, b)  # no class information
    assert a.dtype == np.uint8 and a[24:40, 24:40].mean() > 200 and a[:8, :8].mean() < 60
    assert 0 < (np.abs(a.astype(int) - 255 * (mask > 0)) > 30).mean() < 0.5  # blurred and noisy, not the GT


def test_saliency_folder_checks_name_what_is_missing(tmp_path):
    from wsss_core.data.saliency import check_saliency_folder, read_saliency

    with pytest.raises(DatasetError, match="nowhere"):
        check_saliency_folder(tmp_path / "nowhere", ["a"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.png").write_bytes(b"not a png")
    assert check_saliency_folder(tmp_path / "s", ["a", "b"]) == ["b"]
    with pytest.raises(DatasetError, match="a.png"):
        read_saliency(tmp_path / "s", "a")


def test_experiment_dataset_overrides_are_applied_last():
    import yaml

    from conftest import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    toy = stage_config(config, "toy", "ppc_fsae", "classifier")
    voc = stage_config(config, "voc", "ppc_fsae", "classifier")
    assert toy["backbone"]["width"] == 0.125 and toy["backbone"]["weights"] is None and toy["crop_size"] == 96
    assert voc["backbone"]["width"] == 1.0 and voc["backbone"]["weights"]["path"].endswith(".params")
    assert voc["max_steps"] == 40000 and stage_config(config, "voc", "ppc", "classifier")["max_steps"] == 20000
    assert toy["fsae"] == {"base": "ppc"}  # the rest: the reference defaults of wsss_core/methods/fsae.py
    from wsss_core.methods.fsae import fsae_settings
    assert fsae_settings(toy)["bdry_cutoff"] == 0.8 and fsae_settings(toy)["p_cutoff"] == 0.95


def test_crf_bg_alpha_source():
    from wsss_core.stages.refine import resolve_bg_threshold

    bg, src = resolve_bg_threshold({"bg_alpha": 8, "bg_threshold": "auto"}, None)
    assert bg == ("alpha", 8.0) and "** 8" in src
    assert resolve_bg_threshold({"bg_threshold": 0.3}, None)[0] == 0.3
