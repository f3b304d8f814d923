"""Stage: download pretrained weights (torchvision-named, or a published URL; hash-checked) into the weights cache."""

from __future__ import annotations

from ..engine.logs import setup_job_logging
from ..models.weights import download_weights, fetch_torchvision_weights


def fetch(name: str, dest: str, log: str | None = None, url: str | None = None) -> None:
    """Torchvision weights ``name``, or the file at ``url`` when given, to ``dest``."""
    logger = setup_job_logging(log)
    if url:
        download_weights(url, dest, name)
    else:
        fetch_torchvision_weights(name, dest)
    logger.info("downloaded %s to %s", url or name, dest)
