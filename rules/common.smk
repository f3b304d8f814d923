# Helpers shared by the rules: config validation, paths, per-stage settings, dataset checks.

import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from wsss_core.config import config_hash, stage_config, url_file_name
from wsss_core.data.prepare import VOC_HOWTO, voc_layout_problems, voc_lists
from wsss_core.data.prepare import SALIENCY_HOWTO
from wsss_core.errors import CONFIG_FIX, config_problems, missing_weights_message


def _config_sources():
    """Where settings come from, most specific first: --config, each --configfile, then config.yaml."""
    import yaml

    sources = {}
    if workflow.config_settings.config:
        sources["--config on the command line"] = dict(workflow.config_settings.config)
    files = list(workflow.config_settings.configfiles)
    files.extend(f for f in workflow.configfiles if Path(f).absolute() not in files)
    for f in files:
        try:
            sources[str(f)] = yaml.safe_load(Path(f).read_text()) or {}
        except Exception:  # unreadable here: Snakemake has read it already, just don't name it
            pass
    return sources


def _validate_config():
    """Schema check with one readable message (dotted key, the file it is in, closest spelling) instead of the schema
    dump of snakemake.utils.validate, which still runs afterwards (it would fill in schema defaults)."""
    import yaml

    schema = yaml.safe_load((Path(workflow.basedir) / "schemas" / "config.schema.yaml").read_text())
    problems = config_problems(config, schema, _config_sources())
    if problems:
        listed = "\n  - ".join(["invalid configuration:", *problems])
        raise WorkflowError(f"{listed}\n{CONFIG_FIX}")
    validate(config, "../schemas/config.schema.yaml")


_validate_config()

R = config["results_dir"]
L = config["logs_dir"]
GPU_LOCKS = config.get("gpu_lock_dir", ".wsss/gpu-locks")


def _check_references():
    for suite, s in config["suites"].items():
        for exp in s["experiments"]:
            if exp not in config["experiments"]:
                raise WorkflowError(
                    f"config: suites.{suite} names experiment {exp!r}, which is not under experiments "
                    f"(known: {sorted(config['experiments'])})"
                )


_check_references()


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    experiment="|".join(config["experiments"]),
    suite="|".join(config["suites"]),
    split="[a-z][a-z0-9_]*",
    shard=r"\d+",
    nshards=r"\d+",


def dataset_cfg(dataset):
    return config["datasets"][dataset]


def split_name(dataset, role):
    """Actual split name of a role (train, threshold, mask_eval, eval) of a dataset."""
    return dataset_cfg(dataset)["splits"][role]


def scfg(dataset, experiment, stage):
    return stage_config(config, dataset, experiment, stage)


def train_gpus(dataset, experiment, stage):
    """The `gpu` resource of a training job: the stage's n_procs (data-parallel processes, one per GPU; default 1)."""
    return int(scfg(dataset, experiment, stage).get("n_procs", 1))


def dataset_root(dataset):
    ds = dataset_cfg(dataset)
    if ds["kind"] == "toy":
        return f"{R}/{dataset}/source"
    return ds["root"]


def dataset_for_prepare(dataset):
    """What prepare_dataset depends on: the dataset's own settings, without stage overrides."""
    ds = {k: v for k, v in dataset_cfg(dataset).items() if k not in ("stages", "saliency")}
    return {**ds, "root": dataset_root(dataset)}


def prepared(dataset):
    return f"{R}/{dataset}/dataset"


def manifest(dataset):
    return f"{prepared(dataset)}/manifest.json"


def dataset_inputs(wildcards):
    """Inputs of prepare_dataset; for a user dataset, check its layout now (at DAG build) and name what is missing."""
    ds = dataset_cfg(wildcards.dataset)
    if ds["kind"] == "toy":
        return {"root": dataset_root(wildcards.dataset)}
    problems = voc_layout_problems(ds, wildcards.dataset)
    if problems:
        raise WorkflowError(
            f"dataset {wildcards.dataset!r} (datasets.{wildcards.dataset}.root = {ds['root']}) is not usable:\n  - "
            + "\n  - ".join(problems)
            + "\n"
            + VOC_HOWTO
        )
    root = Path(ds["root"]).expanduser()
    lists = {f"list_{s}": str(p) for s, p in voc_lists(ds, wildcards.dataset)[0].items()}
    return {"images": str(root / "JPEGImages"), **lists}


def saliency_inputs(dataset, experiment):
    """The saliency manifest when the experiment trains with saliency (classifier.saliency); checks a user folder now."""
    if not scfg(dataset, experiment, "classifier").get("saliency"):
        return []
    ds = dataset_cfg(dataset)
    if ds["kind"] != "toy":
        folder = (ds.get("saliency") or {}).get("dir")
        if not folder or not Path(folder).is_dir():
            raise WorkflowError(
                f"experiment {experiment!r} trains with saliency maps, but datasets.{dataset}.saliency.dir "
                f"({folder}) is not a folder.\n{SALIENCY_HOWTO}"
            )
    return [f"{R}/{dataset}/saliency/manifest.json"]


def n_shards(dataset, experiment, stage):
    return int(scfg(dataset, experiment, stage)["n_shards"])


def cam_splits(dataset, experiment):
    roles = scfg(dataset, experiment, "cams")["splits"]
    return list(dict.fromkeys(split_name(dataset, r) for r in roles))


_SHARDS_CHECKED = set()


def checked_shards(paths, kind, split, hash_now):
    """``paths``, after a check of those that exist (once per file and Snakemake process, when the DAG is built):
    an invalid shard (truncated or unreadable, incomplete, of another kind / split / shard number) is renamed to
    ``<name>.invalid-<time>``, a valid one made with other settings (its config_hash attr is not ``hash_now()``, the
    hash its rule writes now) is marked out of date (mtime 1970), so that this run rebuilds them (wsss_core.store.shards.
    set_aside_invalid_shard). Dry runs, --touch, --report and --summary only warn."""
    todo = [p for p in paths if p not in _SHARDS_CHECKED and os.path.exists(p)]
    _SHARDS_CHECKED.update(paths)
    if not todo:
        return paths
    from wsss_core.store.shards import set_aside_invalid_shard  # h5py: imported only when a shard exists

    act = workflow.executor_plugin is not None and not workflow.dryrun and not workflow.touch
    expect = {"kind": kind, "split": split, "config_hash": hash_now()}
    stale, changed = [], False
    for p in todo:
        found = set_aside_invalid_shard(p, expect, dry_run=not act)
        changed = changed or bool(found and act)
        if found and found[0] == "out of date":
            stale.append(p)
        elif found:
            logger.warning(f"invalid shard: {found[1]}")
    if changed:  # Snakemake may have listed the folder already: forget what it saw
        workflow.iocache.clear()
    if stale:  # after a settings change Snakemake reruns these jobs anyway ("params changed"): one line
        logger.warning(f"{len(stale)} shard(s) were made with other settings (their config_hash is not the current "
                       f"settings' {expect['config_hash']}): {', '.join(stale)}; "
                       + ("marked out of date (mtime 1970) so that their jobs run again" if act else
                          "a real run marks them out of date (mtime 1970) so that their jobs run again"))
    return paths


def cams_hash(dataset, experiment):
    return stage_hash(dataset, experiment, "classifier", "cams")


def cam_shards(dataset, experiment, split):
    n = n_shards(dataset, experiment, "cams")
    paths = [f"{R}/{dataset}/{experiment}/cams/{split}/{k}-of-{n}.h5" for k in range(n)]
    return checked_shards(paths, "cams", split, lambda: cams_hash(dataset, experiment))


def all_cam_shards(wildcards):
    return [p for s in cam_splits(wildcards.dataset, wildcards.experiment) for p in cam_shards(wildcards.dataset, wildcards.experiment, s)]


def uses_affinity(dataset, experiment):
    return bool(scfg(dataset, experiment, "affinity").get("enabled"))


def uses_irn(dataset, experiment):
    return bool(scfg(dataset, experiment, "irn").get("enabled"))


def mask_stages(dataset, experiment):
    """The stages that determine the pseudo-masks (for hashes downstream of them)."""
    if uses_irn(dataset, experiment):
        return ("classifier", "cams", "eval", "irn")
    base = ("classifier", "cams", "eval", "crf")
    return base + ("affinity",) if uses_affinity(dataset, experiment) else base


def ir_label_hash(dataset, experiment):
    """IRN stage without the random walk: confident-region labels and the IRN network."""
    return stage_hash(dataset, experiment, "classifier", "cams", "eval", "irn-")


def ir_label_shards(dataset, experiment):
    """IRN stage: the confident-region labels (cam_to_ir_label), one shard set per experiment."""
    n = n_shards(dataset, experiment, "irn")
    paths = [f"{R}/{dataset}/{experiment}/irn/ir_label/{k}-of-{n}.h5" for k in range(n)]
    return checked_shards(paths, "masks", split_name(dataset, "train"), lambda: ir_label_hash(dataset, experiment))


def irn_classifier_inputs(w):
    """The trained classifier when the IRN backbone starts from it (irn.init_from_classifier, toy data)."""
    if scfg(w.dataset, w.experiment, "irn").get("init_from_classifier"):
        return [f"{R}/{w.dataset}/{w.experiment}/classifier/model.pt"]
    return []


def crf_hash(dataset, experiment):
    return stage_hash(dataset, experiment, "classifier", "cams", "eval", "crf")


def rw_hash(dataset, experiment):
    return stage_hash(dataset, experiment, "classifier", "cams", "eval", "affinity")


def irn_mask_hash(dataset, experiment):
    return stage_hash(dataset, experiment, "classifier", "cams", "eval", "irn")


def pseudo_mask_hash(dataset, experiment):
    """The config hash of the pseudo-masks (make_sem_seg_labels, random_walk or refine_crf)."""
    if uses_irn(dataset, experiment):
        return irn_mask_hash(dataset, experiment)
    return (rw_hash if uses_affinity(dataset, experiment) else crf_hash)(dataset, experiment)


def pseudo_mask_shards(dataset, experiment):
    """Pseudo-mask shards: IRN random walk (irn.enabled), AffinityNet random walk (affinity.enabled), else the
    CRF-refined CAMs."""
    if uses_irn(dataset, experiment):
        n = n_shards(dataset, experiment, "irn")
        folder = "pseudo_masks_irn"
    elif uses_affinity(dataset, experiment):
        n = n_shards(dataset, experiment, "affinity")
        folder = "pseudo_masks_rw"
    else:
        n = n_shards(dataset, experiment, "crf")
        folder = "pseudo_masks"
    paths = [f"{R}/{dataset}/{experiment}/{folder}/{k}-of-{n}.h5" for k in range(n)]
    return checked_shards(paths, "masks", split_name(dataset, "train"), lambda: pseudo_mask_hash(dataset, experiment))


def seg_hash(dataset, experiment):
    """Segmentation network and its predictions."""
    return stage_hash(dataset, experiment, *mask_stages(dataset, experiment), "segmentation")


def seg_pred_shards(dataset, experiment, split):
    n = n_shards(dataset, experiment, "segmentation")
    paths = [f"{R}/{dataset}/{experiment}/segmentation/pred/{split}/{k}-of-{n}.h5" for k in range(n)]
    return checked_shards(paths, "masks", split, lambda: seg_hash(dataset, experiment))


def stage_hash(dataset, experiment, *stages):
    """Hash of everything that determines a stage's output (settings of it and its upstream stages, seed, method).
    A stage named ``irn-`` stands for the IRN settings without the random walk's (``irn_cfg(..., walk=False)``)."""
    exp = config["experiments"][experiment]
    return config_hash(
        {
            "dataset": dataset_for_prepare(dataset),
            "method": exp["method"],
            "seed": config["seed"],
            "stages": {
                s: irn_cfg(dataset, experiment, walk=False) if s == "irn-" else scfg(dataset, experiment, s)
                for s in stages
            },
        }
    )


def irn_cfg(dataset, experiment, walk=True):
    """The irn stage settings; ``walk=False`` drops ``rw`` (the random walk's settings), so that changing them
    reruns make_sem_seg_labels only, not cam_to_ir_label and train_irn."""
    cfg = scfg(dataset, experiment, "irn")
    return cfg if walk else {k: v for k, v in cfg.items() if k != "rw"}


def report_md(dataset, suite):
    return f"{R}/{dataset}/reports/{suite}/report.md"


def suite_experiments(suite):
    return config["suites"][suite]["experiments"]


def weights_inputs(cfg):
    """torchvision weights files a stage needs (fetched by fetch_weights); a local path is checked now (DAG build)."""
    w = cfg["backbone"].get("weights")
    if w and w.get("path") and not Path(w["path"]).expanduser().is_file():
        raise WorkflowError(f"{missing_weights_message(w['path'])} (Set in config: the backbone.weights.path of "
                            "this rule's stage, for the dataset and experiment shown below.)")
    if w and w.get("torchvision") and not w.get("path"):
        return [f"{config['weights_dir']}/{w['torchvision']}.pth"]
    if w and w.get("url") and not w.get("path"):
        return [f"{config['weights_dir']}/url/{url_file_name(w['url'])}"]
    return []


def weights_url(name):
    """The URL of a ``{url: ...}`` weights spec whose file name is ``name`` (any stage of any experiment)."""
    def walk(node):
        if isinstance(node, dict):
            u = node.get("url")
            if isinstance(u, str) and url_file_name(u) == name:
                yield u
            for v in node.values():
                yield from walk(v)

    urls = sorted(set(walk(config)))
    if not urls:
        raise WorkflowError(f"no weights url in the config ends in {name!r}")
    return urls[0]


def report_inputs(wildcards):
    ds, exps = wildcards.dataset, suite_experiments(wildcards.suite)
    ev = split_name(ds, "eval")
    return {
        "manifest": manifest(ds),
        "cam_evals": [f"{R}/{ds}/{e}/eval/cams.json" for e in exps],
        "mask_evals": [f"{R}/{ds}/{e}/eval/pseudo_masks.json" for e in exps],
        "seg_evals": [f"{R}/{ds}/{e}/eval/segmentation.json" for e in exps],
        "cams": [p for e in exps for p in cam_shards(ds, e, ev)],
        "masks": [p for e in exps for p in pseudo_mask_shards(ds, e)],
        "preds": [p for e in exps for p in seg_pred_shards(ds, e, ev)],
        "classifiers": [f"{R}/{ds}/{e}/classifier/model.pt" for e in exps],
        "segmenters": [f"{R}/{ds}/{e}/segmentation/model.pt" for e in exps],
        "saliency": sorted({p for e in exps for p in saliency_inputs(ds, e)}),
        "submissions": [f"{R}/{ds}/{e}/submission/results.tar.gz" for e in exps] if has_test_split(ds) else [],
        "ir_label_evals": [f"{R}/{ds}/{e}/eval/ir_labels.json" for e in exps if uses_irn(ds, e)],
    }


def has_test_split(dataset):
    """Datasets with a `test` split role (e.g. VOC2012 test) get a submission archive per experiment."""
    return bool(dataset_cfg(dataset)["splits"].get("test"))


def experiment_label(experiment):
    exp = config["experiments"][experiment]
    return exp.get("label") or exp["method"]
