"""Stages: generate the toy dataset; prepare lists, labels and manifest of any dataset."""

from __future__ import annotations

from pathlib import Path

from ..data.prepare import prepare_dataset
from ..data.toy import make_toy_dataset
from ..engine.logs import setup_job_logging
from .job import Files, JobSettings


def make_toy(job: JobSettings, inp: Files, out: Files) -> dict:
    """Generate the toy dataset (``extra.generator``: generator settings) into ``out.root``."""
    logger = setup_job_logging(job.log)
    summary = make_toy_dataset(out.root, **dict(job.extra["generator"]))
    logger.info("toy dataset written to %s: %s", out.root, summary)
    return summary


def prepare(job: JobSettings, inp: Files, out: Files) -> dict:
    """Lists, image-level labels and manifest of dataset ``extra.ds`` into the folder of ``out.manifest``."""
    logger = setup_job_logging(job.log)
    manifest = prepare_dataset(job.extra["ds"], job.dataset, str(Path(out.manifest).parent), n_workers=job.threads)
    logger.info("prepared %s: splits %s, labels from %s", job.dataset, manifest["splits"], manifest["label_source"])
    return manifest


def make_saliency(job: JobSettings, inp: Files, out: Files) -> None:
    """Saliency stage: stand-in maps for the toy dataset, a verified folder of precomputed maps otherwise."""
    from ..data.saliency import saliency_manifest

    logger = setup_job_logging(job.log)
    man = saliency_manifest(job.extra["ds"], job.prepared, [job.split("train")], out.manifest, job.seed)
    logger.info("saliency (%s): %d maps in %s", man["kind"], man["n_maps"], man["dir"])
