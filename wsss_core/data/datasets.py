"""torch Datasets: image-level-labelled training images and pseudo-mask-labelled segmentation crops."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .augment import apply_geometry, make_weak_strong_views
from .io import IGNORE_INDEX, read_image
from .saliency import read_saliency
from .transforms import color_jitter_fixed_order, normalize, random_crop, random_resize_long, resize, to_tensor


class _Seeded:
    """Per-sample RNG = f(seed, epoch, index), so augmentation survives a resume unchanged."""

    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class ClassificationDataset(_Seeded, torch.utils.data.Dataset):
    """Training images with multi-hot labels.

    item: ``{"image": float32 (3, crop, crop), "label": float32 (C,), "id": str}`` where C is the number of foreground
    classes (background excluded), plus ``"valid": float32 (1, crop, crop)`` (1 on image pixels, 0 on padding) when
    ``valid``. Augmentation: random long side in ``resize_long``, colour jitter (unless ``jitter=False``, e.g. SIPE
    ``data/data_voc.py::VOC12ClsDataset``), h-flip, normalise, random crop (zero pad after normalisation).
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], labels: np.ndarray, crop_size: int,
                 resize_long: Sequence[int], seed: int = 0, ext: str = ".jpg", jitter: bool = True,
                 valid: bool = False):
        self.image_dir, self.ids, self.labels = Path(image_dir), list(ids), np.asarray(labels, dtype=np.float32)
        self.crop, self.resize_long, self.seed, self.ext = int(crop_size), resize_long, int(seed), ext
        self.jitter, self.valid = bool(jitter), bool(valid)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        img = read_image(self.image_dir / f"{self.ids[i]}{self.ext}")
        img = random_resize_long(img, rng, *self.resize_long)
        if self.jitter:
            img = color_jitter_fixed_order(img, rng)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        arrays = [normalize(img)] + ([np.ones(img.shape[:2], np.float32)] if self.valid else [])
        crops = random_crop(arrays, [0.0] * len(arrays), self.crop, rng)  # one window for all: same draws
        item = {"image": to_tensor(crops[0]), "label": torch.from_numpy(self.labels[i]), "id": self.ids[i]}
        if self.valid:
            item["valid"] = torch.from_numpy(crops[1][None])
        return item


def posterize_any_bits(img, bits_to_keep: int, **_):
    """timm's posterize for every bit count it draws: ``PosterizeIncreasing`` at a noisy magnitude >= 10 asks for 0 bits,
    which Pillow < 11 turned into a black image and Pillow >= 11 refuses (ValueError); 0 bits -> black, as the
    reference's Pillow did; >= 8 bits -> unchanged."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


class TimmClassificationDataset(_Seeded, torch.utils.data.Dataset):
    """Training images through timm's ImageNet training transform (MCTformer,
    ``xulianuwa/MCTformer`` ``datasets.py::build_transform``).

    item: ``{"image": float32 (3, crop, crop), "label": float32 (C,), "id": str}``. Transform:
    RandomResizedCrop(crop, ``scale``, ratio (3/4, 4/3), bicubic) -> h-flip 0.5 -> RandAugment ``auto_augment`` ->
    normalise (ImageNet) -> RandomErasing(``re_prob``, per-pixel normal values, one box). timm draws from python's,
    numpy's and torch's global RNGs: they are seeded per (seed, epoch, index) for the call and restored after it,
    so a sample's augmentation survives a resume and nothing else's randomness changes.
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], labels: np.ndarray, crop_size: int,
                 seed: int = 0, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                 scale: tuple[float, float] = (0.08, 1.0), re_prob: float = 0.25, ext: str = ".jpg"):
        from timm.data import create_transform

        from .transforms import IMAGENET_MEAN, IMAGENET_STD

        self.image_dir, self.ids, self.labels = Path(image_dir), list(ids), np.asarray(labels, dtype=np.float32)
        self.seed, self.ext = int(seed), ext
        self.transform = create_transform(int(crop_size), is_training=True, scale=tuple(scale), ratio=(3 / 4, 4 / 3),
                                          hflip=0.5, auto_augment=auto_augment, interpolation="bicubic",
                                          re_prob=float(re_prob), re_mode="pixel", re_count=1,
                                          mean=tuple(IMAGENET_MEAN.tolist()), std=tuple(IMAGENET_STD.tolist()))
        for t in getattr(self.transform, "transforms", []):
            for op in getattr(t, "ops", []):  # RandAugment's ops
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_any_bits

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        import random

        from PIL import Image

        img = Image.fromarray(read_image(self.image_dir / f"{self.ids[i]}{self.ext}"))
        s = int(self.rng(i).integers(2**31))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(s)
                np.random.seed(s)
                torch.manual_seed(s)
                x = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {"image": x.float(), "label": torch.from_numpy(self.labels[i]), "id": self.ids[i]}


class SegmentationDataset(_Seeded, torch.utils.data.Dataset):
    """Training crops with (pseudo-)masks read from a sharded mask store.

    item: ``{"image": float32 (3, crop, crop), "mask": int64 (crop, crop) with 255 = ignore, "id": str}``.
    Augmentation: random scale in ``scale_range``, h-flip, normalise, crop (image pad 0, label pad 255).
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], mask_shards: Sequence[str | Path], crop_size: int,
                 scale_range: Sequence[float], seed: int = 0, ext: str = ".jpg"):
        self.image_dir, self.ids, self.mask_shards = Path(image_dir), list(ids), [str(p) for p in mask_shards]
        self.crop, self.scale_range, self.seed, self.ext = int(crop_size), scale_range, int(seed), ext
        self._store = None

    def __len__(self) -> int:
        return len(self.ids)

    def _masks(self):
        if self._store is None:  # opened lazily: one handle per worker process
            from ..store.shards import ShardedStore

            self._store = ShardedStore(self.mask_shards, kind="masks")
        return self._store

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        image_id = self.ids[i]
        img = read_image(self.image_dir / f"{image_id}{self.ext}")
        mask = self._masks()[image_id]
        s = rng.uniform(*self.scale_range)
        h, w = img.shape[:2]
        size = (max(1, int(h * s)), max(1, int(w * s)))
        img, mask = resize(img, size), resize(mask, size, label=True)
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        img, mask = random_crop([normalize(img), mask], [0.0, IGNORE_INDEX], self.crop, rng)
        return {"image": to_tensor(img), "mask": torch.from_numpy(mask.astype(np.int64)), "id": image_id}


class ViewsDataset(_Seeded, torch.utils.data.Dataset):
    """Training images for EPS/PPC-style methods and FSAE: a weak view, optional saliency, optional strong view.

    The views follow ``obeychoi0120/PixMatch`` ``data/dataset.py::ClassificationDatasetWithSaliency``
    (:func:`wsss_core.data.augment.make_weak_strong_views`): random long side, h-flip, colour jitter, crop on uint8
    (black pad), normalise; the strong view reuses the weak view's geometry exactly (pixel-aligned) with a fresh jitter,
    blur and RandAugment.

    item: ``{"image": float32 (3, crop, crop), "label": float32 (C,), "id": str}`` plus
    ``"saliency": float32 (1, crop, crop)`` in [0, 1] when ``saliency_dir`` is given and
    ``"image_strong": float32 (3, crop, crop)`` when ``strong`` and ``"valid": float32 (1, crop, crop)`` (1 on image
    pixels, 0 on the crop's padding) when ``valid``.
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], labels: np.ndarray, crop_size: int,
                 resize_long: Sequence[int], seed: int = 0, saliency_dir: str | Path | None = None,
                 saliency_ext: str = ".png", strong: bool = False, strong_cfg: dict | None = None,
                 ext: str = ".jpg", valid: bool = False):
        self.image_dir, self.ids, self.labels = Path(image_dir), list(ids), np.asarray(labels, dtype=np.float32)
        self.crop, self.resize_long, self.seed, self.ext = int(crop_size), tuple(resize_long), int(seed), ext
        self.saliency_dir, self.saliency_ext = saliency_dir, saliency_ext
        self.strong, self.strong_cfg = bool(strong), dict(strong_cfg or {})
        self.valid = bool(valid)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        image_id = self.ids[i]
        img = read_image(self.image_dir / f"{image_id}{self.ext}")
        sal = None
        if self.saliency_dir is not None:
            sal = read_saliency(self.saliency_dir, image_id, self.saliency_ext)
            if sal.shape != img.shape[:2]:
                raise ValueError(f"saliency map of {image_id} is {sal.shape}, image is {img.shape[:2]}")
        sc = self.strong_cfg
        v = make_weak_strong_views(img, rng, saliency=sal, crop=self.crop, resize_long=self.resize_long,
                                   blur_kernel=int(sc.get("blur_kernel", 1)),
                                   n_strong_augs=int(sc.get("n_strong_augs", 5)), strong=self.strong)
        item = {"image": v["img_w"], "label": torch.from_numpy(self.labels[i]), "id": image_id}
        if sal is not None:
            item["saliency"] = v["saliency"]
        if self.strong:
            item["image_strong"] = v["img_s"]
        if self.valid:
            ones = np.ones(img.shape[:2], np.uint8)
            item["valid"] = torch.from_numpy(apply_geometry(ones, v["geometry_w"], label=True, pad=0)[None]
                                              .astype(np.float32))
        return item


class SuperpixelDataset(_Seeded, torch.utils.data.Dataset):
    """Training crops of a superpixel network (CHENDL-SHEN/MSA ``train_scn.py`` with ``Dataset_with_LABIMG``;
    CHENDL-SHEN/ESC ``train_Q.py``): random long side in ``resize_long`` (bicubic image), h-flip, normalise, crop
    (zero padding), and the recipe's content targets cropped alongside.

    item: ``{"image": float32 (3, crop, crop), "id": str}`` plus

    - ``content="lab"``: ``"lab"`` float32 (3, crop, crop), OpenCV's 8-bit RGB -> LAB of the resized image / 255;
    - ``content="saliency_cam"``: ``"saliency"`` float32 (1, crop, crop) in [0, 1] (nearest) and ``"cam"`` float32
      (C+1, crop, crop) (bilinear): the stage-1 CAMs of the present classes from ``cam_shards``, background and
      absent channels 0 (the background channel is replaced by thresholds in the loss).
    """

    def __init__(self, image_dir: str | Path, ids: Sequence[str], crop_size: int, resize_long: Sequence[int],
                 content: str, seed: int = 0, n_classes: int | None = None, saliency_dir: str | Path | None = None,
                 saliency_ext: str = ".png", cam_shards: Sequence[str | Path] = (), ext: str = ".jpg"):
        if content not in ("lab", "saliency_cam"):
            raise ValueError(f"superpixel content must be lab or saliency_cam, not {content!r}")
        if content == "saliency_cam" and (saliency_dir is None or not cam_shards or n_classes is None):
            raise ValueError("the saliency_cam recipe needs saliency maps, stage-1 CAM shards and n_classes")
        self.image_dir, self.ids, self.crop = Path(image_dir), list(ids), int(crop_size)
        self.resize_long, self.content, self.seed, self.ext = tuple(resize_long), content, int(seed), ext
        self.n_classes, self.saliency_dir, self.saliency_ext = n_classes, saliency_dir, saliency_ext
        self.cam_shards, self._store = [str(p) for p in cam_shards], None

    def __len__(self) -> int:
        return len(self.ids)

    def _cams(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        if self._store is None:  # opened lazily: one handle per worker process
            from ..store.shards import ShardedStore

            self._store = ShardedStore(self.cam_shards, kind="cams")
        keys, cams = self._store[image_id]
        full = np.zeros((self.n_classes + 1, *shape), np.float32)
        for k, cam in zip(keys, cams):
            if k > 0:
                full[int(k)] = cam
        return full

    def __getitem__(self, i: int) -> dict:
        import cv2

        rng = self.rng(i)
        image_id = self.ids[i]
        img = read_image(self.image_dir / f"{image_id}{self.ext}")
        h, w = img.shape[:2]
        target = int(rng.integers(int(self.resize_long[0]), int(self.resize_long[1]) + 1))
        s = target / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        flip = rng.random() < 0.5
        arrays, pads = [], []
        img = resize(img, size)
        if flip:
            img = img[:, ::-1]
        arrays.append(normalize(img))
        if self.content == "lab":
            arrays.append(cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2LAB).astype(np.float32) / 255)
        else:
            sal = read_saliency(self.saliency_dir, image_id, self.saliency_ext)
            if sal.shape != (h, w):
                raise ValueError(f"saliency map of {image_id} is {sal.shape}, image is {(h, w)}")
            cam = self._cams(image_id, (h, w))
            if cam.shape[1:] != (h, w):
                raise ValueError(f"stage-1 CAM of {image_id} is {cam.shape[1:]}, image is {(h, w)}")
            sal = resize(sal, size, label=True).astype(np.float32) / 255
            cam = np.stack([cv2.resize(c, size[::-1], interpolation=cv2.INTER_LINEAR) for c in cam], -1)
            if flip:
                sal, cam = sal[:, ::-1], cam[:, ::-1]
            arrays += [sal, cam]
        crops = random_crop(arrays, [0.0] * len(arrays), self.crop, rng)
        item = {"image": to_tensor(crops[0]), "id": image_id}
        if self.content == "lab":
            item["lab"] = to_tensor(crops[1])
        else:
            item["saliency"] = torch.from_numpy(np.ascontiguousarray(crops[1])[None])
            item["cam"] = to_tensor(crops[2])
        return item
