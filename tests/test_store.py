"""Tests of wsss_core.store: atomic writes, shard partitioning, HDF5 shard round trips."""

from __future__ import annotations

import json
import random

import h5py
import numpy as np
import pytest

from wsss_core.errors import DataError
from wsss_core.store import ShardedStore, ShardWriter, atomic_path, read_json, shard_ids, write_json, write_text


# ---------------------------------------------------------------- shard_ids


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 33, 100])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 8, 13])
def test_shard_ids_partition_sorted_ids(n, n_shards):
    ids = [f"img_{i:04d}" for i in range(n)]
    shuffled = ids[:]
    random.Random(n * 31 + n_shards).shuffle(shuffled)
    shards = [shard_ids(shuffled, s, n_shards) for s in range(n_shards)]
    # concatenation in shard order is exactly the sorted list: union = all, disjoint, contiguous, ordered
    assert [i for sh in shards for i in sh] == sorted(ids)
    sizes = [len(sh) for sh in shards]
    assert max(sizes) - min(sizes) <= 1
    # independent of the input order
    assert shards == [shard_ids(list(reversed(ids)), s, n_shards) for s in range(n_shards)]


def test_shard_ids_sorts_unsorted_input():
    ids = ["c", "a", "e", "b", "d"]
    assert shard_ids(ids, 0, 2) + shard_ids(ids, 1, 2) == ["a", "b", "c", "d", "e"]
    assert shard_ids(ids, 0, 1) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("shard,n_shards", [(-1, 4), (4, 4), (0, 0)])
def test_shard_ids_rejects_bad_shard(shard, n_shards):
    with pytest.raises(ValueError):
        shard_ids(["a", "b"], shard, n_shards)


# ---------------------------------------------------------------- ShardWriter / ShardedStore


def _random_cams(rng, n_images):
    data = {}
    for i in range(n_images):
        k = int(rng.integers(0, 4))  # 0 keys allowed (image with no foreground class)
        keys = np.sort(rng.choice(np.arange(1, 21), size=k, replace=False)).astype(np.int64)
        h, w = int(rng.integers(5, 20)), int(rng.integers(5, 20))
        data[f"2007_{i:06d}"] = (keys, rng.random((k, h, w)).astype(np.float32))
    return data


def test_cam_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = _random_cams(rng, 9)
    ids = list(data)
    paths = []
    for s in range(3):
        p = tmp_path / f"cams_{s}.h5"
        meta = {"split": "train", "shard": s, "n_shards": 3, "config_hash": "abc123",
                "scales": [1.0, 0.5, 1.5], "flip": True, "arr": np.arange(3)}
        with ShardWriter(p, "cams", meta) as w:
            for image_id in shard_ids(ids, s, 3):
                w.add_cams(image_id, *data[image_id])
        assert w.n == len(shard_ids(ids, s, 3))
        paths.append(p)
    with ShardedStore(paths) as store:
        assert store.kind == "cams"
        assert len(store) == len(ids)
        assert store.ids() == sorted(ids)
        for image_id, (keys, cams) in data.items():
            assert image_id in store
            got_keys, got_cams = store[image_id]
            np.testing.assert_array_equal(got_keys, keys)
            assert got_cams.dtype == np.float32
            assert got_cams.shape == cams.shape
            # float16 storage: relative precision 2^-11 on values in [0, 1)
            np.testing.assert_allclose(got_cams, cams, atol=1e-3, rtol=0)
        assert [i for i, _ in store.items()] == sorted(ids)
        # attrs of the first shard, with caller metadata
        a = store.attrs
        assert a["kind"] == "cams"
        assert a["split"] == "train"
        assert int(a["shard"]) == 0 and int(a["n_shards"]) == 3
        assert a["config_hash"] == "abc123"
        assert json.loads(a["scales"]) == [1.0, 0.5, 1.5]
        assert bool(a["flip"]) is True
        np.testing.assert_array_equal(a["arr"], np.arange(3))
        assert bool(a["complete"]) is True
        assert int(a["n_images"]) == len(shard_ids(ids, 0, 3))
    # every shard file records its own metadata
    for s, p in enumerate(paths):
        with h5py.File(p, "r") as fh:
            assert int(fh.attrs["shard"]) == s
            assert int(fh.attrs["n_images"]) == len(shard_ids(ids, s, 3))


def test_mask_shard_round_trip_exact(tmp_path):
    rng = np.random.default_rng(1)
    masks = {}
    for i in range(5):
        m = rng.integers(0, 21, size=(int(rng.integers(4, 30)), int(rng.integers(4, 30)))).astype(np.uint8)
        m[rng.random(m.shape) < 0.1] = 255
        masks[f"id{i}"] = m
    p = tmp_path / "masks.h5"
    with ShardWriter(p, "masks", {"split": "val", "bg_threshold": 0.25}) as w:
        for k, m in masks.items():
            w.add_mask(k, m)
    with ShardedStore([p]) as store:
        assert store.kind == "masks"
        assert float(store.attrs["bg_threshold"]) == 0.25
        for k, m in masks.items():
            got = store[k]
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, m)


def test_add_cams_rejects_mismatched_keys(tmp_path):
    p = tmp_path / "x.h5"
    with pytest.raises(ValueError):
        with ShardWriter(p, "cams") as w:
            w.add_cams("a", np.array([1, 2]), np.zeros((3, 4, 4)))
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "x.h5", "logits")


def test_exception_inside_writer_leaves_nothing(tmp_path):
    p = tmp_path / "sub" / "cams_0.h5"

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with ShardWriter(p, "cams", {"split": "train"}) as w:
            w.add_cams("a", np.array([1]), np.ones((1, 4, 4)))
            raise Boom("killed mid-shard")
    assert not p.exists()
    assert list(p.parent.iterdir()) == []  # no .tmp-* file either


def test_exception_inside_writer_keeps_previous_shard(tmp_path):
    p = tmp_path / "m.h5"
    with ShardWriter(p, "masks") as w:
        w.add_mask("old", np.zeros((3, 3), np.uint8))
    with pytest.raises(KeyError):
        with ShardWriter(p, "masks") as w:
            w.add_mask("new", np.ones((3, 3), np.uint8))
            raise KeyError("boom")
    with ShardedStore([p]) as store:
        assert store.ids() == ["old"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.h5"]


def test_store_rejects_incomplete_shard(tmp_path):
    p = tmp_path / "incomplete.h5"
    with h5py.File(p, "w") as fh:
        fh.attrs["kind"] = "masks"
        fh.create_group("a").create_dataset("mask", data=np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="incomplete"):
        ShardedStore([p])
    with h5py.File(p, "a") as fh:
        fh.attrs["complete"] = False
    with pytest.raises(DataError, match="incomplete"):
        ShardedStore([p])


def test_store_rejects_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "torn.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="torn.h5"):
        ShardedStore([bad])
    with pytest.raises(DataError, match="absent.h5"):
        ShardedStore([tmp_path / "absent.h5"])


def test_store_rejects_mixed_kinds(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    with ShardWriter(a, "masks") as w:
        w.add_mask("x", np.zeros((2, 2), np.uint8))
    with ShardWriter(b, "cams") as w:
        w.add_cams("y", np.array([1]), np.zeros((1, 2, 2)))
    with pytest.raises(DataError):
        ShardedStore([a, b])


def test_store_missing_id_raises_data_error_naming_it(tmp_path):
    p = tmp_path / "m.h5"
    with ShardWriter(p, "masks") as w:
        w.add_mask("present", np.zeros((2, 2), np.uint8))
    with ShardedStore([p]) as store:
        assert "absent_id_42" not in store
        with pytest.raises(DataError, match="absent_id_42"):
            store["absent_id_42"]


# ---------------------------------------------------------------- atomic_path


def test_atomic_path_success_replaces(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    with atomic_path(p) as tmp:
        assert tmp != p and tmp.parent == p.parent and tmp.suffix == ".json"
        tmp.write_text("new")
        assert p.read_text() == "old"  # nothing visible at the final path before the body ends
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_failure_leaves_old_file(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old content")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert p.read_text() == "old content"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_failure_without_old_file(tmp_path):
    p = tmp_path / "deep" / "new.bin"
    with pytest.raises(ZeroDivisionError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"x")
            1 / 0
    assert not p.exists()
    assert list(p.parent.iterdir()) == []


def test_write_json_and_text(tmp_path):
    obj = {"a": np.int64(3), "b": np.arange(3), "c": tmp_path, "d": [1.5]}
    write_json(tmp_path / "x.json", obj)
    assert read_json(tmp_path / "x.json") == {"a": 3, "b": [0, 1, 2], "c": str(tmp_path), "d": [1.5]}
    write_text(tmp_path / "y.txt", "héllo\n")
    assert (tmp_path / "y.txt").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(TypeError):
        write_json(tmp_path / "z.json", {"bad": object()})
    assert not (tmp_path / "z.json").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.json", "y.txt"]


def test_atomic_outputs_get_normal_permissions_not_mkstemps_0600(tmp_path):
    import os

    from wsss_core.store.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with ShardWriter(tmp_path / "s.h5", "masks", {}) as w:
            w.add_mask("i", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "s.h5").stat().st_mode & 0o777 == 0o644
