"""Exceptions with messages meant for the person running the pipeline.

Every error raised for bad input names the offending path (or config key) and says how to fix it.
"""


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
