"""DeepLab-V2: dilated ResNet (output stride 8) + ASPP with summed branches."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNetBackbone, resnet_from_config


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab-V2: parallel dilated 3x3 convs whose logits are summed.

    (B, C_in, h, w) -> (B, n_classes, h, w). Weights ~ N(0, 0.01), bias 0.
    """

    def __init__(self, in_channels: int, n_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, n_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(nn.Module):
    """forward: (B, 3, H, W) -> logits (B, n_classes, H/8, W/8) (``upsample=True``: (B, n_classes, H, W))."""

    def __init__(self, backbone: ResNetBackbone, n_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, n_classes, rates)

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        logits = self.aspp(self.backbone(x))
        if upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Backbone at lr; ASPP weights at 10x lr; ASPP biases at 20x lr without weight decay."""
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        return [
            {"params": bb, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": [b.weight for b in self.aspp.branches], "lr": 10 * lr, "weight_decay": weight_decay, "lr_mult": 10.0},
            {"params": [b.bias for b in self.aspp.branches], "lr": 20 * lr, "weight_decay": 0.0, "lr_mult": 20.0},
        ]


def build_deeplabv2(n_classes: int, backbone: Mapping[str, Any], rates: Sequence[int] = (6, 12, 18, 24),
                    cache_dir: str = "weights") -> DeepLabV2:
    """Build DeepLab-V2 from a backbone config dict (arch, layers, width_per_group, weights, frozen_bn)."""
    bb = resnet_from_config(backbone, cache_dir, default_arch="resnet101", default_output_stride=8,
                            frozen_bn=backbone.get("frozen_bn", True))
    return DeepLabV2(bb, n_classes, rates)
