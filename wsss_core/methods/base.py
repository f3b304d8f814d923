"""The small interface every WSSS method module implements (same shape as a timm/kornia model family).

A method module exposes:

- ``build_model(cfg: dict, n_classes: int) -> nn.Module`` — ``cfg`` is the effective ``classifier`` stage
  config, ``n_classes`` counts foreground classes only;
- ``param_groups(model, cfg) -> list[dict]`` — optimizer groups (with ``lr``);
- ``training_step(model, batch, step, cfg) -> dict`` — ``{"loss": scalar tensor, **named scalars}``; the
  batch is a dict with ``image`` (B, 3, H, W) and ``label`` (B, C) on the model's device;
- ``cam_forward(model, images) -> Tensor`` — (B, 3, H, W) -> non-negative CAMs (B, C, h, w).

Optional:

- ``data_needs(cfg) -> {"views": bool, "saliency": bool, "strong": bool, "valid": bool, "jitter": bool}`` — the
  training batch pipeline (``valid``: a (1, H, W) crop-validity map ``valid``; ``jitter``: colour jitter of the
  classic crops, default True)
  (``views``: :class:`~wsss_core.data.datasets.ViewsDataset` with the weak view; ``saliency``: the dataset's
  saliency maps; ``strong``: a pixel-aligned strong view ``image_strong``); default: the classic pipeline;
- ``after_step(model, step, cfg)`` — called after each optimizer step (e.g. an EMA teacher update);
- ``cam_logits(model, images, label=None, valid=None) -> (logits (B, C+1, h, w), bg_index)`` — CAM logits with
  an explicit background channel; needed by wrappers such as FSAE (``label`` (B, C) and ``valid`` (B, 1, H, W)
  for methods whose maps depend on the image labels, e.g. SIPE's seeds);
- ``infer_cams(model, image, keys, scales, flip, device) -> (keys_out, cams, aux)`` — the method's own
  multi-scale inference of one uint8 image (default: :func:`wsss_core.methods.inference.multiscale_cams` over
  ``cam_forward``); ``keys_out`` may start with 0 (a background map), ``aux`` is an optional second stack;
- ``build_optimizer(model, cfg) -> Optimizer`` — default: SGD over ``param_groups`` (momentum / weight decay
  from ``cfg``); ``lr_lambda(cfg, steps_per_epoch) -> (step -> lr multiplier)`` — default: poly over
  ``max_steps`` (MCTformer: AdamW with a per-epoch warm-up + cosine schedule);
- ``infer_seg(model, image, scales, flip, device, keys=None) -> (keys_out, maps)`` — a single-stage method's own
  segmentation output of one uint8 image: fg score maps (K, H, W) in [0, 1] whose background is a threshold (RTC);
  ``keys`` None: every class (gated by the method's own class scores), else those classes; the pipeline evaluates
  it with and without CRF when the experiment sets ``stages.single_stage.enabled``
  (:mod:`wsss_core.stages.single_stage`);
- ``setup(model, labels, cfg)`` — called once before training with the training list's (N, C) multi-hot
  labels (e.g. SFC's class-occurrence weights).

Wrappers (e.g. FSAE) take a base method module and implement the same interface.

A module registers itself by decorating its ``build_model`` with
``@register_method("<name>")`` (:mod:`wsss_core.methods.registry`); :func:`get_method` looks a name up.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from .registry import get_method, load_plugins, register_method, registered_methods  # noqa: F401 (re-exported)


def method_settings(cfg: Mapping[str, Any], section: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by the non-null values of ``cfg[section]``; an unknown key is a ConfigError that
    names it (``classifier.<section>.<key>``)."""
    from ..errors import ConfigError

    user = dict(cfg.get(section) or {})
    unknown = sorted(set(user) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown classifier.{section} key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in user.items() if v is not None}}


def make_optimizer(m: ModuleType, model, cfg: Mapping[str, Any]):
    """Method ``m``'s optimizer for ``model``: its ``build_optimizer`` if it has one, else SGD over its
    ``param_groups`` with ``cfg``'s lr / momentum / weight decay as group defaults."""
    from ..engine.optim import reference_sgd

    if hasattr(m, "build_optimizer"):
        return m.build_optimizer(model, cfg)
    return reference_sgd(m.param_groups(model, cfg), cfg, quirk=False)


def make_lr_lambda(m: ModuleType, cfg: Mapping[str, Any], steps_per_epoch: int):
    """Method ``m``'s per-step lr multiplier: its ``lr_lambda`` if it has one, else ``None`` (the trainer's poly)."""
    return m.lr_lambda(cfg, steps_per_epoch) if hasattr(m, "lr_lambda") else None
