"""The pipeline's one table of artifacts: where each output lives, which settings make it, what it is made from.

The Snakemake rules take their ``output:`` paths from :data:`ARTIFACTS` and their inputs from
:class:`Pipeline`, which formats the same templates; the config hash stamped into every output follows from the
same table (an artifact's hash covers its own stage settings and the hashes of the artifacts it is made from), so
a stage dependency is written down once, here.

Paths are relative to ``results_dir``; wildcards are ``{dataset}``, ``{experiment}``, ``{split}``, ``{shard}``,
``{nshards}`` and ``{suite}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from .config import config_hash, experiment_config, experiment_seed, split_seed_variant, stage_config


@dataclass(frozen=True)
class Artifact:
    """One kind of pipeline output.

    ``path``: template under ``results_dir``; ``stage``: the config stage whose settings make it (``drop``: keys of
    those settings that do not matter for it); ``after``: the artifacts it is made from (``"pseudo_masks"`` stands
    for the one the experiment's ``refine`` choice makes); ``kind`` / ``split_role``: sharded HDF5 outputs, their
    shard kind and, for a fixed split, its role (``train``: the training split); ``version``: part of the config
    hash, raised when a code change alters what the artifact is for unchanged settings, so that existing outputs
    count as out of date; ``key``: what the artifact belongs to besides the dataset, an ``experiment``, a superpixel
    network (``scn``: the wildcard ``{scn}``, a name under ``superpixel_networks``) or nothing (``dataset``)."""

    path: str
    stage: str | None = None
    after: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    kind: str | None = None
    split_role: str | None = None
    version: int = 1
    key: str = "experiment"


_E = "{dataset}/{experiment}"
_SHARD = "{shard}-of-{nshards}.h5"

ARTIFACTS: dict[str, Artifact] = {
    "toy_source": Artifact("{dataset}/source"),
    "manifest": Artifact("{dataset}/dataset/manifest.json"),
    "labels": Artifact("{dataset}/dataset/labels.json"),
    "lists": Artifact("{dataset}/dataset/lists"),
    "saliency": Artifact("{dataset}/saliency/manifest.json"),
    # COCO: one shard of a split's class masks from the instance annotations (PNGs in coco_masks/masks/, a marker)
    "coco_masks": Artifact("{dataset}/coco_masks/{split}/{shard}-of-{nshards}.json", key="dataset"),
    # superpixel networks, shared by the experiments that name them (classifier.superpixels.network)
    "scn": Artifact("{dataset}/superpixels/{scn}/model.pt", "scn",
                    drop=("eval_steps", "eval_images", "eval_low", "n_shards"), key="scn"),
    "scn_eval": Artifact("{dataset}/superpixels/{scn}/eval.json", "scn", ("scn",), drop=("n_shards",), key="scn"),
    "q_maps": Artifact(f"{{dataset}}/superpixels/{{scn}}/q/{{split}}/{_SHARD}", "scn", ("scn",),
                       drop=("eval_steps", "eval_images", "eval_low"), kind="q", split_role="eval", key="scn"),
    # version 2: PPC prototypes and FSAE's strong views as the references compute them
    "classifier": Artifact(f"{_E}/classifier/model.pt", "classifier", version=2),
    # version 2: multi-scale views resized with PIL bicubic, as the references
    "cams": Artifact(f"{_E}/cams/{{split}}/{_SHARD}", "cams", ("classifier",), drop=("rw_grid",), kind="cams",
                     version=2),
    "cam_eval": Artifact(f"{_E}/eval/cams.json", "eval", ("cams",)),
    # superpixel methods: the (walk steps n, threshold t) grid of SP-CAM's evaluator (cams.rw_grid)
    "rw_grid": Artifact(f"{_E}/eval/rw_grid.json", "cams", ("classifier",), drop=("n_shards", "splits")),
    # refinements: each makes the training split's pseudo-masks (REFINERS picks one per experiment)
    # version 2: label CRFs over all classes (wseg's seam_label)
    "crf_masks": Artifact(f"{_E}/pseudo_masks/{_SHARD}", "crf", ("cam_eval",), kind="masks", split_role="train",
                          version=2),
    "cam_masks": Artifact(f"{_E}/pseudo_masks_cam/{_SHARD}", "crf", ("cam_eval",),
                          drop=("preset", "params", "n_workers"), kind="masks", split_role="train"),
    "affinity": Artifact(f"{_E}/affinity/model.pt", "affinity", ("cams",)),
    "rw_masks": Artifact(f"{_E}/pseudo_masks_rw/{_SHARD}", "affinity", ("affinity", "cam_eval"), kind="masks",
                         split_role="train"),
    "ir_labels": Artifact(f"{_E}/irn/ir_label/{_SHARD}", "irn", ("cam_eval",), drop=("rw",), kind="masks",
                          split_role="train"),
    "irn": Artifact(f"{_E}/irn/model.pt", "irn", ("ir_labels",), drop=("rw",)),
    "irn_masks": Artifact(f"{_E}/pseudo_masks_irn/{_SHARD}", "irn", ("irn", "cam_eval"), kind="masks",
                          split_role="train"),
    # single-stage methods (RTC): the method's own segmentation output (stage single_stage), its threshold curve,
    # its CRF labels on the eval split, and on the train split as the pseudo-masks of `refine: single_stage`
    "ss_maps": Artifact(f"{_E}/single_stage/maps/{{split}}/{_SHARD}", "single_stage", ("classifier",),
                        drop=("crf", "enabled"), kind="cams"),
    "ss_eval": Artifact(f"{_E}/eval/single_stage.json", "eval", ("ss_maps",)),
    "ss_crf": Artifact(f"{_E}/single_stage/crf/{{split}}/{_SHARD}", "single_stage", ("ss_eval",),
                       drop=("enabled", "scales", "flip", "gate"), kind="masks"),
    "ss_crf_eval": Artifact(f"{_E}/eval/single_stage_crf.json", None, ("ss_crf",)),
    "ss_masks": Artifact(f"{_E}/pseudo_masks_single_stage/{_SHARD}", "single_stage", ("ss_eval",),
                         drop=("enabled", "scales", "flip", "gate"), kind="masks", split_role="train"),
    "ir_label_eval": Artifact(f"{_E}/eval/ir_labels.json", None, ("ir_labels",)),
    "mask_eval": Artifact(f"{_E}/eval/pseudo_masks.json", None, ("pseudo_masks",)),
    "segmentation": Artifact(f"{_E}/segmentation/model.pt", "segmentation", ("pseudo_masks",)),
    "seg_pred": Artifact(f"{_E}/segmentation/pred/{{split}}/{_SHARD}", "segmentation", ("segmentation",),
                         kind="masks"),
    "seg_eval": Artifact(f"{_E}/eval/segmentation.json", None, ("seg_pred",)),
    "submission": Artifact(f"{_E}/submission/results.tar.gz", None, ("seg_pred",)),
    # import (experiments.E.import): pseudo-masks from a folder of label PNGs (`refine: import`); CAMs from
    # reference-layout files are the experiment's `cams` (rule import_cams instead of infer_cams)
    "imported_masks": Artifact(f"{_E}/pseudo_masks_imported/{_SHARD}", "crf",
                               drop=("preset", "params", "n_workers", "bg_threshold", "bg_alpha"), kind="masks",
                               split_role="train"),
    # export: CAMs in a reference layout, pseudo-masks as palette PNGs, manifest (config hashes, provenance)
    "export": Artifact(f"{_E}/export", "export", ("cams", "pseudo_masks")),
    "report": Artifact("{dataset}/reports/{suite}"),  # report.md, report.json and the plots
}

#: ``experiments.<name>.refine`` -> the artifact that holds its pseudo-masks (and the stage that sizes its shards)
REFINERS: dict[str, str] = {"crf": "crf_masks", "affinity": "rw_masks", "irn": "irn_masks", "none": "cam_masks",
                            "single_stage": "ss_masks", "ir_labels": "ir_labels", "import": "imported_masks"}

#: what an experiment's ``import`` block can bring in -> the artifact it replaces
IMPORTS: dict[str, str] = {"cams": "cams", "pseudo_masks": "imported_masks"}


def export_library_path(root: str) -> None:
    """Put ``root`` (the folder holding ``wsss_core``) first on ``PYTHONPATH``, which the pipeline's jobs inherit:
    Snakemake puts only a script's own folder on the path, so a job in an environment without the project installed
    (``--sdm conda``, a container) imports the library of the workflow it runs."""
    import os

    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def state_dir(model_path: str) -> str:
    """The resumable state (checkpoints, metrics.jsonl) of a training stage: ``state/`` beside its model file."""
    return model_path.rsplit("/", 1)[0] + "/state"


class Pipeline:
    """Paths, settings and config hashes of every artifact for one (validated) config."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.results = str(config["results_dir"]).rstrip("/")
        self._hash = lru_cache(maxsize=None)(self._hash_uncached)

    # ------------------------------------------------------------------ paths
    def template(self, artifact: str) -> str:
        """The path template of ``artifact`` under ``results_dir``, wildcards left in (for a rule's ``output:``)."""
        return f"{self.results}/{ARTIFACTS[artifact].path}"

    def path(self, artifact: str, **wildcards: Any) -> str:
        return self.template(artifact).format(**wildcards)

    def refine(self, experiment: str, dataset: str | None = None) -> str:
        """``experiment``'s ``refine`` choice on ``dataset``: ``experiments.E.datasets.D.refine`` (e.g. SIPE on COCO:
        the CRF labels of cam_to_ir_label instead of IRN, as the references), else ``experiments.E.refine`` (crf)."""
        exp = experiment_config(self.config, experiment)
        per = ((exp.get("datasets") or {}).get(dataset) or {}).get("refine") if dataset else None
        return per or exp.get("refine", "crf")

    def mask_artifact(self, experiment: str, dataset: str | None = None) -> str:
        """The artifact that holds ``experiment``'s pseudo-masks on ``dataset`` (its ``refine`` choice)."""
        return REFINERS[self.refine(experiment, dataset)]

    def imported(self, experiment: str | None, what: str | None = None) -> dict[str, Any] | None:
        """``experiments.E.import`` (``what``: its ``cams`` / ``pseudo_masks`` entry); None when not imported."""
        if experiment is None or split_seed_variant(experiment)[0] not in self.config["experiments"]:
            return None  # a superpixel network
        imp = experiment_config(self.config, experiment).get("import")
        return imp if imp is None or what is None else imp.get(what)

    def resolve(self, experiment: str | None, artifact: str, dataset: str | None = None) -> str:
        return self.mask_artifact(experiment, dataset) if artifact == "pseudo_masks" else artifact

    def n_shards(self, dataset: str, experiment: str, artifact: str) -> int:
        return int(self.settings(dataset, experiment, self.resolve(experiment, artifact, dataset))["n_shards"])

    def shards(self, artifact: str, dataset: str, experiment: str, split: str | None = None) -> list[str]:
        """Every shard path of a sharded artifact (``split``: for artifacts of any split, e.g. ``cams``);
        ``experiment``: the superpixel network for artifacts of one (``key`` scn)."""
        artifact = self.resolve(experiment, artifact, dataset)
        a = ARTIFACTS[artifact]
        if a.split_role:
            split = self.split_name(dataset, a.split_role)
        n = self.n_shards(dataset, experiment, artifact)
        return [self.path(artifact, dataset=dataset, experiment=experiment, scn=experiment, split=split, shard=k,
                          nshards=n) for k in range(n)]

    def split_name(self, dataset: str, role: str) -> str:
        """The split a role (train, threshold, mask_eval, eval, test) stands for in ``dataset``."""
        return self.config["datasets"][dataset]["splits"][role]

    # ------------------------------------------------------------------ settings and hashes
    def settings(self, dataset: str, experiment: str | None, artifact: str) -> dict[str, Any]:
        """The stage settings that make ``artifact`` (its ``drop`` keys removed); {} for an artifact of no stage."""
        name = self.resolve(experiment, artifact, dataset)
        a = ARTIFACTS[name]
        if a.stage is None:
            return {}
        cfg = stage_config(self.config, dataset, experiment, a.stage)
        cfg = {k: v for k, v in cfg.items() if k not in a.drop}
        source = next((self.imported(experiment, w) for w, art in IMPORTS.items() if art == name), None)
        if source is not None:  # imported: the folder and its layout, the shard count and (CAMs) the splits
            cfg = {**{k: cfg[k] for k in ("n_shards", "splits") if k in cfg}, **source}
        return cfg

    def hash(self, dataset: str, experiment: str, artifact: str) -> str:
        """Hash of everything that determines ``artifact``: its settings, the hashes of what it is made from, and at
        the root (the classifier) the dataset's settings, the method and the seed (of the experiment's seed variant)."""
        return self._hash(dataset, experiment, self.resolve(experiment, artifact, dataset))

    def _hash_uncached(self, dataset: str, experiment: str, artifact: str) -> str:
        a = ARTIFACTS[artifact]
        settings = self.settings(dataset, experiment, artifact)
        if any(art == artifact and self.imported(experiment, w) for w, art in IMPORTS.items()):
            # made from files, not from the experiment's classifier: a root of the DAG
            return config_hash({"artifact": artifact, "settings": settings, "imported": True,
                                "dataset": self.dataset_settings(dataset)})
        node: dict[str, Any] = {"artifact": artifact, "settings": settings,
                                "after": [self.hash(dataset, experiment, b) for b in a.after]}
        if a.version > 1:
            node["version"] = a.version
        if not a.after:
            node.update(dataset=self.dataset_settings(dataset), seed=self.config["seed"])
            if a.key == "experiment":
                node["method"] = experiment_config(self.config, experiment).get("method", "imported")
                node["seed"] = experiment_seed(self.config, experiment)  # a seed variant's branch
        # made from another key's artifacts: a classifier from a superpixel network, a network from CAMs
        network = self.scn_network(dataset, experiment) if artifact == "classifier" else None
        if network is not None:
            node["scn"] = self.hash(dataset, network, "scn")
        if artifact == "scn" and settings.get("recipe") == "saliency_cam":
            node["cams"] = self.hash(dataset, self.cams_from(experiment), "cams")
        return config_hash(node)

    def seed(self, experiment: str) -> int:
        """The seed of ``experiment``'s branch (a ``-seed<N>`` variant's N, else the workflow seed)."""
        return experiment_seed(self.config, experiment)

    # ------------------------------------------------------------------ provenance
    def provenance(self, dataset: str, experiment: str, seeds: list[int] | None = None) -> dict[str, Any]:
        """What a report row must say to be comparable with a published one: backbone, pretrained weights,
        refinement, inference scales / flip, CRF, segmentation network, seeds (strings, from the settings; for
        imported CAMs / pseudo-masks, what ``import.provenance`` declares about what made them)."""
        cls = self.settings(dataset, experiment, "classifier")
        cams = self.settings(dataset, experiment, "cams")
        seg = self.settings(dataset, experiment, "segmentation")
        refine = self.refine(experiment, dataset)
        crf_of = {"crf": ("crf", "preset"), "single_stage": ("single_stage", "crf"), "ir_labels": ("irn", "crf"),
                  "irn": ("irn", "crf"), "affinity": ("affinity", "crf")}
        mask_crf = "no"
        if refine in crf_of:
            stage, key = crf_of[refine]
            preset = stage_config(self.config, dataset, experiment, stage).get(key)
            mask_crf = f"yes ({preset.get('preset') if isinstance(preset, dict) else preset})"
        cam_inference = f"CAM scales {describe_scales(cams.get('scales'), cams.get('flip'))}"
        out = {"backbone": describe_backbone(cls.get("backbone")),
               "pretrained": describe_weights((cls.get("backbone") or {}).get("weights")), "refinement": refine}
        imp = self.imported(experiment)
        if imp is not None:  # what made the files is what their provider declares
            declared, unknown = dict(imp.get("provenance") or {}), "not declared (imported)"
            out.update(backbone=declared.get("backbone", unknown), pretrained=declared.get("pretrained", unknown))
            cam_inference = f"CAMs {declared.get('inference', unknown)}"
            if refine == "import":
                out["refinement"], mask_crf = declared.get("refinement", unknown), declared.get("crf", unknown)
        seg_backbone = describe_backbone(seg.get("backbone"))
        return {**out,
                "inference": f"{cam_inference}; segmentation "
                             f"{describe_scales(seg.get('infer_scales'), seg.get('infer_flip'))}",
                "crf": f"pseudo-masks {mask_crf}; segmentation test {'yes' if seg.get('infer_crf') else 'no'}",
                "segmentation": f"DeepLab-V2 ({seg_backbone})",
                "seeds": ", ".join(str(x) for x in (seeds if seeds is not None else [self.seed(experiment)]))}

    # ------------------------------------------------------------------ superpixel networks
    def scn_network(self, dataset: str, experiment: str) -> str | None:
        """The trained superpixel network ``experiment``'s classifier uses (``superpixels: {backend: scn, scn: trained,
        network}``); None for stand-ins and for a network file (``scn: file``, its ``weights``)."""
        sp = stage_config(self.config, dataset, experiment, "classifier").get("superpixels") or {}
        trained = sp.get("backend") == "scn" and sp.get("scn", "trained") == "trained"
        return sp.get("network") if trained else None

    def cams_from(self, network: str) -> str:
        """The experiment whose train-split CAMs label a ``saliency_cam`` network's superpixels."""
        from .config import network_config
        from .errors import ConfigError

        exp = network_config(self.config, network).get("cams_from")
        if not exp:
            raise ConfigError(f"superpixel_networks.{network}: recipe saliency_cam needs cams_from: <experiment>")
        return exp

    def dataset_settings(self, dataset: str) -> dict[str, Any]:
        """What a prepared dataset depends on: the dataset's own settings, without stage overrides."""
        ds = self.config["datasets"][dataset]
        return {k: v for k, v in ds.items() if k not in ("stages", "saliency")}


#: per architecture family, the backbone keys that change its size (and their standard values)
_SIZE_KEYS = {"resnet38": {"width": 1.0}, "resne": {"layers": None, "width_per_group": 64},
              "vit": {"embed_dim": None, "depth": None, "patch_size": None}}


def describe_backbone(backbone: Mapping[str, Any] | None) -> str:
    """``{arch: resnet38, width: 0.125}`` -> ``"resnet38 (width 0.125)"``: the architecture and what departs from
    its standard size (keys of other families, inherited from a dataset's defaults, are ignored)."""
    b = dict(backbone or {})
    if not b:
        return "method default"
    arch = str(b.get("arch", "?"))
    keys = next((v for k, v in _SIZE_KEYS.items() if arch.startswith(k)), {})
    extra = [f"{k} {b[k]}" for k, std in keys.items() if b.get(k) is not None and b[k] != std]
    return arch + (f" ({', '.join(extra)})" if extra else "")


def describe_weights(weights: Mapping[str, Any] | None) -> str:
    """A weights spec in words: torchvision name, URL file, local file, or random initialisation."""
    if not weights:
        return "none (random init)"
    if weights.get("torchvision"):
        return f"torchvision {weights['torchvision']}"
    if weights.get("url"):
        return f"url {str(weights['url']).rsplit('/', 1)[-1]}"
    return f"file {str(weights.get('path', '?')).rsplit('/', 1)[-1]}"


def describe_scales(scales: Any, flip: Any) -> str:
    """``[1.0, 0.5], True`` -> ``"1.0, 0.5 + flip"``; single scale without flip -> ``"1.0"``."""
    text = ", ".join(str(s) for s in (scales or [1.0]))
    return text + (" + flip" if flip else "")
