"""Pretrained weights: the one place where weights are located, verified and loaded.

A weights spec (one config entry per backbone) is a dict with one of:

- ``path``: a local file (``.pth``/``.pt`` state dict, optionally nested under ``state_dict``/``model``;
  a ``.params`` file is the MXNet ImageNet ResNet-38 checkpoint, see :mod:`wsss_core.models.mxnet_params`);
- ``torchvision``: a torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V1``, fetched into
  ``cache_dir`` by the ``fetch_weights`` rule (hash checked by torchvision) when online;
- ``url``: a published checkpoint (e.g. DeiT-S for MCTformer), fetched into ``cache_dir/url/<file name>`` by the
  ``fetch_url_weights`` rule when online (the sha256 prefix in a ``name-<hex>.pth`` file name is checked);
- neither (``null``): random initialisation (the toy configuration).

``sha256`` (optional) pins the file's checksum. Missing files give a :class:`WeightsError` naming the
expected path and how to get the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import url_file_name
from ..errors import WeightsError, missing_weights_message


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_weights_path(spec: Mapping[str, Any] | None, cache_dir: str | os.PathLike) -> Path | None:
    """Where the weights of ``spec`` live on disk (``None`` for random init). Does not check existence."""
    if not spec:
        return None
    if spec.get("path"):
        return Path(spec["path"]).expanduser()
    if spec.get("torchvision"):
        return Path(cache_dir) / f"{spec['torchvision']}.pth"
    if spec.get("url"):
        return Path(cache_dir) / "url" / url_file_name(spec["url"])
    return None



def fetch_torchvision_weights(name: str, dest: str | os.PathLike) -> Path:
    """Download torchvision weights ``name`` (e.g. ``ResNet50_Weights.IMAGENET1K_V1``) to ``dest`` atomically.

    torchvision checks the file hash embedded in its URL. Raises WeightsError when offline.
    """
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except Exception as exc:
        raise WeightsError(f"unknown torchvision weights name {name!r}: {exc}") from exc
    return download_weights(weights.url, dest, name)


def download_weights(url: str, dest: str | os.PathLike, what: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the sha256 prefix a ``name-<hex>.pth`` file name carries
    (torch.hub's convention, used by torchvision and DeiT). Raises WeightsError naming the file when it fails."""
    from ..store.atomic import atomic_path

    dest = Path(dest)
    try:
        with atomic_path(dest, suffix=dest.suffix or ".pth") as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=_hash_prefix(url), progress=True)
    except Exception as exc:
        raise WeightsError(f"could not download {what or url} from {url} ({exc}). Offline? Download that file "
                           f"by hand and place it at {dest}, or set the backbone's weights.path in config.yaml.") from exc
    return dest


def _hash_prefix(url: str) -> str | None:
    stem = url.rsplit("/", 1)[-1].split(".")[0]
    part = stem.rsplit("-", 1)[-1]
    return part if len(part) >= 6 and all(c in "0123456789abcdef" for c in part) else None


def load_state_dict_file(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (verifying ``sha256`` if given), unwrapping common nestings."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(missing_weights_message(path))
    if sha256:
        got = sha256_file(path)
        if got != sha256:
            raise WeightsError(f"checksum mismatch for {path}: sha256 {got} != expected {sha256}")
    if path.suffix == ".params":  # MXNet ImageNet ResNet-38 checkpoint, converted on the fly
        from .mxnet_params import load_params_file

        return load_params_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path} ({type(exc).__name__}: {exc}). Is it truncated or not a "
                           f"PyTorch state dict? Download it again, or fix the stage's backbone.weights.") from exc
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (a dict parameter name -> tensor, optionally under "
                           f"'state_dict' or 'model'), but a {type(obj).__name__}. Save model.state_dict(), or fix "
                           f"the stage's backbone.weights.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, spec: Mapping[str, Any] | None, cache_dir: str | os.PathLike = "weights",
                 strict: bool = False, ignore_prefixes: tuple[str, ...] = ("fc.",),
                 adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 ) -> dict[str, list[str]]:
    """Load pretrained weights described by ``spec`` into ``model``; verify shapes; report key mismatches.

    ``adapt(state) -> state`` converts a published checkpoint to the model's layout before the shape check (e.g.
    MCTformer: DeiT's one class token and 14x14 position table to C class tokens). Returns ``{"missing": [...],
    "unexpected": [...], "source": str}``. Keys whose shapes differ raise WeightsError. With ``strict``, any
    missing key (other than ``ignore_prefixes``) raises too.
    """
    path = resolve_weights_path(spec, cache_dir)
    if path is None:
        return {"missing": [], "unexpected": [], "source": "random init"}
    state = load_state_dict_file(path, (spec or {}).get("sha256"))
    if adapt is not None:
        state = adapt(state)
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        shared = sum(1 for k in state if k in own)
        raise WeightsError(
            f"weights {path} do not fit the model: {len(bad)} of the {shared} parameters they share have other "
            f"shapes: " + "; ".join(bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
            + ". The file is for another architecture or size (arch, layers, width, number of classes) than the "
            "backbone in config.yaml. Fix: use the weights file made for this backbone (set the stage's "
            "backbone.weights), change the backbone settings to match the file, or set backbone.weights: null "
            "to start from random initialisation.")
    unexpected = [k for k in state if k not in own and not k.startswith(ignore_prefixes)]
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore_prefixes)]
    if strict and missing:
        raise WeightsError(f"weights {path} lack {len(missing)} parameters of the model, e.g. {missing[:5]}")
    return {"missing": missing, "unexpected": unexpected, "source": str(path)}
