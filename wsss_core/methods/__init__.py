"""WSSS methods, one module each, all with the interface described in :mod:`wsss_core.methods.base`; each
registers itself with :func:`register_method` (see :mod:`wsss_core.methods.registry`)."""

from .registry import check_method_name, get_method, known_methods, load_plugins, register_method, registered_methods

__all__ = ["check_method_name", "get_method", "known_methods", "load_plugins", "register_method",
           "registered_methods"]
