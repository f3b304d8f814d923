"""Stage: download torchvision-named pretrained weights (hash-checked) into the weights cache."""

from __future__ import annotations

from ..engine.logs import setup_job_logging
from ..models.weights import fetch_torchvision_weights


def fetch(name: str, dest: str, log: str | None = None) -> None:
    logger = setup_job_logging(log)
    fetch_torchvision_weights(name, dest)
    logger.info("downloaded %s to %s", name, dest)
