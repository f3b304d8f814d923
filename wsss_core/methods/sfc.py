"""SFC (shared feature calibration, Zhao et al. AAAI 2024; a delta over SIPE) on ResNet-50.

Upstream: ``Barrett-python/SFC`` (file::function citations below are in that repository unless marked SIPE; SFC is
an overlay on ``chenqi1126/SIPE``, and what it does not change is SIPE's). The op core lives in
:mod:`wsss_core.methods.sfc_ops` (PCM, prototype seeds, the weighted losses, the image bank, T) and
:mod:`wsss_core.methods.sipe_ops` (norm_cam, prototypes, IS-CAM); the network, optimizer groups, flip fusion
and scale fusion are SIPE's (:mod:`wsss_core.methods.sipe`). This module is the method interface of
:mod:`wsss_core.methods.base` plus :func:`setup` (class-occurrence weights), :func:`infer_cams` (prototype CAM
and PCM classifier CAM, both through T) and :func:`cam_logits` (for wrappers such as FSAE).

Stage config keys (``classifier``): SIPE's (``backbone``, ``lr``, ``head_lr_mult``, ``weight_decay``,
``fix_quirk``, ``momentum``, ``max_grad_norm``), ``crop_size`` (sizes the image bank), and ``sfc``:
``gsc_weight`` (1.6), ``ms_weight`` (0.8), ``bg_seed_scale`` (0.3), ``scale2`` (0.5), ``n_bank`` (4),
``bank_correction`` (396), ``infer_bg_add`` (0.4), ``infer_fg_mul`` (2.0), ``fsae_tau`` (as SIPE's).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import reference_sgd
from ..errors import ConfigError
from . import sfc_ops as ops
from . import sipe
from . import sipe_ops
from .base import method_settings
from .registry import register_method

DEFAULTS = {"gsc_weight": 1.6, "ms_weight": 0.8, "bg_seed_scale": ops.BG_SEED_SCALE, "scale2": 0.5, "n_bank": 4,
            "bank_correction": ops.BANK_CORRECTION, "infer_bg_add": ops.INFER_BG_ADD,
            "infer_fg_mul": ops.INFER_FG_MUL, "fsae_tau": sipe.FSAE_TAU}


def sfc_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULTS` overridden by ``cfg['sfc']`` (non-null values); unknown keys are a ConfigError."""
    out = method_settings(cfg, "sfc", DEFAULTS)
    if not 0 < float(out["scale2"]) <= 1:
        raise ConfigError(f"classifier.sfc.scale2 must be in (0, 1], got {out['scale2']!r}")
    if int(out["n_bank"]) != out["n_bank"] or int(out["n_bank"]) < 0:
        raise ConfigError(f"classifier.sfc.n_bank must be a non-negative integer, got {out['n_bank']!r}")
    out["n_bank"] = int(out["n_bank"])
    return out


class ImageBank(nn.Module):
    """Per-class image bank of ``train_resnet50_SFC.py::train`` (``slot`` / ``vm`` / ``sltarget``) as persistent
    buffers (so checkpoints and resumes carry it).

    ``image`` (S, 3, H, W), ``valid`` (S, 1, H, W) (raw crop validity, not class-masked) and ``label`` (S, S)
    with S = C-1 slots, all zero until written. H = W = ``crop_size``; without it the image buffers start empty
    (H = W = 0) and are sized by the first batch. Loading a state dict adopts its bank shapes; a state dict
    without the bank (e.g. final weights stripped of it) loads and leaves the bank as it is.
    """

    NAMES = ("image", "valid", "label")

    def __init__(self, n_slots: int, crop_size: int | None = None):
        super().__init__()
        s = int(crop_size or 0)
        self.register_buffer("image", torch.zeros(n_slots, 3, s, s))
        self.register_buffer("valid", torch.zeros(n_slots, 1, s, s))
        self.register_buffer("label", torch.zeros(n_slots, n_slots))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self.NAMES:
            new = state_dict.get(prefix + name)
            old = getattr(self, name)
            if new is not None and new.shape != old.shape:
                setattr(self, name, old.new_zeros(new.shape))
        n = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[n:] = [k for k in missing_keys[n:] if k not in {prefix + m for m in self.NAMES}]

    def resample(self, image: torch.Tensor, valid: torch.Tensor, label: torch.Tensor, step: int,
                 n_draw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Permute the batch, update the bank, append ``n_draw`` banked samples (:func:`sfc_ops.bank_resample`
        with the step's generator) -> (image (B+n, 3, H, W), valid (B+n, 1, H, W), label (B+n, S))."""
        size = tuple(image.shape[-2:])
        if tuple(self.image.shape[-2:]) != size:
            if self.image.numel():
                raise ValueError(f"SFC image bank holds {tuple(self.image.shape[-2:])} crops, the batch has {size}; "
                                 "training crops must have one fixed size (classifier.crop_size)")
            self.image = self.image.new_zeros(self.image.shape[:2] + size)
            self.valid = self.valid.new_zeros(self.valid.shape[:2] + size)
        return ops.bank_resample(self.image, self.valid, self.label, image, valid, label, n_draw,
                                 ops.bank_generator(step))


class SFCNet(sipe.SIPENet):
    """SIPE's network + ``f9`` (1x1, no bias, 3 + C4 -> C4 with C4 = layer4 channels), the PCM
    (``network/resnet50_SFC.py::Net.PCM``) and the prototype CAM (``Net.prototype``); plus the image bank (``bank``,
    ``train_resnet50_SFC.py::train``) and the class weights (``class_weights`` (C,), bg
    first, set by :func:`setup`) as persistent buffers.

    ``forward(x (N, 3, H, W), mask (N, C, h, w) or None)`` -> ``{"score": (N, C-1), "cam": (N, C-1, h, w) raw
    logits, "norm_cam": (N, C, h, w) (the reference's ``orignal_cam``: masked, before the PCM), "cam1": (N, C, h, w)
    PCM-refined norm_cam (not re-normalised), "cam2": (N, C, h, w) prototype CAM (IS-CAM), "hie_fea": (N, 768, h,
    w), "x4": (N, C4, h, w)}`` with h, w = ceil(H/16), ceil(W/16). ``mask`` None = no masking (seeds masked by 1).
    """

    def __init__(self, backbone: nn.Module, n_classes: int, crop_size: int | None = None,
                 bg_seed_scale: float = ops.BG_SEED_SCALE, frozen_bn: bool = True, frozen_stem: bool = True):
        super().__init__(backbone, n_classes, frozen_bn=frozen_bn, frozen_stem=frozen_stem)
        c4 = backbone.out_channels
        self.f9 = nn.Conv2d(3 + c4, c4, 1, bias=False)  # the reference keeps torch's default init for f9
        self.bank = ImageBank(n_classes, crop_size)
        self.register_buffer("class_weights", torch.ones(n_classes + 1))
        self.bg_seed_scale = float(bg_seed_scale)
        self.fsae_tau = sipe.FSAE_TAU                        # build_model sets these from classifier.sfc
        self.infer_t = (ops.INFER_BG_ADD, ops.INFER_FG_MUL)  # T's (bg_add, fg_mul), used by infer_cams

    @property
    def new_layers(self) -> list[nn.Module]:
        """classifier, f9, side1-4 (10x learning rate). While SIPENet.__init__ runs f9 does not exist yet, so
        only SIPE's heads get its xavier init."""
        layers = super().new_layers
        f9 = self._modules.get("f9")
        return layers[:1] + [f9] + layers[1:] if f9 is not None else layers

    def pcm(self, ncam: torch.Tensor, image: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        """``Net.forward`` / ``Net.PCM``: guide = [image resized (bilinear, align_corners True) to x4's size,
        x4 (not detached)] -> f9 -> :func:`sfc_ops.pcm_refine` of ``ncam`` (N, C, h, w)."""
        img = F.interpolate(image, size=x4.shape[-2:], mode="bilinear", align_corners=True)
        return ops.pcm_refine(ncam, self.f9(torch.cat([img.to(x4.dtype), x4], 1)))

    def prototype_cam(self, cam1: torch.Tensor, hie_fea: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``Net.prototype``: seeds from ``cam1`` (bg x bg_seed_scale, masked) -> per-image prototypes over
        ``hie_fea`` -> IS-CAM."""
        seeds = ops.prototype_seeds(cam1, mask, self.bg_seed_scale)
        return sipe_ops.is_cam(hie_fea, sipe_ops.prototypes(seeds, hie_fea))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = self.features(x)
        cam = self.classifier(f["x4"])
        ncam = sipe_ops.norm_cam(cam, mask)
        cam1 = self.pcm(ncam, x, f["x4"])
        cam2 = self.prototype_cam(cam1, f["hie_fea"], sipe.seed_mask(mask, ncam))
        return {"score": cam.mean((2, 3)), "cam": cam, "norm_cam": ncam, "cam1": cam1, "cam2": cam2,
                "hie_fea": f["hie_fea"], "x4": f["x4"]}


@register_method("sfc")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> SFCNet:
    s = sfc_settings(cfg)
    model = SFCNet(sipe.build_backbone(cfg, cache_dir), n_classes, crop_size=cfg.get("crop_size"),
                   bg_seed_scale=s["bg_seed_scale"], **sipe.freeze_flags(cfg))
    model.fsae_tau = float(s["fsae_tau"])
    model.infer_t = (float(s["infer_bg_add"]), float(s["infer_fg_mul"]))
    return model


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    """As SIPE (``chenqi1126/SIPE data/data_voc.py::VOC12ClsDataset``): classic crops without colour
    jitter, plus the crop's validity mask."""
    return sipe.data_needs(cfg)


def param_groups(model: SFCNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return sipe.poly_sgd_groups(model, model.new_layers, cfg)


def build_optimizer(model: SFCNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SIPE's ``PolyOptimizerSGD`` (momentum quirk unless ``fix_quirk``) over :func:`param_groups`."""
    return reference_sgd(param_groups(model, cfg), cfg)


def setup(model: SFCNet, labels, cfg: Mapping[str, Any]) -> None:
    """Class-occurrence weights (``train_resnet50_SFC.py::train``, ``ben`` / ``Images_num``) of the training
    list's (N, C-1) multi-hot ``labels`` into ``model.class_weights`` = [1 (bg), w_1 .. w_{C-1}] (fg mean 1)."""
    s = sfc_settings(cfg)
    w = ops.occurrence_weights(ops.class_counts(labels), bank_correction=float(s["bank_correction"]))
    if w.shape[0] + 1 != model.class_weights.shape[0]:
        raise ValueError(f"labels have {w.shape[0]} classes, the model {model.class_weights.shape[0] - 1}")
    with torch.no_grad():
        model.class_weights.copy_(torch.from_numpy(np.concatenate([[1.0], w])))


def supervised_loss(model: SFCNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any],
                    **_: Any) -> dict[str, torch.Tensor]:
    """``train_resnet50_SFC.py::train`` on one batch: ``image`` (B, 3, H, W), ``label`` (B, C-1), optional
    ``valid`` (B, 1, H, W).

    Image Bank Re-sampling (B -> B + n_bank), scale-2 input (bilinear x scale2, align_corners True), two forwards
    with the class-masked validity nearest-resized to each OS16 size; ``loss = L_cls + L_GSC + L_ms``:
    ``L_cls = (MLSM_1 + MLSM_2) / 2``, ``L_GSC = gsc_weight * mean(W |cam1_1 - cam2_1'|)`` (all channels),
    ``L_ms = ms_weight * mean_fg(w_c |down(cam1_1) y - cam1_2 y|)``. Updates the bank in place.
    """
    s = sfc_settings(cfg)
    x, label = batch["image"], batch["label"]
    valid = batch.get("valid")
    if valid is None:
        valid = x.new_ones((x.shape[0], 1) + tuple(x.shape[-2:]))
    x, valid, label = model.bank.resample(x, valid, label, step, s["n_bank"])
    h2, w2 = int(x.shape[-2] * float(s["scale2"])), int(x.shape[-1] * float(s["scale2"]))
    x2 = F.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=True)
    out1 = model(x, sipe.lowres_valid(valid, label, sipe.os16_size(x), x))
    out2 = model(x2, sipe.lowres_valid(valid, label, sipe.os16_size(x2), x))
    weights = model.class_weights
    l_cls = 0.5 * (F.multilabel_soft_margin_loss(out1["score"], label)
                   + F.multilabel_soft_margin_loss(out2["score"], label))
    l_gsc = float(s["gsc_weight"]) * ops.weighted_gsc_loss(out1["cam1"], out1["cam2"], weights)
    l_ms = float(s["ms_weight"]) * ops.cross_scale_loss(out1["cam1"], out2["cam1"], label, weights[1:])
    return {"loss": l_cls + l_gsc + l_ms, "loss_cls": l_cls, "loss_gsc": l_gsc, "loss_ms": l_ms}


def training_step(model: SFCNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    return supervised_loss(model, batch, step, cfg)


def cam_logits(model: SFCNet, images: torch.Tensor, label: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """FSAE's view of SFC: (N, 3, H, W) -> (prototype CAM' / tau (N, C, h, w), bg index 0).

    As :func:`sipe.cam_logits` on SFC's ``cam2``: max-normalised per channel (the GSC target) and divided by
    ``model.fsae_tau``; norm_cam and seeds are masked by ``label`` (and ``valid``) as in training.
    """
    return sipe.tempered_logits(model, images, label, valid, "cam2", "SFC")


cam_forward = sipe.cam_forward  # generic-inference fallback (ReLU'd classifier CAMs); SFC's own is infer_cams


@torch.no_grad()
def infer_cams(model: SFCNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``network/resnet50_SFC.py::CAM.forward`` + ``make_cam.py::_work``: multi-scale + flip CAMs of one uint8
    (H, W, 3) image; ``keys`` = present fg labels (1..C-1).

    Per scale: flip-fused logits / hie_fea / x4 and guide image (img + un-flipped flip), unmasked norm_cam, PCM
    -> cam1, prototype CAM with the seed mask [1, y]. The prototype CAMs (A) and the PCM CAMs (B) are fused over
    scales separately (:func:`sipe.fuse_scales`), cut to ``keys_out`` = [0, *keys] and passed through T.
    Returns ``(keys_out, T(A), T(B))``, float32 (K, H, W) each (fg in [0, 2], bg in [0.4, 1.4] by default):
    the reference's ``IS_CAM`` and ``IS_CAM1``.
    """
    h, w = image.shape[:2]
    keys_out = np.asarray([0, *keys], dtype=np.int64)
    proto, pcm = [], []
    for o in sipe.fused_views(model, image, keys_out, scales, flip, device):
        cam1 = model.pcm(o["norm_cam"], o["image"], o["x4"])
        proto.append(model.prototype_cam(cam1, o["hie_fea"], o["mask"]))
        pcm.append(cam1)
    bg_add, fg_mul = model.infer_t
    a, b = (ops.transform_t(sipe.fuse_scales(m, (h, w))[keys_out], bg_add, fg_mul) for m in (proto, pcm))
    return keys_out, a.cpu().numpy().astype(np.float32), b.cpu().numpy().astype(np.float32)
