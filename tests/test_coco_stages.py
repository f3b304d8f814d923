"""COCO as a dataset of the pipeline: the coco_masks stage on a hand-written instances file (every pixel checked),
prepare_dataset on its markers, the errors for a missing file, every method's COCO settings, and the COCO DAG on
the real id lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, run_snakemake, shared_path, write_yaml
from wsss_core.errors import DatasetError

H, W = 8, 10
from wsss_core.data.coco import COCO_2014_IDS as COCO_IDS  # noqa: E402


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out by hand: run lengths of the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F")
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return {"counts": [int(c) for c in counts], "size": [H, W]}


def write_instances(path: Path) -> np.ndarray:
    """A val instances file: image 1 with a polygon (person), an uncompressed RLE (car) over it, a compressed RLE
    (dog) and a person crowd region partly under the car; image 2 without annotations. Returns image 1's expected
    class mask (crowd 255 first, then the instances in file order, later ones on top)."""
    import pycocotools.mask as mask_util

    from wsss_core.data.coco import COCO_CLASSES

    dog = _box(6, 8, 0, 3)
    rle = mask_util.encode(np.asfortranarray(dog))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]]},
        {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _uncompressed_rle(_box(3, 7, 4, 9))},
        {"id": 13, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": rle},
        {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": _uncompressed_rle(_box(0, 4, 7, 10))},
    ]
    for a in anns:
        a.update(area=1.0, bbox=[0, 0, 1, 1])
    doc = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": H, "width": W},
                      {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": H, "width": W}],
           "annotations": anns,
           "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, COCO_CLASSES[1:])]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    # drawn by hand: '.' bg, 'p' person (1), 'c' car (3), 'd' dog (17), 'x' crowd (255)
    rows = [".......xxx",
            ".ppppp.xxx",
            ".ppppp.xxx",
            ".pppcccccx",
            ".pppccccc.",
            "....ccccc.",
            "ddd.ccccc.",
            "ddd......."]
    code = {".": 0, "p": 1, "c": 3, "d": 17, "x": 255}
    return np.array([[code[ch] for ch in r] for r in rows], np.uint8)


def _run_coco_masks(tmp_path: Path, instances: Path, split: str = "val"):
    from wsss_core.stages import Files, JobSettings
    from wsss_core.stages.dataset import coco_masks

    marker = tmp_path / "coco_masks" / split / "0-of-1.json"
    job = JobSettings(dataset="c", config_hash="h0", wildcards={"split": split, "shard": "0", "nshards": "1"},
                      extra={"instances": str(instances), "masks": {}, "toy": False})
    coco_masks(job, Files(), Files(marker=str(marker)))
    return marker


def test_coco_masks_stage_writes_every_pixel_and_prepare_reads_it(tmp_path):
    from wsss_core.data.io import read_label_png, write_image
    from wsss_core.data.prepare import DatasetInfo, prepare_dataset

    root = tmp_path / "coco"
    expected = write_instances(root / "annotations" / "instances_val2014.json")
    marker = _run_coco_masks(tmp_path, root / "annotations" / "instances_val2014.json")
    m = json.loads(marker.read_text())
    stem = "COCO_val2014_000000000001"
    assert m["ids"] == [stem] and m["n_images_in_file"] == 2 and m["n_with_objects"] == 1   # image 2 dropped
    assert m["labels"][stem] == [1, 3, 17] and m["crowd"] == "ignore" and len(m["classes"]) == 81
    got = read_label_png(tmp_path / "coco_masks" / "masks" / f"{stem}.png")
    assert got.shape == (H, W)
    assert np.array_equal(got, expected), f"\n{got}\n!=\n{expected}"

    (root / "val2014").mkdir()
    write_image(root / "val2014" / f"{stem}.jpg", np.full((H, W, 3), 128, np.uint8))
    ds = {"kind": "coco", "root": str(root), "image_dirs": {"val": "val2014"}}
    man = prepare_dataset(ds, "c", tmp_path / "prepared", coco_markers=[str(marker)])
    assert man["splits"] == {"val": 1} and man["label_source"]["annotations"] == 1 and man["n_classes"] == 81
    info = DatasetInfo(tmp_path / "prepared")
    assert info.ids("val") == [stem] and info.labels(stem) == [1, 3, 17]
    assert np.array_equal(read_label_png(info.mask_path(stem)), expected)
    assert info.image_path(stem).resolve() == (root / "val2014" / f"{stem}.jpg").resolve()


def test_coco_masks_missing_or_broken_instances_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        _run_coco_masks(tmp_path, tmp_path / "annotations" / "instances_val2014.json")
    bad = tmp_path / "bad" / "instances_val2014.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad/instances_val2014.json"):
        _run_coco_masks(tmp_path, bad)
    assert not (tmp_path / "coco_masks" / "val" / "0-of-1.json").exists()


def test_prepare_names_missing_coco_images(tmp_path):
    from wsss_core.data.prepare import prepare_dataset

    root = tmp_path / "coco"
    write_instances(root / "annotations" / "instances_val2014.json")
    marker = _run_coco_masks(tmp_path, root / "annotations" / "instances_val2014.json")
    with pytest.raises(DatasetError, match=r"COCO_val2014_000000000001\.jpg.*cocodataset"):
        prepare_dataset({"kind": "coco", "root": str(root), "image_dirs": {"val": "val2014"}}, "c",
                        tmp_path / "prepared", coco_markers=[str(marker)])


# ---- configuration and DAG -------------------------------------------------------------------------------------

COCO_STEPS = {"cam": 25650, "ppc": 256500, "ppc_fsae": 1026000, "sipe": 25650, "sipe_fsae": 25650, "sfc": 30780,
              "mctformer": 76920, "mctformer_v1": 76920, "mctformer_fsae": 76920, "spcam_eps": 30780,
              "spcam": 30780, "msa_image": 61560, "msa_sal": 61560, "rtc": 256500}


def test_every_experiment_has_its_coco_schedule():
    from wsss_core.config import stage_config
    from wsss_core.pipeline import Pipeline

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert set(COCO_STEPS) == set(config["experiments"])
    for exp, steps in COCO_STEPS.items():
        assert stage_config(config, "coco", exp, "classifier")["max_steps"] == steps, exp
        assert stage_config(config, "voc", exp, "classifier")["max_steps"] != steps or exp == "sipe_fsae", exp
    ppc = stage_config(config, "coco", "ppc", "classifier")
    assert (ppc["crop_size"], ppc["batch_size"], ppc["resize_long"], ppc["ppc"]["eps_alpha"]) == (321, 16, [256, 448],
                                                                                                  0.9)
    p = Pipeline(config)
    for exp in ("sipe", "sfc", "sipe_fsae"):   # COCO: the CRF labels of cam_to_ir_label, no IRN walk
        assert p.mask_artifact(exp, "coco") == "ir_labels" and p.mask_artifact(exp, "voc") == "irn_masks", exp


def _coco_tree(root: Path) -> dict[str, int]:
    """A COCO-shaped tree of the real id lists (placeholder images and instances files)."""
    from wsss_core.data.coco import write_placeholder_tree

    lists = shared_path("data", "coco14_lists")
    stems = {split: (lists / name).read_text().split() for split, name in (("train", "train_coco.txt"),
                                                                            ("val", "val_coco.txt"))}
    write_placeholder_tree(root, stems)
    return {k: len(v) for k, v in stems.items()}


def _job_counts(stdout: str) -> dict[str, int]:
    table = stdout[stdout.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slow  # writes 122,218 placeholder files and builds two DAGs (about 15 s)
def test_coco_dry_run_on_real_id_lists(tmp_path):
    """coco_fsae_report on a COCO-shaped tree of the real lists: 16 mask shards per split, one prepare job, every
    row's jobs, SIPE's pseudo-masks from cam_to_ir_label (no IRN); a missing tree names what is missing."""
    root = tmp_path / "COCO"
    cfg = write_yaml(tmp_path / "coco.yaml", {"datasets": {"coco": {"root": str(root),
                                                                     "saliency": {"dir": str(tmp_path)}}}})
    (tmp_path / "weights").mkdir()
    for f in ("ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "deit_small_patch16_224-cd65a155.pth"):
        (tmp_path / "weights" / f).write_bytes(b"")
    proc = run_snakemake(tmp_path, "-n", "coco_fsae_report", configfile=cfg, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "instances_train2014.json" in text and "cocodataset.org" in text, text[-2000:]
    counts = _coco_tree(root)
    assert counts == {"train": 82081, "val": 40137}
    proc = run_snakemake(tmp_path, "-n", "coco_fsae_report", configfile=cfg)
    assert proc.elapsed < 60, f"DAG took {proc.elapsed:.1f} s"  # gross-regression guard; timings: bench/
    jobs = _job_counts(proc.stdout)
    assert jobs["coco_masks"] == 32 and jobs["prepare_dataset"] == 1 and jobs["train_classifier"] == 6
    assert jobs["infer_cams"] == 6 * 2 * 64                      # train and val CAMs, 64 shards each
    assert "train_irn" not in jobs and jobs["cam_to_ir_label"] == 2 * 8   # sipe, sipe_fsae: CRF labels only
    assert jobs["train_affinity"] == 2 and jobs["refine_crf"] == 2 * 64   # MCTformer rows; PPC rows
