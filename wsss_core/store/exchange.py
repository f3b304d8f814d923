"""Per-image CAM and pseudo-mask files in the layouts of the reference WSSS repositories, read with checks.

Our CAMs live in HDF5 shards (:mod:`wsss_core.store.shards`: per image ``keys`` (K,) class labels, ``cams``
float16 (K, H, W), optional ``aux``); the reference repositories write one ``{image id}.npy`` per image instead
(``np.save`` of a pickled dict or of an array) and one ``{image id}.png`` label map per pseudo-mask. This module
converts one such file to / from ``(keys, cams, aux)``; :mod:`wsss_core.stages.exchange` runs it over a split.

CAM formats (``CAM_FORMATS``; class label = 0-based foreground index + 1, 0 = background)::

    psa    dict {fg_index: float32 (H, W)}                 jiwoon-ahn/psa infer_cls.py (also usr922/wseg and PPC
                                                           infer_cam, FSAE contrast_infer.py: the image's label
                                                           classes only; RTC: all classes)
    irn    dict {"keys": int64 (K,) fg indices,           jiwoon-ahn/irn step/make_cam.py ("keys" and the stride-4
                 "cam": (K, h, w), "high_res": float32 (K, H, W)}     "cam" are torch tensors there; "high_res" is read)
    sipe   dict {"keys": int64 (K,) labels, 0 first,       chenqi1126/SIPE make_cam.py (its own background map;
                 "IS_CAM": float32 (K, H, W), ["IS_CAM1"]}  SFC adds "IS_CAM1", our ``aux``)
    dense  float32 (C, H, W) or (1, C, H, W), channel c =  SP-CAM / MSA camnpy/{id}.npy, CHENDL-SHEN/ESC
           class label c (0 = background), absent = 0      evaluator.py

Import options: ``classes`` ``labels`` (default: the maps of the image's label classes in ascending order, as our
own CAM inference keeps; a label class without a map is an error; ``dense`` has a channel for every class, an
all-zero one is kept) or ``all`` (every map of the file, in ascending class order; for ``dense`` every channel that
is not all zero); ``bg`` ``threshold`` (no background map: drop it if the file has one; the
evaluator sweeps a constant) or ``own`` (keep it as key 0, first). The default ``bg`` is the format's own:
``own`` for ``sipe``, ``threshold`` for the others (``psa`` and ``irn`` have no background map to keep).

Every problem with a file is a :class:`~wsss_core.errors.DataError` naming the file, what is wrong and what was
expected: unreadable or not the format's type, a spatial shape other than the image's, a wrong channel count, a
key out of range or repeated, NaN / inf, a value outside [0, 1] (tolerance ``VALUE_TOLERANCE``), a missing label
class. Values are kept as they are (no clipping): a float16 shard exported as float32 and imported back is
bit-identical.

Pseudo-masks: ``{id}.png``, a palette or grayscale index PNG with values 0..C-1 or 255 (void), the image's shape;
written with the VOC palette (:func:`wsss_core.data.io.write_label_png`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ..data.io import read_label_png, write_label_png
from ..errors import ConfigError, DataError

#: CAM file formats that can be imported, and those that can be exported (``dense`` is import only).
CAM_FORMATS = ("psa", "irn", "sipe", "dense")
EXPORT_CAM_FORMATS = ("psa", "irn", "sipe")
#: the pseudo-mask file format
MASK_FORMATS = ("png",)
CLASS_CHOICES = ("labels", "all")
BG_CHOICES = ("threshold", "own")

#: how far a value may lie outside [0, 1] (the reference repositories divide by max + 1e-5; resizing overshoots)
VALUE_TOLERANCE = 1e-3

#: the upstream code that writes (and reads) each format, for manifests and messages
FORMAT_REFERENCES = {
    "psa": "jiwoon-ahn/psa infer_cls.py (np.save of {fg_index: float32 (H, W)}); read by its eval / the "
           "usr922/wseg and PPC/FSAE infer_cam and eval scripts",
    "irn": "jiwoon-ahn/irn step/make_cam.py (np.save of {'keys': fg indices, 'cam': stride-4 maps, 'high_res': "
           "float32 (K, H, W)}); read by step/eval_cam.py, cam_to_ir_label.py, make_sem_seg_labels.py",
    "sipe": "chenqi1126/SIPE make_cam.py (np.save of {'keys': [0, class_idx + 1...], 'IS_CAM': float32 (K, H, W)}; "
            "SFC adds 'IS_CAM1'); read by its eval_cam.py (pred = keys[argmax])",
    "dense": "SP-CAM / MSA camnpy/{id}.npy (float32 (C, H, W), channel 0 = background); read by the "
             "CHENDL-SHEN/ESC evaluator.py",
    "png": "VOC-style index PNG {id}.png (values 0..C-1, 255 = void; VOC palette), as the reference repositories "
           "write pseudo-masks (e.g. jiwoon-ahn/irn make_sem_seg_labels.py, jiwoon-ahn/psa infer_aff.py)",
}

#: the stride of IRN's strided "cam" (jiwoon-ahn/irn misc/imutils.py get_strided_size(size, 4))
IRN_STRIDE = 4


class ReferenceCams(NamedTuple):
    """The maps of one image: ``keys`` int64 (K,) class labels (0 = a background map, first), ``cams`` float32
    (K, H, W), ``aux`` float32 (K, H, W) or None (SFC's ``IS_CAM1``)."""

    keys: np.ndarray
    cams: np.ndarray
    aux: np.ndarray | None


def cam_file(folder: str | os.PathLike, image_id: str) -> Path:
    """The CAM file of ``image_id`` in ``folder``: ``{id}.npy``."""
    return Path(folder) / f"{image_id}.npy"


def mask_file(folder: str | os.PathLike, image_id: str) -> Path:
    """The pseudo-mask file of ``image_id`` in ``folder``: ``{id}.png``."""
    return Path(folder) / f"{image_id}.png"


# --------------------------------------------------------------------------------------------- options

def cam_import_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The import settings ``{dir, format, classes, bg}`` with defaults filled in (``format`` psa, ``classes``
    labels, ``bg`` the format's own); a bad value is a :class:`ConfigError` naming the key."""
    if not cfg.get("dir"):
        raise ConfigError("the CAM import settings have no 'dir' (the folder of {id}.npy files)")
    fmt = cfg.get("format", "psa")
    if fmt not in CAM_FORMATS:
        raise ConfigError(f"CAM import format {fmt!r} is not one of {', '.join(CAM_FORMATS)}")
    classes = cfg.get("classes", "labels")
    if classes not in CLASS_CHOICES:
        raise ConfigError(f"CAM import classes {classes!r} is not one of {', '.join(CLASS_CHOICES)}")
    bg = cfg.get("bg") or ("own" if fmt == "sipe" else "threshold")
    if bg not in BG_CHOICES:
        raise ConfigError(f"CAM import bg {bg!r} is not one of {', '.join(BG_CHOICES)}")
    if bg == "own" and fmt in ("psa", "irn"):
        raise ConfigError(f"CAM import bg 'own' needs a background map, which format {fmt!r} has none of; use "
                          "bg: threshold, or format sipe / dense")
    return {"dir": str(cfg["dir"]), "format": fmt, "classes": classes, "bg": bg}


def mask_import_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The pseudo-mask import settings ``{dir, format}`` (format png)."""
    if not cfg.get("dir"):
        raise ConfigError("the pseudo-mask import settings have no 'dir' (the folder of {id}.png files)")
    fmt = cfg.get("format", "png")
    if fmt not in MASK_FORMATS:
        raise ConfigError(f"pseudo-mask import format {fmt!r} is not one of {', '.join(MASK_FORMATS)}")
    return {"dir": str(cfg["dir"]), "format": fmt}


def export_cam_format(fmt: str, has_bg: bool, has_aux: bool) -> str:
    """The CAM file format to export maps with (``has_bg``: they carry a background map, key 0; ``has_aux``: a
    second stack): ``auto`` = ``sipe`` with a background map, else ``psa``. A format that cannot hold the maps is
    a :class:`ConfigError`."""
    if fmt == "auto":
        fmt = "sipe" if has_bg else "psa"
    if fmt not in EXPORT_CAM_FORMATS:
        raise ConfigError(f"CAM export format {fmt!r} is not one of auto, {', '.join(EXPORT_CAM_FORMATS)}")
    if has_bg and fmt != "sipe":
        raise ConfigError(f"CAM export format {fmt!r} cannot hold a background map (key 0) and these CAMs have one: "
                          "use cam_format sipe (or auto)")
    if not has_bg and fmt == "sipe":
        raise ConfigError("CAM export format 'sipe' needs a background map (key 0, first) and these CAMs have none: "
                          "use cam_format psa or irn (or auto)")
    if has_aux and fmt != "sipe":
        raise ConfigError(f"CAM export format {fmt!r} cannot hold the second CAM stack (aux, SFC's IS_CAM1) these "
                          "CAMs have: use cam_format sipe (or auto)")
    return fmt


# --------------------------------------------------------------------------------------------- reading

def load_npy(path: str | os.PathLike) -> Any:
    """The content of a ``.npy`` file: the dict of a pickled dict (``.item()``), else the array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CAM file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=True)
    except Exception as exc:  # truncated file, not .npy, a pickle of a class that cannot be imported
        raise DataError(f"CAM file {path} cannot be read as .npy ({type(exc).__name__}: {exc}); expected np.save "
                        "output") from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj.item()
    return obj


def _array(value: Any, path: Path, what: str) -> np.ndarray:
    """``value`` as a numpy array (a CPU torch tensor too: jiwoon-ahn/irn pickles its keys and strided cams as
    tensors); a non-numeric one is a DataError."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise DataError(f"CAM file {path}: {what} is a {type(value).__name__}, not an array") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"CAM file {path}: {what} holds {arr.dtype} values ({type(value).__name__}); expected a "
                        "numeric array")
    return arr


def _keys(value: Any, path: Path, what: str) -> np.ndarray:
    arr = _array(value, path, what)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DataError(f"CAM file {path}: {what} is {arr.dtype} of shape {arr.shape}; expected a 1-D integer array")
    return arr.astype(np.int64)


def _dict(obj: Any, path: Path, fmt: str, required: Sequence[str]) -> dict:
    if not isinstance(obj, dict):
        got = f"an array {obj.dtype} {obj.shape}" if isinstance(obj, np.ndarray) else f"a {type(obj).__name__}"
        raise DataError(f"CAM file {path} holds {got}; the {fmt} format expects a pickled dict"
                        + (f" with keys {list(required)}" if required else "") + f" ({FORMAT_REFERENCES[fmt]})")
    missing = [k for k in required if k not in obj]
    if missing:
        raise DataError(f"CAM file {path}: the dict has no {', '.join(repr(k) for k in missing)} (it has "
                        f"{sorted(map(str, obj))}); the {fmt} format expects {list(required)}")
    return obj


def _maps(value: Any, path: Path, what: str, ndim: int) -> np.ndarray:
    arr = _array(value, path, what)
    if arr.ndim != ndim:
        raise DataError(f"CAM file {path}: {what} has shape {arr.shape}; expected {ndim} dimensions "
                        f"({'(H, W)' if ndim == 2 else '(K, H, W)'})")
    return arr.astype(np.float32, copy=False)


def _parse(obj: Any, path: Path, fmt: str, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(keys int64 (K,) class labels, maps float32 (K, H, W), aux or None) of one file, keys checked."""
    n_fg = n_classes - 1
    aux = None
    if fmt == "psa":
        # jiwoon-ahn/psa infer_cls.py: cam_dict[i] = norm_cam[i] for the label classes i (0-based)
        d = _dict(obj, path, fmt, ())
        bad = [k for k in d if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n_fg]
        if bad:
            raise DataError(f"CAM file {path}: dict keys {bad[:5]} are not 0-based foreground class indices; "
                            f"expected integers in 0..{n_fg - 1} ({n_fg} foreground classes)")
        order = sorted(int(k) for k in d)
        keys = np.asarray(order, np.int64) + 1
        maps = [_maps(d[k], path, f"the map of fg index {k}", 2) for k in sorted(d, key=int)]
        shapes = {m.shape for m in maps}
        if len(shapes) > 1:
            raise DataError(f"CAM file {path}: its maps differ in shape ({sorted(shapes)}); expected one (H, W)")
        cams = np.stack(maps) if maps else np.zeros((0, 0, 0), np.float32)
    elif fmt == "irn":
        # jiwoon-ahn/irn step/make_cam.py: {"keys": valid_cat, "cam": strided_cam, "high_res": highres_cam}
        d = _dict(obj, path, fmt, ("keys", "high_res"))
        idx = _keys(d["keys"], path, "'keys'")
        if idx.size and (idx.min() < 0 or idx.max() >= n_fg):
            raise DataError(f"CAM file {path}: 'keys' {idx.tolist()} are out of range; expected 0-based foreground "
                            f"class indices in 0..{n_fg - 1}")
        keys, cams = idx + 1, _maps(d["high_res"], path, "'high_res'", 3)
    elif fmt == "sipe":
        # chenqi1126/SIPE make_cam.py: keys = nonzero(pad(label, (1, 0), 1.0)) -> [0, class_idx + 1, ...]
        d = _dict(obj, path, fmt, ("keys", "IS_CAM"))
        keys = _keys(d["keys"], path, "'keys'")
        if keys.size == 0 or keys[0] != 0 or (keys[1:].size and (keys[1:].min() < 1 or keys[1:].max() >= n_classes)):
            raise DataError(f"CAM file {path}: 'keys' {keys.tolist()} are out of range; expected 0 (the background "
                            f"map) first, then class labels in 1..{n_classes - 1}")
        cams = _maps(d["IS_CAM"], path, "'IS_CAM'", 3)
        if "IS_CAM1" in d and d["IS_CAM1"] is not None:  # SFC: the classifier CAM beside the prototype CAM
            aux = _maps(d["IS_CAM1"], path, "'IS_CAM1'", 3)
            if aux.shape != cams.shape:
                raise DataError(f"CAM file {path}: 'IS_CAM1' has shape {aux.shape}, 'IS_CAM' {cams.shape}; expected "
                                "the same")
    elif fmt == "dense":
        # SP-CAM / MSA camnpy: one (C, H, W) array, channel 0 background (CHENDL-SHEN/ESC evaluator.py)
        if isinstance(obj, dict):
            raise DataError(f"CAM file {path} holds a pickled dict (keys {sorted(map(str, obj))[:6]}); the dense "
                            f"format expects a float array ({n_classes}, H, W) ({FORMAT_REFERENCES[fmt]})")
        arr = _array(obj, path, "the array")
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != n_classes:
            raise DataError(f"CAM file {path}: the array has shape {arr.shape}; expected ({n_classes}, H, W) or "
                            f"(1, {n_classes}, H, W): one channel per class, background first ({n_classes} classes)")
        keys, cams = np.arange(n_classes, dtype=np.int64), arr.astype(np.float32, copy=False)
    else:
        raise ConfigError(f"CAM format {fmt!r} is not one of {', '.join(CAM_FORMATS)}")
    if cams.shape[0] != keys.size:
        raise DataError(f"CAM file {path}: {keys.size} keys but {cams.shape[0]} maps (shape {cams.shape}); expected "
                        "one map per key")
    if len(set(keys.tolist())) != keys.size:
        raise DataError(f"CAM file {path}: keys {keys.tolist()} repeat a class; expected each class once")
    return keys, cams, aux


def _check_values(maps: np.ndarray, keys: np.ndarray, path: Path, what: str) -> None:
    finite = np.isfinite(maps)
    if not finite.all():
        k = int(np.flatnonzero(~finite.reshape(len(maps), -1).all(1))[0])
        bad = maps[k][~finite[k]]
        raise DataError(f"CAM file {path}: {what} of class {int(keys[k])} holds {bad.size} non-finite values "
                        f"({'NaN' if np.isnan(bad).any() else 'inf'}); expected finite values in [0, 1]")
    if maps.size:
        lo, hi = float(maps.min()), float(maps.max())
        if lo < -VALUE_TOLERANCE or hi > 1 + VALUE_TOLERANCE:
            flat = maps.reshape(len(maps), -1)
            k = int(np.flatnonzero((flat.min(1) < -VALUE_TOLERANCE) | (flat.max(1) > 1 + VALUE_TOLERANCE))[0])
            raise DataError(f"CAM file {path}: {what} of class {int(keys[k])} has values in [{flat[k].min():g}, "
                            f"{flat[k].max():g}]; expected values in [0, 1] (tolerance {VALUE_TOLERANCE:g}): "
                            "normalised CAMs, as the reference repositories write them")


def read_reference_cams(path: str | os.PathLike, fmt: str, n_classes: int, size: tuple[int, int] | None = None,
                        labels: Sequence[int] | None = None, classes: str = "labels", bg: str | None = None,
                        class_names: Sequence[str] | None = None) -> ReferenceCams:
    """Read and check one CAM file of format ``fmt`` (``CAM_FORMATS``).

    ``n_classes``: C incl. background; ``size``: the image's (H, W), which the maps must have; ``labels``: the
    image's label classes (1..C-1), needed for ``classes='labels'``; ``bg``: ``threshold`` | ``own`` | None (the
    format's own, see the module docstring); ``class_names``: for messages. Returns :class:`ReferenceCams` with
    keys in ascending order (0 first when kept), maps float32 (K, H, W) with the file's values."""
    path = Path(path)
    opts = cam_import_options({"dir": str(path.parent), "format": fmt, "classes": classes, "bg": bg})
    keys, cams, aux = _parse(load_npy(path), path, fmt, n_classes)
    if size is not None and cams.shape[0] and tuple(cams.shape[1:]) != tuple(size):
        raise DataError(f"CAM file {path}: maps of shape {tuple(cams.shape[1:])} (H, W); expected the image's "
                        f"{tuple(size)} (H, W), full resolution")
    has_bg = bool(keys.size) and keys[0] == 0
    if opts["bg"] == "own" and not has_bg:
        raise DataError(f"CAM file {path} has no background map (key 0) and bg: own was asked for")
    fg = np.flatnonzero(keys > 0)
    if opts["classes"] == "labels":
        if labels is None:
            raise ValueError("classes='labels' needs the image's labels")
        pos = {int(k): i for i, k in enumerate(keys)}
        missing = [c for c in sorted(labels) if int(c) not in pos]
        if missing:
            name = (lambda c: f"{class_names[c]!r} (label {c}, fg index {c - 1})") if class_names else \
                (lambda c: f"label {c} (fg index {c - 1})")
            raise DataError(f"CAM file {path} has no map of class {', '.join(name(c) for c in missing)}, which the "
                            f"image is labelled with; it has maps of labels {keys[fg].tolist()}. Expected one map "
                            "per label class (or set classes: all to import the maps the file has)")
        fg = np.asarray([pos[int(c)] for c in sorted(labels)], np.int64)
    else:
        if fmt == "dense":
            flat = cams.reshape(len(cams), -1)
            fg = fg[np.any(flat[fg] != 0, axis=1)] if fg.size else fg
        fg = fg[np.argsort(keys[fg], kind="stable")]
    pick = np.concatenate([[0], fg]).astype(np.int64) if opts["bg"] == "own" else fg.astype(np.int64)
    keys, cams = keys[pick], cams[pick]
    aux = aux[pick] if aux is not None else None
    _check_values(cams, keys, path, "the map")
    if aux is not None:
        _check_values(aux, keys, path, "the IS_CAM1 map")
    if size is not None and cams.shape[0] == 0:
        cams = np.zeros((0, *size), np.float32)
        aux = None if aux is None else np.zeros((0, *size), np.float32)
    return ReferenceCams(keys, np.ascontiguousarray(cams), None if aux is None else np.ascontiguousarray(aux))


def read_reference_mask(path: str | os.PathLike, n_classes: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read and check one pseudo-mask PNG: uint8 (H, W), values 0..C-1 or 255; ``size``: the image's (H, W)."""
    mask = read_label_png(path, n_classes)  # DataError naming the file for a missing, colour or bad-valued PNG
    if mask.ndim != 2:
        raise DataError(f"pseudo-mask {path} has shape {mask.shape}; expected a single-channel (H, W) label map")
    if size is not None and mask.shape != tuple(size):
        raise DataError(f"pseudo-mask {path} has shape {mask.shape} (H, W); expected the image's {tuple(size)}")
    return mask


# --------------------------------------------------------------------------------------------- writing

def write_reference_cams(path: str | os.PathLike, fmt: str, keys: Sequence[int], cams: np.ndarray,
                         aux: np.ndarray | None = None) -> None:
    """Write one image's maps (keys (K,) class labels, 0 = a background map first; cams and optional aux float
    (K, H, W)) as a ``.npy`` file of format ``fmt`` (``EXPORT_CAM_FORMATS``), float32 values unchanged.

    ``irn``'s strided ``"cam"`` is ``high_res[:, ::4, ::4]`` as a CPU torch tensor (as upstream pickles it; reading
    the file then needs torch), a subsample of the full-resolution maps: the size of jiwoon-ahn/irn's stride-4
    maps (``get_strided_size(size, 4)``), not the network's own stride-4 output."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    cams = np.asarray(cams, np.float32)
    has_bg = bool(keys.size) and keys[0] == 0
    export_cam_format(fmt, has_bg, aux is not None)  # raises for a format that cannot hold these maps
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"{path}: cams of shape {cams.shape} do not match {keys.size} keys")
    if fmt == "psa":
        obj: Any = {int(k) - 1: cams[i] for i, k in enumerate(keys)}
    elif fmt == "irn":
        # a torch tensor, as jiwoon-ahn/irn step/make_cam.py saves it (step/make_sem_seg_labels.py moves it to the
        # GPU: cam.cuda)
        import torch

        strided = torch.from_numpy(np.ascontiguousarray(cams[:, ::IRN_STRIDE, ::IRN_STRIDE]))
        obj = {"keys": keys - 1, "cam": strided, "high_res": cams}
    else:  # sipe
        obj = {"keys": keys, "IS_CAM": cams}
        if aux is not None:
            obj["IS_CAM1"] = np.asarray(aux, np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file object: np.save would append .npy to a name without it
        np.save(fh, obj, allow_pickle=True)


def write_reference_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write one uint8 (H, W) pseudo-mask as a VOC-palette index PNG (atomically)."""
    write_label_png(path, mask)
