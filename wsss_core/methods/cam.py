"""Baseline CAM (Zhou et al. 2016, IRN-style): ResNet (OS16) -> 1x1 classifier -> GAP -> multi-label soft margin."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import resnet_from_config
from .registry import register_method


class CAMNet(nn.Module):
    """forward: (B, 3, H, W) -> logits (B, C); ``cam``: (B, 3, H, W) -> ReLU'd CAMs (B, C, H/os, W/os)."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, n_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.classifier(F.adaptive_avg_pool2d(feats, 1)).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.backbone(x)))


@register_method("cam")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> CAMNet:
    return CAMNet(resnet_from_config(cfg["backbone"], cache_dir), n_classes)


def param_groups(model: CAMNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Backbone at ``lr``, classifier at ``lr * head_lr_mult`` (both with weight decay)."""
    lr = cfg["lr"]
    return [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr},
        {"params": list(model.classifier.parameters()), "lr": lr * cfg.get("head_lr_mult", 10.0)},
    ]


def training_step(model: CAMNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    logits = model(batch["image"])
    loss = F.multilabel_soft_margin_loss(logits, batch["label"])
    with torch.no_grad():
        acc = ((logits > 0).float() == batch["label"]).float().mean()
    return {"loss": loss, "label_acc": acc}


def cam_forward(model: CAMNet, images: torch.Tensor) -> torch.Tensor:
    return model.cam(images)
