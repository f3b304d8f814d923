"""What every pipeline job is told, in one object, and the one adapter that builds it from Snakemake's.

A rule passes its settings as one parameter (``params: job=...``, built by ``rules/common.smk::job_params``); its
workflow script is one call, ``run_job(snakemake, "<stage function>")``, which builds :class:`JobSettings` and
calls ``fn(job, inputs, outputs)``. Stage functions take nothing else, so tests call them with a
:class:`JobSettings` of their own and :class:`Files` of paths.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

#: stage function of each workflow script: name -> "module:function" (imported when the job runs)
STAGE_FUNCTIONS = {
    "make_toy": "dataset:make_toy",
    "prepare": "dataset:prepare",
    "coco_masks": "dataset:coco_masks",
    "saliency": "dataset:make_saliency",
    "fetch_weights": "weights:fetch",
    "train_scn": "superpixels:train_scn",
    "eval_superpixels": "superpixels:eval_superpixels",
    "rw_grid": "superpixels:rw_grid",
    "superpixels": "superpixels:superpixel_maps",
    "train_classifier": "classifier:train_classifier",
    "infer_cams": "classifier:infer_cams",
    "eval_cams": "evaluate:eval_cams",
    "infer_single_stage": "single_stage:infer_single_stage",
    "single_stage_crf": "single_stage:single_stage_crf",
    "eval_masks": "evaluate:eval_masks",
    "refine_crf": "refine:refine_crf",
    "threshold_masks": "refine:threshold_masks",
    "train_affinity": "affinity:train_affinity",
    "random_walk": "affinity:random_walk_masks",
    "cam_to_ir_label": "irn:cam_to_ir_label",
    "train_irn": "irn:train_irn",
    "make_sem_seg_labels": "irn:make_sem_seg_labels",
    "eval_ir_labels": "irn:eval_ir_labels",
    "train_segmentation": "segmentation:train_segmentation",
    "infer_segmentation": "segmentation:infer_segmentation",
    "test_submission": "segmentation:make_test_submission",
    "report": "report:report",
    "import_cams": "exchange:import_cams",
    "import_masks": "exchange:import_masks",
    "export": "exchange:export_run",
}


class Files(dict):
    """A job's named input or output paths (a path, or a list of paths), readable as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no file named {name!r} (have: {sorted(self)})") from None

    @classmethod
    def of(cls, named: Any) -> "Files":
        """From a Snakemake ``input`` / ``output`` (named entries; a list entry stays a list of str)."""
        return cls({k: v if isinstance(v, str) else [str(p) for p in v] for k, v in named.items()})


@dataclass
class JobSettings:
    """Settings of one job: where its dataset is, the stage settings, the config hash stamped into its outputs,
    and how it runs (seed, device, GPU lease folder, weights cache, log, threads).

    ``splits``: the dataset's split roles (train, threshold, mask_eval, eval, test) -> split names;
    ``wildcards``: the job's wildcards (``split``, ``shard``, ``nshards``, ...); ``extra``: rule-specific values
    (e.g. the report's experiments and labels)."""

    dataset: str | None = None
    experiment: str | None = None
    prepared: str | None = None
    method: str | None = None
    cfg: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    splits: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    lock_dir: str = ".wsss/gpu-locks"
    weights_dir: str = "weights"
    method_plugins: list[str] = field(default_factory=list)
    log: str | None = None
    threads: int = 1
    wildcards: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, role: str) -> str:
        """The split name of a role (``train``, ``eval``, ...)."""
        try:
            return self.splits[role]
        except KeyError:
            raise KeyError(f"dataset {self.dataset!r} has no split role {role!r} (roles: {sorted(self.splits)})") \
                from None

    @property
    def shard(self) -> int:
        return int(self.wildcards["shard"])

    @property
    def n_shards(self) -> int:
        return int(self.wildcards["nshards"])

    def start(self, n_gpus: int = 0):
        """Start the job: logging into its log file, threads, seeds, device (a GPU lease when ``n_gpus`` > 0);
        returns :class:`wsss_core.engine.context.Job`."""
        from ..engine.context import start_job

        return start_job(self.log, self.threads, self.seed, self.device, n_gpus=n_gpus, lock_dir=self.lock_dir)

    def replace(self, **changes: Any) -> "JobSettings":
        return JobSettings(**{**asdict(self), **changes})


def stage_function(name: str) -> Callable[..., Any]:
    module, fn = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def runtime_settings(config: Mapping[str, Any], experiment: str | None = None) -> dict[str, Any]:
    """How a job runs, from the workflow config (not from its params, so that changing it reruns nothing that is
    done; the seed reaches every output through the config hashes). The seed is the experiment's
    (:func:`wsss_core.config.experiment_seed`: a ``-seed<N>`` variant's N, else the workflow seed)."""
    from ..config import experiment_seed

    defaults = JobSettings()
    seed = int(config.get("seed", defaults.seed)) if experiment is None or "experiments" not in config \
        else experiment_seed(config, experiment)
    return {"seed": seed, "device": config.get("device", defaults.device),
            "lock_dir": config.get("gpu_lock_dir", defaults.lock_dir),
            "weights_dir": config.get("weights_dir", defaults.weights_dir),
            "method_plugins": list(config.get("method_plugins") or [])}


def settings_from_snakemake(smk: Any) -> JobSettings:
    """The adapter: ``params.job`` (the :class:`JobSettings` fields that decide the outputs) + the workflow
    config's :func:`runtime_settings` + log, threads and wildcards."""
    p: Mapping[str, Any] = dict(smk.params.get("job") or {})
    return JobSettings(**p, **runtime_settings(smk.config, p.get("experiment")),
                       log=smk.log[0] if len(smk.log) else None,
                       threads=int(smk.threads), wildcards={k: str(v) for k, v in smk.wildcards.items()})


def run_job(smk: Any, name: str) -> None:
    """Run stage function ``name`` (:data:`STAGE_FUNCTIONS`) for the Snakemake job ``smk``: bad input (a
    :class:`~wsss_core.errors.WsssError`) ends the job with its one-line message in the log."""
    from ..engine.logs import get_logger
    from ..errors import bad_input_ends_job
    from ..methods import load_plugins

    job = settings_from_snakemake(smk)
    # the stage function opens the job's log (setup_job_logging / job.start); the error line goes to the same logger
    with bad_input_ends_job(get_logger()):
        load_plugins(job.method_plugins)
        stage_function(name)(job, Files.of(smk.input), Files.of(smk.output))
