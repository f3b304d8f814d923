"""PASCAL VOC test-set submission archive in the official result format.

The evaluation server (host.robots.ox.ac.uk) takes a ``.tar.gz`` whose members are
``results/VOC2012/Segmentation/<comp>_test_cls/<id>.png``: one indexed ("P" mode, VOC palette) PNG per test
image, values 0..20 (background 0; no 255). ``comp6`` is the competition for methods that use data outside
VOC (e.g. ImageNet-pretrained backbones), which covers every WSSS method here.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from typing import Sequence

import numpy as np

from ..data.io import label_png_bytes
from ..errors import DataError
from ..store.atomic import atomic_path
from ..store.shards import ShardedStore

def member_name(image_id: str, comp: str = "comp6", year: str = "VOC2012") -> str:
    return f"results/{year}/Segmentation/{comp}_test_cls/{image_id}.png"


def write_voc_submission(pred_shards: Sequence[str | os.PathLike], ids: Sequence[str], out: str | os.PathLike,
                         n_classes: int = 21, comp: str = "comp6", year: str = "VOC2012") -> int:
    """Write the archive of the predictions of ``ids`` (every id must be present, values < ``n_classes``).

    Written to a temporary file and renamed, so an interrupted run leaves no archive. Returns the member count.
    """
    ids = list(ids)
    with ShardedStore([str(p) for p in pred_shards]) as store, atomic_path(out, suffix=".tar.gz") as tmp:
        missing = [i for i in ids if i not in set(store.ids())]
        if missing:
            raise DataError(f"{len(missing)} of {len(ids)} test images have no prediction, e.g. {missing[:3]}")
        with tarfile.open(tmp, "w:gz") as tar:
            for image_id in ids:
                mask = np.asarray(store[image_id], dtype=np.uint8)
                if mask.max(initial=0) >= n_classes:
                    raise DataError(f"prediction of {image_id} has value {int(mask.max())} >= {n_classes}")
                data = label_png_bytes(mask)
                info = tarfile.TarInfo(member_name(image_id, comp, year))
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    return len(ids)
