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
        q      float16 (9, H, W), gzip: a superpixel association map Q (wsss_core/superpixel/ops.py)  (Q shards)
    attrs: kind ("cams" | "masks" | "q"), shard, n_shards, split, n_images, and any caller metadata
           (config hash, scales, model, ...). ``complete`` = True is set last.

A shard file is only ever trusted after :func:`shard_problems` finds nothing wrong with it: it opens as HDF5 (a
truncated file does not: HDF5 checks the end of file it recorded), has the ``complete`` flag, its ``shard`` /
``n_shards`` attrs match its ``<k>-of-<n>.h5`` name, it holds ``n_images`` images, and it has the attrs its
reader expects (kind, split, config hash). :class:`ShardedStore` raises a :class:`DataError` naming the file, what
is wrong and the fix; :func:`set_aside_invalid_shard` (called by the workflow when it builds the DAG) moves an
invalid shard aside, so that the same Snakemake run rebuilds it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import h5py
import numpy as np

from ..errors import DataError
from ..faults import fault_point
from .atomic import atomic_path

#: The file name of shard k of n.
SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)\.h5$")

#: What to do about an invalid shard (in every DataError about one).
SHARD_FIX = ("Its contents are not used. Move it aside (or delete it) and rerun snakemake, which rebuilds it; "
             "snakemake also does this by itself: when it builds the DAG it checks every existing shard it needs and "
             "renames an invalid one to <name>.invalid-<time>.")


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
        if kind not in ("cams", "masks", "q"):
            raise ValueError(kind)
        self.path = Path(path)
        self.kind = kind
        self.meta = dict(meta or {})
        self.compression = compression
        self._ctx = None
        self._fh: h5py.File | None = None
        self.n = 0

    def __enter__(self) -> "ShardWriter":
        self._ctx = atomic_path(self.path, suffix=".h5", clean_stale=True)  # a killed job's partial shard
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
            # one chunk per map; the byte-shuffle filter groups the float16 high bytes before gzip, which
            # roughly halves the file of smooth maps (bench/bench_cam_cache.py); values are unchanged
            g.create_dataset(name, data=maps.astype(np.float16), compression="gzip",
                             compression_opts=self.compression, shuffle=bool(maps.size),
                             chunks=(1,) + maps.shape[1:] if maps.size else None)
        self.n += 1
        fault_point("shard_item", self.n, self.path)  # test hook (WSSS_FAULT), a no-op otherwise

    def add_mask(self, image_id: str, mask: np.ndarray) -> None:
        """mask: (H, W) uint8 label map."""
        g = self._fh.create_group(image_id)
        g.create_dataset("mask", data=np.asarray(mask, dtype=np.uint8), compression="gzip",
                         compression_opts=self.compression)
        self.n += 1
        fault_point("shard_item", self.n, self.path)  # test hook (WSSS_FAULT), a no-op otherwise

    def add_q(self, image_id: str, q: np.ndarray) -> None:
        """q: (9, H, W) superpixel association map, stored as float16 (one chunk per channel)."""
        q = np.asarray(q)
        if q.ndim != 3 or q.shape[0] != 9:
            raise ValueError(f"{image_id}: Q shape {q.shape}, expected (9, H, W)")
        g = self._fh.create_group(image_id)
        g.create_dataset("q", data=q.astype(np.float16), compression="gzip", compression_opts=self.compression,
                         shuffle=True, chunks=(1,) + q.shape[1:])
        self.n += 1
        fault_point("shard_item", self.n, self.path)  # test hook (WSSS_FAULT), a no-op otherwise

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._fh.attrs["n_images"] = self.n
                self._fh.attrs["complete"] = True
            self._fh.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


class ShardProblem(NamedTuple):
    """One thing wrong with a shard file. ``key``: ``unreadable``, ``incomplete``, ``name``, ``n_images``, or the attr
    that differs from what its reader expects (``kind``, ``split``, ``config_hash``, ...)."""
    key: str
    message: str


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_problem(path: Path, exc: BaseException) -> ShardProblem:
    if not path.exists():
        return ShardProblem("unreadable", "it does not exist")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ShardProblem("unreadable", f"it cannot be read as HDF5: it is truncated or not an HDF5 file ({reason})")


def _file_problems(fh: h5py.File, path: Path, expect: Mapping[str, Any] | None) -> list[ShardProblem]:
    attrs = fh.attrs
    out = []
    if not attrs.get("complete", False):
        out.append(ShardProblem("incomplete", "it is incomplete (no 'complete' flag: it was not finished by "
                                              "ShardWriter)"))
    m = SHARD_NAME.match(path.name)
    if m:
        for key, want in (("shard", int(m.group(1))), ("n_shards", int(m.group(2)))):
            if key in attrs and attr_value(attrs[key]) != want:
                out.append(ShardProblem("name", f"its attrs say {key}={attr_value(attrs[key])!r} but its file name "
                                                f"{path.name} says {want}"))
    if "n_images" in attrs and attr_value(attrs["n_images"]) != len(fh):
        out.append(ShardProblem("n_images", f"it holds {len(fh)} images but its attrs say n_images="
                                            f"{attr_value(attrs['n_images'])}"))
    for key, want in (expect or {}).items():
        if want is None:
            continue
        got = attr_value(attrs[key]) if key in attrs else None
        if got != want:
            out.append(ShardProblem(key, f"it holds {key} {got!r}, expected {want!r}"))
    return out


def shard_problems(path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> list[ShardProblem]:
    """What is wrong with the shard file ``path`` (an empty list: nothing). Reads the attrs only (and the number of
    images), so it is cheap. ``expect``: attrs the reader needs, e.g. ``{"kind": "cams", "split": "val",
    "config_hash": h}`` (None values are not checked)."""
    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        return [_open_problem(path, exc)]
    with fh:
        return _file_problems(fh, path, expect)


def describe_problems(path: str | os.PathLike, problems: Sequence[ShardProblem]) -> str:
    return f"HDF5 shard {path}: " + "; ".join(p.message for p in problems) + "."


def set_aside_invalid_shard(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
                            stale_keys: Sequence[str] = ("config_hash",), dry_run: bool = False) -> tuple[str, str] | None:
    """Check an existing shard before a workflow run uses it; None when it is valid or absent, else
    ``(action, message)`` after acting on it (unless ``dry_run``):

    - ``"set aside"``: invalid (unreadable or truncated, incomplete, of another kind / split / shard): renamed to
      ``<name>.invalid-<UTC time>``, nothing is deleted, and the rule that makes it runs again;
    - ``"out of date"``: valid, but made with other settings (only ``stale_keys`` differ, e.g. ``config_hash``): its
      mtime is set to 0 (1970), older than any input, so that Snakemake reruns its job (which replaces the file, as
      it does after a settings change that Snakemake sees itself; no copy is kept).
    """
    path = Path(path)
    if not path.exists():
        return None
    problems = shard_problems(path, expect)
    if not problems:
        return None
    what = describe_problems(path, problems)
    if all(p.key in stale_keys for p in problems):
        if not dry_run:
            os.utime(path, (0, 0))
        return "out of date", (f"{what} It was made with other settings: "
                               + ("(dry run: left as it is) " if dry_run else "marked out of date (mtime 1970) ")
                               + "so that its job runs again.")
    if dry_run:
        return "set aside", f"{what} (dry run: left as it is; a real run moves it aside and rebuilds it.)"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.invalid-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.invalid-{stamp}-{n}"), n + 1
    os.replace(path, aside)
    return "set aside", f"{what} Moved aside to {aside.name} (not deleted) so that its job runs again."


class ShardedStore:
    """Read-only view over several shard files of one kind, indexed by image id.

    ``store[id]`` returns ``(keys, cams float32)`` for CAM shards, the ``uint8`` mask for mask shards and the float32
    (9, H, W) Q for Q shards.

    Every file is checked first (:func:`shard_problems`; ``kind`` and ``expect``: the attrs the caller needs), and
    the shards of one folder must agree on kind, split, n_shards and config hash: a shard copied in from another
    split, experiment or configuration is refused with a :class:`DataError` naming it, never read as valid.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], kind: str | None = None,
                 expect: Mapping[str, Any] | None = None):
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        self._index: dict[str, int] = {}
        self.kind = kind
        self.attrs: dict[str, Any] = {}
        try:
            self._open(kind, expect)
        except BaseException:
            self.close()
            raise

    def _open(self, kind: str | None, expect: Mapping[str, Any] | None) -> None:
        for i, p in enumerate(self.paths):
            try:
                fh = h5py.File(p, "r")
            except (OSError, ValueError) as exc:
                if not p.exists():
                    raise DataError(f"HDF5 shard {p} does not exist: rerun snakemake, which makes it") from exc
                raise DataError(f"{describe_problems(p, [_open_problem(p, exc)])} {SHARD_FIX}") from exc
            self._files.append(fh)
            problems = _file_problems(fh, p, {"kind": kind, **dict(expect or {})})
            if problems:
                raise DataError(f"{describe_problems(p, problems)} {SHARD_FIX}")
            got = attr_value(fh.attrs.get("kind"))
            if self.kind is None:
                self.kind = got
            elif got != self.kind:
                raise DataError(f"HDF5 shard {p}: it holds {got!r}, expected {self.kind!r}. {SHARD_FIX}")
            if not self.attrs:
                self.attrs = {k: fh.attrs[k] for k in fh.attrs}
            for image_id in fh.keys():
                self._index[image_id] = i
        self._check_siblings()

    def _check_siblings(self) -> None:
        """The shards of one folder are one set: they must agree on split, n_shards and config hash."""
        by_dir: dict[Path, list[int]] = {}
        for i, p in enumerate(self.paths):
            by_dir.setdefault(p.parent, []).append(i)
        for folder, idx in by_dir.items():
            for key in ("split", "n_shards", "config_hash"):
                values = {i: attr_value(self._files[i].attrs[key]) for i in idx if key in self._files[i].attrs}
                counts = Counter(values.values()).most_common()
                if len(counts) < 2:
                    continue
                if counts[0][1] > counts[1][1]:
                    odd = [i for i, v in values.items() if v != counts[0][0]]
                    raise DataError(f"HDF5 shard {self.paths[odd[0]]}: it holds {key} {values[odd[0]]!r} while the "
                                    f"other shards of {folder} hold {counts[0][0]!r} (a shard of another split, "
                                    f"experiment or configuration). {SHARD_FIX}")
                listed = ", ".join(f"{self.paths[i].name}: {v!r}" for i, v in values.items())
                raise DataError(f"the HDF5 shards of {folder} disagree on {key} ({listed}): some come from another "
                                f"split, experiment or configuration. {SHARD_FIX}")

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
        if self.kind == "q":
            return np.asarray(g["q"][()], dtype=np.float32)
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
