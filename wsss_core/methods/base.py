"""The small interface every WSSS method module implements (same shape as a timm/kornia model family).

A method module exposes:

- ``build_model(cfg: dict, n_classes: int) -> nn.Module`` — ``cfg`` is the effective ``classifier`` stage
  config, ``n_classes`` counts foreground classes only;
- ``param_groups(model, cfg) -> list[dict]`` — optimizer groups (with ``lr``);
- ``training_step(model, batch, step, cfg) -> dict`` — ``{"loss": scalar tensor, **named scalars}``; the
  batch is a dict with ``image`` (B, 3, H, W) and ``label`` (B, C) on the model's device;
- ``cam_forward(model, images) -> Tensor`` — (B, 3, H, W) -> non-negative CAMs (B, C, h, w).

Optional:

- ``data_needs(cfg) -> {"views": bool, "saliency": bool, "strong": bool}`` — the training batch pipeline
  (``views``: :class:`~wsss_core.data.datasets.ViewsDataset` with the weak view; ``saliency``: the dataset's
  saliency maps; ``strong``: a pixel-aligned strong view ``image_strong``); default: the classic pipeline;
- ``after_step(model, step, cfg)`` — called after each optimizer step (e.g. an EMA teacher update);
- ``cam_logits(model, images) -> (logits (B, C+1, h, w), bg_index)`` — raw CAM logits with an explicit
  background channel; needed by wrappers such as FSAE.

Wrappers (e.g. FSAE) take a base method module and implement the same interface.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS = {"cam": "wsss_core.methods.cam", "ppc": "wsss_core.methods.ppc", "fsae": "wsss_core.methods.fsae"}


def get_method(name: str) -> ModuleType:
    """Import the method module registered as ``name``."""
    try:
        return importlib.import_module(METHODS[name])
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
