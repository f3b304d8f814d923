"""PPC (pixel-to-prototype contrast, Du et al. CVPR 2022) on ResNet-38, in its two published variants.

Upstream: ``usr922/wseg`` (branch ``master``: SEAM+PPC; branch ``esp``: EPS+PPC) and FSAE's fork
``obeychoi0120/PixMatch``; citations below name the branch. The loss / op core lives in
:mod:`wsss_core.methods.ppc_ops`; this module is the method interface of :mod:`wsss_core.methods.base` plus
:func:`cam_logits`, which wrappers (FSAE) use.

- ``variant: seam`` (usr922/wseg master): bg channel **0**, dropout7 before fc8, maps upsampled to the input
  for L_cls/L_er/L_ecr, CAM inference from the PCM output ``cam_rv``.
- ``variant: eps`` (usr922/wseg@esp, FSAE's ``base`` mode; the default): bg channel **last**, all losses at
  stride 8, EPS saliency loss, CAM inference = softmax of the raw fc8 logits (``forward_cam``).

Stage config keys (``classifier``): ``backbone`` (``arch: resnet38``, ``width``, ``weights``, ``frozen_bn``,
``frozen_stem``), ``lr``, ``weight_decay``, ``momentum`` (used only with ``fix_quirk``), ``fix_quirk`` (False reproduces
the SGD momentum quirk of ``usr922/wseg`` ``tool/torchutils.py::PolyOptimizer`` (``util/torchutils.py`` on ``esp``):
weight decay passed in the momentum slot), and ``ppc``: ``variant``, ``view2_size`` (128), ``bg_thr``, ``proto_div``,
``tau``, ``gamma``, ``ecr_topk``, ``eps_tau``, ``eps_alpha``, ``esp_onehot_bug`` (True reproduces the channel bug of
``usr922/wseg@esp`` ``module/train.py::max_onehot``), ``sal_view2`` (``resize``: base mode, saliency bilinearly resized
to the view-2 size first; ``direct``: FSAE ssl mode, nearest from full resolution, as in ``obeychoi0120/PixMatch``
``module/train.py::train_ssl``), ``proto_safe_denominator`` (False reproduces the contrast-loss prototype
``Σ w·f / Σ w`` of ``usr922/wseg@esp`` ``module/train.py::get_contrast_loss`` with a weight sum that can be negative
(a class map zero in every image: P = +mean of its top-k features) or zero (non-finite); True: convex weights, see
:func:`wsss_core.methods.ppc_ops.prototypes`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import reference_sgd
from ..errors import ConfigError
from ..models.resnet38 import build_resnet38
from . import ppc_ops as ops
from .registry import register_method

VARIANTS = {"seam": ops.MASTER_DEFAULTS, "eps": ops.ESP_DEFAULTS}


def ppc_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Variant defaults (``ppc_ops.MASTER_DEFAULTS`` / ``ESP_DEFAULTS``, e.g. ``proto_safe_denominator: False``)
    overridden by ``cfg['ppc']`` (non-null)."""
    user = dict(cfg.get("ppc") or {})
    variant = user.get("variant", "eps")
    if variant not in VARIANTS:
        raise ConfigError(f"classifier.ppc.variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    out = {**VARIANTS[variant], "variant": variant, "sal_view2": "resize", "esp_onehot_bug": variant == "eps"}
    out.update({k: v for k, v in user.items() if v is not None})
    return out


class PPCNet(nn.Module):
    """ResNet-38 + fc8 (C+1 channels incl. bg) + projection head + PCM.

    forward: (N, 3, H, W) -> ``{"cam": (N, C+1, h, w), "cam_rv": (N, C+1, h, w), "f_proj": (N, 128, h, w)}``
    with h, w = ceil(H/8), ceil(W/8) (stride 8, not upsampled); ``cam_rv`` is the PCM output.
    ``logits``: (N, 3, H, W) -> raw fc8 logits (N, C+1, h, w) (``forward_cam``: no PCM, no upsampling).
    """

    def __init__(self, backbone: nn.Module, n_classes: int, variant: str = "eps", proj_dim: int = 128):
        super().__init__()
        self.variant = variant
        self.bg_index = 0 if variant == "seam" else -1
        self.backbone = backbone
        c = backbone.out_channels
        self.dropout7 = nn.Dropout2d(0.5) if variant == "seam" else nn.Identity()
        self.fc8 = nn.Conv2d(c, n_classes + 1, 1, bias=False)
        self.fc_proj = nn.Conv2d(c, proj_dim, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.xavier_uniform_(self.fc_proj.weight)
        self.pcm = ops.PCMHead(backbone.tap_channels["conv4"], backbone.tap_channels["conv5"])

    @property
    def new_layers(self) -> list[nn.Module]:
        """The randomly initialised heads (10x learning rate;
        ``network/resnet38_contrast.py::Net.get_parameter_groups``)."""
        return [self.fc8, self.fc_proj, self.pcm]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone.forward_features(x)
        fea = self.dropout7(f["conv6"])
        cam = self.fc8(fea)
        f_proj = F.relu(self.fc_proj(fea))
        cam_rv = self.pcm(x, f["conv4"], f["conv5"], cam, self.bg_index)
        return {"cam": cam, "cam_rv": cam_rv, "f_proj": f_proj}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.backbone(x)
        return self.fc8(self.dropout7(fea) if self.variant == "seam" else fea)


@register_method("ppc")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> PPCNet:
    bb = cfg["backbone"]
    if bb.get("arch", "resnet38") != "resnet38":
        raise ConfigError(f"PPC is defined on ResNet-38 (backbone.arch: resnet38), got {bb.get('arch')!r}")
    backbone = build_resnet38(weights=bb.get("weights"), cache_dir=cache_dir, frozen_bn=bb.get("frozen_bn", True),
                              frozen_stem=bb.get("frozen_stem", True), width=bb.get("width", 1.0))
    return PPCNet(backbone, n_classes, ppc_settings(cfg)["variant"])


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    """What the training batches must carry: saliency for the EPS variant."""
    return {"views": True, "saliency": ppc_settings(cfg)["variant"] == "eps", "strong": False}


def param_groups(model: PPCNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``PolyOptimizer`` groups of ``usr922/wseg`` (``tool/torchutils.py``; ``util/torchutils.py`` on ``esp``):
    backbone lr / new layers 10x lr."""
    return ops.ppc_param_groups(model, model.new_layers, cfg["lr"], cfg.get("weight_decay", 5e-4))


def build_optimizer(model: PPCNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``PolyOptimizer`` of ``usr922/wseg`` over :func:`param_groups`: momentum quirk unless ``fix_quirk``."""
    return reference_sgd(param_groups(model, cfg), cfg, weight_decay=5e-4)


def supervised_loss(model: PPCNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any],
                    sal_view2: str | None = None) -> dict[str, torch.Tensor]:
    """The full PPC loss on the weak view and its rescaled copy (``usr922/wseg`` master ``contrast_train.py``;
    ``esp`` ``module/train.py::train_contrast``).

    batch: ``image`` (N, 3, H, W), ``label`` (N, K), and for ``eps`` ``saliency`` (N, 1, H, W) in [0, 1].
    Returns ``{"loss", "loss_cls", "loss_er", "loss_ecr", "loss_nce", ["loss_sal"]}`` (scalars).
    """
    p = ppc_settings(cfg)
    bg = model.bg_index
    img1, label = batch["image"], batch["label"]
    size2 = (int(p["view2_size"]),) * 2
    img2 = ops.resize(img1, size2)
    o1, o2 = model(img1), model(img2)
    if p["variant"] == "seam":  # master resnet38_contrast.py::Net.forward: cam, cam_rv upsampled to input size
        up = [ops.resize(o[k], i.shape[-2:]) for o, i in ((o1, img1), (o2, img2)) for k in ("cam", "cam_rv")]
        cam1, cam_rv1, cam2, cam_rv2 = up
    else:
        cam1, cam_rv1, cam2, cam_rv2 = o1["cam"], o1["cam_rv"], o2["cam"], o2["cam_rv"]
    l_cls = ops.cls_loss(cam1, cam2, cam_rv1, cam_rv2, label, bg)
    l_er, c1, c2 = ops.er_loss(cam1, cam2, label, bg)
    l_ecr = ops.ecr_loss(c1, c2, cam_rv1, cam_rv2, label, bg, p["ecr_topk"], p["esp_onehot_bug"])
    gen = torch.Generator().manual_seed(1_000_003 * int(step) + 7)  # hard-pixel sampling, stable across resumes
    nce = ops.ppc_contrast_loss(o1["cam_rv"], o1["f_proj"], o2["cam_rv"], o2["f_proj"], label, bg, p["bg_thr"],
                                p["proto_div"], tau=p["tau"], gamma=p["gamma"], generator=gen,
                                proto_safe_denominator=bool(p["proto_safe_denominator"]))
    out = {"loss_cls": l_cls, "loss_er": l_er, "loss_ecr": l_ecr, "loss_nce": nce["loss"]}
    total = l_cls + l_er + l_ecr + nce["loss"]
    if p["variant"] == "eps":
        if "saliency" not in batch:
            raise ConfigError("PPC-EPS needs saliency maps: set classifier.saliency: true (and the dataset's "
                              "saliency source)")
        sal1 = batch["saliency"]
        mode = sal_view2 or p["sal_view2"]
        sal2 = ops.resize(sal1, size2) if mode == "resize" else sal1
        s = lambda cam, sal: ops.eps_saliency_loss(cam, sal, label, p["eps_tau"], p["eps_alpha"], bg)  # noqa: E731
        l_sal = 0.5 * (s(cam1, sal1) + s(cam2, sal2)) + 0.5 * (s(cam_rv1, sal1) + s(cam_rv2, sal2))
        out["loss_sal"] = l_sal
        total = total + l_sal
    return {"loss": total, **out}


def training_step(model: PPCNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    return supervised_loss(model, batch, step, cfg)


def cam_logits(model: PPCNet, images: torch.Tensor, label: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(N, 3, H, W) -> (raw CAM logits (N, C+1, h, w) with an explicit bg channel, bg index) for wrappers.
    ``label`` / ``valid`` are not used: PPC's logits do not depend on them."""
    return model.logits(images), model.bg_index


def cam_forward(model: PPCNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> non-negative fg CAMs (N, C, h, w) (``contrast_infer.py`` of ``usr922/wseg`` master / ``esp``).

    ``eps``: softmax over the C+1 raw logits, fg probabilities. ``seam``: ReLU of the PCM output ``cam_rv``,
    fg channels. The caller sums scales/flips and normalises per class by the max.
    """
    if model.variant == "seam":
        return F.relu(model(images)["cam_rv"][:, 1:])
    return torch.softmax(model.logits(images), dim=1)[:, :-1]
