"""CAM classifier with the EPS saliency loss: SP-CAM's stage 1 (CHENDL-SHEN/ESC ``train.py --SP_CAM false``,
``core/networks.py::CAM_Model``, ``core/loss.py::SP_CAM_Loss``; the loss is EPS, Lee et al. CVPR 2021).

ResNeSt-50 (or a ResNet) at output stride 16 with fixed BatchNorm statistics, a bias-free 1x1 classifier over
C + 1 channels (0: background). Loss: multi-label soft margin on the GAP of the foreground channels plus
``weight`` x the EPS loss of ``softmax(logits)`` against the nearest-resized saliency (bg channel first, ESC's 1e-4 per
cell in the overlap ratio). Inference: softmax maps of 4 scales x flip, bilinear (``evaluator.py``), summed,
``make_cam``.

Settings (``classifier.eps``): ``tau`` 0.4 (a present class counts as salient when its overlap ratio exceeds it),
``lam`` 0.5 (fg / bg mix of the predicted saliency), ``weight`` 0.5 (the loss weight ``alpha``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import reference_sgd, weight_bias_groups
from ..models.backbones import backbone_from_config, fix_bn_statistics
from ..superpixel.cams import superpixel_cams
from .base import method_settings
from .ppc_ops import eps_saliency_loss
from .registry import register_method

EPS_DEFAULTS = {"tau": 0.4, "lam": 0.5, "weight": 0.5}


def eps_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return method_settings(cfg, "eps", EPS_DEFAULTS)


class FixedBNBackboneNet(nn.Module):
    """A backbone whose BatchNorm layers always use their running statistics (ESC ``FixedBatchNorm``; affine
    parameters stay trainable) when ``frozen_bn``, plus a bias-free 1x1 classifier over C + 1 channels."""

    def __init__(self, backbone: nn.Module, n_classes: int, frozen_bn: bool = True):
        super().__init__()
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
        self.classifier = nn.Conv2d(backbone.out_channels, n_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen_bn", False):
            fix_bn_statistics(self.backbone)
        return self


class EPSCAMNet(FixedBNBackboneNet):
    """forward: (B, 3, H, W) -> logits (B, C+1, H/16, W/16), channel 0 background."""

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.backbone(x))


@register_method("eps_cam")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> EPSCAMNet:
    eps_settings(cfg)
    return EPSCAMNet(backbone_from_config(cfg["backbone"], cache_dir), n_classes,
                     cfg["backbone"].get("frozen_bn", True))


def param_groups(model: EPSCAMNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pretrained backbone x1 (biases x2, no decay), classifier x10 (ESC ``get_parameter_groups``)."""
    return weight_bias_groups([("backbone", model.backbone.named_parameters(), 1.0),
                               ("classifier", model.classifier.named_parameters(), 10.0)], cfg)


def build_optimizer(model: EPSCAMNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """ESC's ``PolyOptimizer``: SGD whose momentum is the weight decay (the quirk, ``fix_quirk``), Nesterov."""
    return reference_sgd(param_groups(model, cfg), cfg)


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    return {"views": True, "saliency": True, "strong": False}


def cls_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin on the GAP of the foreground channels. logits (B, C+1, h, w), label (B, C)."""
    return F.multilabel_soft_margin_loss(logits.mean((2, 3))[:, 1:], label)


def eps_loss(logits: torch.Tensor, sal: torch.Tensor, label: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    e = eps_settings(cfg)
    return eps_saliency_loss(logits, sal, label, tau=e["tau"], alpha=e["lam"], bg_index=0, eps_per_cell=True)


def training_step(model: EPSCAMNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    logits = model(batch["image"])
    lc = cls_loss(logits, batch["label"])
    ls = eps_loss(logits, batch["saliency"], batch["label"], cfg)
    return {"loss": lc + eps_settings(cfg)["weight"] * ls, "loss_cls": lc, "loss_sal": ls}


def cam_forward(model: EPSCAMNet, images: torch.Tensor) -> torch.Tensor:
    """Foreground softmax maps (B, C, h, w) (the background competes in the softmax)."""
    return torch.softmax(model(images), 1)[:, 1:]


def cam_logits(model: EPSCAMNet, images: torch.Tensor, label=None, valid=None) -> tuple[torch.Tensor, int]:
    return model(images), 0


def infer_cams(model: EPSCAMNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, None]:
    keys_out, cams = superpixel_cams(lambda x, q: model(x), None, image, keys, scales, flip, device)
    return keys_out, cams, None
