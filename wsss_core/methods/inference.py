"""Multi-scale + flip CAM inference shared by all methods."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import normalize, resize, to_tensor


def scaled_views(image: np.ndarray, scales: Sequence[float], flip: bool,
                 device: torch.device) -> Iterator[torch.Tensor]:
    """Per scale s: the uint8 (H, W, 3) image resized (bicubic) to (round(H s), round(W s)), normalised, as a
    batch (1, 3, h, w), or (2, 3, h, w) = [img, hflip img] with ``flip``, on ``device``."""
    h, w = image.shape[:2]
    for s in scales:
        img = image if s == 1.0 else resize(image, (max(1, round(h * s)), max(1, round(w * s))))
        x = to_tensor(normalize(img)).unsqueeze(0)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        yield x.to(device)


def method_cams(m, model, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
                device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys_out, cams, aux)`` of one image by method module ``m``: its own ``infer_cams`` if it has one (e.g.
    SIPE: a bg map first), else :func:`multiscale_cams` over its ``cam_forward`` for the present ``keys``."""
    if hasattr(m, "infer_cams"):
        return m.infer_cams(model, image, keys, scales, flip, device)
    cams = multiscale_cams(lambda x: m.cam_forward(model, x), image, scales, flip, device,
                           classes=[k - 1 for k in keys])
    return keys, cams, None


@torch.no_grad()
def multiscale_cams(cam_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, scales: Sequence[float],
                    flip: bool, device: torch.device, classes: Sequence[int] | None = None) -> np.ndarray:
    """Fused CAMs of one image.

    image: uint8 (H, W, 3). For each scale the image is resized (bicubic), run with and without h-flip,
    the ReLU'd maps are bilinearly resized back to (H, W) (align_corners False), un-flipped and summed;
    then each class map is divided by its maximum (+1e-5). ``classes`` (0-based foreground indices) selects
    the maps to return. Returns float32 (K, H, W) in [0, 1).
    """
    h, w = image.shape[:2]
    total = None
    for x in scaled_views(image, scales, flip, device):
        cams = cam_fn(x).float()
        if classes is not None:
            cams = cams[:, list(classes)]
        cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)
        fused = cams[0] + cams[1].flip(-1) if flip else cams[0]
        total = fused if total is None else total + fused
    total = F.relu(total)
    total = total / (total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    return total.cpu().numpy().astype(np.float32)
