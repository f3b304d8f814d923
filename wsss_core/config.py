"""Configuration helpers shared by the Snakefile and the library: merging, per-stage views, hashing."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

STAGES = ("classifier", "cams", "eval", "crf", "affinity", "irn", "segmentation", "scn", "single_stage", "export")


def url_file_name(url: str) -> str:
    """The file name a ``{url: ...}`` weights spec is cached under: the URL path's last component."""
    from pathlib import PurePosixPath
    from urllib.parse import urlparse

    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise ValueError(f"weights url {url!r} has no file name")
    return name


#: keys whose value replaces the base's as a whole: a weights spec ({path}, {torchvision}, {url}) names one source
ATOMIC_KEYS = frozenset({"weights"})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces; the dicts under
    :data:`ATOMIC_KEYS` replace too, so an experiment's ``{url: ...}`` weights do not inherit a ``torchvision``)."""
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if key not in ATOMIC_KEYS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: keys of an experiment that ``extends`` does not inherit (a row's name is its own)
NOT_INHERITED = frozenset({"extends", "label", "compare_to"})


#: a seed variant of an experiment is named ``<experiment>-seed<N>`` (experiment names have no dash)
SEED_MARK = "-seed"


def seed_variant(experiment: str, seed: int, default_seed: int) -> str:
    """The experiment name of ``experiment`` trained with ``seed``: the plain name for the workflow seed (its
    outputs are the one-seed run's), else ``<experiment>-seed<N>``, a branch of the DAG of its own."""
    return experiment if int(seed) == int(default_seed) else f"{experiment}{SEED_MARK}{int(seed)}"


def split_seed_variant(name: str) -> tuple[str, int | None]:
    """``"ppc-seed2"`` -> ``("ppc", 2)``; a plain name -> ``(name, None)``."""
    base, mark, n = name.rpartition(SEED_MARK)
    if mark and base and n.isdigit():
        return base, int(n)
    return name, None


def experiment_seed(config: Mapping[str, Any], experiment: str) -> int:
    """The seed of an experiment's branch: its ``-seed<N>`` suffix, else the workflow ``seed``. It seeds the
    initialisation of every network of the branch (``torch.manual_seed`` at job start), the data order of each
    epoch and each sample's augmentation (wsss_core/engine/trainer.py: pure functions of seed, epoch, index)."""
    seed = split_seed_variant(experiment)[1]
    return int(config.get("seed", 0)) if seed is None else seed


def run_seeds(config: Mapping[str, Any], experiment: str, suite: str | None = None) -> list[int]:
    """The seeds ``experiment`` runs with in ``suite``: ``suites.<suite>.seeds``, else ``experiments.<e>.seeds``
    (inherited through ``extends``), else the workflow ``seed`` alone."""
    seeds = (config["suites"][suite].get("seeds") if suite else None) or experiment_config(config, experiment).get(
        "seeds")
    return [int(s) for s in seeds] if seeds else [int(config.get("seed", 0))]


def suite_variants(config: Mapping[str, Any], suite: str) -> dict[str, list[str]]:
    """experiment -> its seed variants in ``suite`` (names, in seed order), for every experiment of the suite."""
    default = int(config.get("seed", 0))
    return {e: [seed_variant(e, s, default) for s in run_seeds(config, e, suite)]
            for e in config["suites"][suite]["experiments"]}


def compared_to(config: Mapping[str, Any], experiment: str) -> str | None:
    """The experiment ``experiment`` is compared with, seed by seed, in reports: its own ``compare_to``, else the
    experiment it ``extends`` (PPC + FSAE extends PPC); None for neither."""
    own = config["experiments"][split_seed_variant(experiment)[0] if experiment not in config["experiments"]
                                else experiment]
    return own.get("compare_to") or own.get("extends")


def experiment_config(config: Mapping[str, Any], experiment: str) -> dict[str, Any]:
    """``experiments.<experiment>`` with its ``extends`` chain resolved: the parent's settings (recursively, minus
    ``label``) deep-merged under the experiment's own. An unknown parent or a cycle is a :class:`ConfigError`.
    A seed variant (``<experiment>-seed<N>``) has the settings of its experiment."""
    from .errors import ConfigError

    experiments = config["experiments"]
    if experiment not in experiments:
        experiment = split_seed_variant(experiment)[0]
    chain, name = [], experiment
    while name is not None:
        if name not in experiments:
            where = f"experiments.{chain[-1]}.extends" if chain else "the experiment name"
            raise ConfigError(f"{where}: unknown experiment {name!r} (known: {sorted(experiments)})")
        if name in chain:
            raise ConfigError("experiments extend each other in a cycle: " + " -> ".join([*chain, name]))
        chain.append(name)
        name = experiments[name].get("extends")
    out: dict[str, Any] = {}
    for i, name in enumerate(reversed(chain)):
        own = experiments[name]
        if i < len(chain) - 1:  # an ancestor: its row name stays its own
            own = {k: v for k, v in own.items() if k not in NOT_INHERITED}
        out = deep_merge(out, {k: v for k, v in own.items() if k != "extends"})
    return out


def network_config(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``superpixel_networks.<name>``; an unknown name is a :class:`ConfigError` naming the known ones."""
    from .errors import ConfigError

    nets = config.get("superpixel_networks") or {}
    if name not in nets:
        raise ConfigError(f"unknown superpixel network {name!r} (superpixel_networks: {sorted(nets)})")
    return dict(nets[name] or {})


def stage_config(config: Mapping[str, Any], dataset: str, experiment: str | None, stage: str) -> dict[str, Any]:
    """Effective settings of ``stage`` for ``dataset`` and ``experiment``; later levels override earlier ones
    (deep merge; a ``weights`` spec replaces as a whole):

    1. ``stages.<stage>`` (defaults of every experiment);
    2. ``datasets.<dataset>.stages.<stage>`` (e.g. the CPU-sized toy settings);
    3. ``experiments.<experiment>.stages.<stage>``;
    4. ``experiments.<experiment>.datasets.<dataset>.stages.<stage>`` (e.g. a narrow ResNet-38 on the toy data).

    Levels 3 and 4 are read from the experiment with its ``extends`` chain resolved
    (:func:`experiment_config`: parent first), so an experiment that extends another inherits its toy settings.
    For the ``scn`` stage, ``experiment`` names a superpixel network (``superpixel_networks.<name>``, same layout).
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}")
    cfg = dict(config["stages"][stage])
    cfg = deep_merge(cfg, config["datasets"][dataset].get("stages", {}).get(stage))
    if experiment is not None:
        exp = network_config(config, experiment) if stage == "scn" else experiment_config(config, experiment)
        cfg = deep_merge(cfg, exp.get("stages", {}).get(stage))
        cfg = deep_merge(cfg, (exp.get("datasets") or {}).get(dataset, {}).get("stages", {}).get(stage))
    return cfg


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
