"""Exceptions with messages meant for the person running the pipeline.

Every error raised for bad input names the offending path (or config key) and says how to fix it.
"""

from __future__ import annotations

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


RESNET38_HOWTO = ("ResNet-38 ImageNet weights: download ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet, linked from "
                  "the READMEs of github.com/jiwoon-ahn/psa and github.com/usr922/wseg) or a converted PyTorch state dict "
                  "of it; the .params file is read directly, no mxnet needed.")


DEIT_HOWTO = ("DeiT-S ImageNet-1k weights (MCTformer's start point): download "
              "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth (the {'model': state_dict} file "
              "of github.com/facebookresearch/deit) to that path.")


def missing_weights_message(path: str | os.PathLike) -> str:
    """The error text for a missing local weights file: the path, and how to get it."""
    hint = RESNET38_HOWTO if "ilsvrc-cls_rna-a1" in str(path) or str(path).endswith(".params") else DEIT_HOWTO if (
        "deit" in Path(path).name) else (
        "Put the file there, set its path in config.yaml, or (online) use {torchvision: <name>} weights, "
        "which the fetch_weights rule downloads.")
    return f"pretrained weights not found: {Path(path).resolve()}. {hint}"
