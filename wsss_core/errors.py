"""Exceptions with messages meant for the person running the pipeline.

Every error raised for bad input names the offending path (or config key) and says how to fix it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class WsssError(Exception):
    """Base class of all errors raised on purpose by wsss_core."""


class ConfigError(WsssError):
    """The configuration is invalid (unknown key, bad value, inconsistent settings)."""


class DatasetError(WsssError):
    """A dataset folder, list or label file is missing or malformed."""


class DataError(WsssError):
    """A single data file (image, mask, HDF5 shard) is unreadable or has invalid content."""


class WeightsError(WsssError):
    """Pretrained weights are missing, corrupt, or do not fit the model."""


@contextlib.contextmanager
def bad_input_ends_job(logger, in_job: bool = True):
    """Around a job's work: a :class:`WsssError` (bad input; its message names the file or key and the fix) is
    logged as one ERROR line and ends the job with exit status 1, without a traceback that would bury the message.
    Other exceptions (bugs) keep their traceback. With ``in_job`` False (called from Python), errors propagate."""
    try:
        yield
    except WsssError as exc:
        if not in_job:
            raise
        logger.error("%s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from None


RESNET38_HOWTO = ("ResNet-38 ImageNet weights: download ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet, linked from "
                  "the READMEs of github.com/jiwoon-ahn/psa and github.com/usr922/wseg) or a converted PyTorch state dict "
                  "of it; the .params file is read directly, no mxnet needed.")


DEIT_HOWTO = ("DeiT-S ImageNet-1k weights (MCTformer's start point): download "
              "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth (the {'model': state_dict} file "
              "of github.com/facebookresearch/deit) to that path.")


#: where to get the other published files the configuration names (file name part -> how)
KNOWN_WEIGHTS = {
    "resnest50": "It is the official ResNeSt-50 ImageNet file (resnest50-528c19ca.pth, the torch.hub weights of "
                 "github.com/zhanghang1989/ResNeSt); SP-CAM's backbone.",
    "SpixelNet_bsd": "It is SpixelFCN's BSDS500 checkpoint (SpixelNet_bsd_ckpt.tar, published with "
                     "github.com/fuy34/superpixel_fcn), SP-CAM's superpixel-network init; or set "
                     "superpixel_networks.spcam's scn.weights: null to train from scratch.",
    "Q_model": "It is SP-CAM's shipped superpixel network (models_ckpt/Q_model_final.pth of github.com/CHENDL-SHEN/ESC); "
               "or set the experiment's classifier.superpixels.scn: trained to use the network train_scn makes.",
}


def missing_weights_message(path: str | os.PathLike) -> str:
    """The error text for a missing local weights file: the path, and how to get it."""
    name = Path(path).name
    known = [how for part, how in KNOWN_WEIGHTS.items() if part in name]
    hint = RESNET38_HOWTO if "ilsvrc-cls_rna-a1" in str(path) or str(path).endswith(".params") else DEIT_HOWTO if (
        "deit" in name) else known[0] if known else (
        "Put the file there, set its path in config.yaml, or (online) use {torchvision: <name>} weights, "
        "which the fetch_weights rule downloads.")
    return f"pretrained weights not found: {Path(path).resolve()}. {hint}"


def first_few(items, n: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, ... (12 more)``: the first ``n`` of ``items`` for an error message."""
    items = [str(i) for i in items]
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _has_path(tree, path) -> bool:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return False
        tree = tree[p]
    return True


def config_problems(config, schema, sources=None, limit: int = 5) -> list[str]:
    """Readable problems of ``config`` against the JSON ``schema`` (draft 2020-12): each names the dotted key, the
    file it comes from (``sources``: ``{file name: its own parsed content}``, searched in order) and, for an unknown
    key, the closest allowed spelling and the keys allowed there. Empty when the config is valid."""
    import difflib

    from jsonschema import Draft202012Validator

    def where(path) -> str:
        hits = [name for name, tree in (sources or {}).items() if _has_path(tree, path)]
        return f" (set in {hits[0]})" if hits else ""  # the most specific source is the one that counts

    out = []
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    for err in errors:
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(k for k in err.instance if k not in allowed):
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                known = f" Keys allowed in {_dotted(path)}: {', '.join(allowed)}." if allowed else ""
                out.append(f"unknown key {_dotted(path + [key])}{where(path + [key])}.{hint}{known}")
        else:
            msg = err.message
            if err.context:  # oneOf / anyOf: say what each alternative wanted
                msg += " (" + "; ".join(sorted({c.message for c in err.context})) + ")"
            out.append(f"{_dotted(path)}{where(path)}: {msg}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


CONFIG_FIX = ("Fix: correct the spelling of an unknown key or remove it (a mistyped key would otherwise be ignored "
              "silently), and correct a bad value; schemas/config.schema.yaml lists the allowed keys, types and values, "
              "config.yaml the defaults.")
