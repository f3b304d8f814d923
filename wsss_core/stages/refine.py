"""Stage: CAMs -> pseudo-masks with the chosen background threshold and a dense CRF (pydensecrf2)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.io import read_image
from ..data.prepare import DatasetInfo
from ..engine.logs import progress, setup_job_logging
from ..refine.crf import bg_power, crf_params, crf_refine_cams
from ..store.atomic import read_json
from ..store.shards import ShardedStore, ShardWriter, shard_ids

_WORKER: dict[str, Any] = {}


def _init_worker(cam_shards, prepared, params, bg) -> None:
    _WORKER.update(store=ShardedStore(cam_shards), info=DatasetInfo(prepared), params=params, bg=bg)


def _refine_one(image_id: str) -> tuple[str, np.ndarray]:
    w = _WORKER
    keys, cams = w["store"][image_id]
    image = read_image(w["info"].image_path(image_id))
    bg = w["bg"]
    if keys.size and keys[0] == 0:  # the CAMs carry their own background map (SIPE / SFC): use it
        bg, cams, keys = cams[0], cams[1:], keys[1:]
    elif isinstance(bg, tuple):  # ("alpha", a): PSA-style (1 - max_k cam_k) ** a
        bg = bg_power(cams, bg[1])
    return image_id, crf_refine_cams(image, cams, keys, bg, w["params"])


def resolve_bg_threshold(cfg: Mapping[str, Any], cam_eval: str | None) -> tuple[float | tuple[str, float], str]:
    """The background score for the CRF and where it came from: a threshold, or ``("alpha", a)`` when
    ``crf.bg_alpha`` is set (bg = (1 - max_k cam_k) ** a, the ``crf_{t}_{alpha}`` dicts of PSA/PPC/FSAE)."""
    if cfg.get("bg_alpha") is not None:
        return ("alpha", float(cfg["bg_alpha"])), f"bg = (1 - max cam) ** {cfg['bg_alpha']} (crf.bg_alpha)"
    if cfg.get("bg_threshold", "auto") == "auto":
        ev = read_json(cam_eval)
        t = ev["threshold"]
        return float(t["value"]), f"chosen by eval_cams on split {t['source']['split']!r} ({cam_eval})"
    return float(cfg["bg_threshold"]), "set in config (crf.bg_threshold)"


def refine_crf(prepared: str, cam_shards: Sequence[str], split: str, shard: int, n_shards: int,
               cfg: Mapping[str, Any], cam_eval: str, out: str, config_hash: str = "", log: str | None = None,
               threads: int = 1) -> None:
    """Pseudo-masks of one shard of ``split`` (uint8 HDF5 shard, values 0..C-1)."""
    logger = setup_job_logging(log)
    info = DatasetInfo(prepared)
    params = crf_params(cfg.get("preset", "seam_label"), **dict(cfg.get("params") or {}))
    bg, source = resolve_bg_threshold(cfg, cam_eval)
    ids = shard_ids(info.ids(split), shard, n_shards)
    logger.info("CRF %s on %d images, bg %s (%s)", params, len(ids), bg, source)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": config_hash,
             "crf": repr(params), "bg_threshold_source": source}
    if isinstance(bg, tuple):
        attrs["bg_alpha"] = bg[1]
    else:
        attrs["bg_threshold"] = bg
    n_workers = max(1, min(int(cfg.get("n_workers", 1)), threads))
    with contextlib.ExitStack() as stack:
        if n_workers == 1:
            _init_worker(cam_shards, prepared, params, bg)
            stack.callback(_WORKER["store"].close)
            results = map(_refine_one, ids)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(n_workers, initializer=_init_worker,
                                                           initargs=(cam_shards, prepared, params, bg)))
            results = pool.map(_refine_one, ids, chunksize=8)
        writer = stack.enter_context(ShardWriter(out, "masks", attrs))
        for image_id, mask in progress(results, total=len(ids), desc=f"crf {shard + 1}/{n_shards}"):
            writer.add_mask(image_id, mask)
    logger.info("wrote %d pseudo-masks to %s", len(ids), out)
