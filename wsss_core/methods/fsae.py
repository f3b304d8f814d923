"""FSAE (Choi et al., WACV 2025) as a wrapper around any base method that exposes CAM logits.

Upstream: ``obeychoi0120/PixMatch`` (the canonical FSAE code; ``module/train.py::train_ssl``, ``module/ema.py``), and
the authors' working fork ``obeychoi0120/wseg`` branch ``ssl``. The wrapper adds, on top of the base method's own loss
on the weak view:

1. an EMA teacher (a copy of the base model, ``ema_m`` 0.999, updated after each optimizer
   step; ``module/ema.py::EMA``);
2. confident hard labels from the teacher's weak-view CAM logits (``p_cutoff`` 0.95) plus the boundary ring (3x3
   dilation of the confident foreground minus itself, kept where the teacher's confidence >= 0.8; ``train_ssl``);
3. pixel cross-entropy of the student's logits on the pixel-aligned strong view (``train_ssl``, ``loss_semcon``),
   normalised by all pixels; ``variant: union`` (PixMatch: ring merged into the mask) or ``separate`` (wseg@ssl: ring as
   its own term weighted by ``bdry_lambda``).

A base method module must provide ``build_model``, ``param_groups``, ``training_step`` (its loss on the weak
view), ``cam_forward`` and ``cam_logits(model, images) -> (logits (N, C+1, h, w), bg_index)``; optionally
``supervised_loss(..., sal_view2=...)`` and ``data_needs``. Stage config: ``classifier.fsae`` with ``base``
(method name) and the switches below; everything else of the classifier config goes to the base method.

Inference uses the student (saved checkpoints hold both; ``train_ssl`` saves only the student).

Teacher and BatchNorm statistics (``shared_bn_stats``, default True). Upstream there is one module: ``train_ssl``
calls ``ema.apply_shadow()`` (``module/ema.py::EMA.apply_shadow`` swaps the EMA values into the registered
*parameters* only), runs the teacher as ``model.module.forward_cam(img_w)`` under ``no_grad`` on that same module,
still in train mode (``contrast_train.py`` calls ``model.train()`` once), then ``ema.restore()``. Buffers are never
swapped, so a BatchNorm in train mode would fold the teacher's weak-view batch statistics into the one set of running
statistics the student also uses. In the published configurations this never happens: ``network/resnet38d.py::
Net.train`` puts every ``BatchNorm2d`` in eval mode (frozen BN, same in ``obeychoi0120/wseg@ssl``), so neither the
teacher nor the student updates running statistics; here too with ``backbone.frozen_bn: true`` (all VOC configs).
With trainable BN (the toy configs) our separate teacher reproduces the shared-module behaviour exactly: its forward
runs on the student's buffer tensors (:meth:`FSAEModel.student_buffers`), so its batch statistics update the
student's running statistics in place, between the student's weak-view and strong-view forwards as upstream (the
train-mode outputs use batch statistics, so losses are unchanged; only the running statistics, i.e. eval-mode
inference, are). ``shared_bn_stats: false`` keeps the teacher's update in its own copy (discarded
at the next EMA update), i.e. the student's statistics come from its own forwards only.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from . import fsae_ops as ops
from .registry import register_method

DEFAULTS: dict[str, Any] = {
    "base": "ppc",
    "p_cutoff": ops.P_CUTOFF,          # --p_cutoff of contrast_train.py
    "bdry": True,                      # --bdry: spatial expansion (boundary ring) on
    "bdry_size": ops.BDRY_SIZE,        # 3x3 ring
    "bdry_cutoff": ops.BDRY_CUTOFF,    # ring kept where conf >= 0.8
    "variant": "union",                # union (PixMatch, canonical) | separate (wseg@ssl)
    "bdry_lambda": ops.BDRY_LAMBDA,    # weight of the ring term in the separate variant
    "pl_weight": ops.PL_WEIGHT,        # weight of L_pl, no ramp-up
    "ema": True,                       # teacher = EMA of the student; False: teacher = the student itself
    "ema_m": ops.EMA_M,
    "absent": "zero",                  # absent-class logits x0 (reference) | neg_inf
    "n_strong_augs": ops.N_STRONG_AUGS,
    "blur_kernel": ops.BLUR_KERNEL,    # 1 = identity, as in the authors' seed-7 runs (data/dataset.py)
    "sal_view2": "direct",             # ssl mode resizes full-res saliency straight to view 2 (train_ssl)
    "shared_bn_stats": True,           # teacher forward updates the student's BN running stats (one module upstream)
}


def fsae_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from .base import method_settings  # base.py registers this module: import on use

    out = method_settings(cfg, "fsae", DEFAULTS)
    if out["variant"] not in ("union", "separate"):
        raise ConfigError(f"classifier.fsae.variant must be union or separate, got {out['variant']!r}")
    if out["base"] == "fsae":
        raise ConfigError("classifier.fsae.base cannot be fsae itself")
    return out


def _base(name: str):
    from .base import get_method  # base.py registers this module: import on use

    m = get_method(name)
    if not hasattr(m, "cam_logits"):
        raise ConfigError(f"method {name!r} exposes no cam_logits; FSAE cannot wrap it")
    return m


def base_method(cfg: Mapping[str, Any]):
    """The wrapped method module named by ``classifier.fsae.base``."""
    return _base(fsae_settings(cfg)["base"])


class FSAEModel(nn.Module):
    """``student`` (the base model, trained and used for inference) and ``teacher`` (its EMA copy, no grads).

    The teacher copies the student at construction (no warm-up in ``train_ssl``) and shares its train/eval mode, so its
    dropout is active during training as in the reference (``train_ssl`` swaps the EMA weights into the train-mode
    model).
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.registered = sorted(n for n, p in student.named_parameters() if p.requires_grad)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    @property
    def weights_info(self):
        """The student's pretrained-weights report (its own, e.g. MCTformer's, or its backbone's)."""
        own = getattr(self.student, "weights_info", None)
        return own or getattr(getattr(self.student, "backbone", None), "weights_info", None)

    def forward(self, x: torch.Tensor):
        return self.student(x)

    def updates_bn_stats(self) -> bool:
        """Whether a teacher forward would update BatchNorm running statistics (a BN in train mode that tracks them)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                   for m in self.teacher.modules())

    @contextlib.contextmanager
    def student_buffers(self):
        """Inside, the teacher's modules hold the student's buffer tensors (BN running statistics, ...), so a teacher
        forward updates them in place exactly as the reference's single module does (``EMA.apply_shadow`` swaps
        parameters, not buffers); the teacher's own buffers are put back on exit."""
        s_mods = dict(self.student.named_modules())
        saved = []
        for name, mod in self.teacher.named_modules():
            src = s_mods[name]._buffers
            for k, b in mod._buffers.items():
                if b is not None and src.get(k) is not None:
                    saved.append((mod, k, b))
                    mod._buffers[k] = src[k]
        try:
            yield
        finally:
            for mod, k, b in saved:
                mod._buffers[k] = b

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """``t <- m t + (1 - m) s`` for the registered parameters; frozen ones and buffers copied (``EMA.update``)."""
        ops.ema_update_(self.teacher, self.student, momentum, set(self.registered))


@register_method("fsae")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> FSAEModel:
    name = fsae_settings(cfg)["base"]
    model = FSAEModel(_base(name).build_model(cfg, n_classes, cache_dir=cache_dir))
    model.base_name = name  # cam_forward / cam_logits need the base method without the config
    return model


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    m = base_method(cfg)
    needs = dict(m.data_needs(cfg)) if hasattr(m, "data_needs") else {"views": True, "saliency": False}
    needs.pop("timm", None)  # FSAE's weak / pixel-aligned strong views replace a base's own pipeline (MCTformer)
    return {**needs, "views": True, "strong": True}


def strong_view_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    s = fsae_settings(cfg)
    return {"n_strong_augs": s["n_strong_augs"], "blur_kernel": s["blur_kernel"]}


def param_groups(model: FSAEModel, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return base_method(cfg).param_groups(model.student, cfg)


def build_optimizer(model: FSAEModel, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The base method's optimizer on the student (MCTformer: AdamW; others: SGD over their groups)."""
    from .base import make_optimizer

    return make_optimizer(base_method(cfg), model.student, cfg)


def lr_lambda(cfg: Mapping[str, Any], steps_per_epoch: int):
    """The base method's schedule (None: the trainer's poly)."""
    from .base import make_lr_lambda

    return make_lr_lambda(base_method(cfg), cfg, steps_per_epoch)


def training_step(model: FSAEModel, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    """L = L_sup(weak view; the base method's loss) + L_fsae(student strong view vs. teacher weak view).

    batch: the base method's keys plus ``image_strong`` (N, 3, H, W), pixel-aligned with ``image``.
    Logged per step: the base method's terms, ``loss_sup``, ``loss_pl`` / ``loss_ring`` (student),
    ``teacher_conf`` (mean teacher confidence), ``mask_ratio`` / ``ring_ratio`` (teacher's supervised pixels)
    and ``agreement`` (student strong-view argmax == teacher label, over supervised pixels).
    """
    s = fsae_settings(cfg)
    m = base_method(cfg)
    if hasattr(m, "supervised_loss"):
        sup = m.supervised_loss(model.student, batch, step, cfg, sal_view2=s["sal_view2"])
    else:
        sup = m.training_step(model.student, batch, step, cfg)
    label = batch["label"]
    teacher = model.teacher if s["ema"] else model.student
    valid = batch.get("valid")
    share = s["ema"] and s["shared_bn_stats"] and model.updates_bn_stats()  # see the module docstring
    with torch.no_grad(), (model.student_buffers() if share else contextlib.nullcontext()):
        z_w, bg = m.cam_logits(teacher, batch["image"], label=label, valid=valid)
    with torch.no_grad():
        t = ops.teacher_pseudo_labels(z_w.float(), label, s["p_cutoff"], s["bdry"], s["bdry_size"],
                                      s["bdry_cutoff"], bg_index=bg, absent=s["absent"])
    z_s, _ = m.cam_logits(model.student, batch["image_strong"], label=label, valid=valid)
    f = ops.fsae_loss(z_s.float(), label, t, s["variant"], s["bdry_lambda"], s["pl_weight"], bg_index=bg,
                      absent=s["absent"])
    with torch.no_grad():
        sup_px = t["mask"]
        agree = (z_s.argmax(1) == t["pseudo"]) & sup_px
        agreement = agree.sum() / sup_px.sum().clamp(min=1)
    extra = {k: v for k, v in sup.items() if k != "loss"}
    return {"loss": sup["loss"] + f["loss"], "loss_sup": sup["loss"], **extra, "loss_pl": f["loss_pl"],
            "loss_ring": f["loss_ring"], "teacher_conf": t["conf"].mean(), "mask_ratio": f["mask_ratio"],
            "ring_ratio": f["ring_ratio"], "agreement": agreement}


def after_step(model: FSAEModel, step: int, cfg: Mapping[str, Any]) -> None:
    """EMA update after every optimizer step (``ema.update()`` in ``module/train.py::train_ssl``)."""
    s = fsae_settings(cfg)
    if s["ema"]:
        model.ema_update(s["ema_m"])


def cam_logits(model: FSAEModel, images: torch.Tensor, label: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    return base_method_of(model).cam_logits(model.student, images, label=label, valid=valid)


def setup(model: FSAEModel, labels, cfg: Mapping[str, Any]) -> None:
    """The base method's one-off setup (e.g. SFC's class weights), on the student and the teacher."""
    m = base_method(cfg)
    if hasattr(m, "setup"):
        m.setup(model.student, labels, cfg)
        m.setup(model.teacher, labels, cfg)


def infer_cams(model: FSAEModel, image, keys, scales, flip, device):
    """The base method's inference on the student (its own, or generic multi-scale CAMs when it has none)."""
    from .inference import method_cams

    return method_cams(base_method_of(model), model.student, image, keys, scales, flip, device)


def cam_forward(model: FSAEModel, images: torch.Tensor) -> torch.Tensor:
    """The student's CAMs, as the base method computes them (``contrast_infer.py``: inference unchanged, no teacher)."""
    return base_method_of(model).cam_forward(model.student, images)


def base_method_of(model: FSAEModel):
    name = getattr(model, "base_name", None)
    if name is None:
        raise ConfigError("FSAEModel without base_name; build it with fsae.build_model")
    return _base(name)
