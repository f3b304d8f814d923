"""MSA: multi-type semantic affinity (CHENDL-SHEN/MSA at 0550782: ``core/networks.py::SP_CAM_Model3``,
``train_cls_image.py`` / ``train_cls_sal.py``, ``core/loss.py::SP_CAM_Loss2``, ``evaluator_cls_image.py``).

A ResNet-50 (strides 2, 2, 2, 1) whose layer3 output and final logits pass through the dynamic convolutional
reconstruction (DCR, :func:`wsss_core.superpixel.ops.dcr`: a 3x3 gather with weights predicted from Q features and
the detached stage features), SE-style channel attention on both stages, optional affinity propagation (AP,
:func:`~wsss_core.methods.msa_ops.affinity_propagation` on the DCR'd layer3 features). Loss: multi-label soft margin
on the GAP of the plain logits + ``alpha`` x IPC (:func:`~wsss_core.methods.msa_ops.ipc_loss`) of the foreground
CAMs against a superpixel target, on ``patches`` patches: the superpixel-mean normalised image (``target: image``)
or ``[s, 1 - s]`` of the superpixel-mean saliency (``target: saliency``). Inference: raw logits with AP, PSAM
upsampling, 4 scales x flip, ``make_cam`` (no walk).

Settings ``classifier.msa``: ``target`` image | saliency, ``alpha`` 0.3, ``patches`` 9 (saliency: 1), ``ig_th``
0.1 (saliency: 0.01), ``ap_train`` (beta) 8 (saliency: 0), ``ap_infer`` 8, ``gamma`` 0.6,
``valid_over_image_only`` false (the reference's patch-validity quirk, :func:`~wsss_core.methods.msa_ops.ipc_loss`).
``classifier.superpixels``: where Q comes from.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import reference_sgd, weight_bias_groups
from ..models.backbones import backbone_from_config
from ..superpixel import ops
from ..superpixel.cams import QModule, provider_from_config, superpixel_cams
from . import eps_cam, msa_ops
from .base import method_settings
from .registry import register_method

MSA_DEFAULTS = {"target": "image", "alpha": 0.3, "patches": None, "ig_th": None, "ap_train": None, "ap_infer": 8,
                "gamma": 0.6, "valid_over_image_only": False}
_PER_TARGET = {"image": {"patches": 9, "ig_th": 0.1, "ap_train": 8},
               "saliency": {"patches": 1, "ig_th": 0.01, "ap_train": 0}}


def msa_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``classifier.msa`` over the defaults of its target (``train_cls_image.py`` / ``train_cls_sal.py``)."""
    from ..errors import ConfigError

    s = method_settings(cfg, "msa", MSA_DEFAULTS)
    if s["target"] not in _PER_TARGET:
        raise ConfigError(f"classifier.msa.target must be image or saliency, not {s['target']!r}")
    return {**s, **{k: v for k, v in _PER_TARGET[s["target"]].items() if s[k] is None}}


def _conv(cin: int, cout: int, k: int, stride: int = 1, bn: bool = True, padding: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if padding is None else padding,
                                         bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.LeakyReLU(0.1))


def _se(ch: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, ch, 1, bias=False),
                         nn.Sigmoid())


class MSANet(eps_cam.FixedBNBackboneNet):
    """forward(x (B, 3, H, W), q or None, ap_steps) -> (z (B, C+1, H/16, W/16) DCR'd logits after AP,
    gap (B, C+1) the GAP of the plain logits)."""

    def __init__(self, backbone: nn.Module, n_classes: int, q_module: QModule, frozen_bn: bool = True,
                 gamma: float = 0.6):
        super().__init__(backbone, n_classes, frozen_bn)
        ch3, ch4 = backbone.stage_channels[3], backbone.stage_channels[4]
        self.q, self.gamma = q_module, gamma
        self.qfeats = nn.Sequential(_conv(9, 32, 4, 4, padding=1), _conv(32, 128, 4, 4, padding=1),
                                    _conv(128, 128, 3, bn=False))
        self.r4, self.r5 = _conv(ch3, 128, 1), _conv(ch4, 128, 1)
        # the released code declares 128 input channels for these heads, which cannot run; ESC's dev versions: 256
        self.g4 = nn.Sequential(_conv(256, 256, 3, bn=False), _conv(256, 9, 1, bn=False), nn.Softmax(1))
        self.g5 = nn.Sequential(_conv(256, 256, 3, bn=False), _conv(256, 9, 1, bn=False), nn.Softmax(1))
        self.ala1, self.ala2 = _se(ch3, ch3 // 16), _se(ch4, ch4 // 16)

    @property
    def new_layers(self) -> list[nn.Module]:
        return [self.classifier, self.qfeats, self.r4, self.r5, self.g4, self.g5, self.ala1, self.ala2]

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None, ap_steps: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q(x) if q is None else q
        qf = self.qfeats(q)
        b = self.backbone
        x4 = b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))))
        w4 = self.g4(torch.cat([self.r4(x4.detach()), qf], 1))
        x4 = ops.dcr(x4 * self.ala1(F.adaptive_avg_pool2d(x4, 1)), w4)
        x5 = b.layer4(x4)
        w5 = self.g5(torch.cat([self.r5(x5.detach()), qf], 1))
        x5 = x5 * self.ala2(F.adaptive_avg_pool2d(x5.detach(), 1))
        logits = self.classifier(x5)
        z = msa_ops.affinity_propagation(ops.dcr(logits, w5), x4, int(ap_steps), self.gamma)
        return z, logits.mean((2, 3))


@register_method("msa")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> MSANet:
    s = msa_settings(cfg)
    net = MSANet(backbone_from_config(cfg["backbone"], cache_dir, dilated=False), n_classes,
                 QModule(provider_from_config(cfg, cache_dir)), cfg["backbone"].get("frozen_bn", True), s["gamma"])
    net.ap_infer = int(s["ap_infer"])
    return net


def param_groups(model: MSANet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pretrained backbone x1, new layers x10 (biases twice that, without weight decay); the SCN is not trained."""
    new = [(f"{i}.{n}", p) for i, m in enumerate(model.new_layers) for n, p in m.named_parameters()]
    return weight_bias_groups([("backbone", model.backbone.named_parameters(), 1.0), ("new", new, 10.0)], cfg)


def build_optimizer(model: MSANet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return reference_sgd(param_groups(model, cfg), cfg)


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    sal = msa_settings(cfg)["target"] == "saliency"
    return {"views": sal, "saliency": sal, "strong": False, "jitter": False}


def ipc_target(batch: Mapping[str, torch.Tensor], q: torch.Tensor, target: str) -> torch.Tensor:
    """The IPC target on the superpixel grid (B, T, h, w), 0 on cells of crop padding (nearest-downsampled image all
    0): the superpixel-mean normalised image (T = 3) or ``[s, 1 - s]`` of the superpixel-mean saliency (T = 2)."""
    x = batch["image"]
    h, w = x.shape[-2] // ops.CELL, x.shape[-1] // ops.CELL
    inside = (F.interpolate(x.float(), size=(h, w)).sum(1, keepdim=True) != 0).to(q.dtype)
    if target == "image":
        t = ops.pool(x.to(q.dtype), q)
    else:
        s = ops.pool(batch["saliency"].to(q.dtype), q)
        t = torch.cat([s, 1 - s], 1)
    return t.detach() * inside


def training_step(model: MSANet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    s = msa_settings(cfg)
    x, label = batch["image"], batch["label"]
    q = model.q(x)
    z, gap = model(x, q, s["ap_train"])
    lc = F.multilabel_soft_margin_loss(gap[:, 1:], label)
    fg = msa_ops.make_cam(z[:, 1:]) * label[:, :, None, None]
    t = ipc_target(batch, q, s["target"])
    li = msa_ops.ipc_loss(msa_ops.tile_features(fg, s["patches"]), msa_ops.tile_features(t, s["patches"]),
                          s["ig_th"], s["valid_over_image_only"])
    return {"loss": lc + s["alpha"] * li, "loss_cls": lc, "loss_ipc": li}


def cam_forward(model: MSANet, images: torch.Tensor) -> torch.Tensor:
    """ReLU'd foreground logits on the superpixel grid (B, C, h, w), with AP."""
    return F.relu(model(images, None, model.ap_infer)[0][:, 1:])


def infer_cams(model: MSANet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, None]:
    p = model.q.provider
    keys_out, cams = superpixel_cams(lambda x, q: model(x, q, model.ap_infer)[0], model.q, image, keys, scales, flip,
                                     device, rw_steps=0, softmax=False, mean=p.mean, std=p.std)
    return keys_out, cams, None
