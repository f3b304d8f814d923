"""Storage: atomic writes and sharded HDF5 stores for CAMs and label masks."""

from .atomic import atomic_path, read_json, write_json, write_text
from .shards import ShardedStore, ShardWriter, shard_ids

__all__ = ["atomic_path", "read_json", "write_json", "write_text", "ShardedStore", "ShardWriter", "shard_ids"]
