"""A method added from outside (module + registration + config, no rule edited) runs through the toy DAG's
classifier -> CAM -> eval jobs, in an interpreter where wsss_core is not installed (slow: a pipeline run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from conftest import REPO, write_yaml

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A throwaway method: the baseline CAM network under another name, with a loss term of its own."""
import torch

from wsss_core.methods import cam
from wsss_core.methods.registry import register_method


@register_method("tinymethod")
def build_model(cfg, n_classes, cache_dir="weights"):
    return cam.build_model(cfg, n_classes, cache_dir=cache_dir)


param_groups = cam.param_groups
cam_forward = cam.cam_forward


def training_step(model, batch, step, cfg):
    out = cam.training_step(model, batch, step, cfg)
    return {**out, "tiny_marker": torch.ones(())}
'''


def _interpreter_without_wsss_core(root: Path) -> Path:
    """A fresh venv whose only packages are this one's (a path line to its site-packages: its ``.pth`` files, among
    them the editable install of wsss_core, are not read), so torch and snakemake import and wsss_core does not."""
    venv.EnvBuilder(with_pip=False).create(root)
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (next(root.glob("lib/python3*/site-packages")) / "deps.pth").write_text(site + "\n")
    return root / "bin" / "python"


def test_plugin_method_runs_through_classifier_cams_and_eval_without_installed_wsss_core(tmp_path):
    py = _interpreter_without_wsss_core(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(py), "-c", "import snakemake, torch; import wsss_core"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert "No module named 'wsss_core'" in probe.stderr, probe.stderr  # really not installed there
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tiny_method.py").write_text(textwrap.dedent(PLUGIN))
    cfg = write_yaml(tmp_path / "tiny.yaml", {
        "method_plugins": ["tiny_method"],
        "datasets": {"toy": {"generator": {"n_train_aug": 12, "n_train": 8, "n_val": 8, "image_size": 64},
                             "stages": {"classifier": {"max_steps": 4, "checkpoint_every": 2, "batch_size": 4,
                                                       "crop_size": 64, "resize_long": [56, 72]},
                                        "cams": {"scales": [1.0], "n_shards": 1}}}},
        "experiments": {"tiny": {"method": "tinymethod", "label": "Tiny"}},
        "suites": {"tiny": {"experiments": ["tiny"]}},
    })
    target = "results/toy/tiny/eval/cams.json"
    proc = subprocess.run([str(py), "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "2", target, "--configfile", str(cfg)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(plugins)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ev = json.loads((tmp_path / target).read_text())
    assert 0.0 <= ev["scores"]["val"]["miou"] <= 1.0 and ev["threshold"]["source"]["split"] == "train"
    metrics = tmp_path / "results/toy/tiny/classifier/state/metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["tiny_marker"] == 1.0 for r in rows)
    assert "rule train_classifier" in proc.stdout + proc.stderr and "rule infer_cams" in proc.stdout + proc.stderr
