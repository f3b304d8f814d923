"""Pure report building blocks: figures (matplotlib, Agg canvas, no pyplot state), Markdown, environment capture.

Nothing here reads pipeline outputs or writes files; :mod:`wsss_core.stages.report` gathers the numbers, calls
these functions, and writes every output atomically once all of them have succeeded.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..data.io import voc_palette

DPI = 100

#: The two mean conventions of :mod:`wsss_core.metrics.miou`, as stated in every report.
MEAN_CONVENTIONS = {
    "miou": "mean IoU over the classes present in the ground truth or the prediction of the split "
            "(T_c + P_c > 0; a class absent from both is excluded) - the project default",
    "miou_strict": "mean IoU over all classes, an absent class counting as IoU 0 (SEAM/RTC do_python_eval style)",
}

#: Packages whose versions every report records (``python`` is the interpreter).
PACKAGES = ("torch", "torchvision", "numpy", "h5py", "snakemake", "pydensecrf2", "matplotlib", "pillow")

#: Marks a CAM-seed score whose background threshold was swept on the split it is reported on.
SAME_SPLIT_MARK = "†"
SAME_SPLIT_NOTE = (f"{SAME_SPLIT_MARK} background threshold chosen on this split (optimistic, as in MCTformer's "
                   "seed protocol)")

STAGE_LABELS = {"cam": "CAM seeds", "pseudo_mask": "pseudo-masks", "segmentation": "segmentation"}
_STAGE_COLORS = {"cam": "tab:blue", "pseudo_mask": "tab:orange", "segmentation": "tab:green"}


# ============================================================================================ environment

def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """``{"python": x.y.z, package: version or "not installed"}`` via importlib.metadata."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(args: Sequence[str], repo: str | Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=str(repo), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout


def git_state(repo: str | Path = ".") -> dict[str, Any]:
    """``{"sha": HEAD or "unknown", "dirty": bool or None, "describe": "<sha>[-dirty]"}`` of the working tree."""
    out = _git(["rev-parse", "HEAD"], repo)
    sha = out.strip() if out and out.strip() else "unknown"
    porcelain = _git(["status", "--porcelain"], repo) if sha != "unknown" else None
    dirty = None if porcelain is None else bool(porcelain.strip())
    describe = sha + ("-dirty" if dirty else "")
    return {"sha": sha, "dirty": dirty, "describe": describe}


def environment(repo: str | Path = ".") -> dict[str, Any]:
    """Versions, git state, platform, host and date (UTC) of this run."""
    return {
        "versions": package_versions(),
        "git": git_state(repo),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "host": socket.gethostname(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


# ============================================================================================ figures

def _nan(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot global state, safe in any backend setting)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """Render ``fig`` to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _exp_colors(n: int) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_threshold_curves(curves: Sequence[Mapping[str, Any]]) -> Figure:
    """mIoU vs background threshold, one colour per experiment, one line style per split, chosen t marked.

    Each item: ``experiment``, ``metric`` (``miou`` or ``miou_strict``, the mean used for the choice),
    ``splits`` {split: {"thresholds": [...], "values": [...], "role": str}}, ``chosen_t``, ``source_split``.
    """
    fig = new_figure(8.0, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    styles = ["-", "--", ":", "-."]
    colors = _exp_colors(len(curves))
    metrics = sorted({c["metric"] for c in curves})
    for color, c in zip(colors, curves):
        t_star = c.get("chosen_t")
        for k, (split, s) in enumerate(c["splits"].items()):
            x, y = np.asarray(s["thresholds"], dtype=float), _nan(s["values"])
            role = f", {s['role']}" if s.get("role") else ""
            j = int(np.argmin(np.abs(x - t_star))) if t_star is not None and x.size else None
            is_source = split == c.get("source_split")
            label = f"{c['experiment']} - {split}{role}"
            if j is not None:
                label += f": {'chosen ' if is_source else ''}t={fmt_t(x[j])}, {fmt(y[j], 3)}"
            ax.plot(x, y, styles[k % len(styles)], color=color, lw=1.6, label=label)
            if j is not None:
                ax.plot([x[j]], [y[j]], "o" if is_source else "x", color=color, ms=8 if is_source else 7,
                        mfc=color if is_source else "none", mew=1.8, zorder=5)
        if t_star is not None:
            ax.axvline(t_star, color=color, ls=":", lw=1.0, alpha=0.8)
    ax.set_xlabel("background threshold t")
    ax.set_ylabel(" / ".join(metrics) + " (CAM seeds)")
    ax.set_title("CAM seed mIoU vs background threshold (o: chosen on source split, x: same t on other split)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no threshold curves", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_per_class_iou(classes: Sequence[str], series: Sequence[Mapping[str, Any]]) -> Figure:
    """Grouped bars per class (plus a final ``mIoU`` group), one row of axes per experiment, one bar per stage.

    Each series: ``experiment``, ``stage`` (cam | pseudo_mask | segmentation), ``iou`` (per class, None for an
    absent class), ``miou``. Absent classes get no bar and a small "-".
    """
    exps = list(dict.fromkeys(s["experiment"] for s in series)) or [""]
    stages = list(dict.fromkeys(s["stage"] for s in series)) or ["cam"]
    groups = list(classes) + ["mIoU"]
    many = len(groups) > 8
    width_in = float(np.clip(2.5 + len(groups) * (0.16 * len(stages) + 0.3), 7.0, 24.0))
    height_in = 1.5 + 2.9 * len(exps) + (0.5 if many else 0)
    fig = new_figure(width_in, height_in)
    x = np.arange(len(groups), dtype=float)
    bw = 0.8 / len(stages)
    handles = {}
    for r, exp in enumerate(exps):
        ax = fig.add_subplot(len(exps), 1, r + 1)
        for s in (s for s in series if s["experiment"] == exp):
            k = stages.index(s["stage"])
            vals = np.append(_nan(s["iou"]), np.nan if s.get("miou") is None else float(s["miou"]))
            pos = x - 0.4 + bw * (k + 0.5)
            ok = ~np.isnan(vals)
            bars = ax.bar(pos[ok], vals[ok], bw * 0.95, color=_STAGE_COLORS.get(s["stage"], "grey"),
                          edgecolor="black", linewidth=0.3)
            handles.setdefault(s["stage"], bars)
            for p in pos[~ok]:
                ax.text(p, 0.01, "-", ha="center", va="bottom", fontsize=7, color="grey")
        ax.axvline(len(classes) - 0.5, color="black", lw=0.8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel(f"{exp}\nIoU" if exp else "IoU", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xticks(x)
        if r == len(exps) - 1:
            ax.set_xticklabels(groups, rotation=45 if many else 0, ha="right" if many else "center", fontsize=8)
        else:
            ax.set_xticklabels([])
    fig.text(0.5, 1 - 0.12 / height_in, "Per-class IoU (CAM seeds: eval split at the chosen t)", ha="center",
             va="top", fontsize=10)
    fig.text(0.5, 1 - 0.38 / height_in, "'-' = class absent from ground truth and prediction (0/0)", ha="center",
             va="top", fontsize=8, color="dimgrey")
    if handles:
        fig.legend([handles[k] for k in stages if k in handles],
                   [STAGE_LABELS.get(k, k) for k in stages if k in handles], loc="upper center",
                   bbox_to_anchor=(0.5, 1 - 0.58 / height_in), ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.95 / height_in))
    return fig


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map (jet colours) over an RGB uint8 image; returns float RGB in [0, 1]."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    hi = heat.max() if heat.size else 0.0
    if hi > 1.0:
        heat = heat / hi
    heat = np.clip(heat, 0.0, 1.0)
    rgb = colormaps["jet"](heat)[..., :3]
    if image is None or image.shape[:2] != heat.shape:
        return rgb
    return (1 - alpha) * (np.asarray(image, dtype=np.float64) / 255.0) + alpha * rgb


def plot_qualitative(rows: Sequence[Sequence[Mapping[str, Any]]], classes: Sequence[str],
                     labels_shown: Sequence[int] = ()) -> Figure:
    """A grid of panels. Each panel: ``title`` and ``image`` (H, W, 3 uint8 or float in [0, 1]) or None with an
    optional ``note``. A legend shows the VOC colours of ``labels_shown`` (class values)."""
    n_rows = max(1, len(rows))
    n_cols = max([len(r) for r in rows] + [1])
    cell = 1.75
    fig = new_figure(cell * n_cols + 0.2, cell * n_rows + 0.9)
    pal = voc_palette(256) / 255.0
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            panel = row[c] if c < len(row) else None
            if panel is None:
                ax.axis("off")
                continue
            ax.set_title(panel.get("title", ""), fontsize=7)
            img = panel.get("image")
            if img is None:
                for side in ax.spines.values():
                    side.set_visible(False)
                ax.text(0.5, 0.5, panel.get("note", "n/a"), ha="center", va="center", fontsize=7, color="grey",
                        transform=ax.transAxes, wrap=True)
            else:
                ax.imshow(img, interpolation="nearest")
    if not rows:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    handles = [Patch(facecolor=pal[v], edgecolor="black", linewidth=0.3,
                     label=classes[v] if 0 <= v < len(classes) else ("void" if v == 255 else str(v)))
               for v in labels_shown]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), max(4, n_cols)), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return fig


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    valid = np.convolve(y, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), valid])


def plot_superpixels(rows: Sequence[Mapping[str, Any]], overlays: Mapping[str, Sequence[tuple]]) -> Figure:
    """Top: heatmaps of the (walk steps n, threshold t) mIoU grid of each superpixel experiment with one, on the split
    where the pair is chosen, the chosen pair marked. Bottom: superpixel boundaries (hard labels of the stored Q) on
    a few eval images per network. A note when the suite has neither."""
    from skimage.segmentation import mark_boundaries

    grids = [r for r in rows if r.get("rw_grid")]
    n_img = max((len(v) for v in overlays.values()), default=0)
    n_rows = (1 if grids else 0) + len(overlays)
    cols = max(len(grids), n_img, 1)
    fig = new_figure(4.6 * cols, 3.8 * max(1, n_rows))
    if not n_rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no superpixel method in this suite", ha="center", va="center", color="grey")
        return fig
    for k, r in enumerate(grids):
        g = r["rw_grid"]
        split = g["chosen"]["split"]
        ns, ts = g["rw_grid"], np.asarray(g["thresholds"], dtype=float)
        z = np.asarray([_nan(g["curves"][split][str(n)]) for n in ns])
        ax = fig.add_subplot(n_rows, cols, k + 1)
        im = ax.imshow(z, aspect="auto", origin="lower", cmap="viridis",
                       extent=(ts[0], ts[-1], -0.5, len(ns) - 0.5))
        ax.set_yticks(range(len(ns)), [str(n) for n in ns])
        ax.plot([g["chosen"]["t"]], [ns.index(g["chosen"]["n"])], marker="x", color="red", ms=9, mew=2)
        ax.set_title(f"{r['experiment']}: {g['metric']} on {split}", fontsize=10)
        ax.set_xlabel("background threshold t")
        ax.set_ylabel("walk steps n")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.subplots_adjust(hspace=0.45)
    for row, (network, items) in enumerate(overlays.items(), start=1 if grids else 0):
        for j, (image_id, image, labels) in enumerate(items):
            ax = fig.add_subplot(n_rows, cols, row * cols + j + 1)
            ax.imshow(mark_boundaries(image, labels, color=(1, 1, 0)))
            ax.set_title(f"network {network}: {image_id}", fontsize=9)
            ax.axis("off")
    return fig


def plot_training(panels: Mapping[str, Mapping[str, Mapping[str, Any] | None]]) -> Figure:
    """Loss vs step, one axis per network (``{"classifier": {exp: {"step": [...], "loss": [...]} or None}}``).

    Raw losses are drawn faintly, a moving average on top. An axis without any metrics gets a note, and the
    experiments without a metrics file are named under the axis.
    """
    fig = new_figure(5.2 * max(1, len(panels)), 4.2)
    colors = None
    for k, (network, by_exp) in enumerate(panels.items()):
        ax = fig.add_subplot(1, max(1, len(panels)), k + 1)
        colors = colors or dict(zip(by_exp, _exp_colors(len(by_exp))))
        missing, drawn = [], []
        for exp, curve in by_exp.items():
            if not curve or not len(curve.get("step", [])):
                missing.append(exp)
                continue
            x, y = np.asarray(curve["step"], dtype=float), _nan(curve["loss"])
            color = colors.get(exp, "black")
            ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, _moving_average(y, max(1, y.size // 50)), color=color, lw=1.6, label=exp)
            drawn.append(y)
        ax.set_title(f"{network} training loss", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if drawn:
            allv = np.concatenate(drawn)
            allv = allv[np.isfinite(allv)]
            if allv.size and allv.min() > 0 and allv.max() / allv.min() > 20:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics file\n(state/metrics.jsonl missing)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        if missing and drawn:
            ax.text(0.0, -0.2, "no metrics: " + ", ".join(missing), transform=ax.transAxes, fontsize=7,
                    color="grey", va="top")
    fig.tight_layout()
    return fig


# ============================================================================================ Markdown

def fmt(x: Any, nd: int = 4) -> str:
    """A number with ``nd`` decimals; None/NaN as "n/a"."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{float(x):.{nd}f}"


def fmt_t(t: Any) -> str:
    """A threshold with at least 2 and at most 6 decimals (0.3 -> 0.30, 0.125 -> 0.125); None as "n/a"."""
    if t is None:
        return "n/a"
    s = f"{float(t):.6f}".rstrip("0")
    whole, _, frac = s.partition(".")
    return f"{whole}.{frac:0<2}"


def fmt_marked(x: Any, same_split: bool, nd: int = 4) -> str:
    """:func:`fmt`, followed by :data:`SAME_SPLIT_MARK` when ``same_split`` (t swept on the reported split)."""
    return fmt(x, nd) + (SAME_SPLIT_MARK if same_split else "")


def _same_split_footnote(add, flags: Sequence[bool]) -> None:
    """Add the :data:`SAME_SPLIT_NOTE` footnote (and a blank line) if any number above carries the mark."""
    if any(flags):
        add(SAME_SPLIT_NOTE + ".")
        add("")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column: "l" or "r" (default: first column left, others right)."""
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pseudo_mask_t_note(th: Mapping[str, Any]) -> str:
    used = th.get("pseudo_mask_bg_thresholds") or []
    src = "; ".join(th.get("pseudo_mask_bg_threshold_source") or [])
    if not used:
        return f" The pseudo-masks use no threshold: {src}." if src else ""
    same = len(used) == 1 and th.get("value") is not None and math.isclose(used[0], th["value"], abs_tol=1e-9)
    note = f" The pseudo-mask shards record t = {', '.join(fmt_t(u) for u in used)}" + (f" ({src})" if src else "")
    if same:
        return note + "."
    return note + " - **different from the chosen t**: the pseudo-masks were not made with the threshold above."


#: provenance fields of a row (wsss_core/pipeline.py::Pipeline.provenance) -> column header
PROVENANCE = {"backbone": "backbone", "pretrained": "pretrained weights", "refinement": "refinement",
              "inference": "inference scales / flip", "crf": "CRF", "segmentation": "segmentation network",
              "seeds": "seeds"}


def provenance_cells(prov: Mapping[str, Any] | None) -> list[str]:
    """The provenance columns of a row (``n/a`` where not given)."""
    return [str((prov or {}).get(k) or "n/a") for k in PROVENANCE]


def fmt_pm(mean: Any, std: Any, nd: int = 4) -> str:
    """``0.3512 ± 0.0101``; ``n/a`` without a mean."""
    if mean is None:
        return "n/a"
    return f"{mean:.{nd}f} ± {std:.{nd}f}" if std is not None else fmt(mean, nd)


def _per_seed(values: Sequence[Any], nd: int = 4) -> str:
    return " / ".join(fmt(v, nd) for v in values)


#: the seed table's numbers: key in the seed statistics -> column name
SEED_COLUMNS = {"threshold": "bg threshold t", "cam.miou": "CAM seeds mIoU", "pseudo_mask.miou": "pseudo-mask mIoU",
                "segmentation.miou": "segmentation mIoU", "cam.miou_strict": "CAM miou_strict",
                "pseudo_mask.miou_strict": "pseudo-mask miou_strict",
                "segmentation.miou_strict": "segmentation miou_strict", "refinement.delta": "refinement change",
                "single_stage.miou": "single-stage mIoU", "single_stage.crf_miou": "single-stage + CRF mIoU"}


def _render_seeds(add, sd: Mapping[str, Any], r: Mapping[str, Any]) -> None:
    """The "Over seeds" section: mean ± std with the per-seed values, and the paired comparisons."""
    groups = sd["experiments"]
    add("## Over seeds")
    add("")
    add("Each experiment ran once per seed (its own branch of the workflow: classifier, CAMs, refinement and "
        "segmentation network; the seed sets initialisation, data order and augmentation). Mean ± sample standard "
        "deviation (ddof 1) over the seeds, then the per-seed values in seed order.")
    add("")
    prov = r.get("provenance") or {}
    cols = [c for c in SEED_COLUMNS if any(c in g["metrics"] for g in groups.values())]
    body = []
    for g, x in groups.items():
        cells = [f"{x['label']} (`{g}`)", ", ".join(str(s) for s in x["seeds"])]
        for c in cols:
            m = x["metrics"].get(c)
            cells.append("n/a" if m is None else f"{fmt_pm(m['mean'], m['std'])} ({_per_seed(m['values'])})")
        body.append(cells + provenance_cells(prov.get(g))[:-1])
    add(md_table(["experiment", "seeds", *[SEED_COLUMNS[c] for c in cols], *list(PROVENANCE.values())[:-1]], body))
    add("")
    if sd.get("paired"):
        add("### Paired comparison")
        add("")
        add("Each experiment against the one it extends (or its `compare_to`), seed by seed: differences d = "
            "experiment - base on the seeds both ran. The difference **exceeds the seed-to-seed spread** when the 95 % "
            "Student-t interval of the mean difference excludes 0 (paired t-test p < 0.05); `spread` is the std of "
            "each side over the same seeds.")
        add("")
        rows = []
        for x in sd["paired"]:
            verdict = {True: "**yes**", False: "no", None: "n/a (fewer than 2 common seeds)"}[x["exceeds_spread"]]
            ci = "n/a" if x["ci"] is None else f"[{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]"
            rows.append([f"`{x['experiment']}` vs `{x['compare_to']}`", x["metric"], ", ".join(map(str, x["seeds"])),
                         " / ".join(f"{v:+.4f}" for v in x["differences"]),
                         "n/a" if x["mean"] is None else f"{x['mean']:+.4f} ± {fmt(x['std'])}", ci, fmt(x["p"]),
                         f"{fmt(x['spread_b'])} / {fmt(x['spread_a'])}", verdict])
        add(md_table(["comparison", "number", "seeds", "per-seed difference", "mean difference ± std", "95 % interval",
                      "p", "spread (experiment / base)", "exceeds the spread"], rows,
                     ["l", "l", "l", "l", "r", "r", "r", "r", "l"]))
        add("")


def render_markdown(r: Mapping[str, Any]) -> str:
    """The report Markdown from the report dict (the one written as report.json), so both agree."""
    ev = r["splits"]["eval"]
    out: list[str] = []
    add = out.append
    add(f"# WSSS report: dataset `{r['dataset']}`, suite `{r['suite']}`")
    add("")
    ds = r["dataset_info"]
    if r.get("synthetic"):
        add("> **Note: synthetic data.** This dataset is the procedurally generated toy dataset (kind "
            f"`{ds.get('kind')}`), not real images; its numbers check that the pipeline works and are not "
            "comparable with published PASCAL VOC results.")
        add("")
    if r.get("notes"):
        add("Notes:")
        add("")
        for note in r["notes"]:
            add(f"- {note}")
        add("")
    exps = ", ".join(f"`{row['experiment']}` ({row['method']})" for row in r["rows"])
    split_counts = ", ".join(f"{k}: {v}" for k, v in ds.get("splits", {}).items())
    add(f"Generated {r['reproducibility']['date_utc']}. Experiments: {exps}. Dataset `{ds.get('name')}` "
        f"({ds.get('n_classes')} classes incl. background; images per split: {split_counts}).")
    add("")
    add("Mean conventions (both are reported):")
    add("")
    for k, v in r["mean_conventions"].items():
        add(f"- `{k}`: {v}.")
    add("")

    # ----- summary
    add("## Summary")
    add("")
    rows = r["rows"]
    cam_split = rows[0]["cam"]["split"] if rows else ev
    mask_split = rows[0]["pseudo_mask"]["split"] if rows else "?"
    seg_split = rows[0]["segmentation"]["split"] if rows else ev
    headers = ["experiment", "method", "bg threshold t", f"CAM seeds mIoU ({cam_split}, at t)",
               f"pseudo-mask mIoU ({mask_split})", f"segmentation mIoU ({seg_split})", *PROVENANCE.values()]
    cam_same = [bool(row["cam"].get("threshold_chosen_on_this_split")) for row in rows]
    add(md_table(headers, [[row["experiment"], row["method"], fmt_t(row["threshold"]),
                            fmt_marked(row["cam"]["miou"], same), fmt(row["pseudo_mask"]["miou"]),
                            fmt(row["segmentation"]["miou"]), *provenance_cells(row.get("provenance"))]
                           for row, same in zip(rows, cam_same)],
                 ["l", "l", "r", "r", "r", "r", *["l"] * len(PROVENANCE)]))
    add("")
    add("Provenance columns (from each experiment's settings; an imported experiment's are what its `import."
        "provenance` declares): backbone and pretrained weights of the classifier, how the pseudo-masks were refined, "
        "inference scales and flip of the CAMs and of the segmentation network, CRF use, the segmentation network, "
        "and the seeds the experiment ran with.")
    add("")
    add("Values are `miou` (present-class mean), as fractions in [0, 1]. The same with `miou_strict` "
        "(mean over all classes) and the image counts:")
    add("")
    add(md_table(["experiment", "CAM seeds miou_strict", "pseudo-mask miou_strict", "segmentation miou_strict",
                  "CAM images", "pseudo-mask images", "segmentation images"],
                 [[row["experiment"], fmt_marked(row["cam"]["miou_strict"], same),
                   fmt(row["pseudo_mask"]["miou_strict"]), fmt(row["segmentation"]["miou_strict"]),
                   fmt(row["cam"]["n_images"]), fmt(row["pseudo_mask"]["n_images"]),
                   fmt(row["segmentation"]["n_images"])] for row, same in zip(rows, cam_same)]))
    add("")
    _same_split_footnote(add, cam_same)
    b = r["baseline"]
    add(f"Reference: predicting **all background** on `{b['split']}` ({b['n_images']} images) gives "
        f"`miou` = {fmt(b['miou'])} and `miou_strict` = {fmt(b['miou_strict'])} (background IoU "
        f"{fmt(b['iou'][0] if b['iou'] else None)}).")
    add("")

    # ----- seeds
    sd = r.get("seeds") or {}
    if sd.get("multi_seed"):
        _render_seeds(add, sd, r)

    # ----- refinement
    if r.get("refinement"):
        add("## Pseudo-mask refinement")
        add("")
        add("What the refinement stage adds over the CAM seeds, both scored on the same split (seeds at the "
            "chosen t, or by their own background map). For IRN, the confident-region labels of `cam_to_ir_label` "
            "are also scored: the fraction of pixels they label and the mIoU on those pixels.")
        add("")
        add(md_table(["experiment", "refinement", "split", "CAM seeds mIoU", "pseudo-mask mIoU", "change",
                      "IR labels: labelled fraction", "IR labels: mIoU on labelled"],
                     [[x["experiment"], x["refinement"], x["split"],
                       fmt_marked(x["cam_seeds_miou"], x.get("cam_seeds_threshold_chosen_on_this_split", False)),
                       fmt(x["pseudo_mask_miou"]), "n/a" if x["delta"] is None else f"{x['delta']:+.4f}",
                       fmt((x.get("ir_labels") or {}).get("labelled_fraction")),
                       fmt((x.get("ir_labels") or {}).get("miou_labelled"))] for x in r["refinement"]],
                     ["l", "l", "l", "r", "r", "r", "r", "r"]))
        add("")
        _same_split_footnote(add, [x.get("cam_seeds_threshold_chosen_on_this_split", False) for x in r["refinement"]])

    # ----- single-stage output
    if r.get("single_stage"):
        add("## Single-stage output")
        add("")
        add("Methods with a segmentation branch of their own (RTC) are scored twice: **single-stage**, the "
            "method's own output on the eval split (score maps thresholded at the background threshold chosen by "
            "the curve, then with the CRF of `stages.single_stage.crf`), and **two-stage**, the segmentation "
            "network of the summary table trained on the method's pseudo-masks.")
        add("")
        ss = r["single_stage"]
        add(md_table(["experiment", "split", "bg threshold t", "t chosen on (criterion)", "single-stage mIoU",
                      "single-stage + CRF mIoU", "two-stage (segmentation network) mIoU", "images"],
                     [[x["experiment"], x["split"], fmt_t(x["threshold"]),
                       f"{x['threshold_source']['split']} ({x['threshold_source']['criterion']})",
                       fmt_marked(x["miou"], x["threshold_chosen_on_this_split"]), fmt(x["crf_miou"]),
                       fmt(x["two_stage_miou"]), fmt(x["n_images"])] for x in ss],
                     ["l", "l", "r", "l", "r", "r", "r", "r"]))
        add("")
        _same_split_footnote(add, [x["threshold_chosen_on_this_split"] for x in ss])
        classes = r["per_class"]["classes"]
        add(md_table(["experiment", "output", *classes],
                     [[x["experiment"], name, *[fmt(v) for v in x[key]]]
                      for x in ss for name, key in (("single-stage", "iou"), ("+ CRF", "crf_iou"))]))
        add("")

    # ----- superpixels
    if r.get("superpixels"):
        add("## Superpixels")
        add("")
        add("Where each superpixel method's Q maps come from: a trained superpixel network (`scn`, named under "
            "`superpixel_networks`) or a classical stand-in (`soft_slic`, `skimage_slic`), which changes the "
            "absolute numbers. GT reconstruction (CHENDL-SHEN/ESC `train_Q.py`): the one-hot ground truth blurred "
            "to a small grid (12 x 12 on VOC; the `blur` column) and back, refined by the superpixel random walk of "
            "each back end, scored as mIoU; `bilinear` is the blurred mask without superpixels.")
        add("")
        backends = ["scn", "soft_slic", "skimage_slic", "bilinear"]
        add(md_table(["experiment", "Q back end", "network", "GT reconstruction split (images, steps, blur)",
                      *[f"GT rec. mIoU {b}" for b in backends]],
                     [[x["experiment"], x["backend"], x.get("network") or "-",
                       (lambda g: f"{g['split']} ({g['images']}, {g['steps']}, {g['low']}x{g['low']})" if g else "-")(
                           x.get("gt_reconstruction")),
                       *[fmt(((x.get("gt_reconstruction") or {}).get("miou") or {}).get(b)) for b in backends]]
                      for x in r["superpixels"]],
                     ["l", "l", "l", "l", "r", "r", "r", "r"]))
        add("")
        grids = [x for x in r["superpixels"] if x.get("rw_grid")]
        if grids:
            add("Superpixel random walk (SP-CAM's evaluator grid): the thresholded CAMs after n walk steps, each n "
                "with its best background threshold t, on the split where the pair is chosen and on the eval split "
                "(the references pick the pair on the split they report: that choice is an oracle, marked ‡). "
                "The pipeline's CAMs use the configured n.")
            add("")
            grid_rows = []
            for x in grids:
                g = x["rw_grid"]
                sel, oracle = g["chosen"], g["eval_oracle"]
                thr = g["thresholds"]
                for n in g["rw_grid"]:
                    cs, ce = g["curves"][sel["split"]][str(n)], g["curves"][oracle["split"]][str(n)]
                    i = max(range(len(cs)), key=lambda j: -1 if cs[j] is None else cs[j])
                    k = max(range(len(ce)), key=lambda j: -1 if ce[j] is None else ce[j])
                    mark = ", ".join(m for m, ok in (("chosen", n == sel["n"]), ("configured", n == g["configured_n"]),
                                                     ("eval oracle‡", n == oracle["n"])) if ok)
                    grid_rows.append([x["experiment"], n, fmt_t(thr[i]), fmt(cs[i]), fmt(ce[i]), fmt_t(thr[k]),
                                      fmt(ce[k]), mark or "-"])
            add(md_table(["experiment", "walk steps n", f"best t on {grids[0]['rw_grid']['chosen']['split']}",
                          "mIoU there", f"mIoU on {grids[0]['rw_grid']['eval_oracle']['split']} at that t",
                          "eval-split best t‡", "eval-split best mIoU‡", "pair"], grid_rows,
                         ["l", "r", "r", "r", "r", "r", "r", "l"]))
            add("")
            for x in grids:
                nb = x["rw_grid"]["n0_vs_best"]
                if nb.get("n0") is not None:
                    add(f"- `{x['experiment']}` on `{nb['split']}`: no walk (n = 0) {fmt(nb['n0'])}, best n = "
                        f"{nb['best_n']} {fmt(nb['best'])} ({nb['best'] - nb['n0']:+.4f}).")
            add("")
            add(f"![Superpixel random-walk grid]({r['plots']['superpixels']})")
            add("")

    # ----- thresholds
    add("## Background threshold")
    add("")
    add("The CAM seeds label a pixel with its strongest class if that class's CAM exceeds t, else background. "
        "t is chosen once per experiment on the source split below and used downstream (pseudo-masks and the "
        "CAM scores of this report); the eval-split optimum (same search rule) is shown for reference only and "
        "was not used. Search `grid`: the argmax of the whole curve; `greedy`: MCTformer's `--curve` rule, the first "
        "local maximum (the walk up the thresholds stops at the first t that does not improve mIoU).")
    add("")
    swept = [bool(th.get("swept_on_reported_split")) for th in r["thresholds"]]
    add(md_table(["experiment", "chosen t", "source split", "search", "criterion", "mIoU on source split at t",
                  f"CAM mIoU on {ev} at t", f"{ev} optimum t (reference)", f"{ev} optimum mIoU"],
                 [[th["experiment"], fmt_t(th["value"]), th["source"]["split"], th.get("search", "grid"),
                   th["source"]["criterion"], fmt(th["source"].get("miou_at_value")),
                   fmt_marked(th["eval_miou_at_value"], same), fmt_t(th["eval_oracle"]["t"]),
                   fmt(th["eval_oracle"]["miou"])] for th, same in zip(r["thresholds"], swept)],
                 ["l", "r", "l", "l", "l", "r", "r", "r", "r"]))
    add("")
    _same_split_footnote(add, swept)
    for th in r["thresholds"]:
        if th.get("own_bg"):  # SIPE / SFC: the CAMs have a background map; t = 0 is the plain argmax
            add(f"- `{th['experiment']}`: no background threshold: the CAMs carry their own background map and a "
                f"pixel takes the label of its strongest map (shown as t = 0.00); mIoU on "
                f"`{th['source']['split']}` {fmt(th['source'].get('miou_at_value'))}.")
            continue
        add(f"- `{th['experiment']}`: t = {fmt_t(th['value'])}, chosen on split `{th['source']['split']}` by "
            f"{th['source']['criterion']} (search `{th.get('search', 'grid')}`; mIoU there "
            f"{fmt(th['source'].get('miou_at_value'))})."
            + (f" {SAME_SPLIT_MARK} `{ev}` is the split t was chosen on: its CAM scores are optimistic."
               if th.get("swept_on_reported_split") else "")
            + _pseudo_mask_t_note(th))
    add("")
    add(f"![Background-threshold curves]({r['plots']['threshold_curves']})")
    add("")

    # ----- per class
    pc = r["per_class"]
    add("## Per-class IoU")
    add("")
    add(f"CAM = CAM seeds on `{cam_split}` at the chosen t; mask = pseudo-masks on `{mask_split}`; "
        f"seg = segmentation predictions on `{seg_split}`. `n/a` = class absent from both ground truth and "
        "prediction (0/0, excluded from `miou`, counted as 0 in `miou_strict`).")
    add("")
    names = [e["experiment"] for e in r["rows"]]
    short = {"cam": "CAM", "pseudo_mask": "mask", "segmentation": "seg"}
    cam_mark = {row["experiment"]: SAME_SPLIT_MARK if row["cam"].get("threshold_chosen_on_this_split") else ""
                for row in r["rows"]}
    if sd.get("multi_seed"):  # one column per experiment and stage: mean ± std over its seeds
        groups = sd["experiments"]
        add("Mean ± std over each experiment's seeds (every run's values: `per_class` in report.json).")
        add("")
        headers = ["class"] + [f"{g} {short[s]}" for g in groups for s in short]
        body = [[cname] + [fmt_pm(groups[g]["per_class"][s]["mean"][ci], groups[g]["per_class"][s]["std"][ci])
                           for g in groups for s in short] for ci, cname in enumerate(pc["classes"])]
        body.append(["**miou**"] + [fmt_pm((groups[g]["metrics"].get(f"{s}.miou") or {}).get("mean"),
                                           (groups[g]["metrics"].get(f"{s}.miou") or {}).get("std"))
                                    for g in groups for s in short])
    else:
        headers = ["class"] + [f"{e} {short[s]}" + (cam_mark[e] if s == "cam" else "") for e in names for s in short]
        body = []
        for ci, cname in enumerate(pc["classes"]):
            body.append([cname] + [fmt(pc["experiments"][e][s]["iou"][ci]) for e in names for s in short])
        body.append(["**miou**"] + [fmt(pc["experiments"][e][s]["miou"]) for e in names for s in short])
        body.append(["**miou_strict**"] + [fmt(pc["experiments"][e][s]["miou_strict"]) for e in names
                                           for s in short])
    add(md_table(headers, body))
    add("")
    _same_split_footnote(add, [bool(m) for m in cam_mark.values()])
    add(f"![Per-class IoU]({r['plots']['per_class_iou']})")
    add("")

    add("## CAM seed precision and recall")
    add("")
    add(f"Per class on `{cam_split}` at the chosen t: precision = TP / predicted pixels, recall = TP / ground-truth "
        "pixels.")
    add("")
    if sd.get("multi_seed"):
        groups = sd["experiments"]
        headers = ["class"] + [f"{g} {k}" for g in groups for k in ("precision", "recall")]
        body = [[cname] + [fmt_pm(groups[g]["per_class"][f"cam_{k}"]["mean"][ci],
                                  groups[g]["per_class"][f"cam_{k}"]["std"][ci])
                           for g in groups for k in ("precision", "recall")] for ci, cname in enumerate(pc["classes"])]
    else:
        headers = ["class"] + [f"{e} {k}{cam_mark[e]}" for e in names for k in ("precision", "recall")]
        body = [[cname] + [fmt(pc["experiments"][e]["cam"][k][ci]) for e in names for k in ("precision", "recall")]
                for ci, cname in enumerate(pc["classes"])]
    add(md_table(headers, body))
    add("")
    _same_split_footnote(add, [bool(m) for m in cam_mark.values()])

    # ----- training
    add("## Training")
    add("")
    body = []
    for e in names:
        for net in ("classifier", "segmentation"):
            t = r["training"][e][net]
            note = []
            if not t["model_exists"]:
                note.append("no model file")
            if not t["metrics_exists"]:
                note.append("no metrics file")
            if t.get("repeated_steps"):
                note.append(f"resumed: {t['repeated_steps']} steps logged twice, last kept")
            body.append([e, net, fmt(t["steps"]), fmt(t["max_steps"]), fmt(t["final_loss"]),
                         fmt(t["final_loss_mean"]), "; ".join(note)])
    add(md_table(["experiment", "network", "steps logged", "max_steps", "final loss", "mean loss (last steps)",
                  "notes"], body, ["l", "l", "r", "r", "r", "r", "l"]))
    add("")
    add("`final loss` is the loss of the last logged step; the mean is over the last "
        f"{r['training_window']} logged steps.")
    add("")
    add(f"![Training curves]({r['plots']['training']})")
    add("")

    # ----- qualitative
    add("## Qualitative examples")
    add("")
    q = r.get("qualitative", {})
    add(f"Rows 1-{len(q.get('eval_ids', []))}: `{ev}` images ({', '.join(q.get('eval_ids', [])) or 'none'}): image, "
        "ground truth, CAM heat map (max over the image's class maps), CAM seeds at the chosen t, segmentation "
        "prediction per experiment. "
        + (f"Further rows: `{q.get('train_split')}` images ({', '.join(q.get('train_ids', []))}) with their "
           "pseudo-masks." if q.get("train_ids") else ""))
    add("")
    add(f"![Qualitative examples]({r['plots']['qualitative']})")
    add("")

    # ----- reproducibility
    rep = r["reproducibility"]
    add("## Reproducibility")
    add("")
    git = rep["git"]
    dirty = {True: " (dirty: uncommitted changes)", False: " (clean)", None: ""}[git.get("dirty")]
    add(f"- workflow seed: `{rep['seed']}`")
    add(f"- git: `{git['sha']}`{dirty}")
    add(f"- platform: {rep['platform']}; host: `{rep['host']}`; date (UTC): {rep['date_utc']}")
    add("- versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()))
    add("")
    body = []
    for e in names:
        for net in ("classifier", "segmentation"):
            m = rep["models"][e][net]
            body.append([e, net, fmt(m.get("seed")), m.get("config_hash") or "n/a", m.get("path", "")])
    add(md_table(["experiment", "network", "seed", "config hash", "weights"], body, ["l", "l", "r", "l", "l"]))
    add("")
    return "\n".join(out)
