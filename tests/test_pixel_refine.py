"""Tests of the pixel-refinement operators (``wsss_core.refine.pixel``) against ``ChunyanWang1/RTC``
``network/VARM.py::VARM``, ``network/PAR.py::PAR`` and ``network/pamr.py::PAMR``. Tiny CPU tensors only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.refine import pixel as PX

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIL = (1, 2, 4, 8, 12, 24)
# the stencil order written out independently of the module: TL, T, TR, L, R, BL, B, BR
ORDER = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ plain re-creation of the upstream modules' loops


def _shift_kernel(centre: float = 0.0, neighbour: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """The upstream fixed (8, 1, 3, 3) kernel: one tap per neighbour (and optionally the centre)."""
    k = torch.zeros(8, 1, 3, 3, dtype=dtype)
    for i, (dy, dx) in enumerate(ORDER):
        k[i, 0, 1, 1] = centre
        k[i, 0, 1 + dy, 1 + dx] = neighbour
    return k


def _ref_neighbours(x, dilations, kernel):
    b, c, h, w = x.shape
    out = []
    for d in dilations:
        xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
        out.append(F.conv2d(xp, kernel, dilation=d).view(b, c, -1, h, w))
    return torch.cat(out, 2)


def _ref_kernel(kind, imgs, dilations):
    """The upstream affinity (B, 1, P, H, W), in its structure (fixed-kernel convolutions per dilation)."""
    copy = _shift_kernel(dtype=imgs.dtype)
    if kind == "pamr":
        diff = _ref_neighbours(imgs, dilations, _shift_kernel(1.0, -1.0, imgs.dtype)).abs()
        k9 = torch.zeros(9, 1, 3, 3, dtype=imgs.dtype)
        for i in range(9):
            k9[i, 0, i // 3, i % 3] = 1
        b, c, h, w = imgs.shape
        std = torch.cat([F.conv2d(F.pad(imgs, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d),
                                  k9, dilation=d).view(b, c, -1, h, w) for d in dilations], 2).std(2, keepdim=True)
        aff = F.softmax((-diff / (1e-8 + 0.1 * std)).mean(1, keepdim=True), 2)
    else:
        nb = _ref_neighbours(imgs, dilations, copy)
        rep = imgs.unsqueeze(2).repeat(1, 1, nb.shape[2], 1, 1)
        std = torch.std(nb, dim=2, keepdim=True)
        if kind == "varm":
            down = torch.cat((nb[:, :, :, 1:, :], nb[:, :, :, -1, :].unsqueeze(3)), 3)
            right = torch.cat((nb[:, :, :, :, 1:], nb[:, :, :, :, -1].unsqueeze(4)), 4)
            grad = ((nb - down) ** 2 + (nb - right) ** 2).mean(1, keepdim=True)
            ref = (-((torch.abs(nb - rep) / (std + 1e-8)) * 4) ** 2).mean(1, keepdim=True)
            aff = F.softmax(ref, 2) - 0.01 * F.softmax(grad, 2)
        else:
            unit = torch.ones(1, 1, 8, 1, 1, dtype=imgs.dtype)
            for i in (0, 2, 5, 7):
                unit[0, 0, i] = math.sqrt(2)
            pos = torch.cat([unit * d for d in dilations], 2).repeat(imgs.shape[0], 1, 1, *imgs.shape[-2:])
            aff = (-(torch.abs(nb - rep) / (std + 1e-8) / 0.3) ** 2).mean(1, keepdim=True)
            pos_aff = -(pos / (torch.std(pos, dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
            aff = F.softmax(aff, 2) + 0.01 * F.softmax(pos_aff, 2)
    return aff


def _ref_refine(kind, imgs, masks, dilations, n_iter):
    """The upstream forward, in its structure: stacked neighbours per iteration, sum over dim 2."""
    masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
    aff = _ref_kernel(kind, imgs, dilations)
    copy = _shift_kernel(dtype=imgs.dtype)
    for _ in range(n_iter):
        masks = (_ref_neighbours(masks, dilations, copy) * aff).sum(2)
    return masks


def _naive_neighbour_mean(m: np.ndarray, dilations, weights=None) -> np.ndarray:
    """sum_p w_p m[clamp(y + dy·d), clamp(x + dx·d)] by a loop over pixels; w uniform 1/P by default."""
    _, h, w = m.shape
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in ORDER]
    weights = np.full(len(offs), 1.0 / len(offs)) if weights is None else weights
    out = np.zeros_like(m, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            for wp, (oy, ox) in zip(weights, offs):
                out[:, y, x] += wp * m[:, min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
    return out


# ------------------------------------------------------------------------------------------------------ neighbours


def test_neighbour_order_on_arange():
    h, w = 7, 9
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    nb = PX.neighbours(x, (1, 2))
    assert nb.shape == (1, 1, 16, h, w)
    # pixel (3, 4) = 31, dilation 1: TL, T, TR, L, R, BL, B, BR
    assert nb[0, 0, :8, 3, 4].tolist() == [21, 22, 23, 30, 32, 39, 40, 41]
    # dilation 2 at (3, 4): rows 1 / 3 / 5, columns 2 / 4 / 6
    assert nb[0, 0, 8:, 3, 4].tolist() == [11, 13, 15, 29, 33, 47, 49, 51]
    # corner (0, 0), dilation 1: replicated borders
    assert nb[0, 0, :8, 0, 0].tolist() == [0, 0, 1, 0, 1, 9, 9, 10]
    # every entry against clamped indices
    a = x[0, 0].numpy()
    for i, d in enumerate((1, 2)):
        for k, (dy, dx) in enumerate(ORDER):
            want = a[np.clip(np.arange(h) + dy * d, 0, h - 1)][:, np.clip(np.arange(w) + dx * d, 0, w - 1)]
            np.testing.assert_array_equal(nb[0, 0, 8 * i + k].numpy(), want)


def test_neighbours_large_dilation_and_channels():
    x = torch.rand(2, 3, 5, 6, generator=_g())
    nb = PX.neighbours(x, DIL)
    assert nb.shape == (2, 3, 48, 5, 6)
    ref = _ref_neighbours(x, DIL, _shift_kernel())
    assert torch.equal(nb, ref)


def test_bad_dilations_raise():
    x = torch.rand(1, 1, 4, 4)
    for bad in ([], [0], [1, -2]):
        with pytest.raises(ValueError):
            PX.neighbours(x, bad)


# --------------------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind,total", [("varm", 0.99), ("par", 1.01), ("pamr", 1.0)])
def test_kernel_row_sums(kind, total):
    img = torch.rand(2, 3, 9, 11, generator=_g(1))
    k = PX.PIXEL_REFINERS[kind](img, DIL)
    assert k.shape == (2, 48, 9, 11)
    assert torch.allclose(k.sum(1), torch.full((2, 9, 11), total), atol=1e-6)


@pytest.mark.parametrize("kind,factor", [("varm", 0.99), ("par", 1.01), ("pamr", 1.0)])
def test_constant_mask_scaled(kind, factor):
    img = torch.rand(1, 3, 10, 12, generator=_g(2))
    c = torch.tensor([0.3, 0.7, 1.5]).view(1, 3, 1, 1)
    masks = c.expand(1, 3, 5, 6).contiguous()  # half size: resized (a constant stays constant)
    n = 4
    out = PX.refine_masks(masks, img, kind, n_iter=n, dilations=DIL)
    assert out.shape == (1, 3, 10, 12)
    want = (c * factor ** n).expand_as(out)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    ratio = out / out[:, :1]
    assert torch.allclose(ratio, (c / c[:, :1]).expand_as(ratio), rtol=1e-5)


@pytest.mark.parametrize("kind,factor", [("pamr", 1.0), ("varm", 0.99)])
def test_constant_image_is_uniform_neighbour_mean(kind, factor):
    img = torch.full((1, 3, 7, 9), 0.4)
    m = torch.rand(1, 2, 7, 9, generator=_g(3), dtype=torch.float64)
    k = PX.PIXEL_REFINERS[kind](img, DIL)
    assert torch.allclose(k, torch.full_like(k, factor / 48), atol=1e-7)
    out = PX.refine_masks(m, img.double(), kind, n_iter=2, dilations=DIL)
    want = m[0].numpy()
    for _ in range(2):
        want = factor * _naive_neighbour_mean(want, DIL)
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-10, atol=1e-12)


def test_par_constant_image_positional_term():
    img = torch.full((1, 3, 7, 9), 0.2, dtype=torch.float64)
    pos = np.array([d * (math.sqrt(2) if dy and dx else 1.0) for d in DIL for dy, dx in ORDER])
    logits = -(pos / (pos.std(ddof=1) + 1e-8) / 0.3) ** 2
    soft = np.exp(logits - logits.max())
    weights = 1.0 / 48 + 0.01 * soft / soft.sum()
    k = PX.par_kernel(img, DIL)
    np.testing.assert_allclose(k[0, :, 3, 4].numpy(), weights, rtol=1e-10)
    m = torch.rand(1, 2, 7, 9, generator=_g(4), dtype=torch.float64)
    out = PX.refine_masks(m, img, "par", n_iter=1, dilations=DIL)
    np.testing.assert_allclose(out[0].numpy(), _naive_neighbour_mean(m[0].numpy(), DIL, weights), rtol=1e-10)


# ----------------------------------------------------------------------------------- against the upstream structure


@pytest.mark.parametrize("kind", ["varm", "par", "pamr"])
def test_matches_reference_loop(kind):
    img = torch.rand(2, 3, 20, 23, generator=_g(5))
    masks = torch.rand(2, 4, 10, 12, generator=_g(6)).softmax(1)
    assert (PX.PIXEL_REFINERS[kind](img, DIL) - _ref_kernel(kind, img, DIL)[:, 0]).abs().max() < 1e-7
    ours = PX.refine_masks(masks, img, kind, n_iter=10, dilations=DIL)
    ref = _ref_refine(kind, img, masks, DIL, 10)
    assert ours.shape == ref.shape == (2, 4, 20, 23)
    # float32: 10 x 48-term sums in another order (the upstream sums the stacked neighbours at once) leave ~10 ulp
    assert (ours - ref).abs().max() < 2e-6
    ours64 = PX.refine_masks(masks.double(), img.double(), kind, n_iter=10, dilations=DIL)
    assert (ours64 - _ref_refine(kind, img.double(), masks.double(), DIL, 10)).abs().max() < 1e-12
    kernel = PX.PIXEL_REFINERS[kind](img, (1, 3))
    assert kernel.shape == (2, 16, 20, 23)


def test_module_wrapper_has_no_state():
    mod = PX.PixelRefiner("varm", n_iter=3, dilations=(1, 2))
    assert list(mod.parameters()) == [] and list(mod.buffers()) == [] and mod.state_dict() == {}
    img = torch.rand(1, 3, 8, 8, generator=_g(7))
    masks = torch.rand(1, 2, 4, 4, generator=_g(8))
    assert torch.equal(mod(img, masks), PX.refine_masks(masks, img, "varm", 3, (1, 2)))
    same = torch.rand(1, 2, 8, 8, generator=_g(9))
    assert torch.equal(PX.PixelRefiner("pamr", n_iter=0)(img, same), same)
    with pytest.raises(ValueError):
        PX.PixelRefiner("crf")
    with pytest.raises(ValueError):
        PX.refine_masks(masks[:, :, :1], img[:1].expand(2, -1, -1, -1), "varm")


@pytest.mark.parametrize("kind", ["varm", "par", "pamr"])
def test_gradients_flow(kind):
    img = torch.rand(1, 3, 3, 4, generator=_g(10), dtype=torch.float64, requires_grad=True)
    masks = torch.rand(1, 1, 3, 4, generator=_g(11), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, m: PX.refine_masks(m, i, kind, n_iter=2, dilations=(1, 2)),
                                    (img, masks))
