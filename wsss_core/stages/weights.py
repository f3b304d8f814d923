"""Stage: download pretrained weights (torchvision-named, or a published URL; hash-checked) into the weights cache."""

from __future__ import annotations

from ..engine.logs import setup_job_logging
from ..models.weights import download_weights, fetch_torchvision_weights
from .job import Files, JobSettings


def fetch(job: JobSettings, inp: Files, out: Files) -> None:
    """Torchvision weights ``wildcards.name``, or the file at ``extra.url`` when given, to ``out.weights``."""
    logger = setup_job_logging(job.log)
    name, url = job.wildcards["name"], job.extra.get("url")
    if url:
        download_weights(url, out.weights, name)
    else:
        fetch_torchvision_weights(name, out.weights)
    logger.info("downloaded %s to %s", url or name, out.weights)
