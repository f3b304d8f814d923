"""MXNet ``.params`` files (NDArray lists) without mxnet, and the ResNet-38 key map.

Used for the ImageNet ResNet-38 weights ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``, which upstream
``usr922/wseg`` ``network/resnet38d.py::convert_mxnet_to_torch`` converts with mxnet (same file in ``jiwoon-ahn/psa``).
:func:`wsss_core.models.weights.load_state_dict_file` calls :func:`load_params_file` for every path whose
name ends in ``.params`` (after the optional sha256 check).

File layout (all integers little-endian)::

    uint64 magic = 0x112 (kMXAPINDArrayListMagic)      uint64 reserved = 0
    uint64 n_arrays, then n_arrays NDArrays:
        uint32 magic:
          0xF993FACA (V3, numpy shape semantics) | 0xF993FAC9 (V2):
              int32 storage type (0 dense; 1 row-sparse, 2 CSR are rejected)
              shape: int32 ndim, ndim x int64 dims   (V2: ndim 0 = empty array, nothing follows;
                                                      V3: ndim -1 = empty array, ndim 0 = a scalar)
          0xF993FAC8 (V1): shape: uint32 ndim, ndim x int64 dims (ndim 0 = empty array)
          anything else (legacy): the value *is* ndim, then ndim x uint32 dims (ndim 0 = empty array)
        int32 dev_type, int32 dev_id                (the context; ignored)
        int32 type flag                             (table _DTYPES below)
        prod(shape) * itemsize bytes of C-order data
    uint64 n_names (0 or n_arrays), then per name: uint64 length, utf-8 bytes
        (``arg:NAME`` for weights, ``aux:NAME`` for BatchNorm running statistics)

Key map MXNet -> PyTorch ResNet-38 (:class:`wsss_core.models.resnet38.ResNet38`)::

    conv1a_weight                           -> conv1a.weight
    res{S}a_branch{B}_weight                -> b{S}.conv_branch{B}.weight          (e.g. res2a -> b2)
    res{S}b{K}_branch{B}_weight             -> b{S}_{K}.conv_branch{B}.weight      (e.g. res2b1 -> b2_1)
    bn{S}a_branch{B}_{gamma,beta}           -> b{S}.bn_branch{B}.{weight,bias}
    bn{S}a_branch{B}_moving_{mean,var}      -> b{S}.bn_branch{B}.running_{mean,var}
    bn{S}b{K}_branch{B}_...                 -> b{S}_{K}.bn_branch{B}....
    bn7_{gamma,beta,moving_mean,moving_var} -> bn7.{weight,bias,running_mean,running_var}
    linear1000_*                            -> dropped (the ImageNet classifier)

with S the stage digit (2..7) and B in {2a, 2b1, 2b2, 1}. Examples:
``res2b1_branch2a_weight -> b2_1.conv_branch2a.weight``, ``bn4a_branch2b1_moving_var ->
b4.bn_branch2b1.running_var``, ``bn7_gamma -> bn7.weight``. The ``arg:``/``aux:`` prefixes are irrelevant to
the map. Deviation from the reference converter (which sends every other name to ``bn7.*`` by its last token):
a name that matches none of these patterns raises :class:`WeightsError` instead of silently overwriting bn7.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import BinaryIO, Mapping

import numpy as np
import torch

from ..errors import WeightsError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

#: mshadow type flag -> numpy dtype (little-endian). 12 (bfloat16) is widened to float32 on reading.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
    5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"), 8: np.dtype("<i2"), 9: np.dtype("<u2"),
    10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
_BFLOAT16 = 12

_MAX_NDIM = 32
_MAX_COUNT = 1 << 24
_MAX_NAME = 1 << 20
_CPU = 1  # Context dev_type kCPU


class MXNetParams(dict):
    """``read_mxnet_params`` result: name (without ``arg:``/``aux:``) -> np.ndarray, plus ``aux_names``."""

    aux_names: frozenset = frozenset()


class _Reader:
    """Sequential little-endian reader over an open file; every short read is a WeightsError naming the path."""

    def __init__(self, fh: BinaryIO, path: Path):
        self.fh, self.path = fh, path
        self.size = os.fstat(fh.fileno()).st_size

    def fail(self, what: str) -> WeightsError:
        return WeightsError(f"{self.path} is not a valid MXNet .params file: {what} (at byte {self.fh.tell()} of "
                            f"{self.size}). Re-download the file or check that it is the MXNet ImageNet checkpoint.")

    def exact(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"file truncated while reading {what}")
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.exact(struct.calcsize("<" + fmt), what))

    def array(self, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * dtype.itemsize
        if nbytes > self.size - self.fh.tell():
            raise self.fail(f"file truncated in the data of {what} (needs {nbytes} bytes)")
        out = np.empty(count, dtype=dtype)
        if nbytes and self.fh.readinto(memoryview(out).cast("B")) != nbytes:
            raise self.fail(f"file truncated in the data of {what}")
        return out.reshape(shape)


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    what = f"array #{index}"
    (magic,) = r.unpack("I", f"the header of {what}")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"the storage type of {what}")
        if stype != 0:
            raise r.fail(f"{what} has sparse storage type {stype}; only dense arrays are supported")
        (ndim,) = r.unpack("i", f"the shape of {what}")
        if magic == V3_MAGIC and ndim == -1 or magic == V2_MAGIC and ndim == 0:
            return np.empty((0,), dtype=np.float32)  # an empty (none) NDArray: nothing else is stored
        if not 0 <= ndim <= _MAX_NDIM:
            raise r.fail(f"{what} has an invalid number of dimensions {ndim}")
        shape = r.unpack(f"{ndim}q", f"the shape of {what}")
    elif magic == V1_MAGIC:
        (ndim,) = r.unpack("I", f"the shape of {what}")
        if ndim == 0:
            return np.empty((0,), dtype=np.float32)
        if ndim > _MAX_NDIM:
            raise r.fail(f"{what} has an invalid number of dimensions {ndim}")
        shape = r.unpack(f"{ndim}q", f"the shape of {what}")
    else:  # legacy: the first word is ndim
        ndim = magic
        if ndim == 0:
            return np.empty((0,), dtype=np.float32)
        if ndim > _MAX_NDIM:
            raise r.fail(f"bad magic 0x{magic:08X} of {what} (expected 0x{V2_MAGIC:08X}, 0x{V3_MAGIC:08X}, "
                         f"0x{V1_MAGIC:08X} or a legacy ndim <= {_MAX_NDIM})")
        shape = r.unpack(f"{ndim}I", f"the shape of {what}")
    if any(d < 0 for d in shape):
        raise r.fail(f"{what} has a negative dimension in shape {shape}")
    r.unpack("ii", f"the context of {what}")
    (flag,) = r.unpack("i", f"the type flag of {what}")
    if flag == _BFLOAT16:
        raw = r.array(np.dtype("<u2"), tuple(shape), what)
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if flag not in _DTYPES:
        raise r.fail(f"{what} has an unknown type flag {flag}")
    arr = r.array(_DTYPES[flag], tuple(shape), what)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def read_mxnet_params(path: str | os.PathLike) -> MXNetParams:
    """Read an MXNet NDArray-list file (``mx.nd.save`` / ``Module.save_params``) into numpy arrays.

    Returns an :class:`MXNetParams` dict ``{name: array}``, names stripped of ``arg:``/``aux:``; the names
    that had ``aux:`` are in ``result.aux_names``. Files saved without names get keys ``"0"``, ``"1"``, ...
    Corrupt or truncated files raise :class:`WeightsError` naming ``path``.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"cannot open MXNet params file {path}: {exc}") from exc
    with fh:
        r = _Reader(fh, path)
        magic, _reserved = r.unpack("QQ", "the file header")
        if magic != LIST_MAGIC:
            raise r.fail(f"bad magic 0x{magic:X} (expected 0x{LIST_MAGIC:X})")
        (n,) = r.unpack("Q", "the array count")
        if n > _MAX_COUNT:
            raise r.fail(f"implausible array count {n}")
        arrays = [_read_ndarray(r, i) for i in range(n)]
        (n_names,) = r.unpack("Q", "the name count")
        if n_names not in (0, n):
            raise r.fail(f"{n_names} names for {n} arrays")
        names = []
        for i in range(n_names):
            (length,) = r.unpack("Q", f"the length of name #{i}")
            if length > _MAX_NAME:
                raise r.fail(f"implausible length {length} of name #{i}")
            try:
                names.append(r.exact(length, f"name #{i}").decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise r.fail(f"name #{i} is not utf-8 ({exc})") from exc
    if not names:
        names = [str(i) for i in range(n)]
    out, aux = MXNetParams(), set()
    for raw, arr in zip(names, arrays):
        prefix, sep, bare = raw.partition(":")
        if not sep or prefix not in ("arg", "aux"):
            bare = raw
        elif prefix == "aux":
            aux.add(bare)
        if bare in out:
            raise WeightsError(f"{path}: parameter name {bare!r} occurs twice")
        out[bare] = arr
    out.aux_names = frozenset(aux)
    return out


# ---------------------------------------------------------------------------------------------- key map

_BLOCK_RE = re.compile(r"^(res|bn)(\d)(a|b(\d+))_(branch[0-9a-z]+)_(weight|gamma|beta|moving_mean|moving_var)$")
_BN7_RE = re.compile(r"^bn7_(gamma|beta|moving_mean|moving_var)$")
_BN_PARAM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def mxnet_to_resnet38_name(name: str) -> str | None:
    """PyTorch ResNet-38 key of MXNet parameter ``name`` (prefix ignored); ``None`` for the dropped classifier.

    Raises WeightsError for names outside the map documented at the top of this module.
    """
    name = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("linear1000"):
        return None
    m = _BN7_RE.match(name)
    if m:
        return f"bn7.{_BN_PARAM[m.group(1)]}"
    m = _BLOCK_RE.match(name)
    if m:
        kind, stage, _, k, branch, param = m.groups()
        block = f"b{stage}" if k is None else f"b{stage}_{k}"
        if kind == "res" and param == "weight":
            return f"{block}.conv_{branch}.weight"
        if kind == "bn" and param in _BN_PARAM:
            return f"{block}.bn_{branch}.{_BN_PARAM[param]}"
    raise WeightsError(f"unrecognised MXNet ResNet-38 parameter name {name!r}")


def mxnet_to_resnet38_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert MXNet ResNet-38 arrays (names with or without ``arg:``/``aux:``) to a PyTorch state dict.

    Drops ``linear1000_*``; raises WeightsError for unknown names or two names mapping to one key.
    """
    state: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        key = mxnet_to_resnet38_name(name)
        if key is None:
            continue
        if key in state:
            raise WeightsError(f"two MXNet parameters map to {key!r} (the second is {name!r})")
        state[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return state


def load_params_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read MXNet ``.params`` file ``path`` and convert it to a ResNet-38 state dict (errors name ``path``)."""
    try:
        return mxnet_to_resnet38_state_dict(read_mxnet_params(path))
    except WeightsError as exc:
        if str(path) in str(exc):
            raise
        raise WeightsError(f"{path}: {exc}") from exc
