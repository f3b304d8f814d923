"""Superpixel CAM methods' shared parts: Q inside a model, and their multi-scale inference.

- :func:`provider_from_config`: the ``superpixels`` block of a classifier config -> a :class:`SuperpixelProvider`;
- :class:`QModule`: that provider as a frozen submodule (eval mode, no gradient, never in an optimizer);
- :func:`superpixel_cams`: SP-CAM / MSA inference of one image (CHENDL-SHEN/ESC ``evaluator.py::Evaluator.get_cam``,
  ``get_Q``, ``get_mutiscale_cam``; MSA ``evaluator_cls_image.py``): per scale and flip, the image resized
  bilinearly to the scale and then to the next multiple of 16 (the Q input: straight to that size), the model's
  superpixel-level map (softmax or raw), ``n`` superpixel random-walk steps, PSAM upsampling ``up(., Q)``, bilinear
  to the scale-1 size, un-flipped and summed; ``make_cam``, bilinear to the image size.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .providers import IMAGENET_MEAN, IMAGENET_STD, SuperpixelProvider

#: ``classifier.superpixels`` keys and defaults
SUPERPIXEL_DEFAULTS: dict[str, Any] = {
    "backend": "soft_slic",   # scn | soft_slic | skimage_slic
    "scn": "trained",         # backend scn: trained (the network `network`, made by train_scn) | file (`weights`)
    "network": None,          # backend scn: the name of a trained network (superpixel_networks.<name>)
    "weights": None,          # the SCN's weights spec (backend scn), e.g. {path: ...}
    "iters": 5,               # soft-SLIC E/M steps
    "color_scale": 0.26,      # SSN's LAB scale
    "pos_scale": 2.5,         # SSN's position scale (per cell)
}


def superpixel_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from ..methods.base import method_settings

    return method_settings(cfg, "superpixels", SUPERPIXEL_DEFAULTS)


def provider_from_config(cfg: Mapping[str, Any], cache_dir: str = "weights") -> SuperpixelProvider:
    """The Q provider of a classifier config's ``superpixels`` block (defaults :data:`SUPERPIXEL_DEFAULTS`). In the
    pipeline, ``network`` names the trained SCN and the classifier stage sets ``weights`` to its file."""
    sp = superpixel_settings(cfg)
    net = None
    if sp["backend"] == "scn":  # weights None: an untrained SCN whose weights come with a classifier checkpoint
        from .scn import load_scn

        net, _ = load_scn(sp["weights"], cache_dir)
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return SuperpixelProvider(sp["backend"], net, mean, std, sp["iters"], sp["color_scale"], sp["pos_scale"])


class QModule(nn.Module):
    """A frozen Q provider as a submodule: ``forward(x)`` normalised (B, 3, H, W) -> Q (B, 9, H, W), no gradient.

    Its SCN (if any) is saved with the model and stays in eval mode whatever ``train()`` says.
    """

    def __init__(self, provider: SuperpixelProvider):
        super().__init__()
        self.provider = provider
        self.scn = provider.scn

    def train(self, mode: bool = True) -> "QModule":
        super().train(mode)
        if self.scn is not None:
            self.scn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.provider.q(x)


def ceil16(n: float) -> int:
    return int(math.ceil(n / ops.CELL) * ops.CELL)


@torch.no_grad()
def superpixel_cams_grid(model_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], q_fn: Callable | None,
                         image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
                         device: torch.device, rw_grid: Sequence[int], softmax: bool = True,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                         ) -> dict[int, np.ndarray]:
    """:func:`superpixel_cams` for several walk lengths at once (SP-CAM's ``refine_list``; the network and Q run once
    per pass): ``{n: cams (K, H, W)}`` for each n of ``rw_grid``."""
    ns = sorted({int(n) for n in rw_grid})
    totals: dict[int, torch.Tensor] = {}

    def accumulate(p: torch.Tensor, q: torch.Tensor | None, flipped: bool, out_size) -> None:
        a, done = (ops.asam(q) if q is not None and ns[-1] else None), 0
        for n in ns:
            if n > done:
                p = ops.random_walk(p, a, n - done)
            done = n
            x = F.interpolate(ops.up(p, q) if q is not None else p, out_size, mode="bilinear", align_corners=False)
            x = x.flip(-1) if flipped else x
            totals[n] = x if n not in totals else totals[n] + x

    _passes(model_fn, q_fn, image, scales, flip, device, softmax, mean, std, accumulate)
    return {n: _finish(t, keys, image.shape[:2]) for n, t in totals.items()}


def _passes(model_fn, q_fn, image, scales, flip, device, softmax, mean, std, consume) -> None:
    """The scale x flip passes of :func:`superpixel_cams`: ``consume(p, q, flipped, out_size)`` per pass, p the
    superpixel-level map (softmax or raw), q its Q (None without superpixels)."""
    hh, ww = image.shape[:2]
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    img = ((torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255 - m) / s)[None].to(device)
    out_size = (ceil16(hh), ceil16(ww)) if q_fn is not None else (hh, ww)
    for sc in scales:
        size = (round(hh * sc), round(ww * sc))
        size16 = (ceil16(size[0]), ceil16(size[1]))
        x = F.interpolate(F.interpolate(img, size, mode="bilinear", align_corners=False), size16, mode="bilinear",
                          align_corners=False)
        xq = F.interpolate(img, size16, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi, xqi = (x.flip(-1), xq.flip(-1)) if flipped else (x, xq)
            q = q_fn(xqi) if q_fn is not None else None
            z = model_fn(xi, q)
            consume(torch.softmax(z, 1) if softmax else z, q, flipped, out_size)


def _finish(total: torch.Tensor, keys: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """``make_cam`` of the summed passes, the channels of ``keys``, bilinear to the image size: (K, H, W) float32."""
    from ..methods.msa_ops import make_cam

    sel = torch.as_tensor(list(keys), dtype=torch.long, device=total.device)
    cams = F.interpolate(make_cam(total)[:, sel], size, mode="bilinear", align_corners=False)[0]
    return cams.cpu().numpy().astype(np.float32)


@torch.no_grad()
def superpixel_cams(model_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], q_fn: Callable | None,
                    image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
                    device: torch.device, rw_steps: int = 0, softmax: bool = True,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Superpixel-level multi-scale CAMs of one image.

    image uint8 (H, W, 3); ``model_fn(x, q)`` -> (1, C+1, h, w) superpixel-level logits (channel 0 background);
    ``q_fn(x)`` -> Q. ``keys``: the present foreground labels (1..C). Returns ``(keys, cams)`` with cams float32
    (K, H, W) in [0, 1): ``make_cam`` of the summed maps of those channels (the background channel is replaced by
    the threshold downstream). ``q_fn=None`` (SP-CAM's stage-1 EPS classifier): no superpixels, the maps are resized
    bilinearly to the image size and summed there (``model_fn(x, None)``).
    """
    cams = superpixel_cams_grid(model_fn, q_fn, image, keys, scales, flip, device, [rw_steps], softmax, mean,
                                std)[int(rw_steps)]
    return np.asarray(list(keys), dtype=np.int64), cams
