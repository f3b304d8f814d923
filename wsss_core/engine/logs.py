"""Per-job logging: everything a job prints goes to its Snakemake log file (and the console when interactive)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "wsss"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_job_logging(log_path: str | os.PathLike | None, level: int = logging.INFO, tag: str = "") -> logging.Logger:
    """Send the ``wsss`` logger, stdout/stderr (progress bars, warnings) and tracebacks to ``log_path``.

    ``tag`` prefixes every message (e.g. ``[rank 1/2]`` in a multi-process job, whose ranks share the log)."""
    logger = get_logger()
    logger.setLevel(level)
    logger.handlers.clear()
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s" if tag else "%(asctime)s %(levelname)s %(message)s",
                            "%Y-%m-%d %H:%M:%S")
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1, encoding="utf-8")
        sys.stdout = stream
        sys.stderr = stream
        handler = logging.StreamHandler(stream)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    logging.captureWarnings(True)
    return logger


def progress(iterable=None, total=None, desc: str = "", **kw):
    """A tqdm progress bar that suits log files (updates every 10 s at most)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, mininterval=10.0, dynamic_ncols=False, ascii=True,
                file=sys.stderr, **kw)
