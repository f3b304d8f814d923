"""WSSS methods, one module each, all with the interface described in :mod:`wsss_core.methods.base`."""

from .base import METHODS, get_method

__all__ = ["METHODS", "get_method"]
