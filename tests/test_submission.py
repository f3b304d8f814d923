"""VOC test-set submission archive: official member names, palette PNGs that read back exactly, clear errors."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from wsss_core.errors import DataError
from wsss_core.report.submission import member_name, write_voc_submission
from wsss_core.store.shards import ShardWriter


def _shard(path, masks):
    with ShardWriter(path, "masks", {"split": "test"}) as w:
        for i, m in masks.items():
            w.add_mask(i, m)
    return str(path)


def test_archive_has_official_names_and_exact_palette_pngs(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"2008_00000{k}": rng.integers(0, 21, (7 + k, 9), dtype=np.uint8) for k in range(3)}
    shards = [_shard(tmp_path / "0-of-2.h5", dict(list(masks.items())[:2])),
              _shard(tmp_path / "1-of-2.h5", dict(list(masks.items())[2:]))]
    out = tmp_path / "results.tar.gz"
    assert write_voc_submission(shards, sorted(masks), out) == 3
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names == [member_name(i) for i in sorted(masks)]
        assert names[0] == "results/VOC2012/Segmentation/comp6_test_cls/2008_000000.png"
        for i in masks:
            im = Image.open(io.BytesIO(tar.extractfile(member_name(i)).read()))
            assert im.mode == "P"
            assert np.array_equal(np.asarray(im), masks[i])


def test_archive_refuses_missing_predictions_and_bad_values(tmp_path):
    shard = _shard(tmp_path / "a.h5", {"x": np.zeros((4, 4), np.uint8)})
    with pytest.raises(DataError, match="no prediction"):
        write_voc_submission([shard], ["x", "y"], tmp_path / "out.tar.gz")
    bad = _shard(tmp_path / "b.h5", {"x": np.full((4, 4), 255, np.uint8)})
    with pytest.raises(DataError, match="255"):
        write_voc_submission([bad], ["x"], tmp_path / "out.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]  # no archive, no temp file left
