"""Shared test helpers: repo paths, the ../shared data folder, running Snakemake in a scratch folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster and immune to oversubscription on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_images(b: int, h: int, w: int, seed: int = 1):
    """Deterministic (b, 3, h, w) float input."""
    import torch

    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def randomize_bn(model, seed: int = 0) -> None:
    """Give every BatchNorm2d random (but valid) statistics and affine parameters, so BN is not an identity."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (tests on real VOC data need ../shared)")
    return p


def snakemake_cmd(workdir: Path, *args: str, configfile: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += list(args)
    if configfile is not None:  # last: --configfile takes several values and would swallow a target after it
        cmd += ["--configfile", str(configfile)]
    return cmd


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: float = 1800,
                  check: bool = True, env: dict | None = None, new_session: bool = False) -> subprocess.CompletedProcess:
    """Run Snakemake on the repo's Snakefile with ``workdir`` as working directory; returns the process.
    ``env``: extra environment variables; ``new_session``: run it as its own process group (a job that SIGKILLs its
    group, ``WSSS_FAULT=...!group``, then kills Snakemake and not the test)."""
    t0 = time.time()
    proc = subprocess.run(snakemake_cmd(workdir, *args, configfile=configfile), cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          start_new_session=new_session)
    proc.elapsed = time.time() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def start_snakemake(workdir: Path, *args: str, configfile: Path | None = None, output: Path | None = None,
                    env: dict | None = None) -> subprocess.Popen:
    """Start Snakemake in the background as its own process group, so that a test can SIGKILL it together with its
    running jobs (:func:`kill_group`); its stdout and stderr go to ``output`` (or nowhere)."""
    out = open(output, "w") if output is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(snakemake_cmd(workdir, *args, configfile=configfile), cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    finally:
        if output is not None:
            out.close()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by :func:`start_snakemake` and everything in its process group (its jobs)."""
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM cluster (slurmctld, slurmd, munged) for the session, all state in a temp folder;
    skips with the reason when it cannot be started (not root, binaries missing, daemons not up in time).
    See tests/slurm_cluster.py. The daemons are stopped (by pid) at the end of the session."""
    import shutil
    import tempfile

    from slurm_cluster import SlurmCluster, SlurmUnavailable, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # a short root: munge's socket path must stay well under the 108-byte limit of a unix socket name
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="wsss-slurm-"))
    try:
        cluster.start(timeout=float(os.environ.get("WSSS_SLURM_START_TIMEOUT", "60")))
    except SlurmUnavailable as e:
        shutil.rmtree(cluster.root, ignore_errors=True)
        pytest.skip(f"SLURM test cluster did not start: {str(e)[:2000]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)



def make_tiny_data(n: int, seed: int, flip: bool = False):
    """A torch Dataset of fixed tensors plus augmentation seeded by (seed, epoch, index), like the real datasets
    (trainer and DDP tests). item: ``{"x": (1, 6, 6), "y": (2,), "index": i}``; ``flip``: a seeded h-flip too."""
    import numpy as np
    import torch

    from wsss_core.data.datasets import _Seeded

    class TinyData(_Seeded, torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(123)
            self.x = torch.randn(n, 1, 6, 6, generator=g)
            self.y = torch.randn(n, 2, generator=g)
            self.seed = seed

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            rng = self.rng(i)
            x = self.x[i] + torch.from_numpy(rng.normal(0.0, 0.2, size=(1, 6, 6)).astype(np.float32))
            if flip and rng.random() < 0.5:
                x = x.flip(-1)
            return {"x": x, "y": self.y[i], "index": i}

    return TinyData()


def tiny_cam_classifier(tmp_path: Path, **overrides) -> tuple[str, dict]:
    """A prepared tiny toy dataset (8 + 4 + 4 images of 48 px, 3 classes) under ``tmp_path / "prepared"`` and the
    classifier stage settings of a tiny ResNet-50-shaped CAM net (one block per layer, width 4, OS 16) training
    2 steps on 32 px crops; ``overrides`` update the settings. Returns (prepared folder, settings)."""
    from wsss_core.data.prepare import prepare_dataset
    from wsss_core.data.toy import make_toy_dataset

    make_toy_dataset(tmp_path / "toy", seed=3, image_size=48, n_train_aug=8, n_train=4, n_val=4, n_classes=3)
    prepare_dataset({"kind": "toy", "root": str(tmp_path / "toy")}, "toy", tmp_path / "prepared")
    cfg = {"backbone": {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 4, "output_stride": 16,
                        "weights": None},
           "batch_size": 4, "crop_size": 32, "resize_long": [40, 56], "max_steps": 2, "lr": 0.01,
           "head_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9, "checkpoint_every": 2,
           "num_workers": 0, **overrides}
    return str(tmp_path / "prepared"), cfg
