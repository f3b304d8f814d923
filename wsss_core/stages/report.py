"""Stage: the per-suite report (Markdown + JSON + four PNG plots) comparing the experiments of a suite.

Reads the eval JSONs (CAM seeds, pseudo-masks, segmentation), the HDF5 shards (for the qualitative grid), the
final weights (seed and config hash from their ``meta``) and the training metrics (``<model dir>/state/
metrics.jsonl``), computes the all-background baseline from the ground truth, renders everything in memory,
and only then writes the outputs, each atomically, ``report.md`` last.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from ..data.io import colorize, read_image, read_label_png
from ..data.prepare import DatasetInfo
from ..engine.logs import setup_job_logging
from ..errors import DataError
from ..faults import fault_point
from ..metrics import ConfusionMatrix, cam_to_labels
from ..report import build as rb
from ..store.atomic import atomic_path, read_json, write_text
from ..store.shards import ShardedStore

#: The final loss of the training summary is also given as the mean over this many last logged steps.
TRAINING_WINDOW = 50

STAGES = ("cam", "pseudo_mask", "segmentation")


# ============================================================================================ inputs

def _as_list(x: Any) -> list[str]:
    """Snakemake may hand a single path as a string; normalise to a list of str."""
    if x is None:
        return []
    if isinstance(x, (str, os.PathLike)):
        return [str(x)]
    return [str(p) for p in x]


def experiment_of(path: str | os.PathLike, dataset: str, experiments: Sequence[str]) -> str:
    """The experiment of a pipeline output path ``.../<dataset>/<experiment>/...`` (last such match)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == dataset and parts[i + 1] in experiments:
            return parts[i + 1]
    if len(experiments) == 1:
        return experiments[0]
    raise DataError(f"cannot tell which experiment of {list(experiments)} the file {path} belongs to: expected a "
                    f"path .../{dataset}/<experiment>/...")


def shards_by_experiment(paths: Iterable[str | os.PathLike], dataset: str,
                         experiments: Sequence[str]) -> dict[str, list[str]]:
    """Group shard paths (all experiments concatenated) by experiment, keeping their order."""
    out: dict[str, list[str]] = {e: [] for e in experiments}
    for p in paths:
        out[experiment_of(p, dataset, experiments)].append(str(p))
    return out


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


def training_summary(model_path: str, logger, window: int = TRAINING_WINDOW) -> tuple[dict, dict | None]:
    """(summary row, curve or None) of one trained network from its weights and ``state/metrics.jsonl``."""
    metrics_path = Path(model_path).parent / "state" / "metrics.jsonl" if model_path else None
    meta, err = _load_meta(model_path, logger)
    curve = read_metrics(metrics_path) if metrics_path else None
    losses = [v for v in (curve["loss"] if curve else []) if v is not None]
    cfg = (meta or {}).get("cfg") or {}
    summary = {
        "model_path": model_path or None,
        "model_exists": bool(model_path) and Path(model_path).is_file(),
        "model_error": err,
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
    return summary, curve


def all_background_baseline(info: DatasetInfo, split: str) -> dict[str, Any]:
    """Scores of predicting background everywhere on ``split`` (exact, from its ground-truth masks)."""
    conf = ConfusionMatrix(info.n_classes)
    ids = info.ids(split)
    for image_id in ids:
        gt = read_label_png(info.mask_path(image_id), info.n_classes)
        conf.update(gt, np.zeros(gt.shape, dtype=np.uint8))
    s = conf.scores(info.classes)
    return {"split": split, "n_images": len(ids), "miou": s["miou"], "miou_strict": s["miou_strict"],
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


def _scores_view(scores: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("iou", "precision", "recall", "miou", "miou_strict", "present", "pixel_acc")
    return {k: scores.get(k) for k in keys}


# ============================================================================================ stage

def _saliency_notes(manifests: Sequence[str] | str) -> list[str]:
    notes = []
    for p in _as_list(manifests):
        man = read_json(p)
        what = "**stand-in saliency** (toy dataset)" if man.get("kind") == "stand-in" else "saliency maps"
        notes.append(f"Saliency used by EPS-style training: {what} from `{man.get('dir')}` "
                     f"({man.get('n_maps')} maps): {man.get('description', '')}.")
    return notes


def _submission_notes(experiments: Sequence[str], archives: Sequence[str] | str) -> list[str]:
    return [f"Test-set submission archive of `{e}`: `{a}` (official format "
            "`results/VOC2012/Segmentation/comp6_test_cls/<id>.png`; upload it to the PASCAL VOC evaluation "
            "server for the test mIoU)." for e, a in zip(experiments, _as_list(archives))]


def _refinement_kind(mask_paths: Sequence[str]) -> str:
    parts = {Path(p).parent.name for p in mask_paths}
    if parts == {"pseudo_masks_irn"}:
        return "IRN random walk"
    if parts == {"pseudo_masks_rw"}:
        return "AffinityNet random walk"
    return "dense CRF"


def threshold_chosen_on(cam_eval: Mapping[str, Any], split: str) -> bool:
    """Whether the CAM scores of ``split`` in a ``cams.json`` are at a background threshold swept on that same
    split (``scores[split]['threshold_chosen_on_this_split']``; for files written before that flag, derived from
    the threshold's source split). Never true for CAMs with their own background map (no sweep)."""
    th = cam_eval.get("threshold") or {}
    flag = ((cam_eval.get("scores") or {}).get(split) or {}).get("threshold_chosen_on_this_split")
    if flag is None:
        flag = (th.get("source") or {}).get("split") == split
    return bool(flag) and not th.get("own_bg", False)


def _refinement_rows(experiments, cam_ev, mask_ev, mask_shards, ir_label_evals, dataset, mask_split) -> list[dict]:
    """Per experiment: how the pseudo-masks were made and what refinement added over the CAM seeds on the same
    split (CAM seeds at the chosen t vs. pseudo-masks), plus IRN's confident-label coverage when present."""
    ir = {experiment_of(p, dataset, experiments): read_json(p) for p in _as_list(ir_label_evals)}
    out = []
    for e in experiments:
        split = mask_ev[e].get("split") or mask_split  # the split the pseudo-masks are scored on
        cam_on_mask = (cam_ev[e].get("scores") or {}).get(split)
        seed = cam_on_mask["miou"] if cam_on_mask else None
        mask = mask_ev[e]["scores"]["miou"]
        row = {"experiment": e, "refinement": _refinement_kind(mask_shards[e]), "split": split,
               "cam_seeds_miou": seed,
               "cam_seeds_threshold_chosen_on_this_split": bool(cam_on_mask) and threshold_chosen_on(cam_ev[e], split),
               "pseudo_mask_miou": mask,
               "delta": None if seed is None or mask is None else mask - seed}
        if e in ir:
            row["ir_labels"] = {"labelled_fraction": ir[e].get("labelled_fraction"),
                                "miou_labelled": ir[e].get("miou_labelled")}
        out.append(row)
    return out


def build_report(*, experiments: Sequence[str], suite: str, dataset: str, prepared: str, eval_split: str,
                 mask_split: str, methods: Mapping[str, str], config: Mapping[str, Any],
                 cam_evals: Sequence[str], mask_evals: Sequence[str], seg_evals: Sequence[str],
                 cams: Sequence[str], masks: Sequence[str], preds: Sequence[str],
                 classifiers: Sequence[str] = (), segmenters: Sequence[str] = (),
                 out_md: str, out_json: str, out_curves: str, out_per_class: str, out_qualitative: str,
                 out_training: str, log: str | None = None, n_examples: int = 6, n_train_examples: int = 2,
                 repo: str | os.PathLike | None = None, saliency: Sequence[str] = (),
                 submissions: Sequence[str] = (), notes: Sequence[str] = (),
                 ir_label_evals: Sequence[str] = ()) -> dict:
    """Write the suite report; returns the report dict (the content of ``out_json``).

    Args:
        experiments: experiment names of the suite, in order; ``cam_evals``/``mask_evals``/``seg_evals``/
            ``classifiers``/``segmenters`` are given in the same order (the last two may be empty or name
            missing files). ``cams``/``masks``/``preds``: the shards of all experiments (CAMs of ``eval_split``,
            pseudo-masks of ``mask_split``, predictions of ``eval_split``), told apart by their path
            ``.../<dataset>/<experiment>/...``.
        methods: experiment -> method name. config: the workflow config (its ``seed`` is recorded).
        out_*: the Markdown, JSON and the four PNG plots. Nothing is written unless everything succeeded.
        repo: working tree whose git SHA is recorded (default: the current directory).
        saliency: saliency manifests used by the experiments (their kind is stated in the report's notes).
        submissions: test-set submission archives (same order as ``experiments``), listed in the notes.
        notes: further lines for the report's notes.
        ir_label_evals: ``eval/ir_labels.json`` of the experiments refined by IRN (any order, told apart by path).
    """
    logger = setup_job_logging(log)
    experiments = list(experiments)
    if not experiments:
        raise DataError(f"suite {suite!r} has no experiments")
    info = DatasetInfo(prepared)
    classes = info.classes
    paths = {"cam_evals": _as_list(cam_evals), "mask_evals": _as_list(mask_evals), "seg_evals": _as_list(seg_evals)}
    for name, lst in paths.items():
        if len(lst) != len(experiments):
            raise DataError(f"report: {len(lst)} {name} for {len(experiments)} experiments {experiments}")
    classifiers, segmenters = _as_list(classifiers), _as_list(segmenters)
    classifiers += [""] * (len(experiments) - len(classifiers))
    segmenters += [""] * (len(experiments) - len(segmenters))

    cam_ev = {e: _read_eval(p, "CAM") for e, p in zip(experiments, paths["cam_evals"])}
    mask_ev = {e: _read_eval(p, "pseudo-mask") for e, p in zip(experiments, paths["mask_evals"])}
    seg_ev = {e: _read_eval(p, "segmentation") for e, p in zip(experiments, paths["seg_evals"])}
    for e in experiments:
        if list(cam_ev[e].get("classes", classes)) != list(classes):
            raise DataError(f"{paths['cam_evals'][experiments.index(e)]} has classes {cam_ev[e].get('classes')}, "
                            f"the dataset {classes}")
        if eval_split not in cam_ev[e].get("scores", {}):
            raise DataError(f"{paths['cam_evals'][experiments.index(e)]} has no scores for the eval split "
                            f"{eval_split!r} (has {sorted(cam_ev[e].get('scores', {}))})")
        for ev, p in ((mask_ev[e], paths["mask_evals"]), (seg_ev[e], paths["seg_evals"])):
            if len(ev["scores"]["iou"]) != len(classes):
                raise DataError(f"{p[experiments.index(e)]} scores {len(ev['scores']['iou'])} classes, the dataset "
                                f"has {len(classes)}")

    cam_shards = shards_by_experiment(_as_list(cams), dataset, experiments)
    mask_shards = shards_by_experiment(_as_list(masks), dataset, experiments)
    pred_shards = shards_by_experiment(_as_list(preds), dataset, experiments)
    mask_attrs = {}
    for e in experiments:
        _check_split(cam_shards[e], eval_split, "CAM")
        _check_split(pred_shards[e], eval_split, "prediction")
        mask_attrs[e] = _check_split(mask_shards[e], mask_split, "pseudo-mask")

    # ----- numbers
    rows, thresholds, per_class = [], [], {"classes": list(classes), "experiments": {}}
    for e in experiments:
        ce, me, se = cam_ev[e], mask_ev[e], seg_ev[e]
        th = ce["threshold"]
        src = th["source"]
        cam_scores = ce["scores"][eval_split]
        eval_curve = ce.get("curves", {}).get(eval_split, {})
        metric = "miou_strict" if ce.get("mean") == "strict" else "miou"
        method = methods.get(e) if methods else None
        rows.append({
            "experiment": e,
            "method": method or (config.get("experiments", {}).get(e, {}).get("method")) or "?",
            "threshold": th["value"],
            "cam": {"split": eval_split, "miou": cam_scores["miou"], "miou_strict": cam_scores["miou_strict"],
                    "n_images": eval_curve.get("n_images"), "pixel_acc": cam_scores.get("pixel_acc"),
                    "threshold_chosen_on_this_split": threshold_chosen_on(ce, eval_split)},
            "pseudo_mask": {"split": me.get("split"), "miou": me["scores"]["miou"],
                            "miou_strict": me["scores"]["miou_strict"], "n_images": me.get("n_images"),
                            "pixel_acc": me["scores"].get("pixel_acc")},
            "segmentation": {"split": se.get("split"), "miou": se["scores"]["miou"],
                             "miou_strict": se["scores"]["miou_strict"], "n_images": se.get("n_images"),
                             "pixel_acc": se["scores"].get("pixel_acc")},
        })
        bg_used = sorted({float(a["bg_threshold"]) for a in mask_attrs[e] if "bg_threshold" in a})
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
            "pseudo_mask_bg_threshold_source": sorted({str(a["bg_threshold_source"]) for a in mask_attrs[e]
                                                       if "bg_threshold_source" in a}),
        })
        per_class["experiments"][e] = {"cam": _scores_view(cam_scores), "pseudo_mask": _scores_view(me["scores"]),
                                       "segmentation": _scores_view(se["scores"])}

    refinement = _refinement_rows(experiments, cam_ev, mask_ev, mask_shards, ir_label_evals, dataset, mask_split)
    baseline = all_background_baseline(info, eval_split)

    training, curves_cls, curves_seg, models = {}, {}, {}, {}
    for e, pc, ps in zip(experiments, classifiers, segmenters):
        sc, cc = training_summary(pc, logger)
        ss, cs = training_summary(ps, logger)
        training[e] = {"classifier": sc, "segmentation": ss}
        curves_cls[e], curves_seg[e] = cc, cs
        models[e] = {net: {"seed": s["seed"], "config_hash": s["config_hash"], "path": s["model_path"] or ""}
                     for net, s in (("classifier", sc), ("segmentation", ss))}

    # ----- figures (in memory)
    curve_items = []
    for e, th in zip(experiments, thresholds):
        ce = cam_ev[e]
        metric = "miou_strict" if ce.get("mean") == "strict" else "miou"
        splits = {}
        for split, c in ce.get("curves", {}).items():
            roles = [r for r, s in (("threshold source", th["source"]["split"]), ("eval", eval_split)) if s == split]
            splits[split] = {"thresholds": c["thresholds"], "values": c[metric], "role": " + ".join(roles)}
        curve_items.append({"experiment": e, "metric": metric, "splits": splits, "chosen_t": th["value"],
                            "source_split": th["source"]["split"]})
    series = []
    for e in experiments:
        for stage in STAGES:
            v = per_class["experiments"][e][stage]
            series.append({"experiment": e, "stage": stage, "iou": v["iou"], "miou": v["miou"]})

    qual_rows, qual_meta = _qualitative_rows(info, experiments, cam_shards, mask_shards, pred_shards,
                                             {t["experiment"]: t["value"] for t in thresholds}, eval_split,
                                             mask_split, n_examples, n_train_examples)

    figures = {}
    for key, path, make in (
        ("threshold_curves", out_curves, lambda: rb.plot_threshold_curves(curve_items)),
        ("per_class_iou", out_per_class, lambda: rb.plot_per_class_iou(classes, series)),
        ("qualitative", out_qualitative, lambda: rb.plot_qualitative(qual_rows, classes, qual_meta["labels"])),
        ("training", out_training, lambda: rb.plot_training({"classifier": curves_cls,
                                                             "segmentation": curves_seg})),
    ):
        figures[key] = (path, rb.figure_png_bytes(make()))

    md_dir = Path(out_md).parent
    env = rb.environment(repo if repo is not None else Path.cwd())
    report = {
        "title": f"WSSS report: dataset {dataset}, suite {suite}",
        "notes": _saliency_notes(saliency) + _submission_notes(experiments, submissions) + list(notes),
        "dataset": dataset,
        "suite": suite,
        "synthetic": bool(info.manifest.get("synthetic", False)),
        "dataset_info": {k: info.manifest.get(k) for k in ("name", "kind", "n_classes", "splits")}
        | {"classes": list(classes), "prepared": str(prepared)},
        "splits": {"eval": eval_split, "train": mask_split,
                   "pseudo_mask_eval": rows[0]["pseudo_mask"]["split"],
                   "threshold_source": sorted({t["source"]["split"] for t in thresholds})},
        "mean_conventions": dict(rb.MEAN_CONVENTIONS),
        "rows": rows,
        "thresholds": thresholds,
        "refinement": refinement,
        "per_class": per_class,
        "baseline": baseline,
        "training": training,
        "training_window": TRAINING_WINDOW,
        "qualitative": {k: v for k, v in qual_meta.items() if k != "labels"},
        "reproducibility": {"seed": config.get("seed"), "models": models, **env},
        "plots": {k: os.path.relpath(p, md_dir) for k, (p, _) in figures.items()},
        "inputs": {**paths, "classifiers": classifiers, "segmenters": segmenters,
                   "cams": cam_shards, "masks": mask_shards, "preds": pred_shards},
        "config": {"seed": config.get("seed"),
                   "experiments": {e: config.get("experiments", {}).get(e) for e in experiments},
                   "eval": config.get("stages", {}).get("eval")},
    }
    md = rb.render_markdown(report)
    json_text = json.dumps(report, indent=2, default=_json_default) + "\n"

    # ----- write: plots, JSON, then the Markdown (the rule's main target) last
    for n, (path, data) in enumerate(figures.values(), 1):
        with atomic_path(path, suffix=".png") as tmp:
            tmp.write_bytes(data)
        fault_point("report_write", n, path)  # test hook (WSSS_FAULT), a no-op otherwise
    write_text(out_json, json_text)
    fault_point("report_write", len(figures) + 1, out_json)
    write_text(out_md, md)
    for row in rows:
        logger.info("%s (%s): t=%s CAM %.4f, pseudo-mask %s, segmentation %s", row["experiment"], row["method"],
                    row["threshold"], row["cam"]["miou"] or float("nan"), rb.fmt(row["pseudo_mask"]["miou"]),
                    rb.fmt(row["segmentation"]["miou"]))
    logger.info("wrote %s", out_md)
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _gt_or_none(info: DatasetInfo, image_id: str) -> np.ndarray | None:
    p = info.mask_path(image_id)
    return read_label_png(p, info.n_classes) if p.is_file() else None


def _qualitative_rows(info: DatasetInfo, experiments: Sequence[str], cam_shards: Mapping[str, list[str]],
                      mask_shards: Mapping[str, list[str]], pred_shards: Mapping[str, list[str]],
                      thresholds: Mapping[str, float], eval_split: str, mask_split: str, n_eval: int,
                      n_train: int) -> tuple[list[list[dict | None]], dict]:
    """Panels of the qualitative grid and what they show (ids, class labels in the legend)."""
    labels: set[int] = set()
    rows: list[list[dict | None]] = []

    def label_panel(title: str, lab: np.ndarray | None, note: str = "n/a") -> dict:
        if lab is None:
            return {"title": title, "image": None, "note": note}
        labels.update(int(v) for v in np.unique(lab))
        return {"title": title, "image": colorize(lab)}

    with contextlib.ExitStack() as stack:
        def open_stores(by_exp):
            return {e: stack.enter_context(ShardedStore(by_exp[e])) if by_exp.get(e) else None for e in experiments}

        cam_st, mask_st, pred_st = open_stores(cam_shards), open_stores(mask_shards), open_stores(pred_shards)
        ev_ids = info.ids(eval_split)
        cam_sets = [s for s in cam_st.values() if s is not None]
        in_all = [i for i in ev_ids if cam_sets and all(i in s for s in cam_sets)]
        in_any = [i for i in ev_ids if any(i in s for s in cam_sets)]
        eval_ids = _pick(in_all or in_any or ev_ids, n_eval)
        for image_id in eval_ids:
            image = read_image(info.image_path(image_id))
            row: list[dict | None] = [{"title": f"{eval_split}/{image_id}", "image": image},
                                      label_panel("ground truth", _gt_or_none(info, image_id), "no GT mask")]
            for e in experiments:
                t = thresholds[e]
                if cam_st[e] is not None and image_id in cam_st[e]:
                    keys, cams = cam_st[e][image_id]
                    fg = cams[keys > 0]  # a leading background map (SIPE/SFC) is not shown in the heat map
                    heat = fg.max(axis=0) if fg.shape[0] else np.zeros(cams.shape[1:], np.float32)
                    row.append({"title": f"{e}: CAM (max)", "image": rb.overlay_heatmap(image, heat)})
                    row.append(label_panel(f"{e}: CAM > t={rb.fmt_t(t)}", cam_to_labels(cams, keys, t)))
                else:
                    row += [{"title": f"{e}: CAM", "image": None, "note": "no CAM"},
                            {"title": f"{e}: CAM > t", "image": None, "note": "no CAM"}]
                pred = pred_st[e][image_id] if pred_st[e] is not None and image_id in pred_st[e] else None
                row.append(label_panel(f"{e}: prediction", pred, "no prediction"))
            rows.append(row)

        mask_sets = [s for s in mask_st.values() if s is not None]
        tr_ids = [i for i in info.ids(mask_split) if mask_sets and all(i in s for s in mask_sets)
                  and info.mask_path(i).is_file()]
        train_ids = _pick(tr_ids, n_train)
        for image_id in train_ids:
            image = read_image(info.image_path(image_id))
            row = [{"title": f"{mask_split}/{image_id}", "image": image},
                   label_panel("ground truth", _gt_or_none(info, image_id), "no GT mask")]
            for e in experiments:
                row += [None, label_panel(f"{e}: pseudo-mask", mask_st[e][image_id]), None]
            rows.append(row)
    meta = {"eval_split": eval_split, "eval_ids": eval_ids, "train_split": mask_split, "train_ids": train_ids,
            "labels": sorted(labels)}
    return rows, meta
