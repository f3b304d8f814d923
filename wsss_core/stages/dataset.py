"""Stages: generate the toy dataset; prepare lists, labels and manifest of any dataset."""

from __future__ import annotations

from typing import Any, Mapping

from ..data.prepare import prepare_dataset
from ..data.toy import make_toy_dataset
from ..engine.logs import setup_job_logging
from ..errors import bad_input_ends_job


def make_toy(out_dir: str, generator: Mapping[str, Any], log: str | None = None) -> dict:
    logger = setup_job_logging(log)
    summary = make_toy_dataset(out_dir, **dict(generator))
    logger.info("toy dataset written to %s: %s", out_dir, summary)
    return summary


def prepare(ds: Mapping[str, Any], name: str, out_dir: str, log: str | None = None, threads: int = 1) -> dict:
    logger = setup_job_logging(log)
    with bad_input_ends_job(logger, in_job=log is not None):
        manifest = prepare_dataset(ds, name, out_dir, n_workers=threads)
    logger.info("prepared %s: splits %s, labels from %s", name, manifest["splits"], manifest["label_source"])
    return manifest


def make_saliency(dataset_cfg: dict, prepared: str, splits: list[str], out: str, seed: int = 0,
                  log: str | None = None) -> None:
    """Saliency stage: stand-in maps for the toy dataset, a verified folder of precomputed maps otherwise."""
    from ..data.saliency import saliency_manifest

    logger = setup_job_logging(log)
    with bad_input_ends_job(logger, in_job=log is not None):
        man = saliency_manifest(dataset_cfg, prepared, splits, out, seed)
    logger.info("saliency (%s): %d maps in %s", man["kind"], man["n_maps"], man["dir"])
