"""Dense CRF refinement (a thin, validated wrapper around pydensecrf).

pydensecrf facts relied on (the ``lucasb-eyer/pydensecrf`` API: ``pydensecrf/densecrf.pyx::DenseCRF2D``,
``pydensecrf/utils.py::unary_from_softmax`` / ``unary_from_labels``):

- ``DenseCRF2D(W, H, n)`` takes the **width first**; the unary is float32, C-contiguous, (n, H*W).
- The image is the original **uint8 RGB (H, W, 3)**, C-contiguous; never a normalised tensor.
- ``unary_from_softmax(p)`` = -ln(clip(p, 1e-5, 1)); no renormalisation, so raw scores are accepted.
- ``unary_from_labels(L, n, gt_prob, zero_unsure=False)``: -ln(gt_prob) on the given label and
  -ln((1 - gt_prob) / (n - 1)) elsewhere (0.3567 / 4.1997 for gt_prob 0.7, n 21).
- ``inference(t)`` returns the Q marginals (n, H*W), summing to 1 per pixel.
- ``addPairwiseGaussian`` / ``addPairwiseBilateral`` build the kernel features in the order (x, y[, r, g, b]);
  ``utils.create_pairwise_gaussian`` / ``create_pairwise_bilateral`` + ``addPairwiseEnergy(DIAG_KERNEL,
  NORMALIZE_SYMMETRIC)`` build the same kernels in the order (y, x[, r, g, b]). The permutohedral lattice is not
  invariant to the feature order, so the two paths agree only approximately (``CRFParams.pairwise``).

Label conventions of the label unary (``CRFParams.label_unary``): the hard labels of an image with K present classes
go through a CRF over either all C labels of the dataset (``all``: class ids, off-label energy
-ln(0.3/(C-1)) = 4.20 for VOC; usr922/wseg ``contrast_infer.py::_crf_inference``, ``aff_prepare.py::_crf_inference``)
or bg + the K present classes (``present``: compact labels 0..K; chenqi1126/SIPE ``tool/imutils.py::
crf_inference_label``, jiwoon-ahn/irn ``misc/imutils.py::crf_inference_label``).

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
    "class_hard_labels",
    "bg_power",
]

_MODES = ("labels", "softmax")
_LABEL_UNARY = ("all", "present")
_PAIRWISE = ("add", "utils")


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
    label_unary: "labels" mode label space of :func:`crf_cam_probs` / :func:`crf_refine_cams`: "all" (the dataset's
        C classes, labels = class ids; needs ``n_classes``; wseg) or "present" (bg + the image's K classes, compact
        labels 0..K; SIPE/IRN). Ignored in "softmax" mode (the given score channels) and by :func:`dense_crf`
        (explicit ``n_labels``).
    pairwise: how the two kernels are added: "add" (``addPairwiseGaussian`` / ``addPairwiseBilateral``) or "utils"
        (``create_pairwise_gaussian`` / ``create_pairwise_bilateral`` + ``addPairwiseEnergy``, DIAG_KERNEL,
        NORMALIZE_SYMMETRIC; wseg ``aff_prepare.py::_crf_inference``).
    """

    mode: str
    gauss_sxy: float
    gauss_compat: float
    bilat_sxy: float
    bilat_srgb: float
    bilat_compat: float
    iters: int
    gt_prob: float = 0.7
    label_unary: str = "present"
    pairwise: str = "add"

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ConfigError(f"CRF mode must be one of {_MODES}, got {self.mode!r}")
        if self.label_unary not in _LABEL_UNARY:
            raise ConfigError(f"CRF label_unary must be one of {_LABEL_UNARY}, got {self.label_unary!r}")
        if self.pairwise not in _PAIRWISE:
            raise ConfigError(f"CRF pairwise must be one of {_PAIRWISE}, got {self.pairwise!r}")
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

    @property
    def needs_class_count(self) -> bool:
        """True when :func:`crf_cam_probs` / :func:`crf_refine_cams` need the dataset's class count (``n_classes``):
        a label unary over all classes."""
        return self.mode == "labels" and self.label_unary == "all"


#: Named configurations found in the seed repos (the upstream function is named above each entry).
PRESETS: dict[str, CRFParams] = {
    # wseg (usr922/wseg master contrast_infer.py::_crf / _crf_inference) and RTC (ChunyanWang1/RTC contrast_infer.py):
    # unary_from_labels(labels, 21, 0.7) over all classes. SIPE/IRN's crf_inference_label has the same kernels over
    # the present classes: label_unary="present" (the IRN stage sets it)
    "seam_label": CRFParams("labels", 3, 3, 50, 5, 10, 10, label_unary="all"),
    # PSA/SEAM tool/imutils.py::crf_inference ("crf_with_alpha"); MCTformer's la/ha affinity sources
    # (xulianuwa/MCTformer@MCTformerPlus engine.py::_crf_with_alpha)
    "psa_softmax": CRFParams("softmax", 3, 3, 80, 13, 10, 10),
    # SEAM-PPC (usr922/wseg master aff_prepare.py::_crf_inference): hard labels argmax [(1 - max)^alpha, cams] through a
    # label unary over all 21 labels; kernels by create_pairwise_gaussian / create_pairwise_bilateral
    "psa_aff_label": CRFParams("labels", 3, 3, 80, 13, 10, 10, 0.7, label_unary="all", pairwise="utils"),
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
    if params.pairwise == "utils":  # wseg aff_prepare.py::_crf_inference: features (y, x[, r, g, b])
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

        gs, bs, srgb = float(params.gauss_sxy), float(params.bilat_sxy), float(params.bilat_srgb)
        feats = create_pairwise_gaussian(sdims=(gs, gs), shape=(h, w))
        d.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=float(params.gauss_compat),
                            kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        feats = create_pairwise_bilateral(sdims=(bs, bs), schan=(srgb, srgb, srgb), img=image, chdim=2)
        d.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=float(params.bilat_compat),
                            kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    else:  # features (x, y[, r, g, b])
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


def _check_keys(keys, k: int, n_classes: int | None = None) -> np.ndarray:
    """keys (K,) -> int64; integer class labels in 1..254 (and < ``n_classes``, without repeats, when it is given)."""
    keys = np.asarray(keys)
    if keys.shape != (k,):
        raise ValueError(f"keys must have shape ({k},), got {keys.shape}")
    if keys.size and (not np.issubdtype(keys.dtype, np.integer) or keys.min() < 1 or keys.max() > 254):
        raise ValueError(f"keys must be integer class labels in 1..254, got {keys.tolist()}")
    if n_classes is not None:
        if keys.size and keys.max() >= n_classes:
            raise ValueError(f"keys {keys.tolist()} exceed the dataset's {n_classes} classes")
        if len(np.unique(keys)) != k:
            raise ValueError(f"keys must not repeat, got {keys.tolist()}")
    return keys.astype(np.int64)


def _check_n_classes(n_classes, params: CRFParams) -> int:
    if n_classes is None:
        raise ValueError(f"label_unary={params.label_unary!r} needs n_classes (the dataset's class count)")
    if int(n_classes) != n_classes or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    return int(n_classes)


def class_hard_labels(cams: np.ndarray, keys: np.ndarray, bg: float | np.ndarray, n_classes: int) -> np.ndarray:
    """Hard labels in the class space (usr922/wseg ``contrast_infer.py::_crf``, ``aff_prepare.py::
    _infer_crf_with_alpha``): argmax of the float32 (C, H, W) stack with ``bg`` at 0, each CAM at its key and 0 for
    the absent classes; ties go to the lower class id.

    Returns int64 (H, W) class ids in 0..C-1."""
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}")
    keys = _check_keys(keys, cams.shape[0], n_classes)
    tensor = np.zeros((n_classes, *cams.shape[1:]), np.float32)
    tensor[keys] = cams
    tensor[0] = bg
    return tensor.argmax(axis=0).astype(np.int64)


def _class_space_probs(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, bg: float | np.ndarray,
                       params: CRFParams, n_classes) -> np.ndarray:
    """label_unary "all": Q (C, H, W) of the label CRF over all ``n_classes`` labels started from
    :func:`class_hard_labels`."""
    n = _check_n_classes(n_classes, params)
    return dense_crf(image, class_hard_labels(cams, keys, bg, n), params, n_labels=n)


def crf_cam_probs(image: np.ndarray, cams: np.ndarray, bg_threshold: float | np.ndarray,
                  params: CRFParams, keys: np.ndarray | None = None, n_classes: int | None = None) -> np.ndarray:
    """CAMs -> CRF marginals over [bg, cams] (compact label space: 0 = bg, k = channel k-1).

    Args:
        image: uint8 (H, W, 3) RGB.
        cams: float (K, H, W) CAMs of the image's present classes (typically in [0, 1]).
        bg_threshold: constant background score (or an (H, W) map such as :func:`bg_power`).
        params: "labels" mode: hard labels argmax [bg, cams] go through a label-unary CRF, over bg + the K present
            classes (``label_unary="present"``: compact labels, K+1 labels; ties -> lower channel) or over all
            ``n_classes`` labels (``"all"``: :func:`class_hard_labels`, then the channels [0, *keys] of Q);
            "softmax" mode: the stack [bg, cams], **not renormalised**, is the unary -ln(clip(score, 1e-5, 1))
            (PSA/MCTformer ``crf_inference``).
        keys: int (K,) class label of each channel; needed for ``label_unary="all"``.
        n_classes: the dataset's class count C (bg included); needed for ``label_unary="all"``.

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
    if params.needs_class_count:
        if keys is None:
            raise ValueError("label_unary='all' needs the keys (class label of each CAM channel)")
        keys = _check_keys(keys, k, _check_n_classes(n_classes, params))
        q = _class_space_probs(image, cams, keys, bg_threshold, params, n_classes)
        return q[np.concatenate([[0], keys])]
    if params.mode == "labels":
        return dense_crf(image, compact_hard_labels(cams, bg_threshold), params, n_labels=k + 1)
    dtype = np.float32
    bg_map = np.broadcast_to(np.asarray(bg_threshold, dtype=dtype), (h, w))
    scores = np.concatenate([bg_map[None], cams.astype(dtype, copy=False)], axis=0)
    return dense_crf(image, np.clip(scores, 1e-5, 1.0), params)


def crf_refine_cams(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, bg_threshold: float | np.ndarray,
                    params: CRFParams, n_classes: int | None = None) -> np.ndarray:
    """CAMs -> CRF-refined label map (SIPE/SEAM style): ``[0, *keys][argmax Q]`` with Q from :func:`crf_cam_probs`;
    with ``label_unary="all"`` the argmax over all ``n_classes`` channels of Q (usr922/wseg ``contrast_infer.py::_crf``).

    Args:
        image: uint8 (H, W, 3) RGB.
        cams: float (K, H, W) CAMs of the image's present classes (typically in [0, 1]).
        keys: int (K,) class label of each channel (1..C-1).
        bg_threshold: constant background score (or an (H, W) map such as :func:`bg_power`).
        params: see :func:`crf_cam_probs`.
        n_classes: the dataset's class count C; needed for ``label_unary="all"``.

    Returns:
        uint8 (H, W) class labels. K == 0 gives all zeros.
    """
    cams = np.asarray(cams)
    keys = np.asarray(keys)
    if cams.ndim == 3:
        keys = _check_keys(keys, cams.shape[0], n_classes if params.needs_class_count else None)
    elif keys.size and (not np.issubdtype(keys.dtype, np.integer) or keys.min() < 1 or keys.max() > 254):
        raise ValueError(f"keys must be integer class labels in 1..254, got {keys.tolist()}")
    if params.needs_class_count and cams.ndim == 3 and cams.shape[0] > 0:
        image = _check_image(image)
        if cams.shape[1:] != image.shape[:2]:
            raise ValueError(f"cams must have shape (K, {image.shape[0]}, {image.shape[1]}) to match the image, "
                             f"got {cams.shape}")
        q = _class_space_probs(image, cams, keys, bg_threshold, params, n_classes)
        return q.argmax(axis=0).astype(np.uint8)
    q = crf_cam_probs(image, cams, bg_threshold, params)
    lut = np.concatenate([[0], keys.astype(np.int64)])
    return lut[q.argmax(axis=0)].astype(np.uint8)
