"""Backbones built from torchvision's ResNet, with configurable depth, width and output stride.

``build_resnet("resnet50", output_stride=16)`` is the standard CAM backbone; ``build_resnet("resnet101",
output_stride=8)`` is DeepLab-V2's. Small variants (``layers=[1, 1, 1, 1]``, ``width_per_group=16``)
keep the toy pipeline fast on a CPU. Pretrained weights are loaded only through
:func:`wsss_core.models.weights.load_weights`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

_ARCHS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3]),
}


class ResNetBackbone(nn.Module):
    """ResNet trunk without pooling/fc.

    forward: (B, 3, H, W) -> (B, out_channels, ceil(H/os), ceil(W/os)).
    ``forward_features`` returns the stage outputs ``{"layer1": ..., ..., "layer4": ...}``; ``stage_channels``
    their widths ``[stem, layer1, layer2, layer3, layer4]`` (the last = ``out_channels``).
    """

    def __init__(self, net: tv_resnet.ResNet, output_stride: int):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.output_stride = output_stride
        def width(layer: nn.Sequential) -> int:
            last = layer[-1]
            return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

        self.stage_channels = [net.conv1.out_channels] + [width(getattr(net, f"layer{i}")) for i in range(1, 5)]
        self.out_channels = self.stage_channels[-1]

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["layer4"]


def _dilate_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided stage into a dilated one (for BasicBlock stages, which torchvision cannot dilate)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)


def build_resnet(arch: str = "resnet50", layers: Sequence[int] | None = None, width_per_group: int = 64,
                 output_stride: int = 16, weights: Mapping[str, Any] | None = None,
                 cache_dir: str = "weights", frozen_bn: bool = False, dilated: bool = True) -> ResNetBackbone:
    """Build a ResNet backbone.

    arch: one of resnet18/34/50/101/152; ``layers`` overrides the blocks per stage (e.g. [1, 1, 1, 1]);
    ``width_per_group`` scales the bottleneck width (64 = standard); ``output_stride`` in {8, 16, 32}.
    ``weights``: a weights spec (see :mod:`wsss_core.models.weights`); ``None`` = random init.
    ``frozen_bn``: put BatchNorm layers in eval mode permanently with frozen affine parameters.
    ``dilated=False`` (SIPE / IRN, ``output_stride`` 16 only): layer4 keeps stride 1 with **no** dilation, i.e.
    the strides (2, 2, 2, 1) of the IRN-family ResNet-50 (a 512 crop gives 32 x 32).
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(_ARCHS)}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    block, default_layers = _ARCHS[arch]
    layers = list(layers or default_layers)
    if not dilated and output_stride != 16:
        raise ValueError("dilated=False is defined for output_stride 16 only (strides 2, 2, 2, 1)")
    dil = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    if not dilated:
        dil = [False, False, False]
    if block is tv_resnet.Bottleneck:
        net = tv_resnet.ResNet(block, layers, width_per_group=width_per_group, replace_stride_with_dilation=dil)
    else:
        net = tv_resnet.ResNet(block, layers, width_per_group=64)
        d = 1
        for flag, layer in zip(dil, (net.layer2, net.layer3, net.layer4)):
            if flag:
                d *= 2
                _dilate_layer(layer, d)
    if not dilated:  # drop layer4's stride (3x3 conv of v1.5 blocks, and the projection shortcut), no dilation
        for m in net.layer4[0].modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
    backbone = ResNetBackbone(net, output_stride)
    if weights:
        from .weights import load_weights

        info = load_weights(backbone, weights, cache_dir=cache_dir)
        backbone.weights_info = info
    if frozen_bn:
        freeze_batchnorm(backbone)
    return backbone




class ResNeStBackbone(ResNetBackbone):
    """ResNeSt (Zhang et al. 2020, github.com/zhanghang1989/ResNeSt) trunk from timm's ``resnest*d`` family, which
    has the official layout (deep stem, radix 2, avd, avg-down shortcuts) and parameter names: the official ImageNet
    files load into it as they are. Output stride 16: layer4 keeps stride 1 and dilates its later blocks by 2
    (the official ``dilated=False, dilation=2``, as CHENDL-SHEN/ESC ``core/networks.py::Backbone`` builds it).

    A :class:`ResNetBackbone` (same stages and interface): ``forward_features`` -> ``{"layer1": ..., "layer4": ...}``,
    ``stage_channels``, ``out_channels``; (B, 3, H, W) -> (B, 2048, ceil(H/16), ceil(W/16)).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width_per_group: int = 64, stem_width: int = 32):
        nn.Module.__init__(self)  # the stages of ResNetBackbone, built by timm
        from timm.models.resnest import ResNestBottleneck
        from timm.models.resnet import ResNet

        net = ResNet(block=ResNestBottleneck, layers=list(layers), stem_type="deep", stem_width=stem_width,
                     avg_down=True, base_width=width_per_group, cardinality=1,
                     block_args={"radix": 2, "avd": True, "avd_first": False}, output_stride=16, num_classes=0,
                     global_pool="")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # The official dilated layer4 (``resnest/torch/models/resnet.py::ResNet._make_layer`` with dilation 2) keeps
        # the first block's 3x3 average pooling at stride 1 (``is_first``) and an identity pool in its shortcut;
        # timm drops the former and puts a 2x2 "same" average in the latter.
        first = self.layer4[0]
        first.avd_last = nn.AvgPool2d(3, 1, padding=1)
        first.downsample[0] = nn.Identity()
        self.output_stride = 16
        self.stage_channels = [stem_width * 2] + [getattr(net, f"layer{i}")[-1].bn3.num_features for i in range(1, 5)]
        self.out_channels = self.stage_channels[-1]


def backbone_from_config(bb: Mapping[str, Any], cache_dir: str = "weights", **force: Any) -> nn.Module:
    """A ResNet (:func:`resnet_from_config`) or, for ``arch: resnest50`` (``layers``, ``width_per_group``,
    ``stem_width``, ``weights``), a :class:`ResNeStBackbone`; ``force`` as for :func:`resnet_from_config`."""
    if not str(bb.get("arch", "resnet50")).startswith("resnest"):
        return resnet_from_config(bb, cache_dir, **force)
    if bb["arch"] != "resnest50":
        raise ValueError(f"unknown backbone {bb['arch']!r}; ResNeSt: resnest50")
    net = ResNeStBackbone(bb.get("layers") or (3, 4, 6, 3), bb.get("width_per_group", 64), bb.get("stem_width", 32))
    weights = force.get("weights", bb.get("weights"))
    if weights:
        from .weights import load_weights

        net.weights_info = load_weights(net, weights, cache_dir=cache_dir)
    return net


def resnet_from_config(bb: Mapping[str, Any], cache_dir: str = "weights", *, default_arch: str = "resnet50",
                       default_output_stride: int = 16, **force: Any) -> ResNetBackbone:
    """:func:`build_resnet` from a stage's ``backbone`` config (``arch``, ``layers``, ``width_per_group``,
    ``output_stride``, ``weights``); ``force`` sets arguments regardless of the config (e.g. ``dilated=False``,
    ``frozen_bn=...``, ``weights=None``)."""
    kw = {"arch": bb.get("arch", default_arch), "layers": bb.get("layers"),
          "width_per_group": bb.get("width_per_group", 64),
          "output_stride": bb.get("output_stride", default_output_stride), "weights": bb.get("weights")}
    kw.update(force)
    return build_resnet(cache_dir=cache_dir, **kw)


def fix_bn_statistics(module: nn.Module) -> None:
    """Put every BatchNorm2d of ``module`` in eval mode: it normalises with its running statistics and does not update
    them, while its affine parameters stay trainable (the ``FixedBatchNorm`` of IRN, SIPE, ESC). Call it from a
    model's ``train()``."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by torchvision's FrozenBatchNorm2d (fixed statistics and affine).

    Done after loading weights; the state-dict keys stay the same. Returns ``module`` (changed in place).
    """
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module
