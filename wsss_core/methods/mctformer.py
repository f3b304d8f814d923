"""MCTformer V1 / V2 (Xu et al. CVPR 2022): a DeiT-S ViT with one class token per class.

Upstream: ``xulianuwa/MCTformer`` branch ``MCTformerPlus`` (V1/V2 code; ``main`` holds MCTformer+ only), whose
file::function citations are below. Tensor ops live in :mod:`wsss_core.methods.mctformer_ops`; this module is the method
interface of :mod:`wsss_core.methods.base`:

- :class:`MCTNet` — patch embedding, C class tokens before the patch tokens, learned position table (interpolated for
  other grids, class slots unchanged), pre-norm blocks that also return their attention
  (``vision_transformer.py::Block``); V1 scores = channel mean of the final class tokens
  (``models.py::MCTformerV1.forward``); V2 adds the 3x3 PatchCAM head and its GAP logits
  (``models.py::MCTformerV2.forward``);
- :func:`training_step` — MLSM(class-token logits) (+ MLSM(patch logits) for V2);
- :func:`build_optimizer` / :func:`lr_lambda` — AdamW (no decay on 1-D parameters, ``pos_embed``, ``cls_token``)
  with timm's per-epoch warm-up + cosine schedule as the reference steps it (``main.py::main``);
- :func:`data_needs` — timm's training transform (RandomResizedCrop, flip, RandAugment ``rand-m9-mstd0.5-inc1``,
  random erasing; :class:`~wsss_core.data.datasets.TimmClassificationDataset`);
- :func:`infer_cams` — ``engine.py::generate_attention_maps_ms`` multi-scale + flip localisation maps: M (last K blocks)
  fused with ReLU(Z) (V2 ``fused``), refined by the patch affinity P, upsampled, absent classes zeroed, un-flipped,
  summed, per-class min-max; stored without a background map (the bg threshold is searched by ``eval_cams``);
- :func:`cam_logits` — FSAE's view (see the function).

Stage config (``classifier``): ``backbone`` (``arch: deit_small`` = D 384, depth 12, 6 heads, patch 16, 224 table,
drop-path 0.1; ``arch: vit`` takes ``embed_dim``, ``depth``, ``heads``, ``patch_size``, ``img_size``, ``drop_path``
from the backbone config; ``weights``: DeiT's ``{'model': state_dict}`` file, adapted in
:func:`adapt_deit_state`), ``lr``, ``weight_decay``, ``max_steps`` and ``mctformer`` (:data:`DEFAULTS`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import mctformer_ops as ops
from .base import method_settings
from .inference import scaled_views
from .registry import register_method

DEFAULTS: dict[str, Any] = {
    "version": "v2",              # v1: class-token attention only | v2: + PatchCAM head and its loss (MCTformerV2)
    "layer_index": 3,             # K: class-to-patch attention summed over the last K blocks at inference
    "attention_type": "fused",    # fused (M * ReLU(Z)) | patchcam (ReLU(Z)) | mct (M); V1 is always M
    "patch_attn_refine": True,    # R = P F, raw patch-to-patch affinity of all blocks (--patch-attn-refine)
    "pad_to_patch": False,        # False: trailing pixels that fill no patch are dropped and the map stretched
                                  # over the image (reference PatchEmbed); True: zero-pad the view to whole patches
    "warmup_epochs": 5,           # timm cosine schedule, stepped per epoch (main.py::main)
    "warmup_lr": 1.0e-6,
    "min_lr": 1.0e-5,
    "auto_augment": "rand-m9-mstd0.5-inc1",   # timm policy string; "none" = no RandAugment
    "rrc_scale": [0.08, 1.0],     # RandomResizedCrop scale range
    "re_prob": 0.25,              # random erasing (mode pixel, one box)
    "fsae_tau": 0.1,              # FSAE: logits = [t, normalised maps] / tau (see cam_logits)
    "fsae_bg": 0.39,              # FSAE: the fixed background score t (PSA's default bg_thr)
}

DEIT_SMALL = {"embed_dim": 384, "depth": 12, "heads": 6, "patch_size": 16, "img_size": 224, "drop_path": 0.1,
              "mlp_ratio": 4.0}


def mct_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    s = method_settings(cfg, "mctformer", DEFAULTS)
    if s["version"] not in ("v1", "v2"):
        raise ConfigError(f"classifier.mctformer.version must be v1 or v2, got {s['version']!r}")
    if s["attention_type"] not in ("fused", "patchcam", "mct"):
        raise ConfigError(f"classifier.mctformer.attention_type must be fused, patchcam or mct, got "
                          f"{s['attention_type']!r}")
    return s


def vit_settings(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """ViT dimensions of a backbone config: ``deit_small`` fixes them
    (``models.py::deit_small_MCTformerV2_patch16_224``), ``vit`` reads them (toy sizes)."""
    arch = backbone.get("arch")
    if arch == "deit_small":
        return dict(DEIT_SMALL)
    if arch != "vit":
        raise ConfigError(f"MCTformer needs backbone.arch deit_small or vit, got {arch!r}")
    out = {k: backbone.get(k, v) for k, v in DEIT_SMALL.items()}
    if out["embed_dim"] % out["heads"]:
        raise ConfigError(f"backbone.embed_dim {out['embed_dim']} is not divisible by backbone.heads {out['heads']}")
    return out


class Attention(nn.Module):
    """Multi-head self-attention that also returns its post-softmax weights (timm parameter names ``qkv``/``proj``).

    (B, N, D) -> ((B, N, D), attention (B, heads, N, N), rows = queries)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)), attn


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, GELU MLP, stochastic depth), returning its attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        from timm.layers import DropPath, Mlp

        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn


class PatchEmbed(nn.Module):
    """Conv kernel = stride = patch (timm name ``proj``): (B, 3, H, W) -> (B, D, H // p, W // p); trailing pixels
    that fill no patch are dropped."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MCTNet(nn.Module):
    """DeiT with ``n_classes`` class tokens (``models.py::MCTformerV1`` / ``MCTformerV2`` on
    ``vision_transformer.py::VisionTransformer``).

    ``forward(x (B, 3, H, W))`` -> ``{"logits": (B, C) class-token scores, "attns": [L x (B, heads, N, N)],
    "grid": (h, w), "z": (B, C, h, w) PatchCAM (V2), "logits_patch": (B, C) its GAP (V2)}`` with h = H // p,
    w = W // p, N = C + h w. The final LayerNorm ``norm`` is loaded but never applied, as in the reference.
    """

    def __init__(self, n_classes: int, version: str = "v2", embed_dim: int = 384, depth: int = 12, heads: int = 6,
                 patch_size: int = 16, img_size: int = 224, drop_path: float = 0.1, mlp_ratio: float = 4.0):
        from timm.layers import trunc_normal_

        super().__init__()
        self.n_classes, self.version, self.patch_size = int(n_classes), version, int(patch_size)
        g = int(img_size) // self.patch_size
        self.patch_embed = PatchEmbed(self.patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, self.n_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_classes + g * g, embed_dim))
        rates = torch.linspace(0, float(drop_path), int(depth)).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, int(heads), float(mlp_ratio), r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # the reference's _init_weights: Linear and LayerNorm only
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.head = nn.Conv2d(embed_dim, self.n_classes, 3, padding=1) if version == "v2" else None
        self.weights_info: dict[str, Any] | None = None
        self.settings: dict[str, Any] = dict(DEFAULTS, version=version)  # build_model sets the configured ones

    @property
    def grid0(self) -> tuple[int, int]:
        g = int(round((self.pos_embed.shape[1] - self.n_classes) ** 0.5))
        return g, g

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        b, c = x.shape[0], self.n_classes
        p = self.patch_embed(x)
        h, w = p.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size}-pixel patch")
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        tokens = tokens + ops.interpolate_pos_embed(self.pos_embed, c, (h, w))
        attns = []
        for blk in self.blocks:
            tokens, a = blk(tokens)
            attns.append(a)
        out = {"logits": tokens[:, :c].mean(-1), "attns": attns, "grid": (h, w)}
        if self.head is not None:
            z = self.head(tokens[:, c:].transpose(1, 2).reshape(b, -1, h, w))
            out["z"], out["logits_patch"] = z, z.mean((2, 3))
        return out


def adapt_deit_state(state: dict[str, torch.Tensor], model: MCTNet) -> dict[str, torch.Tensor]:
    """DeiT-S checkpoint adaptation of ``main.py::main`` (``--finetune``): DeiT's ImageNet head dropped (V2's ``head``
    is a new conv), its class token repeated C times, its position table's class slot repeated C times and its patch
    grid resized (bicubic) to the model's."""
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    c = model.n_classes
    if "cls_token" in out and out["cls_token"].shape[1] == 1 and c != 1:
        out["cls_token"] = ops.expand_cls_token(out["cls_token"], c)
    pe = out.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        out["pos_embed"] = ops.expand_deit_pos_embed(pe, c, model.grid0)
    return out


@register_method("mctformer")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> MCTNet:
    from ..models.weights import load_weights

    s = mct_settings(cfg)
    v = vit_settings(cfg["backbone"])
    if not 1 <= int(s["layer_index"]) <= int(v["depth"]):
        raise ConfigError(f"classifier.mctformer.layer_index {s['layer_index']} must be in 1..{v['depth']} (the "
                          "backbone's number of blocks, backbone.depth)")
    model = MCTNet(n_classes, s["version"], **v)
    info = load_weights(model, cfg["backbone"].get("weights"), cache_dir, ignore_prefixes=(),
                        adapt=lambda st: adapt_deit_state(st, model))
    model.weights_info = info
    model.settings = s  # resolved settings: inference and FSAE's logits read them from the model
    return model


def data_needs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``datasets.py::build_transform``: timm's training transform on ``crop_size`` crops (no colour jitter: timm
    skips it with RandAugment)."""
    s = mct_settings(cfg)
    aa = None if str(s["auto_augment"]).lower() == "none" else s["auto_augment"]
    return {"views": False, "timm": {"auto_augment": aa, "scale": tuple(s["rrc_scale"]),
                                     "re_prob": float(s["re_prob"])}}


def param_groups(model: MCTNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """timm ``create_optimizer`` groups: weight decay on >= 2-D weights, none on biases, norms, ``pos_embed`` and
    ``cls_token``; one learning rate (``cfg['lr']``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token") else decay).append(p)
    lr = float(cfg["lr"])
    return [{"params": decay, "lr": lr, "weight_decay": float(cfg.get("weight_decay", 0.05)), "name": "decay"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: MCTNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``main.py::main`` (timm ``create_optimizer``): AdamW, betas (0.9, 0.999), eps 1e-8, on :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=float(cfg["lr"]), betas=(0.9, 0.999), eps=1e-8)


def warmup_cosine(base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float
                  ) -> Callable[[int], float]:
    """timm CosineLRScheduler value at epoch index t (``t_initial`` = epochs, warm-up not prefixed, no cycles):
    linear warm-up from ``warmup_lr`` for ``warmup_epochs``, then min + (base - min) (1 + cos(pi t / epochs)) / 2."""
    def lr(t: int) -> float:
        if t < warmup_epochs:
            return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
    return lr


def lr_lambda(cfg: Mapping[str, Any], steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step lr multiplier of the timm cosine schedule of ``main.py::main``: the reference calls
    ``scheduler.step(epoch)`` after each epoch, so epoch 0 runs at ``warmup_lr`` and epoch e >= 1 at the schedule's
    value for e - 1. Epochs = ceil(max_steps / steps per epoch)."""
    s = mct_settings(cfg)
    base = float(cfg["lr"])
    epochs = max(1, math.ceil(int(cfg["max_steps"]) / max(1, steps_per_epoch)))
    sched = warmup_cosine(base, epochs, int(s["warmup_epochs"]), float(s["warmup_lr"]), float(s["min_lr"]))

    def mult(step: int) -> float:
        e = step // max(1, steps_per_epoch)
        return (float(s["warmup_lr"]) if e == 0 else sched(e - 1)) / base
    return mult


def training_step(model: MCTNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    """``engine.py::train_one_epoch``: MLSM(class-token logits, y) (+ MLSM(PatchCAM GAP logits, y) for V2, weight 1)."""
    out = model(batch["image"])
    y = batch["label"]
    l_cls = F.multilabel_soft_margin_loss(out["logits"], y)
    res = {"loss": l_cls, "loss_cls": l_cls}
    if "logits_patch" in out:
        l_patch = F.multilabel_soft_margin_loss(out["logits_patch"], y)
        res.update(loss=l_cls + l_patch, loss_patch=l_patch)
    return res


def localisation_maps(model: MCTNet, x: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    """``models.py::MCTformerV2.forward`` (``return_att``) + the refinement of
    ``engine.py::generate_attention_maps_ms``: (B, 3, H, W) -> F (B, C, h, w): M over the last ``layer_index`` blocks,
    fused with ReLU(Z) per ``attention_type`` (V1: M), then R = P F with the summed patch affinity when
    ``patch_attn_refine``."""
    out = model(x)
    c = model.n_classes
    m = ops.class_to_patch_maps(out["attns"], c, out["grid"], int(s["layer_index"]))
    f = ops.fuse_maps(m, out.get("z"), s["attention_type"])
    if s["patch_attn_refine"]:
        f = ops.refine_with_affinity(f, ops.patch_affinity(out["attns"], c))
    return f


def aggregate_views(per_view: Sequence[torch.Tensor], flipped: Sequence[bool], present: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    """``engine.py::generate_attention_maps_ms``: per view (C, h_v, w_v) maps upsampled (bilinear, align_corners False)
    to ``size``, multiplied by the (C,) 0/1 labels, flipped views un-flipped, summed, then per-class min-max (absent
    classes 0) -> (C, H, W)."""
    total = None
    for f, fl in zip(per_view, flipped):
        up = F.interpolate(f[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        up = up * present.view(-1, 1, 1).to(up.dtype)
        up = up.flip(-1) if fl else up
        total = up if total is None else total + up
    return ops.minmax_per_class(total, present)


def _padded(x: torch.Tensor, patch: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % patch, 0, (-h) % patch))


def view_maps(model: MCTNet, x: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    """Maps of a view batch on its own pixel grid: (B, 3, h_v, w_v) -> (B, C, h', w'); with ``pad_to_patch`` the
    view is zero-padded to whole patches and the map, upsampled by the patch size, is cropped back to the view."""
    if not s["pad_to_patch"]:
        return localisation_maps(model, x, s)
    h, w = x.shape[-2:]
    f = localisation_maps(model, _padded(x, model.patch_size), s)
    big = F.interpolate(f.float(), scale_factor=model.patch_size, mode="bilinear", align_corners=False)
    return big[..., :h, :w]


@torch.no_grad()
def infer_cams(model: MCTNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], flip: bool,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, None]:
    """``engine.py::generate_attention_maps_ms`` seeds of one uint8 (H, W, 3) image for its present classes
    ``keys`` (1-based): float32 (K, H, W) in [0, 1] (per-class min-max), no background map."""
    s = model.settings
    h, w = image.shape[:2]
    keys = np.asarray(keys, dtype=np.int64)
    present = torch.zeros(model.n_classes, device=device)
    present[keys - 1] = 1.0
    per_view, flipped = [], []
    for x in scaled_views(image, scales, flip, device):
        f = view_maps(model, x, s)
        for i in range(f.shape[0]):
            per_view.append(f[i])
            flipped.append(i == 1)
    cams = aggregate_views(per_view, flipped, present, (h, w))[keys - 1]
    return keys, cams.cpu().numpy().astype(np.float32), None


def cam_forward(model: MCTNet, images: torch.Tensor) -> torch.Tensor:
    """Localisation maps F (B, C, h, w) with the model's settings (generic-inference fallback)."""
    return F.relu(localisation_maps(model, images, model.settings))


def cam_logits(model: MCTNet, images: torch.Tensor, label: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """FSAE's view of MCTformer (our adaptation: FSAE's code, ``obeychoi0120/PixMatch``, has no MCTformer
    variant): (B, 3, H, W) -> ((B, C + 1, h, w) logits, bg index 0).

    The patch-level CAM — V2's ReLU(Z), differentiable, so FSAE's pixel loss trains the PatchCAM head and the
    patch tokens; V1: the class-to-patch attention M of the last ``layer_index`` blocks — is max-normalised per
    channel; the background logit is the fixed score ``fsae_bg`` (the bg threshold of the seeds, so the teacher's
    argmax equals the thresholded seed); all channels divided by ``fsae_tau`` so a softmax can pass 0.95.
    """
    from .sipe_ops import max_normalise

    s = model.settings
    out = model(images)
    if out.get("z") is not None:
        maps = F.relu(out["z"])
    else:
        maps = ops.class_to_patch_maps(out["attns"], model.n_classes, out["grid"], int(s["layer_index"]))
    maps = max_normalise(maps)
    bg = maps.new_full((maps.shape[0], 1) + tuple(maps.shape[-2:]), float(s["fsae_bg"]))
    return torch.cat([bg, maps], 1) / float(s["fsae_tau"]), 0

