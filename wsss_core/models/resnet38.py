"""ResNet-38 ("resnet38d", model A1 of Wu et al., "Wider or Deeper"): the PSA / SEAM / PPC backbone.

A wide pre-activation ResNet with output stride 8. Upstream: ``usr922/wseg`` ``network/resnet38d.py`` (classes
``ResBlock``, ``ResBlock_bot``, ``Net``), the same file as ``jiwoon-ahn/psa`` ``network/resnet38d.py`` (Ahn & Kwak,
CVPR 2018) and ``xulianuwa/MCTformer`` ``psa/network/resnet38d.py``.
Every convolution is bias-free.

Units (``a = ReLU(BN(x))`` is the pre-activation of the unit's input):

- :class:`ResBlock` ``(in, mid, out, stride, first_dilation, dilation)``::

      main     = conv3x3(in->mid, stride, dil=first_dilation) -> BN -> ReLU -> conv3x3(mid->out, dil=dilation)
      shortcut = conv1x1(in->out, stride)(a)   if in != out or stride != 1   else x (raw input)
      out      = main(a) + shortcut

- :class:`ResBlockBottleneck` ``(in, out, stride, dilation, dropout)``::

      main     = conv1x1(in->out/4, stride) -> BN -> ReLU -> Dropout2d -> conv3x3(out/4->out/2, dil)
                 -> BN -> ReLU -> Dropout2d -> conv1x1(out/2->out)
      shortcut = conv1x1(in->out, stride)(a)   (always)

Layer table (channels in, mid, out; stride; dilations)::

    conv1a            3x3, 3->64, stride 1
    b2                (64, 128, 128),   s2        b2_1, b2_2         (128, 128, 128)
    b3                (128, 256, 256),  s2        b3_1, b3_2         (256, 256, 256)
    b4                (256, 512, 512),  s2        b4_1 .. b4_5       (512, 512, 512)
    b5                (512, 512, 1024), s1, first_dil 1, dil 2
    b5_1, b5_2        (1024, 512, 1024), dil 2
    b6                bottleneck 1024->2048, dil 4, Dropout2d 0.3
    b7                bottleneck 2048->4096, dil 4, Dropout2d 0.5
    bn7 + ReLU        -> conv6

State-dict names follow the converted PyTorch checkpoints shared by PSA/SEAM/PPC, e.g.
``conv1a.weight``, ``b2.bn_branch2a.{weight,bias,running_mean,running_var}``, ``b2.conv_branch2a.weight``,
``b2.bn_branch2b1.*``, ``b2.conv_branch2b1.weight``, ``b2.conv_branch1.weight`` (shortcut),
``b6.bn_branch2b2.*``, ``b6.conv_branch2b2.weight`` (bottlenecks only), ``bn7.*``.

Frozen parts (the reference ``train()`` override): every BatchNorm stays in eval mode with frozen affine
parameters (``frozen_bn=True``), and conv1a, b2, b2_1, b2_2 get ``requires_grad=False``
(``frozen_stem=True``, see :func:`freeze_stem`). Pretrained weights are loaded only through
:func:`wsss_core.models.weights.load_weights` (``.pth`` state dicts, or the MXNet ImageNet ``.params`` file,
converted by :mod:`wsss_core.models.mxnet_params`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: Names of the stem modules that get no gradients (``not_training`` in the reference).
STEM_MODULES = ("conv1a", "b2", "b2_1", "b2_2")

#: Blocks in forward order: (name, kind, kwargs).
_LAYOUT: tuple[tuple[str, str, dict], ...] = (
    ("b2", "basic", dict(in_ch=64, mid_ch=128, out_ch=128, stride=2)),
    ("b2_1", "basic", dict(in_ch=128, mid_ch=128, out_ch=128)),
    ("b2_2", "basic", dict(in_ch=128, mid_ch=128, out_ch=128)),
    ("b3", "basic", dict(in_ch=128, mid_ch=256, out_ch=256, stride=2)),
    ("b3_1", "basic", dict(in_ch=256, mid_ch=256, out_ch=256)),
    ("b3_2", "basic", dict(in_ch=256, mid_ch=256, out_ch=256)),
    ("b4", "basic", dict(in_ch=256, mid_ch=512, out_ch=512, stride=2)),
    ("b4_1", "basic", dict(in_ch=512, mid_ch=512, out_ch=512)),
    ("b4_2", "basic", dict(in_ch=512, mid_ch=512, out_ch=512)),
    ("b4_3", "basic", dict(in_ch=512, mid_ch=512, out_ch=512)),
    ("b4_4", "basic", dict(in_ch=512, mid_ch=512, out_ch=512)),
    ("b4_5", "basic", dict(in_ch=512, mid_ch=512, out_ch=512)),
    ("b5", "basic", dict(in_ch=512, mid_ch=512, out_ch=1024, first_dilation=1, dilation=2)),
    ("b5_1", "basic", dict(in_ch=1024, mid_ch=512, out_ch=1024, dilation=2)),
    ("b5_2", "basic", dict(in_ch=1024, mid_ch=512, out_ch=1024, dilation=2)),
    ("b6", "bottleneck", dict(in_ch=1024, out_ch=2048, dilation=4)),
    ("b7", "bottleneck", dict(in_ch=2048, out_ch=4096, dilation=4)),
)

#: Feature taps: name -> (block whose pre-activation ``a`` is the tap, channels, stride).
#: ``conv6`` is ReLU(bn7(b7 output)), 4096 channels, stride 8.
TAPS = {"conv3": ("b4", 256, 4), "conv4": ("b5", 512, 8), "conv5": ("b6", 1024, 8)}


class ResBlock(nn.Module):
    """Pre-activation basic unit. forward: (B, in, H, W) -> (B, out, ceil(H/stride), ceil(W/stride)).

    ``forward(x, return_preact=True)`` also returns ``a = ReLU(bn_branch2a(x))`` (B, in, H, W).
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, first_dilation: int | None = None,
                 dilation: int = 1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        a = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(a)
        y = self.conv_branch2a(a)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        out = y + shortcut
        return (out, a) if return_preact else out


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck unit with Dropout2d. forward: (B, in, H, W) -> (B, out, ceil(H/s), ceil(W/s)).

    ``forward(x, return_preact=True)`` also returns ``a = ReLU(bn_branch2a(x))`` (B, in, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a)
        y = self.conv_branch2a(a)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        out = y + shortcut
        return (out, a) if return_preact else out


class ResNet38(nn.Module):
    """ResNet-38 (resnet38d) trunk without classifier.

    forward: (B, 3, H, W) -> conv6 (B, 4096, ceil(H/8), ceil(W/8)).
    ``forward_features`` returns ``{"conv3": (B, 256, H/4, W/4), "conv4": (B, 512, H/8, W/8),
    "conv5": (B, 1024, H/8, W/8), "conv6": (B, 4096, H/8, W/8)}`` (sizes rounded up).

    ``frozen_bn``: BatchNorms always run in eval mode (running statistics, never updated) with
    ``requires_grad=False`` on their affine parameters, also after ``train()``.
    ``frozen_stem``: conv1a, b2, b2_1, b2_2 get ``requires_grad=False`` (re-applied by ``train()``).
    ``dropout``: Dropout2d rates of b6 and b7 (reference 0.3, 0.5); dropout is active in train mode only.
    ``width``: channel multiplier (1.0 = the published network, the only width pretrained weights exist for);
    e.g. 0.125 gives a 1.6M-parameter ResNet-38 of the same depth for CPU-sized toy runs. ``out_channels``
    and ``tap_channels`` (conv3/conv4/conv5) follow the width.
    """

    def channels(self, c: int) -> int:
        """Channel count ``c`` of the published network at this width (multiple of 4, at least 4)."""
        return max(4, int(round(c * self.width / 4)) * 4)

    output_stride = 8

    def __init__(self, frozen_bn: bool = True, frozen_stem: bool = True, dropout: tuple[float, float] = (0.3, 0.5),
                 width: float = 1.0):
        super().__init__()
        self.frozen_bn = frozen_bn
        self.frozen_stem = frozen_stem
        self.width = float(width)
        ch = self.channels
        self.conv1a = nn.Conv2d(3, ch(64), 3, padding=1, bias=False)
        drops = {"b6": dropout[0], "b7": dropout[1]}
        for name, kind, kw in _LAYOUT:
            kw = {k: (ch(v) if k.endswith("_ch") else v) for k, v in kw.items()}
            block = ResBlock(**kw) if kind == "basic" else ResBlockBottleneck(**kw, dropout=drops[name])
            self.add_module(name, block)
        self.out_channels = ch(4096)
        self.tap_channels = {tap: ch(c) for tap, (_, c, _) in TAPS.items()}
        self.bn7 = nn.BatchNorm2d(self.out_channels)
        self._tap_of = {block: tap for tap, (block, _, _) in TAPS.items()}
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        if self.frozen_stem:
            freeze_stem(self)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet38":
        """Like ``nn.Module.train``, but keeps BatchNorm in eval mode (``frozen_bn``) and the stem frozen."""
        super().train(mode)
        self._apply_freezing()
        return self

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        x = self.conv1a(x)
        for name, _, _ in _LAYOUT:
            block = getattr(self, name)
            if name in self._tap_of:
                x, a = block(x, return_preact=True)
                feats[self._tap_of[name]] = a
            else:
                x = block(x)
        feats["conv6"] = F.relu(self.bn7(x))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["conv6"]


def freeze_stem(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of conv1a, b2, b2_1 and b2_2 of ``model``; returns it."""
    for name in STEM_MODULES:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    return model


def build_resnet38(weights: Mapping[str, Any] | None = None, cache_dir: str = "weights", frozen_bn: bool = True,
                   frozen_stem: bool = True, dropout: tuple[float, float] = (0.3, 0.5),
                   strict: bool = False, width: float = 1.0) -> ResNet38:
    """Build ResNet-38 and load ``weights`` (a weights spec, see :mod:`wsss_core.models.weights`).

    ``weights={"path": ".../ilsvrc-cls_rna-a1_cls1000_ep-0001.params"}`` converts the MXNet ImageNet
    checkpoint on the fly; a ``.pth`` path loads a converted state dict (e.g. PSA's ``res38_cls.pth``, whose
    head keys are reported as unexpected and skipped). ``None`` = random init. ``strict`` raises when a
    backbone key is missing from the file. The load report is kept in ``model.weights_info``.
    """
    if weights and width != 1.0:
        from ..errors import ConfigError

        raise ConfigError(f"pretrained ResNet-38 weights exist only for width 1.0 (got width {width}); "
                          "set backbone.weights to null or width to 1.0")
    model = ResNet38(frozen_bn=frozen_bn, frozen_stem=frozen_stem, dropout=dropout, width=width)
    if weights:
        from .weights import load_weights

        model.weights_info = load_weights(model, weights, cache_dir=cache_dir, strict=strict)
    return model

