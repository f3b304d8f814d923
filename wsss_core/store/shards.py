"""Sharded HDF5 stores for per-image CAMs and label masks.

A split's sorted id list is cut into a fixed number of contiguous shards (``shard_ids``); each shard
is one HDF5 file, written under a temporary name and renamed when complete (``ShardWriter``).

Layout of one shard file::

    /<image id>/            group per image
        keys   int16 (K,)   class labels of the K maps: 1..C-1, or 0 (bg map, first) then 1..C-1 for methods
                            whose CAMs carry their own background (SIPE, SFC)           (CAM shards)
        cams   float16 (K, H, W), gzip                                 (CAM shards)
        aux    float16 (K, H, W), gzip, optional: a second map stack of the same keys (SFC: the PCM
               classifier CAM ``IS_CAM1`` beside the prototype CAM ``IS_CAM``)  (CAM shards)
        mask   uint8 (H, W), gzip, values 0..C-1 and 255               (mask shards)
    attrs: kind ("cams" | "masks"), shard, n_shards, split, n_images, and any caller metadata
           (config hash, scales, model, ...). ``complete`` = True is set last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from ..errors import DataError
from .atomic import atomic_path


def shard_ids(ids: Sequence[str], shard: int, n_shards: int) -> list[str]:
    """The ids of shard ``shard`` (0-based) of ``n_shards`` contiguous chunks of ``sorted(ids)``."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    ordered = sorted(ids)
    n = len(ordered)
    lo = (n * shard) // n_shards
    hi = (n * (shard + 1)) // n_shards
    return ordered[lo:hi]


class ShardWriter:
    """Write one shard atomically: ``with ShardWriter(path, "cams", meta) as w: w.add_cams(id, keys, cams)``."""

    def __init__(self, path: str | os.PathLike, kind: str, meta: dict[str, Any] | None = None,
                 compression: int = 4):
        if kind not in ("cams", "masks"):
            raise ValueError(kind)
        self.path = Path(path)
        self.kind = kind
        self.meta = dict(meta or {})
        self.compression = compression
        self._ctx = None
        self._fh: h5py.File | None = None
        self.n = 0

    def __enter__(self) -> "ShardWriter":
        self._ctx = atomic_path(self.path, suffix=".h5")
        tmp = self._ctx.__enter__()
        self._fh = h5py.File(tmp, "w")
        self._fh.attrs["kind"] = self.kind
        for k, v in self.meta.items():
            if isinstance(v, np.generic):
                v = v.item()
            self._fh.attrs[k] = v if isinstance(v, (int, float, str, bool, np.ndarray)) else json.dumps(v, default=str)
        return self

    def add_cams(self, image_id: str, keys: np.ndarray, cams: np.ndarray, aux: np.ndarray | None = None) -> None:
        """keys: (K,) class labels (0 = a bg map, first); cams and optional aux: (K, H, W) float, stored as float16."""
        keys = np.asarray(keys, dtype=np.int16).reshape(-1)
        if (keys == 0).any() and keys[0] != 0:
            raise ValueError(f"{image_id}: a background map (key 0) must come first, got keys {keys.tolist()}")
        g = self._fh.create_group(image_id)
        g.create_dataset("keys", data=keys)
        for name, maps in (("cams", cams), ("aux", aux)):
            if maps is None:
                continue
            maps = np.asarray(maps)
            if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
                raise ValueError(f"{image_id}: {name} shape {maps.shape} does not match {keys.shape[0]} keys")
            g.create_dataset(name, data=maps.astype(np.float16), compression="gzip",
                             compression_opts=self.compression, chunks=True if maps.size else None)
        self.n += 1

    def add_mask(self, image_id: str, mask: np.ndarray) -> None:
        """mask: (H, W) uint8 label map."""
        g = self._fh.create_group(image_id)
        g.create_dataset("mask", data=np.asarray(mask, dtype=np.uint8), compression="gzip",
                         compression_opts=self.compression)
        self.n += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._fh.attrs["n_images"] = self.n
                self._fh.attrs["complete"] = True
            self._fh.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


class ShardedStore:
    """Read-only view over several shard files of one kind, indexed by image id.

    ``store[id]`` returns ``(keys, cams float32)`` for CAM shards and the ``uint8`` mask for mask shards.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        self._index: dict[str, int] = {}
        self.kind = None
        self.attrs: dict[str, Any] = {}
        for i, p in enumerate(self.paths):
            try:
                fh = h5py.File(p, "r")
            except (OSError, FileNotFoundError) as exc:
                raise DataError(f"cannot open HDF5 shard {p}: {exc}. Delete it and rerun the rule that makes it.") from exc
            if not fh.attrs.get("complete", False):
                raise DataError(f"HDF5 shard {p} is incomplete (no 'complete' flag); delete it and rerun")
            kind = fh.attrs.get("kind")
            if self.kind is None:
                self.kind = kind
                self.attrs = {k: fh.attrs[k] for k in fh.attrs}
            elif kind != self.kind:
                raise DataError(f"shard {p} holds {kind!r}, expected {self.kind!r}")
            self._files.append(fh)
            for image_id in fh.keys():
                self._index[image_id] = i

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    def ids(self) -> list[str]:
        return sorted(self._index)

    def __getitem__(self, image_id: str):
        g = self._group(image_id)
        if self.kind == "cams":
            return np.asarray(g["keys"][()], dtype=np.int64), np.asarray(g["cams"][()], dtype=np.float32)
        return np.asarray(g["mask"][()], dtype=np.uint8)

    def _group(self, image_id: str) -> h5py.Group:
        try:
            return self._files[self._index[image_id]][image_id]
        except KeyError:
            raise DataError(f"image {image_id!r} is in none of the shards {[str(p) for p in self.paths]}") from None

    def keys(self, image_id: str) -> np.ndarray:
        """The class labels (K,) of ``image_id``'s CAM maps, without reading the maps."""
        return np.asarray(self._group(image_id)["keys"][()], dtype=np.int64)

    def aux(self, image_id: str) -> np.ndarray | None:
        """The optional second CAM stack of ``image_id`` (float32 (K, H, W), same keys), or None."""
        g = self._group(image_id)
        return np.asarray(g["aux"][()], dtype=np.float32) if "aux" in g else None

    def items(self, ids: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
        for image_id in (self.ids() if ids is None else ids):
            yield image_id, self[image_id]

    def close(self) -> None:
        for fh in self._files:
            fh.close()
        self._files = []

    def __enter__(self) -> "ShardedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
