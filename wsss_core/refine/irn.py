"""IRN refinement (IRNet, Ahn et al., CVPR 2019) as used by SIPE / SFC: confident-region labels from CAMs, the
inter-pixel relation network (boundary + displacement branches on a frozen ResNet), and the boundary-aware random walk.

Upstream: the IRN stage of ``chenqi1126/SIPE`` (``cam2ir.py``, ``train_irn.py``, ``make_seg_labels.py``,
``network/resnet50_irn.py``, ``tool/indexing.py``; file::function citations below are in it) and its SFC variant in
``Barrett-python/SFC`` (``cam2ir.py``, ``make_seg_labels.py``).

- :func:`cam_to_ir_label` (``cam2ir.py::_work``): two label-unary CRFs on hard CAM labels -> {fg, 0, 255} training
  labels;
- :class:`IRNet` (``network/resnet50_irn.py::Net``): frozen backbone, edge branch (1 logit at OS4) and displacement
  branch (2 ch at OS4) with a :class:`MeanShift` buffer; :func:`irn_loss` (``AffinityDisplacementLoss``,
  ``train_irn.py::run``) with :func:`pair_displacement` and :func:`downsample_labels`;
- :func:`edge_inference` (``network/resnet50_irn.py::EdgeDisplacement``): boundary probabilities of one image
  from [img, flip(img)];
- :func:`rw_transition` / :func:`sem_seg_labels` (``make_seg_labels.py::_work``, ``tool/indexing.py``): the random walk,
  single pass (SIPE) or two-pass (SFC).

Conventions: directions and sources follow :mod:`wsss_core.refine.irn_ops` (IRN order: by path length); the
transition matrix ``T`` is **column-normalised** (each column sums to 1) and scores propagate as row vectors,
``rw = v @ T`` (``rw[c, j] = sum_i v[c, i] T[i, j]``), so a spatially constant ``v`` stays constant.
Everything runs on the device of the inputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import IGNORE_INDEX
from . import affinity as aff
from .crf import CRFParams, dense_crf
from .irn_ops import edge_to_affinity, search_directions

EPS = 1e-5

#: A hard-label CRF: (image uint8 (H, W, 3), labels int (H, W) in 0..n-1, params, n) -> refined labels int (H, W).
LabelCRF = Callable[[np.ndarray, np.ndarray, CRFParams, int], np.ndarray]


# ----------------------------------------------------------------------------- cam2ir (cam2ir.py::_work)

def crf_label_refine(image: np.ndarray, labels: np.ndarray, params: CRFParams, n_labels: int) -> np.ndarray:
    """``argmax`` of the dense CRF marginals started from hard labels (IRN's ``crf_inference_label`` with the
    ``seam_label`` preset): int64 (H, W) indices in 0..n_labels-1."""
    return dense_crf(image, labels, params, n_labels=n_labels).argmax(0)


def cam_to_ir_label(image: np.ndarray, cams: np.ndarray, keys: Sequence[int], params: CRFParams,
                    bg_scale: float = 0.5, crf: LabelCRF | None = None) -> np.ndarray:
    """Confident-region IRN training labels of one image (``cam2ir.py::_work``).

    Args:
        image: uint8 (H, W, 3) RGB.
        cams: float (K, H, W) maps whose first channel is the background (``keys[0] == 0``).
        keys: (K,) class label of each channel, 0 first.
        params: CRF settings (hard-label mode, e.g. ``crf_params("seam_label")``).
        bg_scale: factor on the bg channel for the bg-confident map (0.5: bg less likely).
        crf: the hard-label CRF (default :func:`crf_label_refine`); injectable for tests.

    Returns:
        uint8 (H, W): the fg class where the fg-confident map ``f`` says fg, 0 where both ``f`` and the
        bg-confident map ``b'`` say bg, 255 where ``f`` says bg but ``b'`` says fg.
    """
    cams = np.asarray(cams, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams must be (K, H, W) with K = {keys.shape[0]} keys, got {cams.shape}")
    if keys.size == 0 or keys[0] != 0:
        raise ValueError(f"cam_to_ir_label needs a background map first (keys[0] == 0), got keys {keys.tolist()}")
    if image.shape[:2] != cams.shape[1:]:
        raise ValueError(f"image {image.shape[:2]} and cams {cams.shape[1:]} differ in size")
    crf = crf or crf_label_refine
    k = keys.shape[0]
    fg = keys[crf(image, cams.argmax(0), params, k)]
    scaled = cams.copy()
    scaled[0] *= bg_scale
    bg = keys[crf(image, scaled.argmax(0), params, k)]
    conf = fg.copy()
    conf[fg == 0] = IGNORE_INDEX
    conf[(fg == 0) & (bg == 0)] = 0
    return conf.astype(np.uint8)


# ---------------------------------------------------------------- network (network/resnet50_irn.py::Net)

class MeanShift(nn.Module):
    """Identity in train mode; in eval mode subtracts the stored (C,) ``running_mean`` from a (B, C, h, w) map."""

    def __init__(self, n: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


def _block(c_in: int, c_out: int, groups: int, up: int = 1) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm -> [bilinear x up] -> ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x[..., :ref.shape[-2], :ref.shape[-1]]


class IRNet(nn.Module):
    """IRN boundary + displacement network on a frozen ResNet (strides 2, 2, 2, 1, no dilation;
    ``network/resnet50_irn.py::Net``).

    forward: (B, 3, H, W) -> ``(edge, disp)``: edge logits (B, 1, ceil(H/4), ceil(W/4)) and the displacement
    field (B, 2, ceil(H/4), ceil(W/4)) in feature cells, channel 0 = dy, 1 = dx (minus ``mean_shift`` in eval).

    The backbone (``conv1/bn1/relu/maxpool`` + ``layer1..4`` of :class:`wsss_core.models.backbones.ResNetBackbone`)
    is frozen: its parameters do not require grad, every stage output is detached, and :meth:`train` keeps it in
    eval mode. The head widths are the reference's; the input widths are read from the backbone.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        c1, c2, c3, c4, c5 = backbone.stage_channels
        # edge branch: 5 x 32 ch at OS4 -> 1 logit
        self.edge1 = _block(c1, 32, 4)
        self.edge2 = _block(c2, 32, 4)
        self.edge3 = _block(c3, 32, 4, up=2)
        self.edge4 = _block(c4, 32, 4, up=4)
        self.edge5 = _block(c5, 32, 4, up=4)
        self.edge6 = nn.Conv2d(160, 1, 1, bias=True)
        # displacement branch
        self.disp1 = _block(c1, 64, 8)
        self.disp2 = _block(c2, 128, 16)
        self.disp3 = _block(c3, 256, 16)
        self.disp4 = _block(c4, 256, 16, up=2)
        self.disp5 = _block(c5, 256, 16, up=2)
        self.disp6 = _block(768, 256, 16, up=2)
        self.disp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
                                   nn.Conv2d(256, 2, 1, bias=False))
        self.mean_shift = MeanShift(2)

    @property
    def edge_layers(self) -> nn.ModuleList:
        return nn.ModuleList([self.edge1, self.edge2, self.edge3, self.edge4, self.edge5, self.edge6])

    @property
    def disp_layers(self) -> nn.ModuleList:
        return nn.ModuleList([self.disp1, self.disp2, self.disp3, self.disp4, self.disp5, self.disp6, self.disp7])

    def train(self, mode: bool = True) -> "IRNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five detached backbone stage outputs s1..s5 (strides 4, 4, 8, 16, 16)."""
        b = self.backbone
        s1 = b.maxpool(b.relu(b.bn1(b.conv1(x)))).detach()
        s2 = b.layer1(s1).detach()
        s3 = b.layer2(s2).detach()
        s4 = b.layer3(s3).detach()
        s5 = b.layer4(s4).detach()
        return [s1, s2, s3, s4, s5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s1, s2, s3, s4, s5 = self.stages(x)
        e2 = self.edge2(s2)
        e = [self.edge1(s1), e2] + [_crop(m(s), e2) for m, s in ((self.edge3, s3), (self.edge4, s4), (self.edge5, s5))]
        edge = self.edge6(torch.cat(e, 1))
        d1, d2, d3 = self.disp1(s1), self.disp2(s2), self.disp3(s3)
        d4, d5 = _crop(self.disp4(s4), d3), _crop(self.disp5(s5), d3)
        u = _crop(self.disp6(torch.cat([d3, d4, d5], 1)), d2)
        disp = self.mean_shift(self.disp7(torch.cat([d1, d2, u], 1)))
        return edge, disp


def copy_backbone_from(backbone: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Copy ``backbone``'s weights from a state dict that holds a backbone of the same shape under some prefix
    (``"backbone."``, ``"student.backbone."``, ...; the shortest complete prefix wins, a ``teacher`` copy only if
    nothing else fits). Returns the prefix.

    Raises KeyError if no prefix covers every parameter and running statistic, ValueError on a shape mismatch.
    """
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    first = next(iter(own))
    prefixes = sorted({k[:-len(first)] for k in state if k == first or k.endswith("." + first)},
                      key=lambda p: ("teacher" in p, len(p), p))
    for prefix in prefixes:
        if all(prefix + k in state for k in own):
            break
    else:
        raise KeyError(f"no prefix of the state dict holds every backbone key (e.g. {first!r}); "
                       f"candidates {prefixes or 'none'}")
    bad = [f"{k}: {tuple(state[prefix + k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if state[prefix + k].shape != v.shape]
    if bad:
        raise ValueError(f"backbone shapes differ under prefix {prefix!r}: " + "; ".join(bad[:5]))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[prefix + k])
    return prefix


# ------------------------- losses (network/resnet50_irn.py::AffinityDisplacementLoss, train_irn.py::run)

def irn_offsets(radius: float = 10) -> list[tuple[int, int]]:
    """The IRN direction order (by path length) as (dy, dx) offsets."""
    return [d for d, _ in search_directions(radius)]


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int labels -> (B, h, w) by nearest sampling at the cell centres (PIL ``NEAREST`` rescale):
    ``src = floor((dst + 0.5) * H / h)``."""
    hh, ww = labels.shape[-2:]
    h, w = size
    ys = ((torch.arange(h, device=labels.device) + 0.5) * hh / h).floor().long().clamp_(max=hh - 1)
    xs = ((torch.arange(w, device=labels.device) + 0.5) * ww / w).floor().long().clamp_(max=ww - 1)
    return labels[..., ys[:, None], xs[None, :]]


def pair_displacement(disp: torch.Tensor, radius: float = 10) -> torch.Tensor:
    """(B, 2, h, w) field -> ``D(src) - D(dst)`` (B, 2, n_dir, n_src), sources and directions as in
    :func:`wsss_core.refine.irn_ops.edge_to_affinity`."""
    b, c, h, w = disp.shape
    rf = int(math.ceil(radius)) - 1
    nh, nw = h - rf, w - 2 * rf
    dirs = search_directions(radius)
    if nh <= 0 or nw <= 0:
        return disp.new_zeros((b, c, len(dirs), 0))
    src = disp[:, :, :nh, rf:rf + nw]
    dst = torch.stack([disp[:, :, dy:dy + nh, rf + dx:rf + dx + nw] for (dy, dx), _ in dirs], 2)
    return (src[:, :, None] - dst).reshape(b, c, len(dirs), -1)


def irn_loss(edge_logits: torch.Tensor, disp: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
             neg: torch.Tensor, radius: float = 10) -> dict[str, torch.Tensor]:
    """Losses of ``network/resnet50_irn.py::AffinityDisplacementLoss`` / ``train_irn.py::run``. edge_logits
    (B, 1, h, w), disp (B, 2, h, w); pair masks (B, n_dir, n_src) from :func:`wsss_core.refine.affinity.pair_labels`
    with ``offsets=irn_offsets(radius)``.

    Returns ``loss = (L_pos + L_neg)/2 + (L_dfg + L_dbg)/2`` and the four terms (sums over batch, directions and
    sources; eps 1e-5).
    """
    a = edge_to_affinity(torch.sigmoid(edge_logits[:, 0]), radius)
    pos_aff = -torch.log(a + EPS)
    neg_aff = -torch.log(1 + EPS - a)
    l_pos = (0.5 * (bg_pos * pos_aff).sum() / (bg_pos.sum() + EPS)
             + 0.5 * (fg_pos * pos_aff).sum() / (fg_pos.sum() + EPS))
    l_neg = (neg * neg_aff).sum() / (neg.sum() + EPS)
    delta = pair_displacement(disp, radius)
    target = torch.tensor(irn_offsets(radius), dtype=disp.dtype, device=disp.device).t()[None, :, :, None]
    l_dfg = ((delta - target).abs() * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + EPS)
    l_dbg = (delta.abs() * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + EPS)
    return {"loss": (l_pos + l_neg) / 2 + (l_dfg + l_dbg) / 2, "loss_pos": l_pos, "loss_neg": l_neg,
            "loss_dfg": l_dfg, "loss_dbg": l_dbg}


def irn_pair_labels(labels: torch.Tensor, radius: float = 10, n_classes: int = 21):
    """(B, h, w) labels -> ``bg_pos, fg_pos, neg`` (B, n_dir, n_src) in the IRN direction order; every label
    >= ``n_classes`` (255) is invalid."""
    return aff.pair_labels(labels, int(math.ceil(radius)), irn_offsets(radius), ignore_at_least=n_classes)


# ------------------------------------------------- inference (network/resnet50_irn.py::EdgeDisplacement)

@torch.no_grad()
def edge_inference(model: IRNet, image: torch.Tensor, pad_to: int = 512) -> torch.Tensor:
    """Boundary probabilities of one image (``network/resnet50_irn.py::EdgeDisplacement``).

    image: normalised float (3, H, W) on the model's device. [img, hflip(img)] are zero-padded right/bottom to
    at least ``pad_to`` x ``pad_to`` (the training crop), the logits cropped to (ceil(H/4), ceil(W/4)), the
    flipped one flipped back, averaged, then the sigmoid: returns (h, w) in [0, 1].
    """
    _, hh, ww = image.shape
    h, w = -(-hh // 4), -(-ww // 4)
    x = torch.stack([image, image.flip(-1)])
    x = F.pad(x, (0, max(pad_to, ww) - ww, 0, max(pad_to, hh) - hh))
    logits = model(x)[0][:, 0, :h, :w]
    return torch.sigmoid(0.5 * logits[0] + 0.5 * logits[1].flip(-1))


# -------------------------- random walk (make_seg_labels.py::_work, tool/indexing.py::propagate_to_edge)

def rw_affinity(edge: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """Dense symmetric affinity (hw, hw) of an (h, w) boundary map: ``a(i, j) = 1 - max edge`` along the path
    for every pair within ``radius`` whose two ends lie in the image (the reference pads the map with a wall of
    1.0 and crops; pairs reaching into the wall have affinity 0 and are dropped), 1 on the diagonal."""
    h, w = edge.shape
    r = int(radius)
    padded = F.pad(edge[None, None], (r, r, 0, r), value=1.0)[0]  # (1, h + r, w + 2r)
    hp, wp = padded.shape[-2:]
    a = edge_to_affinity(padded, r)[0]  # (n_dir, n_src) on the padded grid
    frm, to = aff.pair_indices(hp, wp, r, irn_offsets(r))
    frm, to = frm.to(edge.device), to.to(edge.device)

    def to_orig(idx):
        y, x = idx // wp, idx % wp - r
        ok = (y < h) & (x >= 0) & (x < w)
        return y * w + x, ok

    src, ok_s = to_orig(frm[None].expand_as(to))
    dst, ok_d = to_orig(to)
    keep = ok_s & ok_d
    src, dst, vals = src[keep], dst[keep], a[keep]
    n = h * w
    out = torch.zeros(n, n, dtype=edge.dtype, device=edge.device)
    out[src, dst] = vals
    out[dst, src] = vals
    out.fill_diagonal_(1.0)
    return out


def rw_transition(edge: torch.Tensor, radius: int = 5, beta: float = 10, exp_times: int = 8) -> torch.Tensor:
    """``T = (A^beta / column sums)^(2^exp_times)`` (hw, hw) from an (h, w) boundary map; columns sum to 1."""
    return aff.transition_matrix(rw_affinity(edge, radius), beta, exp_times)


def propagate(scores: torch.Tensor, edge: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(C, h, w) scores -> ``(scores * (1 - edge)) @ T`` (C, h, w): seeds on boundaries are suppressed."""
    c, h, w = scores.shape
    return ((scores * (1 - edge)).reshape(c, -1) @ trans).reshape(c, h, w)


def _upsample_norm(rw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x4 bilinear (align_corners=False), crop to ``size``, divide by the global max (if positive)."""
    h, w = rw.shape[-2:]
    up = F.interpolate(rw[None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)[0]
    up = up[:, :size[0], :size[1]]
    m = up.max() if up.numel() else up.new_zeros(())
    return up / m if m > 0 else up


def sem_seg_labels(cams: torch.Tensor | np.ndarray, keys: Sequence[int], edge: torch.Tensor, radius: int = 5,
                   beta: float = 10, exp_times: int = 8, power: float = 1.5, two_pass: bool = False,
                   bg_const: float = 0.25) -> np.ndarray:
    """Random-walk pseudo-mask of one image (``make_seg_labels.py::_work``, ``tool/indexing.py::propagate_to_edge``).

    Args:
        cams: (K, H, W) maps at image resolution, background first (``keys[0] == 0``); the caller combines the
            stacks (SFC: ``IS_CAM1 + 0.3 IS_CAM``) and adds a bg plane for CAMs without one.
        keys: (K,) class labels of the channels.
        edge: (h, w) boundary probabilities (:func:`edge_inference`), h = ceil(H/4), w = ceil(W/4); its device
            is used for everything.
        radius, beta, exp_times: transition matrix (34 directions at radius 5, ``A^10``, ``T^(2^8)``).
        power: element-wise power of the resized maps (SIPE 1.5, SFC 1.3).
        two_pass: SFC (``Barrett-python/SFC`` ``make_seg_labels.py::_work``): ``argmax([bg_const; R1] + R2)`` with R1
            the walk of the fg maps ``X^p`` and R2 the walk of all maps ``X^(p^2)``, each upsampled, cropped and divided
            by its global max.
        bg_const: the constant bg score of the two-pass variant.

    Returns:
        uint8 (H, W) class labels ``keys[argmax]`` (no 255).
    """
    keys = np.asarray(keys, dtype=np.int64)
    x = torch.as_tensor(cams, dtype=torch.float32).to(edge.device)
    k, hh, ww = x.shape
    if keys.shape != (k,):
        raise ValueError(f"keys must have shape ({k},), got {keys.shape}")
    if k == 0 or keys[0] != 0:
        raise ValueError(f"sem_seg_labels needs a background map first (keys[0] == 0), got keys {keys.tolist()}")
    h, w = edge.shape
    if (h, w) != (-(-hh // 4), -(-ww // 4)):
        raise ValueError(f"edge map {tuple(edge.shape)} does not fit maps of size {(hh, ww)} (expected ceil(/4))")
    if k == 1:
        return np.zeros((hh, ww), np.uint8)
    edge = edge.float()
    # clamped at 0: the power of a negative score (none in IS-CAM / CAM stacks) would be NaN
    xs = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(min=0).pow(power)
    trans = rw_transition(edge, radius, beta, exp_times)
    if not two_pass:
        score = _upsample_norm(propagate(xs, edge, trans), (hh, ww))
    else:
        r1 = _upsample_norm(propagate(xs[1:], edge, trans), (hh, ww))
        b1 = torch.cat([torch.full_like(r1[:1], float(bg_const)), r1])
        r2 = _upsample_norm(propagate(xs.pow(power), edge, trans), (hh, ww))
        score = b1 + r2
    return keys[score.argmax(0).cpu().numpy()].astype(np.uint8)


def build_irnet(backbone_cfg: dict[str, Any], cache_dir: str = "weights", weights: Any = "cfg") -> IRNet:
    """IRNet on ``build_resnet(..., dilated=False)`` from a backbone config (arch, layers, width_per_group,
    weights); ``weights`` overrides the config's weights (``None`` = random init)."""
    from ..models.backbones import resnet_from_config

    bb = backbone_cfg
    return IRNet(resnet_from_config(bb, cache_dir, output_stride=16, dilated=False,
                                    weights=bb.get("weights") if weights == "cfg" else weights))
