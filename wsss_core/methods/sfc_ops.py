"""SFC (AAAI 2024, on SIPE) op core of its method module :mod:`wsss_core.methods.sfc`. Upstream:
``Barrett-python/SFC`` (file::function citations below are in that repository).

- :func:`class_counts`: per-class image counts N_c of a training list from multi-hot labels;
- :func:`occurrence_weights`: the class-occurrence ("ROCon") weights of ``train_resnet50_SFC.py::train`` (hard-coded
  ``ben`` / ``Images_num``), ``ben_c = sum_k |N_c - N_k|``, ``w_c = ben_c / (N_c + bank_correction)``, normalised to
  mean 1;
- :func:`pcm_affinity` / :func:`pcm_propagate` / :func:`pcm_refine` (``network/resnet50_SFC.py::Net.PCM``): the
  SEAM-style pixel-correlation module on the classifier CAM (column-normalised ReLU'd cosine affinity, applied twice);
- :func:`prototype_seeds` (``Net.prototype``): one-hot argmax of the PCM CAM with the bg channel x 0.3, masked;
- :func:`transform_t` (``make_cam.py::_work``): the inference transform ``[X_0 + 0.4, 2 X_fg]``;
- :func:`weighted_gsc_loss` / :func:`cross_scale_loss` (``train_resnet50_SFC.py::train``): the
  class-weighted (MSRW / MSDW) loss terms;
- :func:`bank_update_` / :func:`bank_resample` (``train_resnet50_SFC.py::train``, ``slot`` / ``vm`` / ``sltarget``):
  Image Bank Re-sampling (last writer wins per class slot, then i.i.d. uniform draws appended to the batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .sipe_ops import argmax_seeds, correlation, max_normalise  # noqa: F401 (max_normalise: part of this API)

#: The reference's bank-resampling correction, ``Images_num + 660*4*3/20`` in ``train_resnet50_SFC.py::train``
#: (≈ 660 steps/epoch x 4 resampled images x 3 / 20 classes).
BANK_CORRECTION = 396.0


def class_counts(labels: np.ndarray) -> np.ndarray:
    """(N, C) multi-hot foreground labels -> int64 (C,) number of images containing each class."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C) multi-hot, got shape {labels.shape}")
    return (labels > 0.5).sum(axis=0).astype(np.int64)


def occurrence_weights(counts: np.ndarray, bank_correction: float = BANK_CORRECTION) -> np.ndarray:
    """Class weights of ``train_resnet50_SFC.py::train`` from per-class image counts (C,) -> float64 (C,) with mean 1.

    ``ben_c = sum_k |N_c - N_k|`` (total gap to the other classes), ``w_c = ben_c / (N_c + bank_correction)``,
    then ``w / mean(w)``. U-shaped in frequency: both the most and the least frequent classes are up-weighted.
    Permutation-equivariant in the counts. The background channel (not included here) has weight 1.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size < 2 or (n < 0).any():
        raise ValueError(f"counts must be a 1-D array of >= 2 non-negative values, got {counts!r}")
    ben = np.abs(n[:, None] - n[None, :]).sum(axis=1)
    w = ben / (n + bank_correction)
    if not w.mean() > 0:
        raise ValueError("all classes have the same count: the weights are undefined (all gaps are 0)")
    return w / w.mean()


# --------------------------------------------------------------------------------------------------------------
# Torch ops of the SFC network, loss and image bank (network/resnet50_SFC.py, train_resnet50_SFC.py, make_cam.py).
# Shapes: N batch, C classes incl. background (channel 0), h x w the OS16 map, D embedding channels, S = C-1 bank
# slots. Pure torch on the inputs' device.
# --------------------------------------------------------------------------------------------------------------

EPS = 1e-5
BG_SEED_SCALE = 0.3   # Net.prototype: bg channel x 0.3
PCM_TIMES = 2         # Net.PCM: propagated twice
INFER_BG_ADD = 0.4    # make_cam.py::_work, T(X)
INFER_FG_MUL = 2.0
BANK_SEED = 0x5FC0_0000  # image-bank generator seed = BANK_SEED + step (a resumed run draws the same)


def pcm_affinity(emb: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``Net.PCM`` affinity: (N, D, h, w) guide embedding (f9 output) -> column-normalised affinity (N, hw, hw).

    ``E`` l2-normalised per pixel (+eps), ``A = relu(E^T E)``, ``A[i, j] /= sum_i A[i, j] + eps``.
    """
    aff = correlation(emb, eps)
    return aff / (aff.sum(1, keepdim=True) + eps)


def pcm_propagate(cam: torch.Tensor, aff: torch.Tensor, times: int = PCM_TIMES) -> torch.Tensor:
    """``Net.PCM`` propagation: (N, C, h, w) maps, (N, hw, hw) affinity -> ``M A`` applied ``times`` times,
    (N, C, h, w).

    ``(M A)[c, j] = sum_i M[c, i] A[i, j]``: each output pixel is an affinity-weighted sum of input pixels (a
    weighted average, up to the eps of the column normalisation). No re-normalisation afterwards.
    """
    n, c, h, w = cam.shape
    m = cam.reshape(n, c, h * w)
    for _ in range(times):
        m = torch.bmm(m, aff.to(m.dtype))
    return m.reshape(n, c, h, w)


def pcm_refine(cam: torch.Tensor, emb: torch.Tensor, times: int = PCM_TIMES, eps: float = EPS) -> torch.Tensor:
    """``Net.PCM``: :func:`pcm_propagate` of ``cam`` (N, C, h, w) with :func:`pcm_affinity` of ``emb`` (N, D, h, w)."""
    return pcm_propagate(cam, pcm_affinity(emb, eps), times)


def prototype_seeds(cam: torch.Tensor, mask: torch.Tensor, bg_scale: float = BG_SEED_SCALE) -> torch.Tensor:
    """``Net.prototype`` seeds: one-hot argmax over C of ``cam`` (N, C, h, w) with the bg channel x ``bg_scale``, times
    ``mask`` (broadcastable to (N, C, h, w): training's valid_mask_lowres, inference's [1, y]). The argmax is
    taken before masking (a pixel whose best class is absent gets no seed); ``cam`` is not modified."""
    return argmax_seeds(cam, mask, bg_scale)


def transform_t(x: torch.Tensor, bg_add: float = INFER_BG_ADD, fg_mul: float = INFER_FG_MUL) -> torch.Tensor:
    """``make_cam.py::_work``: ``T(X) = [X_0 + bg_add, fg_mul X_1, ...]`` over the channel axis -3
    ((C, H, W) or (N, C, H, W)).

    With the defaults it preserves the argmax of ``[X_0 / 2 + 0.2, X_fg]``; for X in [0, 1]: bg in [0.4, 1.4],
    fg in [0, 2]."""
    return torch.cat([x[..., :1, :, :] + bg_add, x[..., 1:, :, :] * fg_mul], -3)


def weighted_gsc_loss(cam1: torch.Tensor, cam2: torch.Tensor, weights: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``train_resnet50_SFC.py::train`` lossGSC without its 1.6 factor: mean over (N, C, h, w) of
    ``W_c |cam1 - cam2 / (max_hw cam2 + eps)|``.

    ``weights`` (C,): bg 1 then the class weights w_c. Both sides get gradients."""
    diff = (cam1 - max_normalise(cam2, eps)).abs()
    return (diff * weights.to(diff.dtype).view(1, -1, 1, 1)).mean()


def cross_scale_loss(cam1_s1: torch.Tensor, cam1_s2: torch.Tensor, label: torch.Tensor,
                     fg_weights: torch.Tensor) -> torch.Tensor:
    """``train_resnet50_SFC.py::train`` cross-scale term (loss_consistency) without its 0.8 factor: mean over
    (N, C-1, h2, w2) of ``w_c |down(cam1_s1)_c y_c - cam1_s2,c y_c|``.

    cam1_s1 (N, C, h, w), cam1_s2 (N, C, h2, w2), label (N, C-1), fg_weights (C-1,); ``down`` = bilinear
    (align_corners True) to (h2, w2). Gradients flow into both scales."""
    down = F.interpolate(cam1_s1, size=cam1_s2.shape[-2:], mode="bilinear", align_corners=True)
    y = label.to(down.dtype)[:, :, None, None]
    diff = (down[:, 1:] * y - cam1_s2[:, 1:] * y).abs()
    return (diff * fg_weights.to(diff.dtype).view(1, -1, 1, 1)).mean()


def bank_generator(step: int) -> torch.Generator:
    """The CPU generator of one training step's batch permutation and bank draws (seeded from the step)."""
    return torch.Generator().manual_seed(BANK_SEED + int(step))


def bank_last_writers(label: torch.Tensor) -> torch.Tensor:
    """(B, S) multi-hot labels -> (S,) int64: the last batch row that contains each class, -1 if none."""
    if label.shape[0] == 0:
        return torch.full(label.shape[1:], -1, dtype=torch.long, device=label.device)
    rows = torch.arange(1, label.shape[0] + 1, device=label.device)[:, None]
    return ((label > 0.5).long() * rows).amax(0) - 1


@torch.no_grad()
def bank_update_(bank_image: torch.Tensor, bank_valid: torch.Tensor, bank_label: torch.Tensor,
                 image: torch.Tensor, valid: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``train_resnet50_SFC.py::train`` bank update, in place: every class present in the batch overwrites its slot with
    the image (3, H, W), the raw crop validity (1, H, W) and the label (S,) of the *last* batch row containing it.

    bank_* (S, ...), batch (B, ...); returns the (S,) last-writer rows (-1 = slot kept)."""
    rows = bank_last_writers(label)
    slots = (rows >= 0).nonzero().flatten()
    src = rows[slots]
    for dst, new in ((bank_image, image), (bank_valid, valid), (bank_label, label)):
        dst[slots] = new[src].to(dst.dtype)
    return rows


def bank_resample(bank_image: torch.Tensor, bank_valid: torch.Tensor, bank_label: torch.Tensor,
                  image: torch.Tensor, valid: torch.Tensor, label: torch.Tensor, n_draw: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image Bank Re-sampling of ``train_resnet50_SFC.py::train``: permute the batch, update the bank
    (:func:`bank_update_`), then append ``n_draw`` slots drawn i.i.d. uniformly (duplicates allowed) ->
    (image, valid, label) with B + n_draw rows.

    Both random draws use ``generator`` (CPU). An unseen slot is an all-zero image / validity / label."""
    perm = torch.randperm(image.shape[0], generator=generator).to(image.device)
    image, valid, label = image[perm], valid[perm], label[perm]
    bank_update_(bank_image, bank_valid, bank_label, image, valid, label)
    if n_draw <= 0:
        return image, valid, label
    picks = torch.randint(0, bank_label.shape[0], (int(n_draw),), generator=generator).to(bank_label.device)
    return (torch.cat([image, bank_image[picks].to(image.dtype)]), torch.cat([valid, bank_valid[picks].to(valid.dtype)]),
            torch.cat([label, bank_label[picks].to(label.dtype)]))
