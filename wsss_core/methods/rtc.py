"""RTC (representation, transform, compensator; Wang et al. 2023) on ResNet-38: a single-stage method whose
segmentation branch is its segmentation model.

Upstream: ``ChunyanWang1/RTC`` (a fork of ``usr922/wseg`` master): ``network/resnet38_contrast.py::Net``,
``contrast_train.py``, ``contrast_infer.py``, ``network/VARM.py``, ``network/losses.py``. The op core lives in
:mod:`wsss_core.methods.rtc_ops` (RTC's own pieces) and :mod:`wsss_core.methods.ppc_ops` (the PPC/SEAM pieces RTC
inherits: PCM, max-norm, the cls / ER / ECR losses, prototypes, the optimizer groups); this module is the method
interface of :mod:`wsss_core.methods.base` plus :func:`infer_seg`, the single-stage output.

The three words of the title, in the code (the paper names them; the code does not):

- *representation*: ``Net.FCM``, two PCMs (high-level conv5 + conv6 features, low-level image + conv4 features)
  averaged (:class:`FCMHead`);
- *transform*: the siamese views (the crop and its 128 x 128 resize), cross-view prototypes, the global-context
  feedback and its structure loss, three InfoNCE terms (:func:`wsss_core.methods.rtc_ops.transform_losses`);
- *compensator*: read here as the stride-4 segmentation branch (atrous deep features + shallow conv3 features,
  :class:`SegHead`) trained on VARM-refined two-threshold pseudo-masks with balanced CE. This is our reading;
  the name does not change what is computed.

Stage config keys (``classifier``): ``backbone`` (``arch: resnet38``, ``width``, ``weights``, ``frozen_bn``,
``frozen_stem``), ``lr``, ``weight_decay``, ``fix_quirk`` (False: the momentum = weight decay quirk of
``tool/torchutils.py::PolyOptimizer``), ``momentum`` (with ``fix_quirk``), and ``rtc``: ``view2_size`` (128),
``bg_thr`` (0.20, ``--bg_threshold``), ``proto_div`` (8: top-k k = h·w // 8 of the view-2 grid), ``tau`` (0.1),
``nce_weight`` (0.1), ``ecr_topk`` (0.2), ``struct_topk`` (0.8), ``seg_start`` (0.28: the segmentation loss starts
at this fraction of ``max_steps``; ``contrast_train.py`` starts it at epoch index 7 of 25), ``refiner`` (``varm``
| ``par`` | ``pamr``), ``refine_iters`` (10), ``refine_dilations`` ([1, 2, 4, 8, 12, 24]), ``high_bg`` (0.55),
``low_bg`` (0.20), ``stable_topk`` (True: ties of the prototype top-k go to the first entries in (image, y, x)
order; the reference leaves the order to CUDA's ``topk``; False: ``torch.topk``'s own order).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..engine.optim import reference_sgd
from ..errors import ConfigError
from ..models.resnet38 import build_resnet38
from ..refine.pixel import PixelRefiner
from . import ppc_ops
from . import rtc_ops as ops
from .base import method_settings
from .inference import scaled_views
from .registry import register_method

DEFAULTS: dict[str, Any] = {
    "view2_size": 128,
    "bg_thr": 0.20,
    "proto_div": 8,
    "tau": 0.1,
    "nce_weight": 0.1,
    "ecr_topk": 0.2,
    "struct_topk": 0.8,
    "seg_start": 0.28,
    "refiner": "varm",
    "refine_iters": 10,
    "refine_dilations": [1, 2, 4, 8, 12, 24],
    "high_bg": 0.55,
    "low_bg": 0.20,
    "stable_topk": True,
}


def rtc_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULTS` overridden by ``cfg['rtc']`` (an unknown key is a ConfigError naming it)."""
    return method_settings(cfg, "rtc", DEFAULTS)


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return ppc_ops.resize(x, tuple(size))


class FCMHead(nn.Module):
    """``Net.FCM`` of ``network/resnet38_contrast.py``: the seed of the detached CAM refined by two PCMs, averaged.

    High level: ``f1 = f9_1([relu(f8_4(conv5)), relu(f8_5(conv6))])``; low level: ``f2 = f9_2([image_s8,
    relu(f8_3(conv4))])``; backbone taps detached (gradients reach only these convs). ``ch`` maps the published
    channel count to the backbone's width. forward: cam (N, C, h, w), taps, image (N, 3, H, W) -> (N, C, h, w).
    """

    def __init__(self, ch, c4: int, c5: int, c6: int):
        super().__init__()
        self.f8_3 = nn.Conv2d(c4, ch(64), 1, bias=False)
        self.f8_4 = nn.Conv2d(c5, ch(128), 1, bias=False)
        self.f8_5 = nn.Conv2d(c6, ch(128), 1, bias=False)
        self.f9_1 = nn.Conv2d(2 * ch(128), ch(128), 1, bias=False)
        self.f9_2 = nn.Conv2d(3 + ch(64), ch(64), 1, bias=False)
        for m in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.f9_1.weight, gain=4)
        nn.init.xavier_uniform_(self.f9_2.weight)

    def forward(self, cam: torch.Tensor, taps: Mapping[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        h, w = cam.shape[-2:]
        seed = ppc_ops.pcm_seed(cam, 0)
        f1 = self.f9_1(torch.cat([F.relu(self.f8_4(taps["conv5"].detach())),
                                  F.relu(self.f8_5(taps["conv6"].detach()))], 1))
        f2 = self.f9_2(torch.cat([_up(image, (h, w)), F.relu(self.f8_3(taps["conv4"].detach()))], 1))
        return 0.5 * (ppc_ops.pcm_refine(seed, ppc_ops.pcm_affinity(f1))
                      + ppc_ops.pcm_refine(seed, ppc_ops.pcm_affinity(f2)))


class SegHead(nn.Module):
    """The stride-4 segmentation branch of ``Net.forward(require_seg=True)`` (``fc8_seg_conv1..5``, ``proj2``,
    ``classifier2``; no BN, no activation between conv1 and conv2).

    forward: conv6 (N, C6, h, w) (not detached), conv3 (N, C3, 2h, 2w) -> logits (N, K+1, 2h, 2w).
    """

    def __init__(self, ch, c3: int, c6: int, n_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c6, ch(512), 3, padding=12, dilation=12, bias=True)
        self.conv2 = nn.Conv2d(ch(512), ch(256), 3, padding=12, dilation=12, bias=True)
        self.conv3 = nn.Conv2d(c6, ch(256), 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(2 * ch(256), ch(256), 1, bias=False)
        self.conv5 = nn.Conv2d(c3, ch(48), 3, padding=1, bias=False)
        self.proj2 = nn.Conv2d(ch(256) + ch(48), ch(256), 1, bias=False)
        self.classifier2 = nn.Conv2d(ch(256), n_out, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, conv6: torch.Tensor, conv3: torch.Tensor) -> torch.Tensor:
        deep = self.conv4(torch.cat([self.conv2(self.conv1(conv6)), self.conv3(conv6)], 1))
        deep = _up(deep, conv3.shape[-2:])
        return self.classifier2(F.relu(self.proj2(torch.cat([deep, self.conv5(conv3)], 1))))


class RTCNet(nn.Module):
    """ResNet-38 + CAM branch (dropout, ``proj1``, ``classifier1``) + FCM + segmentation branch.

    forward(x (N, 3, H, W), seg=False) -> ``{"cam": (N, K+1, h, w), "cam_rv": (N, K+1, h, w), "f_proj":
    (N, D, h, w)}`` at stride 8 (h = ceil(H/8)), plus ``"seg": (N, K+1, 2h, 2w)`` with ``seg``. Channel 0 is the
    background; ``cam``'s channel 0 is never used as such (every consumer overwrites it, as upstream).
    """

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        ch = backbone.channels
        c6, taps = backbone.out_channels, backbone.tap_channels
        self.dropout7 = nn.Dropout2d(0.5)
        self.proj1 = nn.Conv2d(c6, ch(256), 1, bias=False)
        self.classifier1 = nn.Conv2d(ch(256), n_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.proj1.weight)
        nn.init.xavier_uniform_(self.classifier1.weight)
        self.fcm = FCMHead(ch, taps["conv4"], taps["conv5"], c6)
        self.seg_head = SegHead(ch, taps["conv3"], c6, n_classes + 1)

    @property
    def new_layers(self) -> list[nn.Module]:
        """The randomly initialised layers (``Net.get_parameter_groups``'s from-scratch list): x10 / x20 lr."""
        return [self.proj1, self.classifier1, self.fcm, self.seg_head]

    def forward(self, x: torch.Tensor, seg: bool = False) -> dict[str, torch.Tensor]:
        taps = self.backbone.forward_features(x)
        f_proj = F.relu(self.proj1(self.dropout7(taps["conv6"])))
        cam = self.classifier1(f_proj)
        out = {"cam": cam, "cam_rv": self.fcm(cam, taps, x), "f_proj": f_proj}
        if seg:
            out["seg"] = self.seg_head(taps["conv6"], taps["conv3"])
        return out


@register_method("rtc")
def build_model(cfg: Mapping[str, Any], n_classes: int, cache_dir: str = "weights") -> RTCNet:
    bb = cfg["backbone"]
    if bb.get("arch", "resnet38") != "resnet38":
        raise ConfigError(f"RTC is defined on ResNet-38 (backbone.arch: resnet38), got {bb.get('arch')!r}")
    rtc_settings(cfg)  # an unknown classifier.rtc key fails before training starts
    backbone = build_resnet38(weights=bb.get("weights"), cache_dir=cache_dir, frozen_bn=bb.get("frozen_bn", True),
                              frozen_stem=bb.get("frozen_stem", True), width=bb.get("width", 1.0))
    return RTCNet(backbone, n_classes)


def data_needs(cfg: Mapping[str, Any]) -> dict[str, bool]:
    """``voc12/data.py::VOC12ClsDataset1`` (as wseg master): resize-long, flip, jitter, normalise, crop into zeros;
    the crop box (``img_box``) as the validity map ``valid``."""
    return {"views": False, "valid": True}


def param_groups(model: RTCNet, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``Net.get_parameter_groups``: backbone weights lr / biases 2 lr (no wd), new weights 10 lr / biases 20 lr."""
    return ppc_ops.ppc_param_groups(model, model.new_layers, cfg["lr"], cfg.get("weight_decay", 5e-4))


def build_optimizer(model: RTCNet, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``tool/torchutils.py::PolyOptimizer`` over :func:`param_groups`: momentum = weight decay unless
    ``fix_quirk``."""
    return reference_sgd(param_groups(model, cfg), cfg, weight_decay=5e-4)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) ImageNet-normalised -> RGB in [0, 1] (``Net.denorm``; padding comes back as the mean colour)."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def training_step(model: RTCNet, batch: Mapping[str, torch.Tensor], step: int, cfg: Mapping[str, Any]) -> dict:
    """The full RTC loss of ``contrast_train.py`` on the crop and its ``view2_size`` resize.

    batch: ``image`` (N, 3, H, W), ``label`` (N, K), ``valid`` (N, 1, H, W). Returns ``{"loss", "loss_cls",
    "loss_er", "loss_ecr", "loss_struct", "loss_nce", "loss_seg"}`` (scalars).
    """
    p = rtc_settings(cfg)
    img1, label = batch["image"], batch["label"]
    size1, size2 = img1.shape[-2:], (int(p["view2_size"]),) * 2
    img2 = _up(img1, size2)
    o1, o2 = model(img1, seg=True), model(img2)
    cam1, cam_rv1 = _up(o1["cam"], size1), _up(o1["cam_rv"], size1)
    cam2, cam_rv2 = _up(o2["cam"], size2), _up(o2["cam_rv"], size2)
    l_cls = ppc_ops.cls_loss(cam1, cam2, cam_rv1, cam_rv2, label, 0)
    l_er, c1, c2 = ppc_ops.er_loss(cam1, cam2, label, 0)
    l_ecr = ppc_ops.ecr_loss(c1, c2, cam_rv1, cam_rv2, label, 0, p["ecr_topk"], esp_onehot_bug=False)
    if step >= float(p["seg_start"]) * int(cfg["max_steps"]):
        yt = ppc_ops.label_with_bg(label, 0)[:, :, None, None]
        with torch.no_grad():
            cams = _up(ppc_ops.max_norm(o1["cam_rv"].detach()) * yt, size1)[:, 1:]
            refiner = PixelRefiner(p["refiner"], int(p["refine_iters"]), tuple(p["refine_dilations"]))
            target = ops.two_threshold_labels(denormalize(img1), cams, label, batch.get("valid"), refiner,
                                              high=p["high_bg"], low=p["low_bg"])
        l_seg = ops.balanced_ce(_up(o1["seg"], size1), target, label)
    else:
        l_seg = img1.new_zeros(())
    t = ops.transform_losses(o1["cam_rv"], o1["f_proj"], o2["cam_rv"], o2["f_proj"], c1, c2, label, p)
    total = l_cls + l_er + l_ecr + t["loss_struct"] + t["loss_nce"] + l_seg
    return {"loss": total, "loss_cls": l_cls, "loss_er": l_er, "loss_ecr": l_ecr, "loss_struct": t["loss_struct"],
            "loss_nce": t["loss_nce"], "loss_seg": l_seg}


def cam_forward(model: RTCNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> the CAM seeds: ReLU of the FCM output ``cam_rv``, fg channels (N, K, h, w) (as PPC-SEAM's
    ``contrast_infer.py``; RTC's own inference reads the segmentation branch instead, :func:`infer_seg`)."""
    return F.relu(model(images)["cam_rv"][:, 1:])


@torch.inference_mode()
def infer_seg(model: RTCNet, image: np.ndarray, scales: Sequence[float], flip: bool, device: torch.device,
              keys: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The single-stage output of one uint8 (H, W, 3) image (``contrast_infer.py``): per view (each scale, and
    its flip), ``softmax(seg logits upsampled to the view)`` times the class scores ``sigmoid(GAP(cam))``, fg
    channels, bilinearly resized to (H, W) (align_corners False), un-flipped; the mean over the views (not
    re-normalised).

    ``keys`` None (the reference): every class, gated by the predicted scores; ``keys`` given (the GT labels of
    the image): those classes only, gated by the labels (score 1) instead. Returns ``(keys_out (K,), maps float32
    (K, H, W))``; the background is a threshold on these maps (0.17 in the reference's ``evallog.txt``).
    """
    h, w = image.shape[:2]
    total, n = None, 0
    for x in scaled_views(image, scales, flip, device):
        o = model(x, seg=True)
        prob = torch.softmax(_up(o["seg"], x.shape[-2:]), 1)
        if keys is None:
            prob = prob * torch.sigmoid(_up(o["cam"], x.shape[-2:]).mean((2, 3)))[:, :, None, None]
        fg = F.interpolate(prob[:, 1:].float(), size=(h, w), mode="bilinear", align_corners=False)
        fused = fg[0] + fg[1].flip(-1) if flip else fg[0]
        total = fused if total is None else total + fused
        n += 2 if flip else 1
    maps = (total / n).cpu().numpy().astype(np.float32)
    if keys is None:
        return np.arange(1, maps.shape[0] + 1, dtype=np.int64), maps
    keys_out = np.asarray(list(keys), dtype=np.int64)
    return keys_out, maps[keys_out - 1]
