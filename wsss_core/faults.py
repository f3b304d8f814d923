"""Deterministic fault injection, a test hook (``tests/test_faults.py``): SIGKILL a job at a named point.

Without the environment variable ``WSSS_FAULT`` (the normal case) :func:`fault_point` returns at once (one dict
lookup). With it set, the process that reaches the named point kills itself (or its whole process group) with
SIGKILL: no ``finally`` block, ``atexit`` handler or Python clean-up runs, exactly as when the OOM killer, a
scheduler's time limit or a power cut ends a job.

``WSSS_FAULT`` = ``<point>:<n>[@<where>][!group]`` (several, comma-separated):

- ``<point>:<n>``: the ``n``-th time (1-based index given by the caller) that ``<point>`` is reached;
- ``@<where>``: only where the caller's ``where`` (a path) contains this text, e.g. ``@cams/val/1-of-3.h5``;
- ``!group``: SIGKILL the whole process group instead of this process (a Snakemake run started as its own process
  group, which its local jobs share: Snakemake itself dies together with the job, mid-write).

Points: ``train_step`` (after training step n and its checkpoint, where = the checkpoint folder),
``shard_item`` (after the n-th image is added to an HDF5 shard, still under its temporary name; where = the
shard's final path), ``report_write`` (after the n-th output file of the report is written; where = that file).
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "WSSS_FAULT"


def parse(spec: str) -> list[tuple[str, int, str, bool]]:
    """``WSSS_FAULT`` -> [(point, n, where, group)]; raises ValueError on a malformed entry."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        rest, group = (item[:-len("!group")], True) if item.endswith("!group") else (item, False)
        rest, _, where = rest.partition("@")
        point, sep, n = rest.partition(":")
        if not point or not sep or not n.strip().isdigit():
            raise ValueError(f"{ENV}: {item!r} is not <point>:<n>[@<where>][!group]")
        out.append((point.strip(), int(n), where, group))
    return out


def fault_point(point: str, n: int, where: str | os.PathLike = "") -> None:
    """SIGKILL this process (or its group) if ``WSSS_FAULT`` names ``point`` at ``n`` (and ``where``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for p, k, w, group in parse(spec):
        if p == point and k == n and w in str(where):
            target = "process group" if group else "process"
            sys.stderr.write(f"{ENV}={spec}: SIGKILL of this {target} (pid {os.getpid()}) at {point} {n} "
                             f"{where}\n")
            sys.stderr.flush()
            if group:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
