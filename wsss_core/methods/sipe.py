"""SIPE (self-supervised image-specific prototype exploration, Chen et al. CVPR 2022) on ResNet-50.

Upstream: ``chenqi1126/SIPE`` (the file::function citations below are in that repository). The op core lives in
:mod:`wsss_core.methods.sipe_ops`; this module is the method interface of :mod:`wsss_core.methods.base` plus
:func:`infer_cams` (the method's own multi-scale inference: flip fusion inside the net, IS-CAM with a background
channel) and :func:`cam_logits` (for wrappers such as FSAE). SFC (:mod:`wsss_core.methods.sfc`) builds on
:class:`SIPENet`.

Stage config keys (``classifier``): ``backbone`` (``arch: resnet50``, ``layers``, ``width_per_group``,
``weights``, ``frozen_bn`` (True, ``network/resnet50.py::FixedBatchNorm``: BN normalises with its running
statistics, affine trainable) and ``frozen_stem`` (True, ``network/resnet50_SIPE.py::Net.train`` and ``Net.forward``:
conv1/bn1 frozen, stem-layer2 output detached); the toy data, with nothing pretrained, turns both off), ``lr``
(backbone; new layers get ``lr * head_lr_mult``), ``weight_decay``, ``fix_quirk`` (False reproduces the momentum quirk
of ``tool/torchutils.py::PolyOptimizerSGD``: weight decay passed in the momentum slot, momentum = 1e-4), ``momentum``
(used only with ``fix_quirk``), ``max_grad_norm`` (1.0), and ``sipe``: ``fsae_tau`` (temperature that turns the
max-normalised IS-CAM into logits for FSAE, see :func:`cam_logits`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import poly_sgd_param_groups, reference_sgd
from ..errors import ConfigError
from ..models.backbones import fix_bn_statistics, resnet_from_config
from . import sipe_ops as ops
from .base import method_settings
from .inference import scaled_views
from .registry import register_method

FSAE_TAU = 0.1  # IS-CAM' / tau as FSAE logits: a pixel at 1 on one channel, 0 elsewhere -> p >= 0.999 (21 ch)


def sipe_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return method_settings(cfg, "sipe", {"fsae_tau": FSAE_TAU})


def lowres_valid(valid: torch.Tensor | None, label: torch.Tensor, size: tuple[int, int],
                 image: torch.Tensor) -> torch.Tensor:
    """``valid_mask_lowres`` of SIPE ``train_resnet50_SIPE.py::train``: (N, 1, H, W) crop validity (None = all
    valid), (N, C-1) labels -> (N, C, h, w).

    Channel 0 (bg) = validity, fg channels = validity x label, nearest-downsampled to the OS16 ``size``.
    """
    n = label.shape[0]
    if valid is None:
        valid = image.new_ones((n, 1) + tuple(image.shape[-2:]))
    y = torch.cat([label.new_ones((n, 1)), label], 1).to(valid.dtype)
    return F.interpolate(valid * y[:, :, None, None], size=size, mode="nearest")


class SIPENet(nn.Module):
    """ResNet-50 (strides 2, 2, 2, 1, no dilation, fixed BN) + 1x1 classifier + side1-4 (SIPE
    ``network/resnet50_SIPE.py::Net``, backbone ``network/resnet50.py::resnet50``).

    ``forward(x (N, 3, H, W), mask (N, C, h, w) or None)`` -> ``{"score": (N, C-1), "cam": (N, C-1, h, w) raw
    logits, "norm_cam": (N, C, h, w), "is_cam": (N, C, h, w), "hie_fea": (N, 768, h, w), "x4": (N, 2048, h, w)}``
    with h, w = ceil(H/16), ceil(W/16). Seeds use x4 (training path, ``Net.forward``;
    ``CAM.forward`` seeds from hie_fea). ``features(x)`` gives the raw pieces.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, frozen_bn: bool = True, frozen_stem: bool = True):
        super().__init__()
        self.backbone = backbone
        self.frozen_bn, self.frozen_stem = bool(frozen_bn), bool(frozen_stem)
        ch = backbone.stage_channels[1:]  # layer1..layer4
        self.classifier = nn.Conv2d(ch[3], n_classes, 1, bias=False)
        self.side1 = nn.Conv2d(ch[0], 128, 1, bias=False)
        self.side2 = nn.Conv2d(ch[1], 128, 1, bias=False)
        self.side3 = nn.Conv2d(ch[2], 256, 1, bias=False)
        self.side4 = nn.Conv2d(ch[3], 256, 1, bias=False)
        for m in self.new_layers:
            nn.init.xavier_uniform_(m.weight)
        for p in list(backbone.conv1.parameters()) + list(backbone.bn1.parameters()):
            p.requires_grad_(not self.frozen_stem)  # Net.train: conv1 / bn1 frozen (layer1-2: detached below)
        self.train()

    @property
    def new_layers(self) -> list[nn.Module]:
        """The randomly initialised heads (``Net.newly_added``, 10x learning rate in ``train_resnet50_SIPE.py``)."""
        return [self.classifier, self.side1, self.side2, self.side3, self.side4]

    def train(self, mode: bool = True) -> "SIPENet":
        """``network/resnet50.py::FixedBatchNorm``: BatchNorm always uses its running statistics (affine stays
        trainable); no dropout anywhere."""
        super().train(mode)
        if getattr(self, "frozen_bn", True):
            fix_bn_statistics(self.backbone)
        return self

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x1..x4 (x2 detached: stem, layer1, layer2 get no gradient) and the 768-ch ``hie_fea``
        (``network/resnet50_SIPE.py::Net.forward``)."""
        b = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_stem):
            x1 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
            x2 = b.layer2(x1)
        x3 = b.layer3(x2)
        x4 = b.layer4(x3)
        return {"x1": x1, "x2": x2, "x3": x3, "x4": x4, "hie_fea": self.hie_fea(x1, x2, x3, x4)}

    def hie_fea(self, x1, x2, x3, x4) -> torch.Tensor:
        """Side convs on detached stage outputs, per-pixel l2-normalised, resized to x3's size, concatenated."""
        size = x3.shape[-2:]
        outs = []
        for conv, f in ((self.side1, x1), (self.side2, x2), (self.side3, x3), (self.side4, x4)):
            s = ops.l2_normalise(conv(f.detach()))
            outs.append(F.interpolate(s, size=size, mode="bilinear", align_corners=False))
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = self.features(x)
        cam = self.classifier(f["x4"])
        score = cam.mean((2, 3))
        ncam = ops.norm_cam(cam, mask)
        seeds = ops.structure_seeds(ncam, f["x4"].detach(), seed_mask(mask, ncam))
        iscam = ops.is_cam(f["hie_fea"], ops.prototypes(seeds, f["hie_fea"]))
        return {"score": score, "cam": cam, "norm_cam": ncam, "is_cam": iscam, "hie_fea": f["hie_fea"],
                "x4": f["x4"]}


def seed_mask(mask: torch.Tensor | None, ncam: torch.Tensor) -> torch.Tensor:
    """The seeds' label mask: ``mask`` as given, or all ones (1, C, 1, 1)-broadcastable when None."""
    return mask if mask is not None else torch.ones_like(ncam[:, :, :1, :1])


def os16_size(x: torch.Tensor) -> tuple[int, int]:
    """(ceil(H/16), ceil(W/16)) of an (N, 3, H, W) input: the size of the OS16 maps."""
    return -(-x.shape[-2] // 16), -(-x.shape[-1] // 16)


def key_mask(keys_out: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Inference seed mask [1, y] (1, C, 1, 1): 1 on the channels ``keys_out`` (bg 0 and the present classes)."""
    mask = like.new_zeros(1, like.shape[1], 1, 1)
    mask[0, torch.as_tensor(keys_out, device=like.device)] = 1
    return mask


def build_backbone(cfg: Mapping[str, Any], cache_dir: str = "weights") -> nn.Module:
    bb = cfg["backbone"]
    if bb.get("arch", "resnet50") not in ("resnet50", "resnet101"):
        raise ConfigError(f"SIPE/SFC use a bottleneck ResNet (backbone.arch: resnet50), got {bb.get('arch')!r}")
    return resnet_from_config(bb, cache_dir, output_stride=16, dilated=False)


def freeze_flags(cfg: Mapping[str, Any]) -> dict[str, bool]:
    """``frozen_bn`` / ``frozen_stem`` of ``cfg['backbone']`` (both default True, as in SIPE's
    ``network/resnet50_SIPE.py::Net``)."""
    bb = cfg["backbone"]
    return {"frozen_bn": bool(bb.get("frozen_bn", True)), "frozen_stem": bool(bb.get("frozen_stem", True))}


@register_method("sipe")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> SIPENet:
    model = SIPENet(build_backbone(cfg, cache_dir), n_classes, **freeze_flags(cfg))
    model.fsae_tau = float(sipe_settings(cfg)["fsae_tau"])
    return model


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    """SIPE ``data/data_voc.py::VOC12ClsDataset``: classic crops without colour jitter, plus the crop's validity
    mask."""
    return {"views": False, "saliency": False, "strong": False, "valid": True, "jitter": False}


def poly_sgd_groups(model: nn.Module, new_layers: Sequence[nn.Module], cfg: Mapping[str, Any]) -> list[dict]:
    """``tool/torchutils.py::PolyOptimizerSGD`` groups (SIPE ``train_resnet50_SIPE.py::train``): backbone at ``lr``, new
    layers at ``lr * head_lr_mult``, weight decay on both (the momentum is :func:`build_optimizer`'s)."""
    new_ids = {id(p) for m in new_layers for p in m.parameters()}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    new = [p for m in new_layers for p in m.parameters() if p.requires_grad]
    return poly_sgd_param_groups([("backbone", base, 1.0), ("new", new, float(cfg.get("head_lr_mult", 10.0)))],
                                 cfg)


def param_groups(model: SIPENet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return poly_sgd_groups(model, model.new_layers, cfg)


def build_optimizer(model: SIPENet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``PolyOptimizerSGD`` over :func:`param_groups`: momentum = weight decay (the positional-argument quirk) unless
    ``fix_quirk`` (then ``momentum``)."""
    return reference_sgd(param_groups(model, cfg), cfg)


def supervised_loss(model: SIPENet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any],
                    **_: Any) -> dict[str, torch.Tensor]:
    """SIPE ``train_resnet50_SIPE.py::train``: L_cls (multi-label soft margin on the GAP score) + L_GSC (|norm_cam -
    IS_cam'|, all channels, padding included). batch: ``image`` (N, 3, H, W), ``label`` (N, C-1), optional ``valid`` (N,
    1, H, W)."""
    x, label = batch["image"], batch["label"]
    out = model(x, lowres_valid(batch.get("valid"), label, os16_size(x), x))
    l_cls = F.multilabel_soft_margin_loss(out["score"], label)
    l_gsc = ops.gsc_loss(out["norm_cam"], out["is_cam"])
    return {"loss": l_cls + l_gsc, "loss_cls": l_cls, "loss_gsc": l_gsc}


def training_step(model: SIPENet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    return supervised_loss(model, batch, step, cfg)


def cam_logits(model: SIPENet, images: torch.Tensor, label: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """FSAE's view of SIPE: (N, 3, H, W) -> (IS-CAM' / tau (N, C, h, w), bg index 0).

    The IS-CAM (the map SIPE's pseudo-masks come from, with its own background-prototype channel) is
    max-normalised per channel as in the GSC target and divided by ``model.fsae_tau`` so that a softmax can
    reach FSAE's 0.95 cut-off. Seeds are masked by ``label`` (and ``valid``) as in training.
    """
    return tempered_logits(model, images, label, valid, "is_cam", "SIPE")


def tempered_logits(model: SIPENet, images: torch.Tensor, label: torch.Tensor | None, valid: torch.Tensor | None,
                    key: str, name: str) -> tuple[torch.Tensor, int]:
    """The training forward with the label/validity mask, output ``key`` (an IS-CAM, bg first) max-normalised per
    channel and divided by ``model.fsae_tau``; bg index 0. Shared by SIPE and SFC's :func:`cam_logits`."""
    if label is None:
        raise ValueError(f"{name}'s CAM logits need the image labels (seeds are masked by them)")
    out = model(images, lowres_valid(valid, label, os16_size(images), images))
    return ops.max_normalise(out[key]) / getattr(model, "fsae_tau", FSAE_TAU), 0


def cam_forward(model: SIPENet, images: torch.Tensor) -> torch.Tensor:
    """Generic-inference fallback: ReLU'd classifier CAMs (N, C-1, h, w). SIPE's own inference is
    :func:`infer_cams`."""
    return F.relu(model.classifier(model.features(images)["x4"]))


def fused_views(model: SIPENet, image: np.ndarray, keys_out: np.ndarray, scales: Sequence[float], flip: bool,
                device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """SIPE ``make_cam.py::_work`` / ``network/resnet50_SIPE.py::CAM.forward`` per scale: run the view batch [img, hflip
    img] (:func:`~wsss_core.methods.inference.scaled_views`) and sum the raw CAM logits ``cam``, ``hie_fea``, ``x4`` and
    the input ``image`` with their un-flipped second copy (SFC's PCM guide is that 2x image); plus the unmasked
    ``norm_cam`` and the seed ``mask`` [1, y] of ``keys_out``. Each tensor has batch size 1."""
    for x in scaled_views(image, scales, flip, device):
        f = model.features(x)
        out = {"cam": model.classifier(f["x4"]), "hie_fea": f["hie_fea"], "x4": f["x4"], "image": x}
        if flip:
            out = {k: (v[:1] + v[1:].flip(-1)) for k, v in out.items()}
        out["norm_cam"] = ops.norm_cam(out["cam"])
        out["mask"] = key_mask(keys_out, out["norm_cam"])
        yield out


def fuse_scales(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """SIPE ``make_cam.py::_work``: per-scale (1, C, h_s, w_s) maps upsampled (bilinear, align_corners False)
    to ``size``, summed, then each channel divided by its spatial max + 1e-5 -> (C, H, W)."""
    total = sum(F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps)[0]
    return ops.max_normalise(total)


@torch.no_grad()
def infer_cams(model: SIPENet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Multi-scale + flip IS-CAM of one image (SIPE ``make_cam.py::_work``).

    image uint8 (H, W, 3); ``keys`` the present foreground class labels (1..C-1). Returns ``(keys_out, cams,
    None)`` with ``keys_out`` = [0, *keys] (bg first) and ``cams`` float32 (K, H, W) in [0, 1]: the IS-CAM of
    those channels (seeds from hie_fea, masked by [1, y]; no label masking of norm_cam).
    """
    h, w = image.shape[:2]
    keys_out = np.asarray([0, *keys], dtype=np.int64)
    per_scale = []
    for o in fused_views(model, image, keys_out, scales, flip, device):
        seeds = ops.structure_seeds(o["norm_cam"], o["hie_fea"], o["mask"])
        per_scale.append(ops.is_cam(o["hie_fea"], ops.prototypes(seeds, o["hie_fea"])))
    cams = fuse_scales(per_scale, (h, w))[keys_out]
    return keys_out, cams.cpu().numpy().astype(np.float32), None
