"""Test fixture: writes MXNet ``.params`` files (the NDArray-list format that ``mx.nd.save`` writes) and renames
a ResNet-38 state dict to MXNet names, so that the reader of :mod:`wsss_core.models.mxnet_params` is tested on
files it did not write itself without mxnet being installed."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from wsss_core.models.mxnet_params import (_BN_PARAM, _CPU, _DTYPES, _MAX_NDIM, LIST_MAGIC, V1_MAGIC, V2_MAGIC,
                                           V3_MAGIC)

_BN_PARAM_INV = {v: k for k, v in _BN_PARAM.items()}


def _flag_of(arr: np.ndarray) -> int:
    dt = arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else arr.dtype
    for flag, ref in _DTYPES.items():
        if dt == ref:
            return flag
    raise ValueError(f"dtype {arr.dtype} cannot be stored in an MXNet .params file")


def write_mxnet_params(path: str | os.PathLike, arrays: Mapping[str, np.ndarray | torch.Tensor],
                       aux_names: Iterable[str] = (), prefix: bool = True, version: int = 2) -> Path:
    """Write ``arrays`` in the MXNet NDArray-list format (as ``mx.nd.save`` does), for tests and conversions.

    Names get ``aux:`` when listed in ``aux_names``, otherwise ``arg:`` (names already carrying a prefix, or
    all names when ``prefix=False``, are written as given). ``version``: 2 (default, what MXNet 1.x writes),
    1 (V1 magic) or 0 (legacy uint32 shapes). 0-d arrays need numpy shape semantics, so a file holding one
    is written entirely in V3 (as MXNet does under ``np_shape``). Context is CPU(0).
    """
    if version not in (0, 1, 2):
        raise ValueError(f"unknown MXNet NDArray version {version} (use 0, 1 or 2)")
    path = Path(path)
    aux = set(aux_names)
    items = [(k, v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()]
    if any(a.ndim == 0 for _, a in items):
        version = 3
    with open(path, "wb") as fh:
        fh.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(items)))
        for name, arr in items:
            flag = _flag_of(arr)
            if arr.ndim > _MAX_NDIM:
                raise ValueError(f"{name}: {arr.ndim} dimensions are too many")
            if version in (2, 3):
                fh.write(struct.pack(f"<Iii{arr.ndim}q", V3_MAGIC if version == 3 else V2_MAGIC, 0, arr.ndim,
                                     *arr.shape))
            elif version == 1:
                fh.write(struct.pack(f"<II{arr.ndim}q", V1_MAGIC, arr.ndim, *arr.shape))
            else:
                fh.write(struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape))
            fh.write(struct.pack("<iii", _CPU, 0, flag))
            fh.write(np.ascontiguousarray(arr, dtype=_DTYPES[flag]).reshape(-1).data)
        fh.write(struct.pack("<Q", len(items)))
        for name, _ in items:
            if prefix and not name.startswith(("arg:", "aux:")):
                name = ("aux:" if name in aux else "arg:") + name
            data = name.encode("utf-8")
            fh.write(struct.pack("<Q", len(data)) + data)
    return path



def resnet38_to_mxnet_name(key: str) -> str:
    """Inverse of :func:`mxnet_to_resnet38_name` (without prefix), e.g. ``b2_1.conv_branch2a.weight`` ->
    ``res2b1_branch2a_weight``. Raises KeyError for keys outside the map (e.g. ``num_batches_tracked``)."""
    if key == "conv1a.weight":
        return "conv1a_weight"
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "bn7" and parts[1] in _BN_PARAM_INV:
        return f"bn7_{_BN_PARAM_INV[parts[1]]}"
    m = re.match(r"^b(\d)(?:_(\d+))?$", parts[0]) if len(parts) == 3 else None
    if m:
        stage, k = m.groups()
        block = f"{stage}a" if k is None else f"{stage}b{k}"
        layer, param = parts[1], parts[2]
        if layer.startswith("conv_branch") and param == "weight":
            return f"res{block}_{layer[len('conv_'):]}_weight"
        if layer.startswith("bn_branch") and param in _BN_PARAM_INV:
            return f"bn{block}_{layer[len('bn_'):]}_{_BN_PARAM_INV[param]}"
    raise KeyError(f"{key!r} has no MXNet ResNet-38 name")


def resnet38_to_mxnet_names(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Rename a ResNet-38 state dict to MXNet names: returns ``(arrays, aux_names)`` for
    :func:`write_mxnet_params`. ``num_batches_tracked`` buffers (absent from MXNet files) are skipped."""
    arrays, aux = {}, set()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = resnet38_to_mxnet_name(key)
        arrays[name] = value.detach().cpu().numpy()
        if "moving_" in name:
            aux.add(name)
    return arrays, aux
