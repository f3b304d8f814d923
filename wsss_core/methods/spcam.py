"""SP-CAM: superpixel-level CAM (CHENDL-SHEN/ESC ``train.py --SP_CAM true``, ``core/networks.py::SP_CAM_Model``,
``core/loss.py::SP_CAM_Loss``, ``evaluator.py``).

The classifier's logits live on the superpixel grid: a Q branch (features of the frozen SCN's Q) and a deconvolution
head predict, per source superpixel, a 9-way distribution (one for the background, one for the foreground
channels); the deconvolution reconstruction module (DRM, :func:`wsss_core.superpixel.ops.drm`) scatters each
superpixel's logits to its neighbours with it. Loss: multi-label soft margin on the GAP of the reconstructed
foreground logits + ``weight`` x EPS on their softmax against the superpixel-mean saliency ``pool(sal, Q)``.
Inference (:func:`wsss_core.superpixel.cams.superpixel_cams`): softmax maps, ``rw_steps`` superpixel random-walk steps
with the ASAM, PSAM upsampling ``up(., Q)``, 4 scales x flip summed, ``make_cam``.

Settings: ``classifier.eps`` (as :mod:`~wsss_core.methods.eps_cam`), ``classifier.superpixels`` (where Q comes from,
:data:`~wsss_core.superpixel.cams.SUPERPIXEL_DEFAULTS`), ``classifier.spcam``: ``q_lr_mult`` 10 (ESC ``drm_lr``),
``drm_lr_mult`` 500 (``drm_lr2``), ``rw_steps`` 20 (inference walk).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.optim import reference_sgd, weight_bias_groups
from ..models.backbones import backbone_from_config
from ..superpixel import ops
from ..superpixel.cams import QModule, provider_from_config, superpixel_cams, superpixel_cams_grid
from . import eps_cam
from .base import method_settings
from .registry import register_method

SPCAM_DEFAULTS = {"q_lr_mult": 10.0, "drm_lr_mult": 500.0, "rw_steps": 20}


def spcam_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return method_settings(cfg, "spcam", SPCAM_DEFAULTS)


def _conv(cin: int, cout: int, k: int, stride: int = 1, bn: bool = True) -> nn.Sequential:
    """ESC ``core/models/model_util.py::conv``: conv (bias only without BN), BN, LeakyReLU 0.1."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.LeakyReLU(0.1))


class SPCAMNet(eps_cam.FixedBNBackboneNet):
    """forward(x (B, 3, H, W), q (B, 9, H, W) or None) -> superpixel-level logits (B, C+1, H/16, W/16).

    ``q`` None: Q from the model's own frozen provider (:class:`~wsss_core.superpixel.cams.QModule` ``q``).
    """

    def __init__(self, backbone: nn.Module, n_classes: int, q_module: QModule, frozen_bn: bool = True,
                 q_channels: int = 32):
        super().__init__(backbone, n_classes, frozen_bn)
        c = q_channels
        self.q = q_module
        # ESC get_qfeats: a circular-padded dilated 3x3 (one superpixel apart), then four stride-2 convs to 1/16
        self.qfeats = nn.Sequential(
            nn.Sequential(nn.Conv2d(9, c, 3, 1, 16, dilation=16, bias=False, padding_mode="circular"),
                          nn.BatchNorm2d(c), nn.ReLU(inplace=True)),
            _conv(c, c, 3, 2), _conv(c, 2 * c, 3, 2), _conv(2 * c, 4 * c, 3, 2), _conv(4 * c, 4 * c, 3, 2))
        # ESC get_tran_conv: the DRM weights of the background (first 9) and foreground (last 9) channels
        self.tran = nn.Sequential(_conv(backbone.out_channels + 4 * c, 1024, 3, bn=False),
                                  _conv(1024, 256, 3, bn=False), _conv(256, 128, 3, bn=False),
                                  _conv(128, 18, 1, bn=False))

    def drm_weights(self, x5: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_bg, w_fg), each (B, 9, h, w) softmax-normalised over the 9 targets of a source superpixel."""
        par = self.tran(torch.cat([x5.detach(), self.qfeats(q)], 1))
        return torch.softmax(par[:, :9], 1), torch.softmax(par[:, 9:], 1)

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(x) if q is None else q
        x5 = self.backbone(x)
        logits = self.classifier(x5)
        w_bg, w_fg = self.drm_weights(x5, q)
        return torch.cat([ops.drm(logits[:, :1], w_bg), ops.drm(logits[:, 1:], w_fg)], 1)


@register_method("spcam")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> SPCAMNet:
    eps_cam.eps_settings(cfg)
    net = SPCAMNet(backbone_from_config(cfg["backbone"], cache_dir), n_classes,
                   QModule(provider_from_config(cfg, cache_dir)), cfg["backbone"].get("frozen_bn", True))
    net.rw_steps = int(spcam_settings(cfg)["rw_steps"])
    return net


def param_groups(model: SPCAMNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ESC ``SP_CAM_Model.get_parameter_groups1``: backbone x1, classifier x10, Q branch x ``q_lr_mult``, DRM head x
    ``drm_lr_mult`` (biases twice that, without weight decay). The SCN is not trained."""
    s = spcam_settings(cfg)
    return weight_bias_groups([("backbone", model.backbone.named_parameters(), 1.0),
                               ("classifier", model.classifier.named_parameters(), 10.0),
                               ("qfeats", model.qfeats.named_parameters(), s["q_lr_mult"]),
                               ("drm", model.tran.named_parameters(), s["drm_lr_mult"])], cfg)


def build_optimizer(model: SPCAMNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return reference_sgd(param_groups(model, cfg), cfg)


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    return {"views": True, "saliency": True, "strong": False}


def training_step(model: SPCAMNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    x = batch["image"]
    q = model.q(x)
    z = model(x, q)
    lc = eps_cam.cls_loss(z, batch["label"])
    ls = eps_cam.eps_loss(z, ops.pool(batch["saliency"].to(q.dtype), q), batch["label"], cfg)
    return {"loss": lc + eps_cam.eps_settings(cfg)["weight"] * ls, "loss_cls": lc, "loss_sal": ls}


def cam_forward(model: SPCAMNet, images: torch.Tensor) -> torch.Tensor:
    """Foreground softmax maps on the superpixel grid (B, C, h, w) (no walk, no PSAM upsampling)."""
    return torch.softmax(model(images), 1)[:, 1:]


def cam_logits(model: SPCAMNet, images: torch.Tensor, label=None, valid=None) -> tuple[torch.Tensor, int]:
    return model(images), 0


def infer_cams(model: SPCAMNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, None]:
    p = model.q.provider
    keys_out, cams = superpixel_cams(lambda x, q: model(x, q), model.q, image, keys, scales, flip, device,
                                     rw_steps=int(model.rw_steps), softmax=True, mean=p.mean, std=p.std)
    return keys_out, cams, None


def infer_cams_grid(model: SPCAMNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
                    device: torch.device, rw_grid: Sequence[int]) -> dict[int, np.ndarray]:
    """:func:`infer_cams` for each walk length of ``rw_grid`` (ESC ``evaluator.py``'s ``refine_list``)."""
    p = model.q.provider
    return superpixel_cams_grid(lambda x, q: model(x, q), model.q, image, keys, scales, flip, device, rw_grid,
                                softmax=True, mean=p.mean, std=p.std)
