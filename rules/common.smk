# Helpers shared by the rules: config validation, the artifact table (paths, settings, hashes), job settings,
# input functions, dataset checks. Paths come from wsss_core/pipeline.py::ARTIFACTS, nowhere else.

import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from wsss_core.config import (SEED_MARK, compared_to, experiment_config, split_seed_variant, stage_config,
                              suite_variants, url_file_name)
from wsss_core.data.prepare import SALIENCY_HOWTO, VOC_HOWTO, voc_layout_problems, voc_lists
from wsss_core.errors import CONFIG_FIX, ConfigError, config_problems, missing_weights_message
from wsss_core.pipeline import ARTIFACTS, Pipeline


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
    dump of snakemake.utils.validate, which still runs afterwards (it would fill in schema defaults); then the
    references between sections: suites name experiments, experiments extend experiments and name registered
    methods (after importing method_plugins)."""
    import yaml

    schema = yaml.safe_load((Path(workflow.basedir) / "schemas" / "config.schema.yaml").read_text())
    problems = config_problems(config, schema, _config_sources())
    if problems:
        listed = "\n  - ".join(["invalid configuration:", *problems])
        raise WorkflowError(f"{listed}\n{CONFIG_FIX}")
    validate(config, "../schemas/config.schema.yaml")
    from wsss_core.methods import check_method_name, load_plugins

    P0 = Pipeline(config)
    try:
        load_plugins(config.get("method_plugins") or [])
        for suite, s in config["suites"].items():
            for exp in s["experiments"]:
                if exp not in config["experiments"]:
                    raise ConfigError(f"suites.{suite} names experiment {exp!r}, which is not under experiments "
                                      f"(known: {sorted(config['experiments'])})")
        for exp, e_cfg in config["experiments"].items():
            if e_cfg.get("compare_to") and e_cfg["compare_to"] not in config["experiments"]:
                raise ConfigError(f"experiments.{exp}.compare_to names {e_cfg['compare_to']!r}, which is not under "
                                  f"experiments (known: {sorted(config['experiments'])})")
        for exp in config["experiments"]:
            method = experiment_config(config, exp).get("method")
            if method is None and experiment_config(config, exp).get("import"):
                if not experiment_config(config, exp)["import"].get("cams"):
                    raise ConfigError(f"experiments.{exp} has no method, so its CAMs must be imported: add "
                                      "import.cams (or set method: / extends: to train them)")
                continue
            if method is None:
                raise ConfigError(f"experiments.{exp} has no method (set method:, or extends: an experiment with one)")
            names = {"method": method}
            for d in config["datasets"]:
                base = (P0.settings(d, exp, "classifier").get("fsae") or {}).get("base")
                if base is not None:
                    names[f"stages.classifier.fsae.base (dataset {d})"] = base
            for key, name in names.items():
                try:
                    check_method_name(name)
                except KeyError as exc:
                    raise ConfigError(f"experiments.{exp}.{key}: {exc.args[0]}") from None
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration: {exc}\n{CONFIG_FIX}") from None


_validate_config()

P = Pipeline(config)
L = config["logs_dir"]
ENV = "../envs/wsss.yaml"


def experiment_pattern(names):
    """Wildcard pattern of experiments ``names`` and their seed variants (<e>-seed<N>); ``(?!)`` (nothing) for none."""
    return f"(?:{'|'.join(names)})(?:{SEED_MARK}[0-9]+)?" if names else "(?!)"


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    experiment=experiment_pattern(config["experiments"]),
    scn="|".join(config.get("superpixel_networks") or {}) or "(?!)",
    suite="|".join(config["suites"]),
    split="[a-z][a-z0-9_]*",
    shard=r"\d+",
    nshards=r"\d+",


def out(artifact):
    """A rule's output path: the artifact's template (wsss_core/pipeline.py::ARTIFACTS), wildcards left in."""
    return P.template(artifact)


def dataset_cfg(dataset):
    return config["datasets"][dataset]


def prepared(dataset):
    """The prepared dataset folder (manifest, labels, lists)."""
    return os.path.dirname(P.path("manifest", dataset=dataset))


def generated(dataset):
    """Whether the dataset is made by make_toy_dataset (the toy data, in VOC or COCO format)."""
    ds = dataset_cfg(dataset)
    return ds["kind"] == "toy" or "generator" in ds


def dataset_root(dataset):
    return P.path("toy_source", dataset=dataset) if generated(dataset) else dataset_cfg(dataset)["root"]


def coco_annotations(dataset):
    """split -> instances file of a COCO dataset (datasets.<D>.annotations, relative to its root; default COCO 2014's
    layout)."""
    from wsss_core.data.coco import COCO_LAYOUT

    files = dataset_cfg(dataset).get("annotations") or {s: ann for s, (_, ann) in COCO_LAYOUT.items()}
    return {s: str(Path(dataset_root(dataset)) / f) for s, f in files.items()}


def coco_mask_markers(dataset):
    """The coco_masks markers of every split and shard of a COCO dataset."""
    n = int((dataset_cfg(dataset).get("masks") or {}).get("n_shards", 8))
    return [P.path("coco_masks", dataset=dataset, split=s, shard=k, nshards=n)
            for s in coco_annotations(dataset) for k in range(n)]


def scfg(dataset, experiment, artifact):
    return P.settings(dataset, experiment, artifact)


def job_params(artifact=None, **extra):
    """``params: job=`` of a rule: the JobSettings fields that decide its outputs (wsss_core/stages/job.py) — the
    artifact's stage settings and config hash, the dataset's folder and split roles, the method, and ``extra``
    (values or functions of the wildcards). How the job runs (device, GPU lease folder, weights cache, seed) is
    read from the config by the job itself, so changing it reruns nothing that is done."""

    def params(w):
        d, e = w.get("dataset"), w.get("experiment")
        job = {"extra": {k: v(w) if callable(v) else v for k, v in extra.items()}}
        if d is not None:
            job.update(dataset=d, prepared=prepared(d), splits=dict(dataset_cfg(d)["splits"]))
        if e is not None:
            job.update(experiment=e, method=experiment_config(config, e).get("method", "imported"))
        elif w.get("scn") is not None:  # a superpixel network's job: its name stands where an experiment would
            e = w.get("scn")
            job.update(experiment=e)
        if artifact is not None:
            job.update(cfg=P.settings(d, e, artifact), config_hash=P.hash(d, e, artifact))
        return job

    return params


def train_gpus(artifact):
    """The `gpu` resource of a training job: its stage's n_procs (data-parallel processes, one per GPU; default 1)."""
    return lambda w: int(P.settings(w.dataset, w.experiment, artifact).get("n_procs", 1))


# ------------------------------------------------------------------------------------------- dataset inputs

def dataset_inputs(wildcards):
    """Inputs of prepare_dataset; for a user dataset, check its layout now (at DAG build) and name what is missing."""
    ds = dataset_cfg(wildcards.dataset)
    if ds["kind"] == "coco":
        return {"coco_masks": coco_mask_markers(wildcards.dataset)}
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


def coco_instances(wildcards):
    """The instances file of a COCO split; a user tree is checked now (DAG build), naming what is missing."""
    d = wildcards.dataset
    if not generated(d):
        from wsss_core.data.coco import COCO_HOWTO, coco_tree_problems

        problems = coco_tree_problems(dataset_root(d))
        if problems:
            listed = "\n  - ".join(p for p in problems if p != COCO_HOWTO)
            raise WorkflowError(f"dataset {d!r} (datasets.{d}.root = {dataset_root(d)}) is not usable:\n  - "
                                f"{listed}\n{COCO_HOWTO}")
        return coco_annotations(d)[wildcards.split]
    return [dataset_root(d)]


def dataset_for_prepare(dataset):
    """What prepare_dataset depends on: the dataset's own settings (root resolved), without stage overrides."""
    return {**P.dataset_settings(dataset), "root": dataset_root(dataset)}


def saliency_inputs(dataset, experiment, required=False):
    """The saliency manifest when the experiment trains with saliency (classifier.saliency, or ``required``); checks
    a user folder now."""
    if not (required or scfg(dataset, experiment, "classifier").get("saliency")):
        return []
    ds = dataset_cfg(dataset)
    if not generated(dataset):
        folder = (ds.get("saliency") or {}).get("dir")
        if not folder or not Path(folder).is_dir():
            raise WorkflowError(
                f"experiment {experiment!r} trains with saliency maps, but datasets.{dataset}.saliency.dir "
                f"({folder}) is not a folder.\n{SALIENCY_HOWTO}"
            )
    return [P.path("saliency", dataset=dataset)]


def weights_inputs(artifact):
    """Input function: the weights files a training stage needs (fetched by fetch_weights / fetch_url_weights); a
    local path is checked now (DAG build)."""

    def fn(w):
        settings = P.settings(w.dataset, w.get("experiment") or w.get("scn"), artifact)
        spec = (settings["backbone"] if "backbone" in settings else settings).get("weights")
        if spec and spec.get("path") and not Path(spec["path"]).expanduser().is_file():
            raise WorkflowError(f"{missing_weights_message(spec['path'])} (Set in config: the backbone.weights.path "
                                "of this rule's stage, for the dataset and experiment shown below.)")
        if spec and spec.get("torchvision") and not spec.get("path"):
            return [f"{config['weights_dir']}/{spec['torchvision']}.pth"]
        if spec and spec.get("url") and not spec.get("path"):
            return [f"{config['weights_dir']}/url/{url_file_name(spec['url'])}"]
        return []

    return fn


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


# ------------------------------------------------------------------------------------------- shard inputs

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


def shard_paths(artifact, dataset, experiment, split=None):
    """Every (checked) shard of a sharded artifact; ``split`` for artifacts of any split (cams, seg_pred)."""
    name = P.resolve(experiment, artifact, dataset)
    a = ARTIFACTS[name]
    split = P.split_name(dataset, a.split_role) if a.split_role else split
    return checked_shards(P.shards(name, dataset, experiment, split), a.kind, split,
                          lambda: P.hash(dataset, experiment, name))


def shards(artifact, role=None):
    """Input function: the shards of ``artifact`` for the job's dataset and experiment, of the split of ``role``
    (artifacts of any split, e.g. cams) or of their own split (pseudo-masks: the train split)."""
    return lambda w: shard_paths(artifact, w.dataset, w.experiment, role and P.split_name(w.dataset, role))


def cam_splits(dataset, experiment):
    roles = scfg(dataset, experiment, "cams")["splits"]
    return list(dict.fromkeys(P.split_name(dataset, r) for r in roles))


def all_cam_shards(w):
    return [p for s in cam_splits(w.dataset, w.experiment) for p in shard_paths("cams", w.dataset, w.experiment, s)]


def single_stage(dataset, experiment):
    """Whether the experiment computes, evaluates and reports its method's own segmentation output."""
    enabled = stage_config(config, dataset, experiment, "single_stage").get("enabled")
    return bool(enabled) or P.mask_artifact(experiment, dataset) == "ss_masks"


def ss_eval_shards(w):
    """The single-stage maps of the threshold and eval splits (the curve is swept on the first)."""
    splits = dict.fromkeys(P.split_name(w.dataset, r) for r in ("threshold", "eval"))
    return [p for s in splits for p in shard_paths("ss_maps", w.dataset, w.experiment, s)]


def scn_inputs(w):
    """train_scn's inputs besides the dataset: for recipe saliency_cam, the saliency manifest and the train-split CAM
    shards of the network's cams_from experiment."""
    if P.settings(w.dataset, w.scn, "scn")["recipe"] != "saliency_cam":
        return {}
    exp = P.cams_from(w.scn)
    if exp not in config["experiments"]:
        raise WorkflowError(f"superpixel_networks.{w.scn}.cams_from: unknown experiment {exp!r}")
    return {"saliency": saliency_inputs(w.dataset, exp, required=True),
            "cams": shard_paths("cams", w.dataset, exp, P.split_name(w.dataset, "train"))}


def classifier_scn_inputs(w):
    """The superpixel network of a classifier that takes its Q maps from one (superpixels.backend scn): the one
    train_scn makes (scn: trained), or a file (scn: file, checked now)."""
    network = P.scn_network(w.dataset, w.experiment)
    sp = scfg(w.dataset, w.experiment, "classifier").get("superpixels") or {}
    if network is None and sp.get("backend") == "scn":
        path = ((sp.get("weights") or {}).get("path") or "")
        if not path or not Path(path).expanduser().is_file():
            raise WorkflowError(f"experiment {w.experiment!r} (dataset {w.dataset!r}) takes its Q maps from the "
                                f"superpixel network file classifier.superpixels.weights.path = {path or '(unset)'}, "
                                "which does not exist. Put the file there (SP-CAM: models_ckpt/Q_model_final.pth of "
                                "github.com/CHENDL-SHEN/ESC), or set superpixels.scn: trained to use the network "
                                "train_scn makes.")
        return []
    if network is None:
        return []
    if network not in (config.get("superpixel_networks") or {}):
        raise WorkflowError(f"experiment {w.experiment!r}: classifier.superpixels.network {network!r} is not under "
                            f"superpixel_networks (known: {sorted(config.get('superpixel_networks') or {})})")
    return [P.path("scn", dataset=w.dataset, scn=network)]


def irn_classifier_inputs(w):
    """The trained classifier when the IRN backbone starts from it (irn.init_from_classifier, toy data)."""
    if scfg(w.dataset, w.experiment, "irn").get("init_from_classifier"):
        if P.imported(w.experiment, "cams"):
            raise WorkflowError(f"experiment {w.experiment!r} imports its CAMs, so it has no classifier for "
                                "irn.init_from_classifier: set it false (and irn.backbone.weights) for this experiment")
        return [P.path("classifier", dataset=w.dataset, experiment=w.experiment)]
    return []


# ------------------------------------------------------------------------------------------- report inputs

def has_test_split(dataset):
    """Datasets with a `test` split role (e.g. VOC2012 test) get a submission archive per experiment."""
    return bool(dataset_cfg(dataset)["splits"].get("test"))


def experiment_files(dataset, experiment):
    """What the report reads of one experiment (name -> path or list of paths)."""
    d, e = dataset, experiment
    ev = P.split_name(d, "eval")
    trained = ("classifier",) if not P.imported(e, "cams") else ()  # imported CAMs: no classifier
    files = {name: P.path(name, dataset=d, experiment=e)
             for name in ("cam_eval", "mask_eval", "seg_eval", *trained, "segmentation")}
    files.update(cams=shard_paths("cams", d, e, ev), masks=shard_paths("pseudo_masks", d, e),
                 preds=shard_paths("seg_pred", d, e, ev), saliency=saliency_inputs(d, e) if trained else [])
    if P.mask_artifact(e, d) in ("irn_masks", "ir_labels"):
        files["ir_label_eval"] = P.path("ir_label_eval", dataset=d, experiment=e)
    network = P.scn_network(d, e)
    if network is not None:
        files["scn_eval"] = P.path("scn_eval", dataset=d, scn=network)
        files["q_maps"] = shard_paths("q_maps", d, network)
    if single_stage(d, e):
        files["ss_eval"] = P.path("ss_eval", dataset=d, experiment=e)
        files["ss_crf_eval"] = P.path("ss_crf_eval", dataset=d, experiment=e)
    if scfg(d, e, "rw_grid").get("rw_grid"):
        files["rw_grid"] = P.path("rw_grid", dataset=d, experiment=e)
    if has_test_split(d):
        files["submission"] = P.path("submission", dataset=d, experiment=e)
    return files


def suite_runs(suite):
    """The runs of a suite's report, in order: every seed variant of every experiment (wsss_core.config.
    suite_variants)."""
    return [v for variants in suite_variants(config, suite).values() for v in variants]


def imported_experiments(what):
    """Wildcard pattern of the experiments (and their seed variants) whose ``what`` (cams, pseudo_masks) is
    imported."""
    return experiment_pattern([e for e in config["experiments"] if P.imported(e, what)])


def import_folder(what):
    """Input function: the folder of an imported experiment's ``what``, checked now (DAG build)."""

    def fn(w):
        folder = P.imported(w.experiment, what)["dir"]
        if not Path(folder).expanduser().is_dir():
            raise WorkflowError(f"experiments.{split_seed_variant(w.experiment)[0]}.import.{what}.dir = {folder} is "
                                "not a folder. Put the reference-layout files there (one per image id; README "
                                "'Import and export'), or export them from another run with the target "
                                "<dataset>_<experiment>_export.")
        return str(Path(folder).expanduser())

    return fn


def report_groups(w):
    """The report's inputs grouped by run (an experiment's seed variant): {run: {name: path or paths}}."""
    return {e: experiment_files(w.dataset, e) for e in suite_runs(w.suite)}


def report_inputs(w):
    """The same files, flat (named lists) for Snakemake."""
    flat = {"manifest": [P.path("manifest", dataset=w.dataset)]}
    for files in report_groups(w).values():
        for name, paths in files.items():
            flat.setdefault(name, []).extend([paths] if isinstance(paths, str) else paths)
    return {name: list(dict.fromkeys(paths)) for name, paths in flat.items()}


def superpixel_settings(w):
    """The ``superpixels`` block of each run's classifier (None for methods without superpixels)."""
    return {e: P.settings(w.dataset, e, "classifier").get("superpixels") for e in suite_runs(w.suite)}


def experiment_label(experiment):
    """A run's row label: the experiment's label (default: its method), with `(seed N)` for a seed variant."""
    exp = experiment_config(config, experiment)
    seed = split_seed_variant(experiment)[1]
    return (exp.get("label") or exp.get("method", "imported")) + ("" if seed is None else f" (seed {seed})")


def experiment_labels(w):
    return {e: experiment_label(e) for e in suite_runs(w.suite)}


def seed_groups(w):
    """The report's seed groups: experiment -> {"runs": its seed variants, "seeds", "label", "compare_to" (the
    experiment it is paired with when that one is in the suite too)}."""
    variants = suite_variants(config, w.suite)
    out = {}
    for e, runs in variants.items():
        base = compared_to(config, e)
        out[e] = {"runs": runs, "seeds": [P.seed(r) for r in runs], "label": experiment_label(e),
                  "compare_to": base if base in variants else None}
    return out


def report_md(dataset, suite):
    return os.path.join(P.path("report", dataset=dataset, suite=suite), "report.md")
