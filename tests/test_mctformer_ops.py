"""MCTformer op core (``xulianuwa/MCTformer`` branch ``MCTformerPlus``: ``models.py``, ``engine.py``,
``evaluation.py``) on tiny CPU tensors, groundwork for issue 5."""

from __future__ import annotations

import pytest
import torch

from wsss_core.methods import mctformer_ops as ops


def _attns(b=2, heads=2, n=15, blocks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(b, heads, n, n, generator=g), -1) for _ in range(blocks)]


def test_attention_maps_shapes_bounds_and_row_major_layout():
    c, (h, w) = 3, (4, 3)  # a non-square 64 x 48 input at patch 16
    attns = _attns(n=c + h * w)
    for a in attns:
        assert torch.allclose(a.mean(1).sum(-1), torch.ones(2, c + h * w), atol=1e-5)
    m = ops.class_to_patch_maps(attns, c, (h, w), last_k=2)
    assert m.shape == (2, c, h, w) and m.min() >= 0 and m.max() <= 2
    # one map per class token, patch (r, q) read from token C + r*w + q
    ref = attns[-1].mean(1) + attns[-2].mean(1)
    for cls, r, q in ((0, 0, 0), (1, 3, 2), (2, 1, 2)):
        assert torch.isclose(m[0, cls, r, q], ref[0, cls, c + r * w + q])
    p = ops.patch_affinity(attns, c)
    assert p.shape == (2, h * w, h * w) and torch.all(p.sum(-1) <= 3 + 1e-5)
    with pytest.raises(ValueError):
        ops.class_to_patch_maps(attns, c, (h, w), last_k=4)


def test_refinement_algebra():
    g = torch.Generator().manual_seed(1)
    f = torch.rand(2, 3, 4, 3, generator=g)
    eye = torch.eye(12).expand(2, -1, -1)
    assert torch.allclose(ops.refine_with_affinity(f, eye), f)
    uniform = torch.full((2, 12, 12), 1 / 12)
    r = ops.refine_with_affinity(f, uniform)
    assert torch.allclose(r, f.mean((2, 3), keepdim=True).expand_as(r), atol=1e-6)
    p = torch.rand(2, 12, 12, generator=g)
    assert torch.allclose(ops.refine_with_affinity(f, p).flatten(2),
                          torch.einsum("bij,bcj->bci", p, f.flatten(2)), atol=1e-6)


def test_fused_maps_and_absent_classes_zeroed_by_minmax():
    m, z = torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2, requires_grad=True)
    assert torch.equal(ops.fuse_maps(m, z, "fused"), m * torch.relu(z.detach()))
    assert torch.equal(ops.fuse_maps(m, z, "patchcam"), torch.relu(z.detach()))
    assert torch.equal(ops.fuse_maps(m, None, "fused"), m)
    assert not ops.fuse_maps(m, z, "fused").requires_grad  # Z is detached
    s = torch.rand(3, 5, 6) * 4 + 1
    out = ops.minmax_per_class(s, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.all(out[1] == 0)
    for c in (0, 2):
        assert abs(float(out[c].min())) < 1e-7 and abs(float(out[c].max()) - 1) < 1e-6


def test_position_embedding_interpolation_keeps_class_tokens():
    c, d, g = 4, 8, 14
    pe = torch.randn(1, c + g * g, d)
    out = ops.interpolate_pos_embed(pe, c, (20, 31))
    assert out.shape == (1, c + 20 * 31, d)
    assert torch.equal(out[:, :c], pe[:, :c])
    assert ops.interpolate_pos_embed(pe, c, (g, g)) is pe
    # a constant patch table stays constant (bicubic reproduces constants)
    const = torch.cat([pe[:, :c], torch.full((1, g * g, d), 0.5)], 1)
    assert torch.allclose(ops.interpolate_pos_embed(const, c, (9, 17))[:, c:], torch.full((1, 9 * 17, d), 0.5),
                          atol=1e-5)
    with pytest.raises(ValueError):
        ops.interpolate_pos_embed(torch.randn(1, c + 10, d), c, (3, 3))


def test_deit_weights_expand_to_c_class_tokens():
    pe, cls = torch.randn(1, 1 + 196, 8), torch.randn(1, 1, 8)
    out = ops.expand_deit_pos_embed(pe, 20)
    assert out.shape == (1, 20 + 196, 8) and torch.equal(out[0, 7], pe[0, 0]) and torch.equal(out[:, 20:], pe[:, 1:])
    tok = ops.expand_cls_token(cls, 20)
    assert tok.shape == (1, 20, 8) and torch.equal(tok[0, 19], cls[0, 0])


def test_greedy_threshold_search_stops_at_first_non_improvement():
    curve = {0.0: 0.1, 0.01: 0.2, 0.02: 0.3, 0.03: 0.25, 0.04: 0.9}
    t, best, seen = ops.greedy_threshold_search(lambda t: curve.get(round(t, 2), 0.0), 0, 5)
    assert (t, best) == (0.02, 0.3) and seen == [0.1, 0.2, 0.3, 0.25]  # 0.9 at t = 0.04 is never seen
