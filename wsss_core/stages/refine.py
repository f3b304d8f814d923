"""Stage: CAMs -> pseudo-masks with the chosen background threshold and a dense CRF (pydensecrf2)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..data.io import read_image
from ..data.prepare import DatasetInfo
from ..engine.logs import progress, setup_job_logging
from ..errors import DataError
from ..refine.crf import bg_power, crf_params, crf_refine_cams
from ..store.atomic import read_json
from ..store.shards import ShardedStore, ShardWriter, shard_ids
from .job import Files, JobSettings

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
    elif bg is None:
        raise DataError(f"{image_id}: the CAMs have no background map and no bg threshold is available; set "
                        "crf.bg_threshold to a number")
    if w["params"] is None:  # refine: none
        return image_id, threshold_labels(cams, keys, bg)
    return image_id, crf_refine_cams(image, cams, keys, bg, w["params"], n_classes=w["info"].n_classes)


def threshold_labels(cams: np.ndarray, keys: Sequence[int], bg: float | np.ndarray) -> np.ndarray:
    """Hard labels without a CRF: argmax over [bg, cams] (a tie goes to the background, as SP-CAM / MSA set the
    background channel to the threshold and take the argmax, CHENDL-SHEN/ESC ``evaluator.py``).

    cams (K, H, W), keys (K,) class labels, bg a number or an (H, W) map -> uint8 (H, W)."""
    bgmap = np.broadcast_to(np.asarray(bg, np.float32), cams.shape[1:])
    scores = np.concatenate([bgmap[None], cams]) if len(cams) else bgmap[None]
    return np.asarray([0, *keys], np.uint8)[scores.argmax(0)]


def resolve_bg_threshold(cfg: Mapping[str, Any], cam_eval: str | None,
                         key: str = "crf.bg_threshold") -> tuple[float | tuple[str, float] | None, str]:
    """The background score for CAMs without a background map, and where it came from (shared by the CRF,
    AffinityNet and IRN stages; ``key`` names the setting in messages).

    ``("alpha", a)`` when ``cfg['bg_alpha']`` is set (bg = (1 - max_k cam_k) ** a, the ``crf_{t}_{alpha}`` dicts of
    PSA/PPC/FSAE); a number from ``cfg['bg_threshold']``; for "auto" the threshold chosen by eval_cams (the JSON
    ``cam_eval``), or None when there is no such file or eval_cams found CAMs with their own background map (then
    no threshold exists, and only an image without a bg map is an error)."""
    if cfg.get("bg_alpha") is not None:
        return ("alpha", float(cfg["bg_alpha"])), f"bg = (1 - max cam) ** {cfg['bg_alpha']} (crf.bg_alpha)"
    t = cfg.get("bg_threshold", "auto")
    if t != "auto":
        return float(t), f"set in config ({key})"
    if not cam_eval:
        return None, "auto, but no eval_cams result given"
    th = read_json(cam_eval)["threshold"]
    if th.get("own_bg"):
        return None, f"not needed: eval_cams found CAMs with their own background map ({cam_eval})"
    return float(th["value"]), f"chosen by eval_cams on split {th['source']['split']!r} ({cam_eval})"


@contextlib.contextmanager
def map_images(fn: Callable[[str], Any], ids: Sequence[str], n_workers: int, init: Callable[..., None],
               initargs: tuple, cleanup: Callable[[], None] | None = None) -> Iterator[Iterable[Any]]:
    """``fn`` over ``ids`` in order: in this process (``init(*initargs)`` first, ``cleanup()`` at exit) when
    ``n_workers`` is 1, else in a pool of ``n_workers`` processes each initialised by ``init`` (chunks of 8)."""
    with contextlib.ExitStack() as stack:
        if n_workers <= 1:
            init(*initargs)
            if cleanup is not None:
                stack.callback(cleanup)
            yield map(fn, ids)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(n_workers, initializer=init, initargs=initargs))
            yield pool.map(fn, ids, chunksize=8)


def refine_crf(job: JobSettings, inp: Files, out: Files, crf: bool = True) -> None:
    """Pseudo-masks of one shard of the ``train`` split (uint8 HDF5 shard ``out.masks``, values 0..C-1) from the CAM
    shards ``inp.cams`` and the background threshold of ``inp.cam_eval``: a dense CRF, or (``crf=False``,
    :func:`threshold_masks`) the thresholded CAMs themselves."""
    label_maps(job, job.cfg, inp.cams, inp.cam_eval, out.masks, job.split("train"), crf)


def label_maps(job: JobSettings, cfg: Mapping[str, Any], cam_shards: Sequence[str], cam_eval: str | None,
               out_path: str, split: str, crf: bool = True) -> None:
    """One shard (``job.shard`` of ``job.n_shards``) of ``split``'s label maps from the score maps of
    ``cam_shards`` and the background of ``cfg`` (``bg_threshold`` / ``bg_alpha``; "auto": chosen in
    ``cam_eval``): a dense CRF (``cfg``: ``preset``, ``params``, ``n_workers``) or, without ``crf``, the thresholded
    maps, into ``out_path``."""
    logger = setup_job_logging(job.log)
    shard, n_shards = job.shard, job.n_shards
    info = DatasetInfo(job.prepared)
    params = crf_params(cfg.get("preset", "seam_label"), **dict(cfg.get("params") or {})) if crf else None
    bg, source = resolve_bg_threshold(cfg, cam_eval)
    ids = shard_ids(info.ids(split), shard, n_shards)
    logger.info("%s on %d images, bg %s (%s)", f"CRF {params}" if crf else "threshold (no CRF)", len(ids), bg,
                source)
    attrs = {"split": split, "shard": shard, "n_shards": n_shards, "config_hash": job.config_hash,
             "crf": repr(params) if crf else "none", "bg_threshold_source": source}
    if isinstance(bg, tuple):
        attrs["bg_alpha"] = bg[1]
    elif bg is not None:
        attrs["bg_threshold"] = bg
    n_workers = max(1, min(int(cfg.get("n_workers", 1)), job.threads))
    with contextlib.ExitStack() as stack:
        results = stack.enter_context(map_images(_refine_one, ids, n_workers, _init_worker,
                                                 (cam_shards, job.prepared, params, bg),
                                                 lambda: _WORKER["store"].close()))
        writer = stack.enter_context(ShardWriter(out_path, "masks", attrs))
        for image_id, mask in progress(results, total=len(ids), desc=f"{'crf' if crf else 'masks'} "
                                                                        f"{shard + 1}/{n_shards}"):
            writer.add_mask(image_id, mask)
    logger.info("wrote %d label maps of %s to %s", len(ids), split, out_path)


def threshold_masks(job: JobSettings, inp: Files, out: Files) -> None:
    """Pseudo-masks of ``refine: none`` (SP-CAM, MSA): the CAMs with the chosen background threshold, no CRF."""
    refine_crf(job, inp, out, crf=False)
