"""The superpixel network, its losses, the GT-reconstruction metric and the classical stand-ins."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.errors import WeightsError
from wsss_core.superpixel import ops, scn
from wsss_core.superpixel.providers import SuperpixelProvider, slic_features, soft_slic


def test_scn_output_is_a_normalised_q():
    torch.manual_seed(0)
    net = scn.SpixelNet().eval()
    q = net(torch.randn(1, 3, 32, 48))
    assert q.shape == (1, 9, 32, 48) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(1, 32, 48), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 3, 40, 48))


def test_load_scn_strips_prefixes_ignores_unused_heads_and_names_bad_files(tmp_path):
    torch.manual_seed(0)
    src = scn.SpixelNet()
    state = {"module." + k: v for k, v in src.state_dict().items()}
    state["module.pred_mask1.weight"] = torch.zeros(9, 32, 3, 3)          # the reference's unused heads
    good = tmp_path / "Q_model.pth"
    torch.save({"state_dict": state}, good)
    net, report = scn.load_scn({"path": str(good)})
    assert report["missing"] == [] and report["unexpected"] == []
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), src.eval()(x))

    wrong = dict(src.state_dict())
    wrong["pred_mask0.weight"] = torch.zeros(9, 8, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"wrong\.pth.*pred_mask0\.weight"):
        scn.load_scn({"path": str(tmp_path / "wrong.pth")})
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("conv4b")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"partial\.pth.*conv4b"):
        scn.load_scn({"path": str(tmp_path / "partial.pth")})
    with pytest.raises(WeightsError, match=r"missing\.pth"):
        scn.load_scn({"path": str(tmp_path / "missing.pth")})


def _block_q(b, h, w, cell, spread):
    """A Q that puts ``1 - spread`` on the own cell and the rest evenly on the 8 others (mass may leave the grid)."""
    q = torch.full((b, 9, h * cell, w * cell), spread / 8, dtype=torch.float64)
    q[:, ops.CENTER9] = 1 - spread
    return q


def test_reconstruction_loss_zero_cases_and_compactness():
    cell = 4
    const = torch.zeros(2, 2, 5 * cell, 6 * cell, dtype=torch.float64)
    const[:, 1] = 1                                                   # one class everywhere
    # CE is -log(R + 1e-8) with R = 1 - what leaves the grid at the border; zero with a Q that loses no mass
    inner = ops.center_q(2, 5 * cell, 6 * cell, dtype=torch.float64)
    out = scn.reconstruction_loss(inner, const, "onehot", cell=cell)
    assert abs(out["sem"].item()) < 1e-5
    # compactness: all mass on the own cell beats mass spread over the neighbours
    tight = scn.reconstruction_loss(_block_q(2, 5, 6, cell, 0.0), const, "onehot", cell=cell)["pos"]
    loose = scn.reconstruction_loss(_block_q(2, 5, 6, cell, 0.8), const, "onehot", cell=cell)["pos"]
    assert tight < loose
    logits = torch.randn(2, 9, 5 * cell, 6 * cell, dtype=torch.float64, requires_grad=True)
    lab = torch.rand(2, 3, 5 * cell, 6 * cell, dtype=torch.float64)
    loss = scn.reconstruction_loss(torch.softmax(logits, 1), lab, "l2", cell=cell)
    loss["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    torch.testing.assert_close(loss["loss"], loss["sem"] + loss["pos"])
    with pytest.raises(ValueError, match="onehot.*l2"):
        scn.reconstruction_loss(inner, const, "ce", cell=cell)


def _labels_7x7():
    lab = torch.zeros(1, 7, 7, dtype=torch.long)
    lab[0, 2:5, 2:5] = 3                                             # a 3x3 block of class 3
    return lab


def test_improved_loss_masks():
    lab = _labels_7x7()
    ident = torch.zeros(1, 25, 7, 7)
    ident[:, ops.CENTER25] = 1
    out = scn.improved_loss(ident, lab, ignore_index=21)
    assert out["diff"] == 0                                          # no weight across a boundary
    assert out["press"] > 0                                          # 1 > 0.75 in the homogeneous background
    low = ident * 0.7
    assert scn.improved_loss(low, lab, ignore_index=21)["press"] == 0
    leak = ident.clone()
    leak[0, 13, 2, 1] = 0.3                                          # bg cell (2, 1) -> its right neighbour (fg)
    d = scn.improved_loss(leak, lab, ignore_index=21)["diff"]
    assert d.item() == pytest.approx(2 * 0.3)
    ign = lab.clone()
    ign[0, 2, 1] = 21                                                # the same cell ignored: no contribution
    assert scn.improved_loss(leak, ign, ignore_index=21)["diff"] == 0
    ign2 = lab.clone()
    ign2[0, 2, 2] = 21                                               # or its neighbour ignored
    assert scn.improved_loss(leak, ign2, ignore_index=21)["diff"] == 0
    # outside the grid counts as background: a fg cell on the border differs from it
    edge = torch.zeros(1, 7, 7, dtype=torch.long)
    edge[0, 0, 3] = 2
    out_w = torch.zeros(1, 25, 7, 7)
    out_w[0, 2, 0, 3] = 0.5                                          # e = (-2, 0): outside
    assert scn.improved_loss(out_w, edge, ignore_index=21)["diff"].item() == pytest.approx(1.0)


def test_superpixel_cam_labels():
    cam = torch.zeros(1, 4, 1, 4)
    cam[0, 1, 0, 0] = 0.9                                            # confident fg class 1
    cam[0, 2, 0, 1] = 0.3                                            # between 0.05 and 0.55: ambiguous -> ignore
    cam[0, 1, 0, 2] = 0.9
    cam[0, 3, 0, 2] = 0.5                                            # second fg score > 0.05 x top -> ignore
    lab = scn.superpixel_cam_labels(cam)                             # cell 3: all zero -> bg
    assert lab.tolist() == [[[1, 4, 4, 0]]]


def test_gt_reconstruction_baseline_and_refined():
    torch.manual_seed(0)
    gt = torch.zeros(1, 64, 64, dtype=torch.long)
    gt[0, 10:40, 20:50] = 2
    gt[0, 0, 0] = 255
    q = ops.center_q(1, 64, 64)
    base = scn.gt_reconstruction(q, gt, 3, steps=0)
    onehot = F.one_hot(torch.where(gt == 255, 0, gt), 3).permute(0, 3, 1, 2).float()
    want = F.interpolate(F.interpolate(onehot, size=(12, 12), mode="bilinear", align_corners=False), size=(64, 64),
                         mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(base, want)
    refined = scn.gt_reconstruction(q, gt, 3, steps=20)
    assert refined.shape == gt.shape
    # a centre-only Q walks nothing: the refined map is the cell-pooled blurred mask
    assert torch.equal(refined, ops.up(ops.pool(F.interpolate(F.interpolate(
        onehot, size=(12, 12), mode="bilinear", align_corners=False), size=(64, 64), mode="bilinear",
        align_corners=False), q), q).argmax(1))


def _two_region_image(hh=64, ww=80):
    """Left red, right blue, with the boundary at x = 37 (through the middle of a 16-px cell)."""
    rgb = np.zeros((1, hh, ww, 3), np.uint8)
    rgb[0, :, :37] = (200, 30, 30)
    rgb[0, :, 37:] = (20, 40, 210)
    return rgb


def _normalise(rgb):
    from wsss_core.superpixel.providers import IMAGENET_MEAN, IMAGENET_STD
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@pytest.mark.parametrize("backend", ["soft_slic", "skimage_slic"])
def test_standins_give_a_grid_q_that_follows_colour_edges(backend):
    rgb = _two_region_image()
    prov = SuperpixelProvider(backend)
    q = prov.q(_normalise(rgb))
    assert q.shape == (1, 9, 64, 80)
    torch.testing.assert_close(q.sum(1), torch.ones(1, 64, 80), atol=1e-5, rtol=0)
    a = ops.asam(q)
    used = ops.pool_mass(q)[:, 0] > 1e-4                            # superpixels that some pixel belongs to
    torch.testing.assert_close(a.sum(1)[used], torch.ones(int(used.sum())), atol=1e-5, rtol=0)  # nothing leaves
    assert torch.equal(q, prov.q(_normalise(rgb)))                                  # deterministic
    # the boundary cell (column 2: x 32..47) splits by colour: its left pixels go left, its right ones right
    lab = ops.hard_labels(q)[0]
    cols = lab % 5
    assert (cols[:, 32:37] <= 2).all() and (cols[:, 37:48] >= 2).all()
    assert (cols[:, 32:37] == 1).float().mean() > 0.8 or backend == "skimage_slic"
    # GT reconstruction: the superpixels recover the boundary better than plain bilinear upsampling
    gt = torch.zeros(1, 64, 80, dtype=torch.long)
    gt[0, :, 37:] = 1
    base = (scn.gt_reconstruction(q, gt, 2, steps=0) == gt).float().mean()
    ref = (scn.gt_reconstruction(q, gt, 2, steps=20) == gt).float().mean()
    assert ref > base


def test_soft_slic_features_and_provider_errors():
    rgb = _two_region_image(32, 32)
    phi = slic_features(rgb)
    assert phi.shape == (1, 5, 32, 32)
    assert phi[0, 3, 16, 0].item() == pytest.approx(2.5 / 16 * 16)   # y coordinate scaled by 2.5 / S
    q = soft_slic(phi, iters=1)
    torch.testing.assert_close(q.sum(1), torch.ones(1, 32, 32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one of scn, soft_slic, skimage_slic"):
        SuperpixelProvider("slic")
    with pytest.raises(ValueError, match="needs a trained superpixel network"):
        SuperpixelProvider("scn")
    with pytest.raises(ValueError, match="multiples of 16"):
        SuperpixelProvider("soft_slic").q(torch.zeros(1, 3, 30, 32))
