"""Configuration helpers shared by the Snakefile and the library: merging, per-stage views, hashing."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

STAGES = ("classifier", "cams", "eval", "crf", "affinity", "irn", "segmentation")


def url_file_name(url: str) -> str:
    """The file name a ``{url: ...}`` weights spec is cached under: the URL path's last component."""
    from pathlib import PurePosixPath
    from urllib.parse import urlparse

    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise ValueError(f"weights url {url!r} has no file name")
    return name


#: keys whose value replaces the base's as a whole: a weights spec ({path}, {torchvision}, {url}) names one source
ATOMIC_KEYS = frozenset({"weights"})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces; the dicts under
    :data:`ATOMIC_KEYS` replace too, so an experiment's ``{url: ...}`` weights do not inherit a ``torchvision``)."""
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if key not in ATOMIC_KEYS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(config: Mapping[str, Any], dataset: str, experiment: str | None, stage: str) -> dict[str, Any]:
    """Effective settings of ``stage`` for ``dataset`` and ``experiment``.

    ``stages.<stage>`` <- ``datasets.<dataset>.stages.<stage>`` <- ``experiments.<experiment>.stages.<stage>``
    <- ``experiments.<experiment>.datasets.<dataset>.stages.<stage>`` (e.g. a narrow ResNet-38 for the toy data).
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}")
    cfg = dict(config["stages"][stage])
    cfg = deep_merge(cfg, config["datasets"][dataset].get("stages", {}).get(stage))
    if experiment is not None:
        exp = config["experiments"][experiment]
        cfg = deep_merge(cfg, exp.get("stages", {}).get(stage))
        cfg = deep_merge(cfg, (exp.get("datasets") or {}).get(dataset, {}).get("stages", {}).get(stage))
    return cfg


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
