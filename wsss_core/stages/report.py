"""Stage: the per-suite report (Markdown + JSON + four PNG plots) comparing the experiments of a suite.

:func:`report` (the job's entry point) runs three steps:

- :func:`collect` reads every input into one :class:`ReportInputs`: the eval JSONs (CAM seeds, pseudo-masks,
  segmentation, IRN's confident labels), the attributes of the HDF5 shards (their split is checked), the final
  weights' ``meta`` and the training metrics (``<model dir>/state/metrics.jsonl``), the saliency manifests, the
  images / ground truth / CAMs / masks / predictions shown in the qualitative grid, the ground-truth class counts of
  the all-background baseline, and the environment (versions, git state, host, date);
- :func:`build` computes the report dict, the Markdown and the PNG figures, in memory, with no I/O;
- :func:`write` writes the outputs, each atomically, ``report.md`` (the rule's main target) last.

The inputs come grouped by experiment (``job.extra["files"]``), so nothing is inferred from folder names; how an
experiment's pseudo-masks were refined is its setting ``refine``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from ..data.io import colorize, read_image, read_label_png
from ..data.prepare import DatasetInfo
from ..engine.logs import get_logger, setup_job_logging
from ..errors import DataError
from ..faults import fault_point
from ..metrics import ConfusionMatrix, cam_to_labels
from ..report import build as rb
from ..store.atomic import atomic_path, read_json, write_text
from ..store.shards import ShardedStore
from .job import Files, JobSettings

#: The final loss of the training summary is also given as the mean over this many last logged steps.
TRAINING_WINDOW = 50
#: Images of the qualitative grid: eval-split images (CAMs, predictions) and training images (pseudo-masks).
N_EXAMPLES, N_TRAIN_EXAMPLES = 6, 2

STAGES = ("cam", "pseudo_mask", "segmentation")
#: An experiment's ``refine`` setting -> how its pseudo-masks were made (the refinement table's column).
REFINEMENTS = {"crf": "dense CRF", "affinity": "AffinityNet random walk", "irn": "IRN random walk",
               "none": "none (thresholded CAMs)",
               "single_stage": "dense CRF of the method's own segmentation output",
               "ir_labels": "CRF labels of cam_to_ir_label (no IRN walk)"}
NETWORKS = (("classifier", "classifier"), ("segmentation", "segmentation"))  # (training key, files key)


# ============================================================================================ inputs

def _as_list(x: Any) -> list[str]:
    """A path or a list of paths (None: none) as a list of str."""
    if x is None:
        return []
    if isinstance(x, (str, os.PathLike)):
        return [str(x)]
    return [str(p) for p in x]


def _shard_attrs(path: str) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as fh:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise DataError(f"cannot open HDF5 shard {path}: {exc}. Delete it and rerun the rule that makes it.") from exc


def _check_split(paths: Sequence[str], split: str, what: str) -> list[dict[str, Any]]:
    attrs = [_shard_attrs(p) for p in paths]
    for p, a in zip(paths, attrs):
        got = a.get("split")
        if got is not None and str(got) != split:
            raise DataError(f"{what} shard {p} holds split {got!r}, expected {split!r}")
    return attrs


def _read_eval(path: str, what: str) -> dict:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {what} evaluation {path}: {exc}; rerun the rule that makes it") from exc


def read_metrics(path: str | os.PathLike) -> dict[str, Any] | None:
    """Training curve from a JSON-lines metrics file, or None if it does not exist.

    A step logged more than once (the run resumed from a checkpoint) keeps its last entry; an unreadable line
    (a torn final line of a killed run) is skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        return None
    by_step: dict[int, dict] = {}
    repeated = bad = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                step = int(obj["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                continue
            if step in by_step:
                repeated += 1
            by_step[step] = obj
    steps = sorted(by_step)
    loss = [by_step[s].get("loss") for s in steps]
    return {"path": str(path), "step": steps, "loss": [None if v is None else float(v) for v in loss],
            "repeated_steps": repeated, "bad_lines": bad}


def _load_meta(path: str, logger) -> tuple[dict | None, str | None]:
    """(meta dict, error) of a final weights file; (None, None) when it does not exist."""
    if not path or not Path(path).is_file():
        return None, None
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt.get("meta") if isinstance(ckpt, Mapping) else None
        return dict(meta or {}), None
    except Exception as exc:  # a report must not die on an unreadable weights file; it says so instead
        logger.warning("cannot read weights %s: %s", path, exc)
        return None, f"{type(exc).__name__}: {exc}"


def read_training(model_path: str, logger) -> dict[str, Any]:
    """What the report reads of one trained network: its final weights' ``meta`` (None when missing or unreadable,
    then ``error`` says why) and its metrics curve (``state/metrics.jsonl`` beside the weights; None when missing)."""
    metrics_path = Path(model_path).parent / "state" / "metrics.jsonl" if model_path else None
    meta, err = _load_meta(model_path, logger)
    curve = read_metrics(metrics_path) if metrics_path else None
    return {"model_path": model_path, "model_exists": bool(model_path) and Path(model_path).is_file(), "meta": meta,
            "error": err, "metrics_path": metrics_path, "curve": curve}


def training_summary(run: Mapping[str, Any], window: int = TRAINING_WINDOW) -> dict[str, Any]:
    """The summary row of one trained network from :func:`read_training`'s record."""
    meta, curve, metrics_path = run["meta"], run["curve"], run["metrics_path"]
    losses = [v for v in (curve["loss"] if curve else []) if v is not None]
    cfg = (meta or {}).get("cfg") or {}
    return {
        "model_path": run["model_path"] or None,
        "model_exists": run["model_exists"],
        "model_error": run["error"],
        "metrics_path": str(metrics_path) if metrics_path else None,
        "metrics_exists": curve is not None,
        "steps": curve["step"][-1] if curve and curve["step"] else None,
        "n_logged": len(curve["step"]) if curve else 0,
        "max_steps": cfg.get("max_steps", (meta or {}).get("steps")),
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean": float(np.mean(losses[-window:])) if losses else None,
        "repeated_steps": curve["repeated_steps"] if curve else 0,
        "bad_lines": curve["bad_lines"] if curve else 0,
        "seed": (meta or {}).get("seed"),
        "config_hash": (meta or {}).get("config_hash"),
        "method": (meta or {}).get("method"),
    }


def background_confusion(info: DatasetInfo, split: str) -> ConfusionMatrix:
    """The confusion matrix of predicting background everywhere on ``split`` (from its ground-truth masks)."""
    conf = ConfusionMatrix(info.n_classes)
    for image_id in info.ids(split):
        gt = read_label_png(info.mask_path(image_id), info.n_classes)
        conf.update(gt, np.zeros(gt.shape, dtype=np.uint8))
    return conf


def all_background_baseline(conf: ConfusionMatrix, classes: Sequence[str], split: str,
                            n_images: int) -> dict[str, Any]:
    """Scores of predicting background everywhere on ``split`` (exact; ``conf`` from :func:`background_confusion`)."""
    s = conf.scores(classes)
    return {"split": split, "n_images": n_images, "miou": s["miou"], "miou_strict": s["miou_strict"],
            "iou": s["iou"], "present": s["present"], "pixel_acc": s["pixel_acc"],
            "description": "every valid pixel predicted as background (class 0)"}


def _pick(ids: Sequence[str], k: int) -> list[str]:
    """Up to k ids spread evenly over ``ids`` (deterministic)."""
    if k <= 0 or not ids:
        return []
    if len(ids) <= k:
        return list(ids)
    idx = np.unique(np.linspace(0, len(ids) - 1, k).round().astype(int))
    return [ids[i] for i in idx]


def _gt_or_none(info: DatasetInfo, image_id: str) -> np.ndarray | None:
    p = info.mask_path(image_id)
    return read_label_png(p, info.n_classes) if p.is_file() else None


def read_qualitative(info: DatasetInfo, experiments: Sequence[str], cam_shards: Mapping[str, list[str]],
                     mask_shards: Mapping[str, list[str]], pred_shards: Mapping[str, list[str]], eval_split: str,
                     mask_split: str, n_eval: int = N_EXAMPLES, n_train: int = N_TRAIN_EXAMPLES) -> dict[str, Any]:
    """The images of the qualitative grid and what is shown of them: up to ``n_eval`` images of ``eval_split`` (in
    every experiment's CAM store if possible) with ground truth, each experiment's ``(keys, cams)`` and prediction
    (None where missing), and up to ``n_train`` of ``mask_split`` (in every pseudo-mask store, with a GT mask) with
    each experiment's pseudo-mask."""
    with contextlib.ExitStack() as stack:
        def open_stores(by_exp):
            return {e: stack.enter_context(ShardedStore(by_exp[e])) if by_exp.get(e) else None for e in experiments}

        cam_st, mask_st, pred_st = open_stores(cam_shards), open_stores(mask_shards), open_stores(pred_shards)
        ev_ids = info.ids(eval_split)
        cam_sets = [s for s in cam_st.values() if s is not None]
        in_all = [i for i in ev_ids if cam_sets and all(i in s for s in cam_sets)]
        in_any = [i for i in ev_ids if any(i in s for s in cam_sets)]
        eval_ids = _pick(in_all or in_any or ev_ids, n_eval)
        eval_samples = []
        for image_id in eval_ids:
            eval_samples.append({
                "id": image_id, "image": read_image(info.image_path(image_id)), "gt": _gt_or_none(info, image_id),
                "cams": {e: cam_st[e][image_id] if cam_st[e] is not None and image_id in cam_st[e] else None
                         for e in experiments},
                "preds": {e: pred_st[e][image_id] if pred_st[e] is not None and image_id in pred_st[e] else None
                          for e in experiments}})

        mask_sets = [s for s in mask_st.values() if s is not None]
        tr_ids = [i for i in info.ids(mask_split) if mask_sets and all(i in s for s in mask_sets)
                  and info.mask_path(i).is_file()]
        train_ids = _pick(tr_ids, n_train)
        train_samples = [{"id": image_id, "image": read_image(info.image_path(image_id)),
                          "gt": _gt_or_none(info, image_id), "masks": {e: mask_st[e][image_id] for e in experiments}}
                         for image_id in train_ids]
    return {"eval_split": eval_split, "eval_ids": eval_ids, "eval": eval_samples,
            "train_split": mask_split, "train_ids": train_ids, "train": train_samples}


def _scores_view(scores: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("iou", "precision", "recall", "miou", "miou_strict", "present", "pixel_acc")
    return {k: scores.get(k) for k in keys}


# ============================================================================================ collect

@dataclass
class ReportInputs:
    """Everything the report is made of, read by :func:`collect`; :func:`build` reads nothing else."""

    suite: str
    dataset: str
    prepared: str
    eval_split: str                            #: CAMs and predictions are scored on it
    mask_split: str                            #: the pseudo-masks' split (role ``train``)
    experiments: list[str]
    labels: dict[str, str]                     #: experiment -> row label
    settings: dict[str, Any]                   #: experiment -> its resolved experiment config
    seed: Any                                  #: the workflow seed
    eval_stage: Any                            #: the global ``stages.eval`` settings
    classes: list[str]
    manifest: dict[str, Any]                   #: the prepared dataset's manifest
    files: dict[str, dict[str, list[str]]]     #: experiment -> {"cam_eval": [path], "cams": [shards], ...}
    cam_eval: dict[str, dict]
    mask_eval: dict[str, dict]
    seg_eval: dict[str, dict]
    ir_label_eval: dict[str, dict]             #: experiments refined by IRN only
    mask_attrs: dict[str, list[dict]]          #: attributes of each pseudo-mask shard
    training: dict[str, dict[str, dict]]       #: experiment -> network -> :func:`read_training`
    baseline: ConfusionMatrix                  #: all-background prediction on the eval split
    baseline_n_images: int
    qualitative: dict[str, Any]                #: :func:`read_qualitative`
    saliency: list[dict]                       #: the saliency manifests used (deduplicated, in order)
    submissions: dict[str, str]                #: experiment -> test-set submission archive
    environment: dict[str, Any]                #: versions, git state, host, date
    notes: list[str] = field(default_factory=list)
    superpixels: dict[str, dict] = field(default_factory=dict)  #: experiment -> its Q back end, SCN score
    superpixel_overlays: dict[str, list] = field(default_factory=dict)  #: network -> [(id, image, labels)]
    single_stage: dict[str, dict] = field(default_factory=dict)  #: experiment -> {"eval", "crf_eval"} JSONs
    #: experiment -> {"runs": its seed runs (entries of ``experiments``), "seeds", "label", "compare_to"}; default:
    #: every run its own experiment
    groups: dict[str, dict] = field(default_factory=dict)
    provenance: dict[str, dict] = field(default_factory=dict)  #: experiment -> backbone, pretrained, ... (strings)


def _experiment_files(experiments: Sequence[str], files: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """The grouped inputs of the suite's experiments, each entry as a list of paths; an eval JSON is required."""
    out = {}
    for e in experiments:
        if e not in files:
            raise DataError(f"report: no input files for experiment {e!r} (have {sorted(files)})")
        out[e] = {k: _as_list(v) for k, v in files[e].items()}
        for name in ("cam_eval", "mask_eval", "seg_eval"):
            if len(out[e].get(name, [])) != 1:
                raise DataError(f"report: experiment {e!r} needs one {name} file, got {out[e].get(name, [])}")
    return out


def collect(job: JobSettings, repo: str | os.PathLike | None = None, logger=None) -> ReportInputs:
    """Read every input of the suite report of ``job`` (see :func:`report`) into a :class:`ReportInputs`; a missing
    or inconsistent input is a DataError naming it. ``repo``: the working tree whose git state is recorded (default:
    the current directory)."""
    logger = logger or get_logger()
    x = job.extra
    experiments = list(x.get("experiments") or [])
    if not experiments:
        raise DataError(f"suite {x.get('suite')!r} has no experiments")
    eval_split, mask_split = job.split("eval"), job.split("train")
    files = _experiment_files(experiments, x.get("files") or {})
    info = DatasetInfo(job.prepared)
    classes = info.classes

    def first(e: str, name: str) -> str:
        return files[e][name][0]

    cam_ev = {e: _read_eval(first(e, "cam_eval"), "CAM") for e in experiments}
    mask_ev = {e: _read_eval(first(e, "mask_eval"), "pseudo-mask") for e in experiments}
    seg_ev = {e: _read_eval(first(e, "seg_eval"), "segmentation") for e in experiments}
    for e in experiments:
        if list(cam_ev[e].get("classes", classes)) != list(classes):
            raise DataError(f"{first(e, 'cam_eval')} has classes {cam_ev[e].get('classes')}, the dataset {classes}")
        if eval_split not in cam_ev[e].get("scores", {}):
            raise DataError(f"{first(e, 'cam_eval')} has no scores for the eval split {eval_split!r} (has "
                            f"{sorted(cam_ev[e].get('scores', {}))})")
        for ev, name in ((mask_ev[e], "mask_eval"), (seg_ev[e], "seg_eval")):
            if len(ev["scores"]["iou"]) != len(classes):
                raise DataError(f"{first(e, name)} scores {len(ev['scores']['iou'])} classes, the dataset has "
                                f"{len(classes)}")

    shards = {kind: {e: files[e].get(kind, []) for e in experiments} for kind in ("cams", "masks", "preds")}
    mask_attrs = {}
    for e in experiments:
        _check_split(shards["cams"][e], eval_split, "CAM")
        _check_split(shards["preds"][e], eval_split, "prediction")
        mask_attrs[e] = _check_split(shards["masks"][e], mask_split, "pseudo-mask")
    ir = {e: read_json(files[e]["ir_label_eval"][0]) for e in experiments if files[e].get("ir_label_eval")}
    baseline = background_confusion(info, eval_split)
    training = {e: {net: read_training((files[e].get(key) or [""])[0], logger) for net, key in NETWORKS}
                for e in experiments}
    groups = seed_groups(experiments, x.get("groups"), x.get("labels") or {})
    shown = [g["runs"][0] for g in groups.values()]  # the qualitative grid: the first seed of each experiment
    qualitative = read_qualitative(info, shown, shards["cams"], shards["masks"], shards["preds"], eval_split,
                                   mask_split)
    saliency = [read_json(p) for p in dict.fromkeys(p for e in experiments for p in files[e].get("saliency", []))]
    submissions = {e: files[e]["submission"][0] for e in experiments if files[e].get("submission")}
    superpixels = {e: {"settings": sp,
                       "gt_reconstruction": read_json(files[e]["scn_eval"][0]) if files[e].get("scn_eval") else None,
                       "rw_grid": read_json(files[e]["rw_grid"][0]) if files[e].get("rw_grid") else None}
                   for e, sp in (x.get("superpixels") or {}).items() if sp}
    overlays = read_superpixel_overlays(info, {(superpixels[e]["settings"] or {}).get("network"): files[e]["q_maps"]
                                               for e in superpixels if files[e].get("q_maps")}, eval_split)
    single = {e: {"eval": read_json(files[e]["ss_eval"][0]), "crf_eval": read_json(files[e]["ss_crf_eval"][0])}
              for e in experiments if files[e].get("ss_eval") and files[e].get("ss_crf_eval")}
    return ReportInputs(
        suite=x.get("suite"), dataset=job.dataset, prepared=str(job.prepared), eval_split=eval_split,
        mask_split=mask_split, experiments=experiments, labels=dict(x.get("labels") or {}),
        settings=dict(x.get("settings") or {}), seed=x.get("seed", job.seed), eval_stage=x.get("eval_stage"),
        classes=list(classes), manifest=dict(info.manifest), files=files, cam_eval=cam_ev, mask_eval=mask_ev,
        seg_eval=seg_ev, ir_label_eval=ir, mask_attrs=mask_attrs, training=training, baseline=baseline,
        baseline_n_images=len(info.ids(eval_split)), qualitative=qualitative, saliency=saliency,
        submissions=submissions, superpixels=superpixels, superpixel_overlays=overlays, single_stage=single,
        environment=rb.environment(repo if repo is not None else Path.cwd()),
        notes=list(x.get("notes") or []), groups=groups,
        provenance=dict(x.get("provenance") or {}))


def seed_groups(runs: Sequence[str], groups: Mapping[str, Mapping[str, Any]] | None,
                labels: Mapping[str, str]) -> dict[str, dict]:
    """The report's experiments and their seed runs, checked against ``runs``; without ``groups`` every run is
    an experiment of one seed."""
    if not groups:
        return {e: {"runs": [e], "seeds": [None], "label": labels.get(e, e), "compare_to": None} for e in runs}
    out = {e: {"runs": list(g["runs"]), "seeds": list(g.get("seeds") or [None] * len(g["runs"])),
               "label": g.get("label", e), "compare_to": g.get("compare_to")} for e, g in groups.items()}
    listed = [r for g in out.values() for r in g["runs"]]
    if sorted(listed) != sorted(runs):
        raise DataError(f"report: the seed groups list runs {listed}, the report has {list(runs)}")
    return out


# ============================================================================================ build

def superpixel_labels(q: np.ndarray, cell: int = 16) -> np.ndarray:
    """Hard superpixel ids of a stored Q (9, H, W) (H, W need not be multiples of ``cell``): the cell
    ``c(p) + d_argmax`` as ``sy * w + sx`` (:func:`wsss_core.superpixel.ops.hard_labels` in numpy)."""
    k = q.argmax(0)
    h, w = q.shape[1:]
    gh, gw = -(-h // cell), -(-w // cell)
    sy = np.clip(np.arange(h)[:, None] // cell + k // 3 - 1, 0, gh - 1)
    sx = np.clip(np.arange(w)[None, :] // cell + k % 3 - 1, 0, gw - 1)
    return sy * gw + sx


def read_superpixel_overlays(info: DatasetInfo, q_shards: Mapping[str, list[str]], split: str,
                             k: int = 3) -> dict[str, list]:
    """Per superpixel network: ``k`` images of ``split`` (evenly spaced) with the hard labels of their stored Q."""
    out = {}
    for network, paths in q_shards.items():
        if network in out or not paths:
            continue
        with ShardedStore(paths, kind="q", expect={"split": split}) as store:
            ids = _pick(store.ids(), k)
            out[network] = [(i, read_image(info.image_path(i)), superpixel_labels(store[i])) for i in ids]
    return out


def _saliency_notes(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    notes = []
    for man in manifests:
        what = "**stand-in saliency** (toy dataset)" if man.get("kind") == "stand-in" else "saliency maps"
        notes.append(f"Saliency used by EPS-style training: {what} from `{man.get('dir')}` "
                     f"({man.get('n_maps')} maps): {man.get('description', '')}.")
    return notes


def _submission_notes(archives: Mapping[str, str]) -> list[str]:
    return [f"Test-set submission archive of `{e}`: `{a}` (official format "
            "`results/VOC2012/Segmentation/comp6_test_cls/<id>.png`; upload it to the PASCAL VOC evaluation "
            "server for the test mIoU)." for e, a in archives.items()]


def refinement_kind(settings: Mapping[str, Any]) -> str:
    """How an experiment's pseudo-masks were made, from its ``refine`` setting (default ``crf``)."""
    kind = settings.get("refine") or "crf"
    return REFINEMENTS.get(kind, str(kind))


def threshold_chosen_on(cam_eval: Mapping[str, Any], split: str) -> bool:
    """Whether the CAM scores of ``split`` in a ``cams.json`` are at a background threshold swept on that same
    split (``scores[split]['threshold_chosen_on_this_split']``; for files written before that flag, derived from
    the threshold's source split). Never true for CAMs with their own background map (no sweep)."""
    th = cam_eval.get("threshold") or {}
    flag = ((cam_eval.get("scores") or {}).get(split) or {}).get("threshold_chosen_on_this_split")
    if flag is None:
        flag = (th.get("source") or {}).get("split") == split
    return bool(flag) and not th.get("own_bg", False)


def _refinement_rows(d: ReportInputs) -> list[dict]:
    """Per experiment: how the pseudo-masks were made and what refinement added over the CAM seeds on the same
    split (CAM seeds at the chosen t vs. pseudo-masks), plus IRN's confident-label coverage when present."""
    out = []
    for e in d.experiments:
        split = d.mask_eval[e].get("split") or d.mask_split  # the split the pseudo-masks are scored on
        cam_on_mask = (d.cam_eval[e].get("scores") or {}).get(split)
        seed = cam_on_mask["miou"] if cam_on_mask else None
        mask = d.mask_eval[e]["scores"]["miou"]
        row = {"experiment": e, "refinement": refinement_kind(d.settings.get(e) or {}), "split": split,
               "cam_seeds_miou": seed,
               "cam_seeds_threshold_chosen_on_this_split": bool(cam_on_mask) and threshold_chosen_on(d.cam_eval[e],
                                                                                                      split),
               "pseudo_mask_miou": mask,
               "delta": None if seed is None or mask is None else mask - seed}
        if e in d.ir_label_eval:
            ir = d.ir_label_eval[e]
            row["ir_labels"] = {"labelled_fraction": ir.get("labelled_fraction"),
                                "miou_labelled": ir.get("miou_labelled")}
        out.append(row)
    return out


#: the numbers of a run that the seed table aggregates: name -> where it is in a summary row
SEED_METRICS = {"threshold": ("threshold",), "cam.miou": ("cam", "miou"), "cam.miou_strict": ("cam", "miou_strict"),
                "pseudo_mask.miou": ("pseudo_mask", "miou"), "pseudo_mask.miou_strict": ("pseudo_mask", "miou_strict"),
                "segmentation.miou": ("segmentation", "miou"),
                "segmentation.miou_strict": ("segmentation", "miou_strict")}
#: the numbers a paired comparison is made on
PAIRED_METRICS = ("cam.miou", "pseudo_mask.miou", "segmentation.miou")


def seed_statistics(groups: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                    refinement: Sequence[Mapping[str, Any]], single: Sequence[Mapping[str, Any]],
                    per_class: Mapping[str, Any]) -> dict[str, Any]:
    """Per experiment, every number of its runs as mean ± std with the per-seed values
    (:func:`wsss_core.metrics.seeds.mean_std`; per-class IoU element-wise), and the paired comparison with the
    experiment it is compared to (``compare_to``, same seeds; :func:`wsss_core.metrics.seeds.paired_difference`)."""
    from ..metrics.seeds import mean_std, mean_std_vectors, paired_difference

    by_run = {r["experiment"]: r for r in rows}
    extra = {x["experiment"]: {"refinement.delta": x["delta"]} for x in refinement}
    for x in single:
        extra.setdefault(x["experiment"], {}).update({"single_stage.miou": x["miou"],
                                                      "single_stage.crf_miou": x["crf_miou"]})

    def value(run: str, name: str) -> Any:
        if name in SEED_METRICS:
            v: Any = by_run[run]
            for k in SEED_METRICS[name]:
                v = v[k]
            return v
        return extra.get(run, {}).get(name)

    names = [*SEED_METRICS, "refinement.delta", "single_stage.miou", "single_stage.crf_miou"]
    out: dict[str, Any] = {"experiments": {}, "paired": [], "multi_seed": any(len(g["runs"]) > 1
                                                                             for g in groups.values())}
    for g, x in groups.items():
        metrics = {n: mean_std([value(r, n) for r in x["runs"]]) for n in names}
        metrics = {n: m for n, m in metrics.items() if m["n"]}
        pc = {stage: mean_std_vectors([per_class["experiments"][r][stage]["iou"] for r in x["runs"]])
              for stage in STAGES}
        pc.update({f"cam_{k}": mean_std_vectors([per_class["experiments"][r]["cam"][k] for r in x["runs"]])
                   for k in ("precision", "recall")})
        out["experiments"][g] = {"label": x["label"], "runs": list(x["runs"]), "seeds": list(x["seeds"]),
                                 "metrics": metrics, "per_class": pc}
    for g, x in groups.items():
        base = x.get("compare_to")
        if not base or base not in groups:
            continue
        for name in PAIRED_METRICS:
            a = dict(zip(groups[base]["seeds"], (value(r, name) for r in groups[base]["runs"])))
            b = dict(zip(x["seeds"], (value(r, name) for r in x["runs"])))
            out["paired"].append({"experiment": g, "compare_to": base, "metric": name,
                                  **paired_difference(a, b)})
    return out


def single_stage_rows(d: ReportInputs) -> list[dict]:
    """Per single-stage experiment: its own segmentation output on the eval split, at the background threshold
    chosen by the curve (and where), and after the CRF; the segmentation-network (two-stage) number beside it."""
    out = []
    for e in d.experiments:
        if e not in d.single_stage:
            continue
        ev, crf = d.single_stage[e]["eval"], d.single_stage[e]["crf_eval"]
        th, scores = ev["threshold"], ev["scores"][d.eval_split]
        out.append({"experiment": e, "split": d.eval_split, "threshold": th["value"],
                    "threshold_source": {"split": th["source"]["split"], "criterion": th["source"]["criterion"],
                                         "miou_at_value": th["source"].get("miou_at_value")},
                    "threshold_chosen_on_this_split": threshold_chosen_on(ev, d.eval_split),
                    "miou": scores["miou"], "miou_strict": scores["miou_strict"], "iou": scores["iou"],
                    "crf_miou": crf["scores"]["miou"], "crf_miou_strict": crf["scores"]["miou_strict"],
                    "crf_iou": crf["scores"]["iou"], "n_images": crf.get("n_images"),
                    "two_stage_miou": d.seg_eval[e]["scores"]["miou"]})
    return out


def qualitative_panels(q: Mapping[str, Any], experiments: Sequence[str],
                       thresholds: Mapping[str, float]) -> tuple[list[list[dict | None]], dict]:
    """Panels of the qualitative grid from :func:`read_qualitative`'s samples, and what they show (ids, class labels
    in the legend)."""
    labels: set[int] = set()
    rows: list[list[dict | None]] = []

    def label_panel(title: str, lab: np.ndarray | None, note: str = "n/a") -> dict:
        if lab is None:
            return {"title": title, "image": None, "note": note}
        labels.update(int(v) for v in np.unique(lab))
        return {"title": title, "image": colorize(lab)}

    for sample in q["eval"]:
        image = sample["image"]
        row: list[dict | None] = [{"title": f"{q['eval_split']}/{sample['id']}", "image": image},
                                  label_panel("ground truth", sample["gt"], "no GT mask")]
        for e in experiments:
            t = thresholds[e]
            if sample["cams"][e] is not None:
                keys, cams = sample["cams"][e]
                fg = cams[keys > 0]  # a leading background map (SIPE/SFC) is not shown in the heat map
                heat = fg.max(axis=0) if fg.shape[0] else np.zeros(cams.shape[1:], np.float32)
                row.append({"title": f"{e}: CAM (max)", "image": rb.overlay_heatmap(image, heat)})
                row.append(label_panel(f"{e}: CAM > t={rb.fmt_t(t)}", cam_to_labels(cams, keys, t)))
            else:
                row += [{"title": f"{e}: CAM", "image": None, "note": "no CAM"},
                        {"title": f"{e}: CAM > t", "image": None, "note": "no CAM"}]
            row.append(label_panel(f"{e}: prediction", sample["preds"][e], "no prediction"))
        rows.append(row)
    for sample in q["train"]:
        row = [{"title": f"{q['train_split']}/{sample['id']}", "image": sample["image"]},
               label_panel("ground truth", sample["gt"], "no GT mask")]
        for e in experiments:
            row += [None, label_panel(f"{e}: pseudo-mask", sample["masks"][e]), None]
        rows.append(row)
    meta = {"eval_split": q["eval_split"], "eval_ids": q["eval_ids"], "train_split": q["train_split"],
            "train_ids": q["train_ids"], "labels": sorted(labels)}
    return rows, meta


@dataclass
class BuiltReport:
    """The report in memory: its dict (``report.json``), texts and PNG figures (output key -> (path, bytes))."""

    report: dict[str, Any]
    markdown: str
    json_text: str
    figures: dict[str, tuple[str, bytes]]


def superpixel_rows(sp: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Per superpixel experiment: where its Q maps come from and, for a trained network, the GT-reconstruction mIoU
    of that network, the soft-SLIC and scikit-image SLIC stand-ins and plain bilinear upsampling."""
    out = []
    for e, x in sp.items():
        s = x["settings"] or {}
        row = {"experiment": e, "backend": s.get("backend", "soft_slic"), "network": s.get("network")}
        ev = x.get("gt_reconstruction")
        if ev:
            row["gt_reconstruction"] = {"split": ev["split"], "images": ev["images"], "steps": ev["steps"],
                                        "low": ev.get("low", 12),
                                        "miou": {k: v["miou"] for k, v in ev["backends"].items()}}
        g = x.get("rw_grid")
        if g:
            row["rw_grid"] = {k: g[k] for k in ("rw_grid", "thresholds", "metric", "configured_n", "chosen",
                                                "eval_oracle", "curves", "n0_vs_best")}
        out.append(row)
    return out


def build(d: ReportInputs, out: Mapping[str, str]) -> BuiltReport:
    """The report dict, its Markdown and JSON texts and the four PNG figures of the collected inputs ``d``, with
    ``out``'s paths (``md``, ``curves``, ``per_class``, ``qualitative``, ``training``) for the plots' relative links.
    Reads and writes nothing."""
    experiments, classes, eval_split = d.experiments, d.classes, d.eval_split

    # ----- numbers
    rows, thresholds, per_class = [], [], {"classes": list(classes), "experiments": {}}
    for e in experiments:
        ce, me, se = d.cam_eval[e], d.mask_eval[e], d.seg_eval[e]
        th = ce["threshold"]
        src = th["source"]
        cam_scores = ce["scores"][eval_split]
        eval_curve = ce.get("curves", {}).get(eval_split, {})
        metric = "miou_strict" if ce.get("mean") == "strict" else "miou"
        rows.append({
            "experiment": e,
            "method": d.labels.get(e) or (d.settings.get(e) or {}).get("method") or "?",
            "threshold": th["value"],
            "cam": {"split": eval_split, "miou": cam_scores["miou"], "miou_strict": cam_scores["miou_strict"],
                    "n_images": eval_curve.get("n_images"), "pixel_acc": cam_scores.get("pixel_acc"),
                    "threshold_chosen_on_this_split": threshold_chosen_on(ce, eval_split)},
            "pseudo_mask": {"split": me.get("split"), "miou": me["scores"]["miou"],
                            "miou_strict": me["scores"]["miou_strict"], "n_images": me.get("n_images"),
                            "pixel_acc": me["scores"].get("pixel_acc")},
            "segmentation": {"split": se.get("split"), "miou": se["scores"]["miou"],
                             "miou_strict": se["scores"]["miou_strict"], "n_images": se.get("n_images"),
                             "pixel_acc": se["scores"].get("pixel_acc"),
                             "path": "two-stage: the segmentation network trained on the pseudo-masks ("
                                     f"{refinement_kind(d.settings.get(e) or {})})"},
        })
        bg_used = sorted({float(a["bg_threshold"]) for a in d.mask_attrs[e] if "bg_threshold" in a})
        thresholds.append({
            "experiment": e,
            "value": th["value"],
            "own_bg": bool(th.get("own_bg", False)),
            "source": {"split": src["split"], "criterion": src["criterion"],
                       "miou_at_value": src.get("miou_at_value")},
            # files written before stages.eval.search existed were swept exhaustively
            "search": src.get("search", "none" if th.get("own_bg") else "grid"),
            "swept_on_reported_split": threshold_chosen_on(ce, eval_split),
            "mean": ce.get("mean", "present"),
            "eval_split": eval_split,
            "eval_miou_at_value": cam_scores[metric],
            "eval_oracle": {"t": eval_curve.get("best_t"), "miou": eval_curve.get("best_miou")},
            "pseudo_mask_bg_thresholds": bg_used,
            "pseudo_mask_bg_threshold_source": sorted({str(a["bg_threshold_source"]) for a in d.mask_attrs[e]
                                                       if "bg_threshold_source" in a}),
        })
        per_class["experiments"][e] = {"cam": _scores_view(cam_scores), "pseudo_mask": _scores_view(me["scores"]),
                                       "segmentation": _scores_view(se["scores"])}

    refinement = _refinement_rows(d)
    baseline = all_background_baseline(d.baseline, classes, eval_split, d.baseline_n_images)
    single = single_stage_rows(d)
    run_of = {r: (g, s) for g, x in d.groups.items() for r, s in zip(x["runs"], x["seeds"])}
    for row in rows:
        row["group"], row["seed"] = run_of[row["experiment"]]
        row["provenance"] = d.provenance.get(row["group"])
    seeds = seed_statistics(d.groups, rows, refinement, single, per_class)

    training, curves_cls, curves_seg, models = {}, {}, {}, {}
    for e in experiments:
        runs = d.training[e]
        sc, ss = training_summary(runs["classifier"]), training_summary(runs["segmentation"])
        training[e] = {"classifier": sc, "segmentation": ss}
        curves_cls[e], curves_seg[e] = runs["classifier"]["curve"], runs["segmentation"]["curve"]
        models[e] = {net: {"seed": s["seed"], "config_hash": s["config_hash"], "path": s["model_path"] or ""}
                     for net, s in (("classifier", sc), ("segmentation", ss))}

    # ----- figures (in memory)
    curve_items = []
    for e, th in zip(experiments, thresholds):
        ce = d.cam_eval[e]
        metric = "miou_strict" if ce.get("mean") == "strict" else "miou"
        splits = {}
        for split, c in ce.get("curves", {}).items():
            roles = [r for r, s in (("threshold source", th["source"]["split"]), ("eval", eval_split)) if s == split]
            splits[split] = {"thresholds": c["thresholds"], "values": c[metric], "role": " + ".join(roles)}
        curve_items.append({"experiment": e, "metric": metric, "splits": splits, "chosen_t": th["value"],
                            "source_split": th["source"]["split"]})
    series = []
    if seeds["multi_seed"]:  # one bar per experiment: the mean over its seeds
        for g, x in seeds["experiments"].items():
            for stage in STAGES:
                m = x["metrics"].get(f"{stage}.miou") or {}
                series.append({"experiment": f"{g} (mean of {len(x['runs'])})", "stage": stage,
                               "iou": x["per_class"][stage]["mean"], "miou": m.get("mean")})
    else:
        for e in experiments:
            for stage in STAGES:
                v = per_class["experiments"][e][stage]
                series.append({"experiment": e, "stage": stage, "iou": v["iou"], "miou": v["miou"]})

    qual_rows, qual_meta = qualitative_panels(d.qualitative, [g["runs"][0] for g in d.groups.values()],
                                              {t["experiment"]: t["value"] for t in thresholds})

    figures = {}
    for key, path, make in (
        ("threshold_curves", out["curves"], lambda: rb.plot_threshold_curves(curve_items)),
        ("per_class_iou", out["per_class"], lambda: rb.plot_per_class_iou(classes, series)),
        ("qualitative", out["qualitative"], lambda: rb.plot_qualitative(qual_rows, classes, qual_meta["labels"])),
        ("training", out["training"], lambda: rb.plot_training({"classifier": curves_cls,
                                                                "segmentation": curves_seg})),
        ("superpixels", out["superpixels"], lambda: rb.plot_superpixels(superpixel_rows(d.superpixels),
                                                                          d.superpixel_overlays)),
    ):
        figures[key] = (str(path), rb.figure_png_bytes(make()))

    md_dir = Path(out["md"]).parent
    files = d.files
    report = {
        "title": f"WSSS report: dataset {d.dataset}, suite {d.suite}",
        "notes": _saliency_notes(d.saliency) + _submission_notes(d.submissions) + list(d.notes),
        "dataset": d.dataset,
        "suite": d.suite,
        "synthetic": bool(d.manifest.get("synthetic", False)),
        "dataset_info": {k: d.manifest.get(k) for k in ("name", "kind", "n_classes", "splits")}
        | {"classes": list(classes), "prepared": str(d.prepared)},
        "splits": {"eval": eval_split, "train": d.mask_split,
                   "pseudo_mask_eval": rows[0]["pseudo_mask"]["split"],
                   "threshold_source": sorted({t["source"]["split"] for t in thresholds})},
        "mean_conventions": dict(rb.MEAN_CONVENTIONS),
        "rows": rows,
        "thresholds": thresholds,
        "refinement": refinement,
        "superpixels": superpixel_rows(d.superpixels),
        "single_stage": single,
        "seeds": seeds,
        "provenance": {g: d.provenance.get(g) for g in d.groups},
        "per_class": per_class,
        "baseline": baseline,
        "training": training,
        "training_window": TRAINING_WINDOW,
        "qualitative": {k: v for k, v in qual_meta.items() if k != "labels"},
        "reproducibility": {"seed": d.seed, "models": models, **d.environment},
        "plots": {k: os.path.relpath(p, md_dir) for k, (p, _) in figures.items()},
        "inputs": {**{f"{name}s": [files[e][name][0] for e in experiments]
                      for name in ("cam_eval", "mask_eval", "seg_eval")},
                   "classifiers": [(files[e].get("classifier") or [""])[0] for e in experiments],
                   "segmenters": [(files[e].get("segmentation") or [""])[0] for e in experiments],
                   **{kind: {e: list(files[e].get(kind, [])) for e in experiments}
                      for kind in ("cams", "masks", "preds")}},
        "config": {"seed": d.seed, "experiments": {e: d.settings.get(e) for e in experiments},
                   "eval": d.eval_stage},
    }
    md = rb.render_markdown(report)
    json_text = json.dumps(report, indent=2, default=_json_default) + "\n"
    return BuiltReport(report=report, markdown=md, json_text=json_text, figures=figures)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ============================================================================================ write

def write(built: BuiltReport, out: Mapping[str, str], logger) -> None:
    """Write the plots, then ``out['json']``, then ``out['md']`` (the rule's main target) last, each atomically."""
    for n, (path, data) in enumerate(built.figures.values(), 1):
        with atomic_path(path, suffix=".png") as tmp:
            tmp.write_bytes(data)
        fault_point("report_write", n, path)  # test hook (WSSS_FAULT), a no-op otherwise
    write_text(out["json"], built.json_text)
    fault_point("report_write", len(built.figures) + 1, out["json"])
    write_text(out["md"], built.markdown)
    for row in built.report["rows"]:
        logger.info("%s (%s): t=%s CAM %.4f, pseudo-mask %s, segmentation %s", row["experiment"], row["method"],
                    row["threshold"], row["cam"]["miou"] or float("nan"), rb.fmt(row["pseudo_mask"]["miou"]),
                    rb.fmt(row["segmentation"]["miou"]))
    logger.info("wrote %s", out["md"])


# ============================================================================================ stage

def report(job: JobSettings, inp: Files, out: Files) -> dict:
    """The suite report of ``job.extra['suite']`` into ``out`` (``md``, ``json``, ``curves``, ``per_class``,
    ``qualitative``, ``training``, ``superpixels``); returns the report dict (the content of ``out.json``). Nothing is written
    unless everything was read and rendered.

    ``job``: ``prepared``, ``dataset``, ``splits`` (``eval``: CAMs and predictions; ``train``: the pseudo-masks),
    ``log``, and ``extra``: ``suite``, ``experiments`` (in order), ``labels`` ({experiment: row label}),
    ``settings`` ({experiment: its resolved experiment config: method, label, refine (crf | affinity | irn, default
    crf), stages, datasets}), ``seed`` (the workflow seed), ``eval_stage`` (the global ``stages.eval``), optional
    ``notes`` (further lines), and ``files``: {experiment: {``cam_eval``, ``mask_eval``, ``seg_eval``,
    ``classifier``, ``segmentation`` (model), ``cams`` (eval-split CAM shards), ``masks`` (pseudo-mask shards),
    ``preds`` (eval-split prediction shards), ``saliency`` (manifests, maybe none), optional ``ir_label_eval``,
    ``submission``, ``scn_eval`` and ``rw_grid``}}; optional ``superpixels`` ({experiment: its classifier's
    superpixels settings}), ``groups`` ({experiment: {runs, seeds, label, compare_to}}: the seed runs behind each
    experiment, the entries of ``experiments`` being runs; default one run each) and ``provenance`` ({experiment:
    backbone, pretrained, refinement, inference, crf, segmentation, seeds}). ``inp``: the same files, flat (the rule's dependencies); they are read through ``files``.
    """
    logger = setup_job_logging(job.log)
    outputs = {k: str(out[k]) for k in ("md", "json", "curves", "per_class", "qualitative", "training",
                                        "superpixels")}
    built = build(collect(job, logger=logger), outputs)
    write(built, outputs, logger)
    return built.report
