"""Tests of the suite report (wsss_core.stages.report.report, wsss_core.report.build).

The inputs are made for real on a hand-built 16x16 dataset: CAM/mask/prediction shards written with ShardWriter,
eval JSONs produced by running the evaluation stage's cam_scores/mask_scores on them, fake weights saved with
torch.save. The report job is called as the pipeline calls it: ``report(JobSettings, Files, Files)``.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_core.data.io import write_image, write_label_png
from wsss_core.report import build as rb
from wsss_core.stages import report as stage
from wsss_core.stages.evaluate import cam_scores, mask_scores
from wsss_core.stages.job import Files, JobSettings
from wsss_core.store.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]
DS = "tinyds"
SUITE = "pair"
EXPS = ["alpha", "beta"]
METHODS = {"alpha": "cam", "beta": "cam"}
SETTINGS = {"alpha": {"method": "cam"}, "beta": {"method": "cam", "refine": "affinity"}}   # alpha: CRF by default
CLASSES = ["background", "disc", "square", "bar"]
SPLITS = {"train_aug": [f"a{i}" for i in range(6)], "train": ["a0", "a1", "a2"], "val": [f"v{i}" for i in range(4)]}
EVAL_CFG = {"thresholds": {"start": 0.0, "stop": 0.6, "step": 0.05}, "mean": "present"}
H = W = 16
PLOTS = ("curves", "per_class", "qualitative", "training")


# ============================================================================================ fixtures

def _mask(rng: np.random.Generator, split: str, k: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    y0, x0 = rng.integers(1, 7, size=2)
    m[y0:y0 + 7, x0:x0 + 6] = 1 + k % 2                       # disc or square
    if split != "val" and k % 3 == 0:
        m[12:14, 2:14] = 3                                     # "bar" never occurs in val: absent class there
    if k == 1:
        m[0, :] = 255                                          # a void band
    return m


def _image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    pal = np.array([[30, 30, 30], [220, 40, 40], [40, 200, 60], [60, 80, 230]], np.uint8)
    img = pal[np.where(mask == 255, 0, mask)].astype(np.int16) + rng.integers(-20, 20, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A prepared dataset folder by hand (manifest.json, labels.json, lists/) plus JPEGs and index PNGs."""
    rng = np.random.default_rng(0)
    img_dir, mask_dir, prep = root / "src" / "JPEGImages", root / "src" / "SegmentationClass", root / DS / "dataset"
    masks, labels = {}, {}
    all_ids = sorted(set(SPLITS["train_aug"]) | set(SPLITS["val"]))
    for k, i in enumerate(all_ids):
        m = _mask(rng, "val" if i.startswith("v") else "train", k)
        masks[i] = m
        write_label_png(mask_dir / f"{i}.png", m)
        write_image(img_dir / f"{i}.jpg", _image(rng, m))
        labels[i] = sorted(int(v) for v in np.unique(m) if 0 < v < len(CLASSES))
    for s, ids in SPLITS.items():
        (prep / "lists").mkdir(parents=True, exist_ok=True)
        (prep / "lists" / f"{s}.txt").write_text("".join(f"{i}\n" for i in ids))
    (prep / "labels.json").write_text(json.dumps({"classes": CLASSES, "labels": labels}))
    manifest = {"name": DS, "kind": "toy", "root": str(root / "src"), "image_dir": str(img_dir),
                "mask_dir": str(mask_dir), "classes": CLASSES, "n_classes": len(CLASSES),
                "splits": {s: len(v) for s, v in SPLITS.items()}, "synthetic": True}
    (prep / "manifest.json").write_text(json.dumps(manifest))
    return prep, masks


def _noisy_labels(rng, gt: np.ndarray, p: float, n_labels: int = len(CLASSES)) -> np.ndarray:
    out = np.where(gt == 255, 0, gt).astype(np.uint8)
    flip = rng.random(gt.shape) < p
    out[flip] = rng.integers(0, n_labels, size=int(flip.sum()))
    return out


def make_experiment(root: Path, prep: Path, masks: dict, exp: str, seed: int, with_seg: bool, with_metrics: bool):
    rng = np.random.default_rng(seed)
    base = root / DS / exp
    labels = json.loads((prep / "labels.json").read_text())["labels"]
    cam_paths = {}
    for split in ("train", "val"):
        cam_paths[split] = base / "cams" / split / "0-of-1.h5"
        with ShardWriter(cam_paths[split], "cams", {"split": split, "shard": 0, "n_shards": 1}) as w:
            for i in SPLITS[split]:
                keys = labels[i]
                cams = np.stack([0.3 * (masks[i] == c) + 0.5 * rng.random((H, W)) for c in keys]) if keys \
                    else np.zeros((0, H, W))
                w.add_cams(i, np.array(keys, np.int64), cams.astype(np.float32))
    pred = base / "segmentation" / "pred" / "val" / "0-of-1.h5"
    with ShardWriter(pred, "masks", {"split": "val", "shard": 0, "n_shards": 1}) as w:
        for i in SPLITS["val"]:
            w.add_mask(i, _noisy_labels(rng, masks[i], 0.05, n_labels=3))   # never "bar"
    ev = base / "eval"
    chosen = cam_scores(str(prep), [str(cam_paths["train"]), str(cam_paths["val"])], "train", "val", EVAL_CFG,
                        str(ev / "cams.json"))
    # alpha's pseudo-masks use the chosen t (crf.bg_threshold auto); beta's a number set in the config
    t_used, t_src = ((chosen["threshold"]["value"], "chosen by eval_cams") if exp == "alpha"
                     else (0.123, "set in config"))
    pm = base / "pseudo_masks" / "0-of-1.h5"
    with ShardWriter(pm, "masks", {"split": "train_aug", "shard": 0, "n_shards": 1, "bg_threshold": t_used,
                                   "bg_threshold_source": t_src}) as w:
        for i in SPLITS["train_aug"]:
            w.add_mask(i, _noisy_labels(rng, masks[i], 0.1))
    mask_scores(str(prep), [str(pm)], "train", str(ev / "pseudo_masks.json"), what="pseudo_masks")
    mask_scores(str(prep), [str(pred)], "val", str(ev / "segmentation.json"), what="segmentation")

    cls = base / "classifier" / "model.pt"
    cls.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "meta": {"method": "cam", "cfg": {"max_steps": 6}, "seed": seed,
                                                         "config_hash": f"cls{exp}", "steps": 6}}, cls)
    seg = base / "segmentation" / "model.pt"
    if with_seg:
        torch.save({"model": {}, "meta": {"cfg": {"max_steps": 4}, "seed": seed, "config_hash": f"seg{exp}"}}, seg)
    if with_metrics:
        (cls.parent / "state").mkdir()
        # steps 1..4, then a resume from step 2 re-logs 3..6: the later entries of 3 and 4 must win
        lines = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 5)]
        lines += [{"step": s, "loss": 0.5 / s, "lr": 0.1} for s in range(3, 7)]
        text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "lo'   # torn last line
        (cls.parent / "state" / "metrics.jsonl").write_text(text)
        if with_seg:
            (seg.parent / "state").mkdir()
            (seg.parent / "state" / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": s, "loss": 2.0 - 0.3 * s}) + "\n" for s in range(1, 5)))
    return {"cam_eval": str(ev / "cams.json"), "mask_eval": str(ev / "pseudo_masks.json"),
            "seg_eval": str(ev / "segmentation.json"), "cams": [str(cam_paths["val"])], "masks": [str(pm)],
            "preds": [str(pred)], "classifier": str(cls), "segmenter": str(seg)}


def report_files(world: dict, experiments=EXPS) -> dict[str, dict]:
    """The report job's inputs grouped by experiment (``extra.files``), as rules/common.smk makes them."""
    e = world["exps"]
    return {x: {"cam_eval": e[x]["cam_eval"], "mask_eval": e[x]["mask_eval"], "seg_eval": e[x]["seg_eval"],
                "classifier": e[x]["classifier"], "segmentation": e[x]["segmenter"], "cams": list(e[x]["cams"]),
                "masks": list(e[x]["masks"]), "preds": list(e[x]["preds"]), "saliency": []} for x in experiments}


def report_args(world: dict, out_dir: Path, files: dict | None = None, experiments=EXPS,
                log: str | None = None) -> tuple[JobSettings, Files, Files]:
    """(job, inp, out) of the report of ``experiments`` into ``out_dir``."""
    files = report_files(world, experiments) if files is None else files
    experiments = list(experiments)
    job = JobSettings(
        dataset=DS, prepared=str(world["prep"]), splits={"train": "train_aug", "threshold": "train", "eval": "val"},
        log=log,
        extra={"suite": SUITE, "experiments": experiments, "labels": {x: METHODS[x] for x in experiments},
               "settings": {x: SETTINGS[x] for x in experiments}, "seed": 3, "eval_stage": EVAL_CFG,
               "files": files})
    flat: dict[str, list[str]] = {}
    for f in files.values():
        for name, paths in f.items():
            flat.setdefault(name, []).extend([paths] if isinstance(paths, str) else paths)
    out = Files(md=str(out_dir / "report.md"), json=str(out_dir / "report.json"),
                curves=str(out_dir / "threshold_curves.png"), per_class=str(out_dir / "per_class_iou.png"),
                qualitative=str(out_dir / "qualitative.png"), training=str(out_dir / "training.png"),
                superpixels=str(out_dir / "superpixels.png"))
    return job, Files(flat), out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    prep, masks = make_dataset(root)
    exps = {"alpha": make_experiment(root, prep, masks, "alpha", 1, with_seg=True, with_metrics=True),
            "beta": make_experiment(root, prep, masks, "beta", 2, with_seg=False, with_metrics=False)}
    world = {"root": root, "prep": prep, "masks": masks, "exps": exps}
    out = root / DS / "reports" / SUITE
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rb, "_git", lambda args, repo: None)     # hermetic: no git call from the tests
        report = stage.report(*report_args(world, out))
    world.update(out=out, report=report, md=(out / "report.md").read_text(),
                 json=json.loads((out / "report.json").read_text()),
                 evals={x: {k: json.loads(Path(exps[x][k]).read_text()) for k in ("cam_eval", "mask_eval", "seg_eval")}
                        for x in EXPS})
    return world


def md_table(md: str, heading: str, nth: int = 0) -> list[dict[str, str]]:
    """The ``nth`` Markdown table after the line ``heading``, as a list of {header: cell} dicts."""
    lines = md.splitlines()
    i = lines.index(heading)
    tables, cur = [], []
    for line in lines[i + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    t = tables[nth]
    split = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
    header = split(t[0])
    return [dict(zip(header, split(r))) for r in t[2:]]


def f4(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ============================================================================================ tests

def test_summary_table_numbers_equal_the_eval_jsons(world):
    rows = md_table(world["md"], "## Summary")
    assert [r["experiment"] for r in rows] == EXPS
    strict = {r["experiment"]: r for r in md_table(world["md"], "## Summary", 1)}
    for r in rows:
        ev = world["evals"][r["experiment"]]
        assert r["method"] == "cam"
        assert r["CAM seeds mIoU (val, at t)"] == f4(ev["cam_eval"]["scores"]["val"]["miou"])
        assert r["pseudo-mask mIoU (train)"] == f4(ev["mask_eval"]["scores"]["miou"])
        assert r["segmentation mIoU (val)"] == f4(ev["seg_eval"]["scores"]["miou"])
        s = strict[r["experiment"]]
        assert s["CAM seeds miou_strict"] == f4(ev["cam_eval"]["scores"]["val"]["miou_strict"])
        assert s["pseudo-mask miou_strict"] == f4(ev["mask_eval"]["scores"]["miou_strict"])
        assert s["segmentation miou_strict"] == f4(ev["seg_eval"]["scores"]["miou_strict"])
        assert s["CAM images"] == "4" and s["pseudo-mask images"] == "3" and s["segmentation images"] == "4"
    # the JSON has the same numbers, unrounded
    for row in world["json"]["rows"]:
        ev = world["evals"][row["experiment"]]
        assert row["cam"]["miou"] == ev["cam_eval"]["scores"]["val"]["miou"]
        assert row["pseudo_mask"]["miou"] == ev["mask_eval"]["scores"]["miou"]
        assert row["segmentation"]["miou_strict"] == ev["seg_eval"]["scores"]["miou_strict"]
    # "bar" is absent from val, so the two conventions differ there and both are named
    seg = world["evals"]["alpha"]["seg_eval"]["scores"]
    assert seg["miou"] != seg["miou_strict"]
    assert "`miou`" in world["md"] and "`miou_strict`" in world["md"]
    assert "present in the ground truth or the prediction" in world["md"]
    assert "over all classes" in world["md"]


def test_chosen_threshold_and_its_source_are_stated(world):
    rows = {r["experiment"]: r for r in md_table(world["md"], "## Background threshold")}
    for x in EXPS:
        th = world["evals"][x]["cam_eval"]["threshold"]
        assert th["source"]["split"] == "train"
        r = rows[x]
        assert float(r["chosen t"]) == pytest.approx(th["value"])
        assert r["source split"] == "train"
        assert r["criterion"] == th["source"]["criterion"]
        assert r["mIoU on source split at t"] == f4(th["source"]["miou_at_value"])
        assert r["val optimum t (reference)"] != ""
        assert f"t = {rb.fmt_t(th['value'])}, chosen on split `train`" in world["md"]
        j = next(t for t in world["json"]["thresholds"] if t["experiment"] == x)
        assert j["value"] == th["value"] and j["source"]["split"] == "train"
        assert j["pseudo_mask_bg_thresholds"] == ([th["value"]] if x == "alpha" else [0.123])
    lines = {x: next(line for line in world["md"].splitlines() if line.startswith(f"- `{x}`: t = ")) for x in EXPS}
    assert "(chosen by eval_cams)." in lines["alpha"] and "different" not in lines["alpha"]
    assert "record t = 0.123 (set in config) - **different from the chosen t**" in lines["beta"]
    summary = {r["experiment"]: r for r in md_table(world["md"], "## Summary")}
    assert float(summary["alpha"]["bg threshold t"]) == pytest.approx(
        world["evals"]["alpha"]["cam_eval"]["threshold"]["value"])


def test_cams_json_labels_the_split_the_threshold_was_chosen_on(world, tmp_path):
    for x in EXPS:
        ce = world["evals"][x]["cam_eval"]
        assert ce["scores"]["train"]["threshold_chosen_on_this_split"] is True     # the threshold split
        assert ce["scores"]["val"]["threshold_chosen_on_this_split"] is False      # the eval split
        assert ce["threshold"]["source"]["swept_on_reported_split"] is False
        assert ce["threshold"]["source"]["search"] == "grid"
    e = world["exps"]["alpha"]
    same = cam_scores(str(world["prep"]), e["cams"], "val", "val", EVAL_CFG, str(tmp_path / "cams.json"))
    assert list(same["scores"]) == ["val"] and same["scores"]["val"]["threshold_chosen_on_this_split"] is True
    assert same["threshold"]["source"]["swept_on_reported_split"] is True


def test_threshold_chosen_on_is_never_true_for_own_background_maps():
    ev = {"threshold": {"own_bg": False, "source": {"split": "val"}}, "scores": {"val": {}, "train": {}}}
    assert stage.threshold_chosen_on(ev, "val") and not stage.threshold_chosen_on(ev, "train")  # older files
    ev["scores"]["val"]["threshold_chosen_on_this_split"] = False
    assert not stage.threshold_chosen_on(ev, "val")                     # the recorded flag wins
    own = {"threshold": {"own_bg": True, "source": {"split": "val"}},
           "scores": {"val": {"threshold_chosen_on_this_split": True}}}
    assert not stage.threshold_chosen_on(own, "val")


def test_only_numbers_on_the_threshold_split_are_marked(world):
    """The threshold was chosen on `train`: the val CAM scores are clean, the refinement table's CAM seeds (scored
    on the pseudo-mask split `train`) carry the dagger and its footnote."""
    md = world["md"]
    mark, note = rb.SAME_SPLIT_MARK, rb.SAME_SPLIT_NOTE
    assert note == "\u2020 background threshold chosen on this split (optimistic, as in MCTformer's seed protocol)"
    summary = md[md.index("## Summary"):md.index("## Pseudo-mask refinement")]
    assert mark not in summary
    ref = {r["experiment"]: r for r in md_table(md, "## Pseudo-mask refinement")}
    for x in EXPS:
        assert ref[x]["split"] == "train"
        assert ref[x]["CAM seeds mIoU"] == f4(world["evals"][x]["cam_eval"]["scores"]["train"]["miou"]) + mark
        assert ref[x]["pseudo-mask mIoU"] == f4(world["evals"][x]["mask_eval"]["scores"]["miou"])
    assert next(x for x in world["json"]["refinement"] if x["experiment"] == "alpha")[
        "cam_seeds_threshold_chosen_on_this_split"] is True
    after = md[md.index("## Pseudo-mask refinement"):]
    assert after.count(note) == 1 and mark not in after[after.index("## Background threshold"):]
    rows = {r["experiment"]: r for r in md_table(md, "## Background threshold")}
    assert {rows[x]["search"] for x in EXPS} == {"grid"}


def test_threshold_swept_on_the_eval_split_is_marked_in_the_report(world, tmp_path):
    """alpha's t is swept (greedily) on val itself, beta's on train: alpha's val CAM numbers carry the dagger,
    beta's do not."""
    e = world["exps"]["alpha"]
    alpha_json = tmp_path / "alpha_cams.json"
    same = cam_scores(str(world["prep"]), e["cams"], "val", "val", {**EVAL_CFG, "search": "greedy"}, str(alpha_json))
    files = report_files(world)
    files["alpha"]["cam_eval"] = str(alpha_json)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rb, "_git", lambda args, repo: None)
        for name in ("plot_threshold_curves", "plot_per_class_iou", "plot_qualitative", "plot_training"):
            mp.setattr(rb, name, lambda *a, **k: None)              # the tables are under test, not the plots
        mp.setattr(rb, "figure_png_bytes", lambda fig, dpi=rb.DPI: b"")
        stage.report(*report_args(world, tmp_path / "out", files))
    md = (tmp_path / "out" / "report.md").read_text()
    mark = rb.SAME_SPLIT_MARK
    beta = world["evals"]["beta"]["cam_eval"]
    summary = {r["experiment"]: r for r in md_table(md, "## Summary")}
    assert summary["alpha"]["CAM seeds mIoU (val, at t)"] == f4(same["scores"]["val"]["miou"]) + mark
    assert summary["beta"]["CAM seeds mIoU (val, at t)"] == f4(beta["scores"]["val"]["miou"])
    strict = {r["experiment"]: r for r in md_table(md, "## Summary", 1)}
    assert strict["alpha"]["CAM seeds miou_strict"] == f4(same["scores"]["val"]["miou_strict"]) + mark
    assert strict["beta"]["CAM seeds miou_strict"] == f4(beta["scores"]["val"]["miou_strict"])
    summary_text = md[md.index("## Summary"):md.index("## Pseudo-mask refinement")]
    assert rb.SAME_SPLIT_NOTE in summary_text
    # refinement (train): alpha has no CAM scores on train, beta's t was chosen on train
    ref = {r["experiment"]: r for r in md_table(md, "## Pseudo-mask refinement")}
    assert ref["alpha"]["CAM seeds mIoU"] == "n/a"
    assert ref["beta"]["CAM seeds mIoU"] == f4(beta["scores"]["train"]["miou"]) + mark
    # thresholds: the search is stated, the eval-split CAM mIoU marked for alpha only
    th = {r["experiment"]: r for r in md_table(md, "## Background threshold")}
    assert (th["alpha"]["search"], th["beta"]["search"]) == ("greedy", "grid")
    assert "first local maximum" in th["alpha"]["criterion"]
    assert th["alpha"]["CAM mIoU on val at t"] == f4(same["scores"]["val"]["miou"]) + mark
    assert th["beta"]["CAM mIoU on val at t"] == f4(beta["scores"]["val"]["miou"])
    line = next(x for x in md.splitlines() if x.startswith("- `alpha`: t = "))
    assert "(search `greedy`;" in line and f"{mark} `val` is the split t was chosen on" in line
    assert mark not in next(x for x in md.splitlines() if x.startswith("- `beta`: t = "))
    pc = md_table(md, "## Per-class IoU")
    assert f"alpha CAM{mark}" in pc[0] and "beta CAM" in pc[0] and f"beta CAM{mark}" not in pc[0]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    flags = {r["experiment"]: r["cam"]["threshold_chosen_on_this_split"] for r in rep["rows"]}
    assert flags == {"alpha": True, "beta": False}
    assert {t["experiment"]: (t["search"], t["swept_on_reported_split"]) for t in rep["thresholds"]} == \
        {"alpha": ("greedy", True), "beta": ("grid", False)}


def test_per_class_tables_equal_the_eval_jsons(world):
    rows = md_table(world["md"], "## Per-class IoU")
    assert [r["class"] for r in rows] == CLASSES + ["**miou**", "**miou_strict**"]
    for x in EXPS:
        ev = world["evals"][x]
        for col, scores in ((f"{x} CAM", ev["cam_eval"]["scores"]["val"]), (f"{x} mask", ev["mask_eval"]["scores"]),
                            (f"{x} seg", ev["seg_eval"]["scores"])):
            assert [rows[c][col] for c in range(len(CLASSES))] == [f4(v) for v in scores["iou"]]
            assert rows[len(CLASSES)][col] == f4(scores["miou"])
            assert rows[len(CLASSES) + 1][col] == f4(scores["miou_strict"])
    assert rows[CLASSES.index("bar")]["alpha seg"] == "n/a"     # absent from val GT and prediction (0/0)
    pr = md_table(world["md"], "## CAM seed precision and recall")
    for x in EXPS:
        s = world["evals"][x]["cam_eval"]["scores"]["val"]
        assert [r[f"{x} precision"] for r in pr] == [f4(v) for v in s["precision"]]
        assert [r[f"{x} recall"] for r in pr] == [f4(v) for v in s["recall"]]
    assert world["json"]["per_class"]["experiments"]["beta"]["pseudo_mask"]["iou"] == \
        world["evals"]["beta"]["mask_eval"]["scores"]["iou"]


def test_all_background_baseline_equals_hand_computation(world):
    gts = [world["masks"][i] for i in SPLITS["val"]]
    valid = np.concatenate([g[g != 255] for g in gts])
    bg_iou = np.sum(valid == 0) / valid.size                  # TP = T_bg, union = T_bg + N - T_bg = N
    present_fg = len({int(v) for v in np.unique(valid) if v != 0})
    assert present_fg == 2                                    # disc and square; bar is absent from val
    miou = bg_iou / (1 + present_fg)
    strict = bg_iou / len(CLASSES)
    b = world["json"]["baseline"]
    assert b["split"] == "val" and b["n_images"] == 4
    assert b["miou"] == pytest.approx(miou, abs=1e-12)
    assert b["miou_strict"] == pytest.approx(strict, abs=1e-12)
    assert b["iou"][0] == pytest.approx(bg_iou, abs=1e-12)
    assert f"`miou` = {miou:.4f} and `miou_strict` = {strict:.4f}" in world["md"]


def test_plots_are_valid_images_linked_relatively(world):
    out = world["out"]
    for name in ("threshold_curves", "per_class_iou", "qualitative", "training"):
        p = out / f"{name}.png"
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            w, h = im.size
            assert w >= 400 and h >= 250
            arr = np.asarray(im.convert("L"))
            assert arr.std() > 5                                # not a blank canvas
        assert f"]({name}.png)" in world["md"]
        assert world["json"]["plots"][name] == f"{name}.png"
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    q = world["json"]["qualitative"]
    assert q["eval_ids"] == SPLITS["val"] and len(q["train_ids"]) == 2 and q["train_split"] == "train_aug"


def test_training_summary_keeps_last_entry_of_repeated_steps_and_handles_missing_files(world):
    tr = world["json"]["training"]
    a = tr["alpha"]["classifier"]
    assert a["metrics_exists"] and a["steps"] == 6 and a["n_logged"] == 6
    assert a["repeated_steps"] == 2 and a["bad_lines"] == 1
    assert a["final_loss"] == pytest.approx(0.5 / 6)
    assert a["final_loss_mean"] == pytest.approx(np.mean([1.0, 0.5, 0.5 / 3, 0.5 / 4, 0.5 / 5, 0.5 / 6]))
    assert tr["alpha"]["segmentation"]["final_loss"] == pytest.approx(2.0 - 1.2)
    b = tr["beta"]
    assert not b["classifier"]["metrics_exists"] and b["classifier"]["final_loss"] is None
    assert b["classifier"]["seed"] == 2 and b["classifier"]["max_steps"] == 6
    assert not b["segmentation"]["model_exists"] and b["segmentation"]["seed"] is None
    rows = md_table(world["md"], "## Training")
    r = next(r for r in rows if r["experiment"] == "alpha" and r["network"] == "classifier")
    assert r["steps logged"] == "6" and r["final loss"] == f4(0.5 / 6) and "resumed" in r["notes"]
    r = next(r for r in rows if r["experiment"] == "beta" and r["network"] == "segmentation")
    assert "no model file" in r["notes"] and "no metrics file" in r["notes"]


def test_reproducibility_block(world):
    rep = world["json"]["reproducibility"]
    assert rep["seed"] == 3
    assert rep["models"]["alpha"]["classifier"] == {"seed": 1, "config_hash": "clsalpha",
                                                   "path": world["exps"]["alpha"]["classifier"]}
    assert rep["models"]["alpha"]["segmentation"]["config_hash"] == "segalpha"
    assert rep["git"] == {"sha": "unknown", "dirty": None, "describe": "unknown"}
    v = rep["versions"]
    assert set(v) >= {"python", "torch", "torchvision", "numpy", "h5py", "snakemake", "pydensecrf2"}
    assert v["numpy"] == np.__version__ and v["python"] == ".".join(map(str, sys.version_info[:3]))
    md = world["md"]
    assert "- workflow seed: `3`" in md and "- git: `unknown`" in md and f"numpy {np.__version__}" in md
    assert rep["host"] in md and rep["date_utc"] in md
    assert "clsalpha" in md and "segalpha" in md


def test_synthetic_note_and_title(world):
    md = world["md"]
    assert md.startswith(f"# WSSS report: dataset `{DS}`, suite `{SUITE}`")
    assert "synthetic data" in md
    assert "synthetic data" not in rb.render_markdown({**world["json"], "synthetic": False})


def test_nothing_is_written_when_a_plot_fails(world, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(rb, "_git", lambda args, repo: None)
    monkeypatch.setattr(rb, "plot_training", boom)
    out = tmp_path / "rep"
    with pytest.raises(RuntimeError, match="plot failed"):
        stage.report(*report_args(world, out))
    assert not out.exists() or list(out.iterdir()) == []


def test_log_file_gets_the_summary(world, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)        # setup_job_logging redirects these; restore after
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(rb, "_git", lambda args, repo: None)
    files = report_files(world, ["alpha"])
    files["alpha"]["cams"] = files["alpha"]["cams"][0]                        # a single path as a str is fine
    files["alpha"]["segmentation"] = str(tmp_path / "never_trained" / "model.pt")
    log = str(tmp_path / "logs" / "report.log")
    rep = stage.report(*report_args(world, tmp_path / "rep", files, ["alpha"], log=log))
    text = (tmp_path / "logs" / "report.log").read_text()
    assert "wrote" in text and "alpha (cam)" in text
    assert [r["experiment"] for r in rep["rows"]] == ["alpha"]
    assert not rep["training"]["alpha"]["segmentation"]["model_exists"]
    assert (tmp_path / "rep" / "report.md").is_file()


def test_mismatched_shard_split_is_an_error(world, tmp_path, monkeypatch):
    monkeypatch.setattr(rb, "_git", lambda args, repo: None)
    files = report_files(world)
    for f in files.values():
        f["preds"] = f["masks"]                                # train_aug shards where val predictions belong
    with pytest.raises(stage.DataError, match="expected 'val'"):
        stage.report(*report_args(world, tmp_path / "rep", files))
    assert not (tmp_path / "rep").exists()


def test_refinement_kind_comes_from_the_experiment_settings(world):
    assert stage.refinement_kind({}) == "dense CRF" and stage.refinement_kind({"refine": "irn"}) == "IRN random walk"
    kinds = {r["experiment"]: r["refinement"] for r in world["json"]["refinement"]}
    assert kinds == {"alpha": "dense CRF", "beta": "AffinityNet random walk"}
    assert world["json"]["config"] == {"seed": 3, "experiments": SETTINGS, "eval": EVAL_CFG}


def test_git_state_unknown_clean_and_dirty(monkeypatch):
    def fake(outputs):
        def run(cmd, **kw):
            out = outputs.get(cmd[1])
            if isinstance(out, Exception):
                raise out
            return subprocess.CompletedProcess(cmd, 0 if out is not None else 128, out or "", "")
        return run

    monkeypatch.setattr(rb.subprocess, "run", fake({"rev-parse": FileNotFoundError("git")}))
    assert rb.git_state() == {"sha": "unknown", "dirty": None, "describe": "unknown"}
    monkeypatch.setattr(rb.subprocess, "run", fake({}))               # not a repository (exit 128)
    assert rb.git_state()["sha"] == "unknown"
    monkeypatch.setattr(rb.subprocess, "run", fake({"rev-parse": "abc123\n", "status": ""}))
    assert rb.git_state() == {"sha": "abc123", "dirty": False, "describe": "abc123"}
    monkeypatch.setattr(rb.subprocess, "run", fake({"rev-parse": "abc123\n", "status": " M x.py\n"}))
    assert rb.git_state() == {"sha": "abc123", "dirty": True, "describe": "abc123-dirty"}


def test_read_metrics_missing_file_is_none(tmp_path):
    assert stage.read_metrics(tmp_path / "nope.jsonl") is None


def test_workflow_script_passes_the_rule_names(monkeypatch, tmp_path):
    """workflow_scripts/report.py runs the stage function ``report`` with the rule's params.job, input and output."""
    seen = {}
    monkeypatch.setattr(stage, "report", lambda job, inp, out: seen.update(job=job, inp=inp, out=out))
    monkeypatch.setattr(sys, "stdout", sys.stdout)        # setup_job_logging redirects these; restore after
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    files = {"cam": {"cam_eval": "c.json", "cams": ["x.h5"], "segmentation": "b.pt"}}
    params = {"job": {"dataset": "toy", "prepared": "d", "splits": {"eval": "val", "train": "train_aug"},
                      "extra": {"suite": "cam", "experiments": ["cam"], "labels": {"cam": "cam"}, "files": files,
                                "settings": {"cam": {"method": "cam"}}, "seed": 0, "eval_stage": {}}}}
    inp = {"manifest": ["m"], "cam_eval": ["c.json"], "cams": ["x.h5"], "segmentation": ["b.pt"]}
    out = {"md": "r.md", "json": "r.json", "curves": "c.png", "per_class": "p.png", "qualitative": "q.png",
           "training": "t.png", "superpixels": "s.png"}
    log = str(tmp_path / "l.log")
    config = {"seed": 3, "device": "cpu", "gpu_lock_dir": "locks", "weights_dir": "w", "method_plugins": []}
    snake = SimpleNamespace(input=inp, output=out, params=params, log=[log], threads=1, wildcards={"suite": "cam"},
                            config=config)
    runpy.run_path(str(REPO / "workflow_scripts" / "report.py"), init_globals={"snakemake": snake})
    job = seen["job"]
    assert isinstance(job, JobSettings) and job.log == log and job.prepared == "d" and job.split("eval") == "val"
    # how the job runs comes from the workflow config, not from the params
    assert (job.seed, job.device, job.lock_dir, job.weights_dir) == (3, "cpu", "locks", "w")
    assert job.extra["files"] == files and job.extra["experiments"] == ["cam"]
    assert seen["out"].md == "r.md" and seen["out"].json == "r.json" and seen["out"].training == "t.png"
    assert seen["inp"].cams == ["x.h5"] and seen["inp"].segmentation == ["b.pt"]


# ============================================================================================ seeds

def test_seed_runs_give_mean_std_per_seed_values_and_a_paired_comparison(world, tmp_path):
    """Three seeds of two experiments (beta compared with alpha): the "Over seeds" table equals numpy's mean and
    sample std of the eval JSONs, the paired test equals scipy.stats.ttest_rel, provenance columns are filled."""
    from scipy import stats

    root, prep, masks = world["root"], world["prep"], world["masks"]
    seeds = [0, 5, 6]
    runs = {x: [x if s == 0 else f"{x}-seed{s}" for s in seeds] for x in EXPS}
    exps = dict(world["exps"])
    for x in EXPS:
        for s, run in zip(seeds[1:], runs[x][1:]):
            exps[run] = make_experiment(root, prep, masks, run, 10 * s + len(x), with_seg=True, with_metrics=False)
    flat_runs = [r for x in EXPS for r in runs[x]]
    files = report_files({"exps": exps}, flat_runs)
    job, inp, out = report_args(world, tmp_path, files=files, experiments=EXPS)
    prov = {x: {"backbone": f"net-{x}", "pretrained": "none (random init)",
                "refinement": SETTINGS[x].get("refine", "crf"),
                "inference": "CAM scales 1.0", "crf": "pseudo-masks no", "segmentation": "DeepLab-V2 (resnet50)",
                "seeds": "0, 5, 6"} for x in EXPS}
    job.extra.update(experiments=flat_runs, labels={r: "cam" for r in flat_runs},
                     settings={r: SETTINGS[r.split("-")[0]] for r in flat_runs}, provenance=prov,
                     groups={x: {"runs": runs[x], "seeds": seeds, "label": x.upper(),
                                 "compare_to": "alpha" if x == "beta" else None} for x in EXPS})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rb, "_git", lambda args, repo: None)
        report = stage.report(job, inp, out)
    md = (tmp_path / "report.md").read_text()
    ev = {r: json.loads(Path(exps[r]["cam_eval"]).read_text())["scores"]["val"]["miou"] for r in flat_runs}
    seg = {r: json.loads(Path(exps[r]["seg_eval"]).read_text())["scores"]["miou"] for r in flat_runs}
    table = {r["experiment"]: r for r in md_table(md, "## Over seeds")}
    for x in EXPS:
        vals = np.array([ev[r] for r in runs[x]])
        cell = table[f"{x.upper()} (`{x}`)"]["CAM seeds mIoU"]
        assert cell.startswith(f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f} (")
        assert cell.endswith(" / ".join(f"{v:.4f}" for v in vals) + ")")
        assert table[f"{x.upper()} (`{x}`)"]["backbone"] == f"net-{x}"
        m = report["seeds"]["experiments"][x]["metrics"]["segmentation.miou"]
        assert m["mean"] == pytest.approx(np.mean([seg[r] for r in runs[x]]))
    paired = {p["metric"]: p for p in report["seeds"]["paired"]}
    assert set(paired) == {"cam.miou", "pseudo_mask.miou", "segmentation.miou"}
    a, b = np.array([ev[r] for r in runs["alpha"]]), np.array([ev[r] for r in runs["beta"]])
    p = paired["cam.miou"]
    assert p["differences"] == pytest.approx((b - a).tolist())
    oracle = stats.ttest_rel(b, a)
    assert p["t"] == pytest.approx(oracle.statistic) and p["p"] == pytest.approx(oracle.pvalue)
    assert p["exceeds_spread"] == bool(oracle.pvalue < 0.05)
    rows = md_table(md, "### Paired comparison")
    assert rows[0]["comparison"] == "`beta` vs `alpha`" and rows[0]["exceeds the spread"] in ("**yes**", "no")
    summary = {r["experiment"]: r for r in md_table(md, "## Summary")}
    assert list(summary) == flat_runs                          # every seed's own row, with its provenance
    assert summary["beta-seed5"]["seeds"] == "0, 5, 6" and summary["alpha"]["backbone"] == "net-alpha"
    assert "Mean ± std over each experiment's seeds" in md      # per-class table over seeds
