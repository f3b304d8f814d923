"""MCTformer V1/V2 method module (``xulianuwa/MCTformer`` branch ``MCTformerPlus``): tiny CPU models, real
properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_core.errors import WeightsError
from wsss_core.methods import mctformer as M
from wsss_core.methods import mctformer_ops as ops

C = 3


def tiny_cfg(version="v2", **mct):
    return {"backbone": {"arch": "vit", "embed_dim": 16, "depth": 3, "heads": 2, "patch_size": 16, "img_size": 64,
                         "drop_path": 0.0, "weights": None},
            "lr": 1e-3, "weight_decay": 0.05, "max_steps": 100, "mctformer": {"version": version, **mct}}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return M.build_model(tiny_cfg(), C).eval()


def test_one_attention_map_per_class_token_on_a_non_square_input(model):
    x = torch.randn(2, 3, 64, 48)  # grid h=4, w=3 (non-square)
    out = model(x)
    assert out["grid"] == (4, 3) and out["logits"].shape == (2, C) and out["z"].shape == (2, C, 4, 3)
    n = C + 12
    for a in out["attns"]:
        assert a.shape == (2, 2, n, n)
        assert torch.allclose(a.mean(1).sum(-1), torch.ones(2, n), atol=1e-5)
    m = ops.class_to_patch_maps(out["attns"], C, out["grid"], last_k=3)
    assert m.shape == (2, C, 4, 3) and (m >= 0).all() and (m <= 3 + 1e-6).all()
    # map c at patch (r, q) is class token c's attention to token C + r*w + q, summed over the last 3 blocks
    for c in range(C):
        for r, q in [(0, 0), (2, 1), (3, 2)]:
            want = sum(a.mean(1)[:, c, C + r * 3 + q] for a in out["attns"])
            assert torch.allclose(m[:, c, r, q], want, atol=1e-6)
    p = ops.patch_affinity(out["attns"], C)
    assert p.shape == (2, 12, 12)


def test_v1_logits_are_the_channel_mean_of_the_class_tokens_and_has_no_patch_head():
    torch.manual_seed(0)
    m = M.build_model(tiny_cfg("v1"), C).eval()
    assert m.head is None
    seen = {}
    m.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.update(tokens=out[0]))
    out = m(torch.randn(1, 3, 32, 32))
    assert "z" not in out
    assert torch.allclose(out["logits"], seen["tokens"][:, :C].mean(-1))


def test_losses_are_multilabel_soft_margin_and_v2_adds_the_patch_term(model):
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    model.train()
    torch.manual_seed(1)
    res = M.training_step(model, {"image": x, "label": y}, 0, tiny_cfg())
    torch.manual_seed(1)
    out = model(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(res["loss_cls"], bce(out["logits"], y), atol=1e-6)
    assert torch.allclose(res["loss_patch"], bce(out["logits_patch"], y), atol=1e-6)
    assert torch.allclose(res["loss"], res["loss_cls"] + res["loss_patch"])


def test_position_table_at_another_grid_keeps_the_class_slots(model):
    pe = ops.interpolate_pos_embed(model.pos_embed, C, (5, 2))
    assert pe.shape == (1, C + 10, 16)
    assert torch.equal(pe[:, :C], model.pos_embed[:, :C])
    assert torch.equal(ops.interpolate_pos_embed(model.pos_embed, C, model.grid0), model.pos_embed)


def test_aggregation_unflips_zeroes_absent_classes_and_min_max_normalises():
    ramp = torch.arange(12.0).view(1, 3, 4).expand(C, 3, 4).clone() + torch.arange(C).view(C, 1, 1)
    present = torch.tensor([1.0, 0.0, 1.0])
    out = M.aggregate_views([ramp, ramp.flip(-1)], [False, True], present, (3, 4))
    want = ops.minmax_per_class(2 * ramp, present)
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.count_nonzero(out[1]) == 0
    for c in (0, 2):
        assert out[c].min() == 0 and abs(float(out[c].max()) - 1) < 1e-6
    # views of different sizes land on the requested grid
    out2 = M.aggregate_views([ramp, torch.rand(C, 5, 7)], [False, False], present, (6, 9))
    assert out2.shape == (C, 6, 9)


def test_infer_cams_returns_present_classes_in_unit_range(model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    keys, cams, aux = M.infer_cams(model, image, [1, 3], [1.0, 0.5], True, torch.device("cpu"))
    assert list(keys) == [1, 3] and aux is None
    assert cams.shape == (2, 50, 70) and cams.dtype == np.float32
    assert cams.min() >= 0 and np.allclose(cams.reshape(2, -1).max(1), 1.0, atol=1e-4)


def test_pad_to_patch_keeps_the_maps_on_the_view_grid(model):
    x = torch.randn(1, 3, 40, 50)  # 2 x 3 whole patches; 8 and 2 trailing pixels
    s = M.mct_settings(tiny_cfg(pad_to_patch=True))
    f = M.view_maps(model, x, s)
    assert f.shape[-2:] == (40, 50)
    s0 = M.mct_settings(tiny_cfg())
    assert M.view_maps(model, x, s0).shape[-2:] == (2, 3)  # the reference: trailing pixels dropped


def test_refinement_with_identity_affinity_is_a_no_op_and_uniform_affinity_averages():
    f = torch.rand(2, C, 3, 4)
    assert torch.allclose(ops.refine_with_affinity(f, torch.eye(12).expand(2, 12, 12)), f)
    r = ops.refine_with_affinity(f, torch.full((2, 12, 12), 1 / 12))
    assert torch.allclose(r, f.mean((2, 3), keepdim=True).expand_as(r), atol=1e-6)


def test_fsae_logits_bg_is_the_fixed_score_and_argmax_is_the_thresholded_map(model):
    cfg = tiny_cfg(fsae_tau=0.1, fsae_bg=0.4)
    m = M.build_model(cfg, C).eval()
    x = torch.randn(2, 3, 64, 64)
    z, bg = M.cam_logits(m, x)
    assert bg == 0 and z.shape == (2, C + 1, 4, 4)
    assert torch.allclose(z[:, 0], torch.full_like(z[:, 0], 4.0))
    maps = z[:, 1:] * 0.1
    assert maps.max() <= 1 + 1e-5 and maps.min() >= 0
    fg = maps.max(1).values > 0.4
    assert torch.equal(z.argmax(1) > 0, fg)


def test_param_groups_exclude_biases_norms_and_token_tables_from_weight_decay(model):
    groups = M.param_groups(model, tiny_cfg())
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token"} <= no_decay and "blocks.0.attn.qkv.weight" in decay
    assert all(n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token") for n in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert isinstance(M.build_optimizer(model, tiny_cfg()), torch.optim.AdamW)


def test_schedule_equals_timm_cosine_stepped_once_per_epoch():
    from timm.scheduler import CosineLRScheduler

    cfg = {**tiny_cfg(), "lr": 6.25e-5, "max_steps": 60 * 7}
    steps_per_epoch = 7
    mult = M.lr_lambda(cfg, steps_per_epoch)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=6.25e-5)
    sched = CosineLRScheduler(opt, t_initial=60, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5, cycle_limit=1,
                              t_in_epochs=True)
    for epoch in range(60):
        want = opt.param_groups[0]["lr"]  # what the reference trains this epoch with
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            assert math.isclose(mult(step) * 6.25e-5, want, rel_tol=1e-9), (epoch, step)
        sched.step(epoch + 1 - 1)  # the reference: lr_scheduler.step(epoch) after epoch `epoch`
    assert math.isclose(mult(0) * 6.25e-5, 1e-6)


def test_deit_checkpoint_loads_with_expanded_class_tokens(tmp_path):
    """A DeiT-S state dict in timm's layout (random values) loads into the C-class-token model (``main.py::main``,
    ``--finetune``)."""
    import timm

    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    sd = deit.state_dict()
    path = tmp_path / "deit_small_patch16_224-test.pth"
    torch.save({"model": sd}, path)
    cfg = {"backbone": {"arch": "deit_small", "weights": {"path": str(path)}}, "mctformer": {"version": "v2"}}
    m = M.build_model(cfg, 20)
    info = m.weights_info
    assert info["missing"] == ["head.weight", "head.bias"] or sorted(info["missing"]) == ["head.bias", "head.weight"]
    assert m.cls_token.shape == (1, 20, 384) and torch.equal(m.cls_token[0, 7], sd["cls_token"][0, 0])
    assert torch.equal(m.pos_embed[0, :20], sd["pos_embed"][0, :1].expand(20, -1))
    assert torch.equal(m.pos_embed[0, 20:], sd["pos_embed"][0, 1:])
    assert torch.equal(m.blocks[11].mlp.fc2.weight, sd["blocks.11.mlp.fc2.weight"])
    assert torch.equal(m.blocks[3].attn.qkv.bias, sd["blocks.3.attn.qkv.bias"])
    # a checkpoint of another width is refused, naming the key
    small = {k: v[..., :8] if v.ndim and v.shape[-1] == 384 else v for k, v in sd.items()}
    torch.save({"model": small}, path)
    with pytest.raises(WeightsError, match="do not fit"):
        M.build_model(cfg, 20)


def test_missing_deit_weights_name_the_path_and_the_download(tmp_path):
    cfg = {"backbone": {"arch": "deit_small", "weights": {"path": str(tmp_path / "deit_small_patch16_224-cd65a155.pth")}},
           "mctformer": {}}
    with pytest.raises(WeightsError, match="dl.fbaipublicfiles.com/deit"):
        M.build_model(cfg, 20)


def test_timm_dataset_is_a_pure_function_of_seed_epoch_index_and_leaves_global_rngs(tmp_path):
    import random

    from PIL import Image

    from wsss_core.data.datasets import TimmClassificationDataset

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
    labels = np.eye(3, dtype=np.float32)
    ds = TimmClassificationDataset(tmp_path, ["im0", "im1", "im2"], labels, 32, seed=5, re_prob=1.0)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = ds[1]["image"]
    after = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    b = ds[1]["image"]
    assert before is not None and a.shape == (3, 32, 32) and torch.equal(a, b)
    assert after == (random.random(), np.random.rand(), torch.rand(1))  # global streams as if untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a)
    assert torch.equal(ds[2]["label"], torch.tensor([0.0, 0.0, 1.0]))


def test_a_few_adamw_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = M.build_model(cfg, C).train()
    opt = M.build_optimizer(m, cfg)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    first = None
    for step in range(40):
        loss = M.training_step(m, {"image": x, "label": y}, step, cfg)["loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_posterize_with_zero_bits_is_black_and_the_dataset_uses_it(tmp_path):
    from PIL import Image

    from wsss_core.data.datasets import TimmClassificationDataset, posterize_any_bits

    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(posterize_any_bits(img, 0)).max() == 0
    assert np.asarray(posterize_any_bits(img, 8)).min() == 200
    assert np.asarray(posterize_any_bits(img, 1)).max() == 128
    ds = TimmClassificationDataset(tmp_path, [], np.zeros((0, 3)), 32)
    ops_ = [op for t in ds.transform.transforms for op in getattr(t, "ops", [])]
    assert any(op.name == "PosterizeIncreasing" for op in ops_)
    assert all(op.aug_fn is posterize_any_bits for op in ops_ if op.name.startswith("Posterize"))


def test_fsae_wraps_mctformer_with_its_optimizer_schedule_and_views():
    from wsss_core.methods import fsae

    cfg = {**tiny_cfg(), "crop_size": 32, "resize_long": [32, 48],
           "fsae": {"base": "mctformer", "ema_m": 0.5}}
    torch.manual_seed(0)
    model = fsae.build_model(cfg, C)
    assert isinstance(fsae.build_optimizer(model, cfg), torch.optim.AdamW)
    assert fsae.lr_lambda(cfg, 10)(0) == M.lr_lambda(cfg, 10)(0)
    needs = fsae.data_needs(cfg)
    assert needs["views"] and needs["strong"] and "timm" not in needs  # FSAE's weak/strong views
    x = torch.randn(2, 3, 32, 32)
    batch = {"image": x, "image_strong": x.clone(), "label": torch.tensor([[1.0, 0, 0], [0, 1, 1]])}
    model.train()
    out = fsae.training_step(model, batch, 0, cfg)
    assert {"loss_cls", "loss_patch", "loss_pl", "teacher_conf", "mask_ratio"} <= set(out)
    out["loss"].backward()
    assert model.student.head.weight.grad is not None and model.student.head.weight.grad.abs().sum() > 0
    before = model.teacher.head.weight.detach().clone()
    with torch.no_grad():
        model.student.head.weight.add_(1.0)
    fsae.after_step(model, 0, cfg)
    assert torch.allclose(model.teacher.head.weight, 0.5 * before + 0.5 * model.student.head.weight)
    assert fsae.cam_logits(model, x)[0].shape == (2, C + 1, 2, 2)


def test_a_weights_override_replaces_the_base_spec_instead_of_merging():
    from wsss_core.config import deep_merge, url_file_name

    base = {"backbone": {"arch": "resnet50", "weights": {"torchvision": "ResNet50_Weights.IMAGENET1K_V1"}}}
    url = "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"
    out = deep_merge(base, {"backbone": {"arch": "deit_small", "weights": {"url": url}}})
    assert out["backbone"] == {"arch": "deit_small", "weights": {"url": url}}
    assert deep_merge(base, {"backbone": {"weights": None}})["backbone"]["weights"] is None
    assert url_file_name(url) == "deit_small_patch16_224-cd65a155.pth"


def test_url_weights_resolve_to_the_cache_and_a_missing_file_names_it(tmp_path):
    from wsss_core.models.weights import resolve_weights_path

    url = "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"
    assert resolve_weights_path({"url": url}, tmp_path) == tmp_path / "url" / "deit_small_patch16_224-cd65a155.pth"
    cfg = {"backbone": {"arch": "deit_small", "weights": {"url": url}}, "mctformer": {}}
    with pytest.raises(WeightsError, match="deit_small_patch16_224-cd65a155.pth"):
        M.build_model(cfg, 20, cache_dir=str(tmp_path))


def test_layer_index_beyond_the_depth_is_a_config_error():
    from wsss_core.errors import ConfigError

    with pytest.raises(ConfigError, match="layer_index 4 must be in 1..3"):
        M.build_model(tiny_cfg(layer_index=4), C)
