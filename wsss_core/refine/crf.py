"""Dense CRF refinement (a thin, validated wrapper around pydensecrf).

pydensecrf facts relied on (the ``lucasb-eyer/pydensecrf`` API: ``pydensecrf/densecrf.pyx::DenseCRF2D``,
``pydensecrf/utils.py::unary_from_softmax`` / ``unary_from_labels``):

- ``DenseCRF2D(W, H, n)`` takes the **width first**; the unary is float32, C-contiguous, (n, H*W).
- The image is the original **uint8 RGB (H, W, 3)**, C-contiguous; never a normalised tensor.
- ``unary_from_softmax(p)`` = -ln(clip(p, 1e-5, 1)); no renormalisation, so raw scores are accepted.
- ``unary_from_labels(L, n, gt_prob, zero_unsure=False)``: -ln(gt_prob) on the given label and
  -ln((1 - gt_prob) / (n - 1)) elsewhere (0.3567 / 4.1997 for gt_prob 0.7, n 21).
- ``inference(t)`` returns the Q marginals (n, H*W), summing to 1 per pixel.

pydensecrf is imported lazily, so the rest of wsss_core works without it (install ``pydensecrf2``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = [
    "CRFParams",
    "PRESETS",
    "crf_params",
    "dense_crf",
    "crf_cam_probs",
    "crf_refine_cams",
    "compact_hard_labels",
    "bg_power",
]

_MODES = ("labels", "softmax")


def _import_dcrf():
    """Import pydensecrf lazily; raise an ImportError that says how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels, unary_from_softmax
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the dense CRF needs the 'pydensecrf' module, which is not installed. "
            "Install it with `pip install pydensecrf2` (a maintained fork with wheels; the original "
            "`pydensecrf` 1.0rc3 builds from source and needs Cython and a C++ compiler)."
        ) from exc
    return dcrf, unary_from_labels, unary_from_softmax


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings.

    mode: "labels" (hard-label unary with ``gt_prob``) or "softmax" (-ln of clipped scores).
    gauss_sxy / gauss_compat: the appearance-free smoothness kernel ``addPairwiseGaussian``.
    bilat_sxy / bilat_srgb / bilat_compat: the appearance kernel ``addPairwiseBilateral``.
    iters: mean-field iterations (0 returns the normalised unary, useful for checks).
    gt_prob: confidence of the given label in "labels" mode.
    """

    mode: str
    gauss_sxy: float
    gauss_compat: float
    bilat_sxy: float
    bilat_srgb: float
    bilat_compat: float
    iters: int
    gt_prob: float = 0.7

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ConfigError(f"CRF mode must be one of {_MODES}, got {self.mode!r}")
        for name in ("gauss_sxy", "bilat_sxy", "bilat_srgb"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"CRF {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gauss_compat", "bilat_compat"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"CRF {name} must be >= 0, got {getattr(self, name)!r}")
        if int(self.iters) != self.iters or self.iters < 0:
            raise ConfigError(f"CRF iters must be an integer >= 0, got {self.iters!r}")
        if not 0.0 < float(self.gt_prob) < 1.0:
            raise ConfigError(f"CRF gt_prob must be in (0, 1), got {self.gt_prob!r}")


#: Named configurations found in the seed repos (the upstream function is named above each entry).
PRESETS: dict[str, CRFParams] = {
    # RTC / wseg contrast_infer._crf_inference, SIPE crf_inference_label
    "seam_label": CRFParams("labels", 3, 3, 50, 5, 10, 10),
    # PSA/SEAM tool/imutils.py::crf_inference ("crf_with_alpha"); MCTformer's la/ha affinity sources
    # (xulianuwa/MCTformer@MCTformerPlus engine.py::_crf_with_alpha)
    "psa_softmax": CRFParams("softmax", 3, 3, 80, 13, 10, 10),
    # SEAM-PPC (usr922/wseg master aff_prepare.py::_crf_inference): hard labels argmax [(1 - max)^alpha, cams] through a
    # label unary
    "psa_aff_label": CRFParams("labels", 3, 3, 80, 13, 10, 10, 0.7),
    # YudeWang seg lib DenseCRF.dense_crf as called on the DeepLab test softmax
    "deeplab_test": CRFParams("softmax", 3, 3, 32, 13, 10, 1),
    # MCTformer segmentation inference
    "mctformer_seg": CRFParams("softmax", 4, 3, 83, 5, 3, 10),
}


def crf_params(preset: str | None = None, **overrides) -> CRFParams:
    """Build CRFParams from a named preset plus field overrides.

    With ``preset=None`` every field (except ``gt_prob``) must be given in ``overrides``.
    Unknown presets or field names raise ConfigError.
    """
    fields = {f.name for f in dataclasses.fields(CRFParams)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown CRF parameter(s) {unknown}; valid: {sorted(fields)}")
    if preset is None:
        required = {f.name for f in dataclasses.fields(CRFParams) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(overrides))
        if missing:
            raise ConfigError(f"CRF parameters {missing} missing; give a preset (one of {sorted(PRESETS)}) "
                              "or all fields")
        return CRFParams(**overrides)
    if preset not in PRESETS:
        raise ConfigError(f"unknown CRF preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be RGB with shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"CRF image must be uint8 (the original JPEG pixels), got {image.dtype}; "
                         "do not pass a normalised tensor")
    return np.require(image, requirements=["C", "W"])  # pydensecrf needs a writable C-contiguous buffer


def dense_crf(image: np.ndarray, x: np.ndarray, params: CRFParams, n_labels: int | None = None) -> np.ndarray:
    """Run a dense CRF and return its marginals.

    Args:
        image: uint8 (H, W, 3) RGB.
        x: mode "softmax": float (n, H, W) non-negative scores (clipped to [1e-5, 1], not renormalised);
           mode "labels": int (H, W) labels in 0..n_labels-1.
        params: CRFParams.
        n_labels: required in "labels" mode; in "softmax" mode optional and must equal n.

    Returns:
        float32 (n, H, W) marginals Q (sum to 1 per pixel).
    """
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a CRFParams, got {type(params).__name__}")
    image = _check_image(image)
    h, w = image.shape[:2]
    x = np.asarray(x)

    if params.mode == "softmax":
        if x.ndim != 3 or x.shape[1:] != (h, w):
            raise ValueError(f"softmax-mode scores must have shape (n, {h}, {w}), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"softmax-mode scores must be numeric, got dtype {x.dtype}")
        n = x.shape[0]
        if n_labels is not None and n_labels != n:
            raise ValueError(f"n_labels={n_labels} does not match the {n} score channels")
        if np.isnan(x).any():
            raise ValueError("softmax-mode scores contain NaN")
    else:
        if x.shape != (h, w):
            raise ValueError(f"labels-mode input must have shape ({h}, {w}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"labels-mode input must be an integer label map, got dtype {x.dtype}")
        if n_labels is None:
            raise ValueError("labels mode needs n_labels (the unary energies depend on it)")
        n = int(n_labels)
        if n < 1:
            raise ValueError(f"n_labels must be >= 1, got {n_labels}")
        if x.size and (x.min() < 0 or x.max() >= n):
            raise ValueError(f"labels must be in 0..{n - 1} (no ignore label), found {x.min()}..{x.max()}")
    if n < 1:
        raise ValueError("need at least one label channel")
    if n == 1:
        return np.ones((1, h, w), dtype=np.float32)

    dcrf, unary_from_labels, unary_from_softmax = _import_dcrf()
    if params.mode == "softmax":
        unary = unary_from_softmax(x.astype(np.float32, copy=False), clip=1e-5)
    else:
        unary = unary_from_labels(x.astype(np.int64, copy=False), n, float(params.gt_prob), zero_unsure=False)
    unary = np.ascontiguousarray(unary, dtype=np.float32)

    d = dcrf.DenseCRF2D(w, h, n)  # width first
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=float(params.gauss_sxy), compat=float(params.gauss_compat))
    d.addPairwiseBilateral(sxy=float(params.bilat_sxy), srgb=float(params.bilat_srgb), rgbim=image,
                           compat=float(params.bilat_compat))
    q = np.asarray(d.inference(int(params.iters)), dtype=np.float32)
    return q.reshape(n, h, w)


def bg_power(cams: np.ndarray, alpha: float) -> np.ndarray:
    """PSA-style background score ``(1 - max_k cams) ** alpha``: float (K, H, W) -> (H, W).

    CAMs are expected max-normalised to [0, 1]. A smaller alpha gives a larger bg score (more bg).
    An image without foreground classes (K = 0) is all background: ones.
    """
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if cams.shape[0] == 0:
        return np.ones(cams.shape[1:], dtype=cams.dtype if np.issubdtype(cams.dtype, np.floating) else np.float64)
    return np.power(np.clip(1.0 - cams.max(axis=0), 0.0, None), alpha)


def compact_hard_labels(cams: np.ndarray, bg: float | np.ndarray) -> np.ndarray:
    """argmax of [bg, cams] in the compact label space.

    Args:
        cams: float (K, H, W) foreground scores.
        bg: constant background score, or an (H, W) map (e.g. :func:`bg_power`).

    Returns:
        int64 (H, W) labels in 0..K (0 = background, k = channel k-1). Ties go to the lower index, so a tie
        with bg is background.
    """
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}")
    dtype = cams.dtype if np.issubdtype(cams.dtype, np.floating) else np.float64
    bg_map = np.broadcast_to(np.asarray(bg, dtype=dtype), cams.shape[1:])
    scores = np.concatenate([bg_map[None], cams.astype(dtype, copy=False)], axis=0)
    return scores.argmax(axis=0).astype(np.int64)


def crf_cam_probs(image: np.ndarray, cams: np.ndarray, bg_threshold: float | np.ndarray,
                  params: CRFParams) -> np.ndarray:
    """CAMs -> CRF marginals over [bg, cams] (compact label space: 0 = bg, k = channel k-1).

    Args:
        image: uint8 (H, W, 3) RGB.
        cams: float (K, H, W) CAMs of the image's present classes (typically in [0, 1]).
        bg_threshold: constant background score (or an (H, W) map such as :func:`bg_power`).
        params: "labels" mode: the hard labels argmax [bg, cams] (ties -> bg) go through a label-unary CRF
            with K+1 labels; "softmax" mode: the stack [bg, cams], **not renormalised**, is the unary
            -ln(clip(score, 1e-5, 1)) (PSA/MCTformer ``crf_inference``).

    Returns:
        float32 (K+1, H, W) marginals Q. K == 0 gives ones (1, H, W).
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[1:] != (h, w):
        raise ValueError(f"cams must have shape (K, {h}, {w}) to match the image, got {cams.shape}")
    k = cams.shape[0]
    if k == 0:
        return np.ones((1, h, w), dtype=np.float32)
    if params.mode == "labels":
        return dense_crf(image, compact_hard_labels(cams, bg_threshold), params, n_labels=k + 1)
    dtype = np.float32
    bg_map = np.broadcast_to(np.asarray(bg_threshold, dtype=dtype), (h, w))
    scores = np.concatenate([bg_map[None], cams.astype(dtype, copy=False)], axis=0)
    return dense_crf(image, np.clip(scores, 1e-5, 1.0), params)


def crf_refine_cams(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, bg_threshold: float | np.ndarray,
                    params: CRFParams) -> np.ndarray:
    """CAMs -> CRF-refined label map (SIPE/SEAM style): ``[0, *keys][argmax Q]`` with Q from :func:`crf_cam_probs`.

    Args:
        image: uint8 (H, W, 3) RGB.
        cams: float (K, H, W) CAMs of the image's present classes (typically in [0, 1]).
        keys: int (K,) class label of each channel (1..C-1).
        bg_threshold: constant background score (or an (H, W) map such as :func:`bg_power`).
        params: see :func:`crf_cam_probs`.

    Returns:
        uint8 (H, W) class labels. K == 0 gives all zeros.
    """
    cams = np.asarray(cams)
    keys = np.asarray(keys)
    if cams.ndim == 3 and keys.shape != (cams.shape[0],):
        raise ValueError(f"keys must have shape ({cams.shape[0]},), got {keys.shape}")
    if keys.size and (not np.issubdtype(keys.dtype, np.integer) or keys.min() < 1 or keys.max() > 254):
        raise ValueError(f"keys must be integer class labels in 1..254, got {keys.tolist()}")
    q = crf_cam_probs(image, cams, bg_threshold, params)
    lut = np.concatenate([[0], keys.astype(np.int64)])
    return lut[q.argmax(axis=0)].astype(np.uint8)
