"""The method registry (timm style): a method module registers itself by decorating its ``build_model``.

    from wsss_core.methods.registry import register_method

    @register_method("mymethod")
    def build_model(cfg, n_classes, cache_dir="weights"): ...

The built-in modules of :mod:`wsss_core.methods` are found with :mod:`pkgutil` and their names read from their
``@register_method("...")`` lines without importing them (:func:`builtin_methods`: checking a config's method names
when the workflow starts costs no torch import); :func:`get_method` imports the one module it needs. A module
elsewhere on ``sys.path`` registers itself when :func:`load_plugins` imports it (config key ``method_plugins``). The interface a module must implement is described in :mod:`wsss_core.methods.base`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import re
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence, TypeVar

from ..errors import ConfigError

#: the functions a method module must define (a tuple: any one of them)
REQUIRED: tuple[str | tuple[str, ...], ...] = ("build_model", ("param_groups", "build_optimizer"), "training_step",
                                               "cam_forward")
#: modules of the package that are not methods
NOT_METHODS = ("base", "inference", "registry")

_REGISTRY: dict[str, ModuleType] = {}
_PENDING: set[str] = set()  # registered while their module was still importing: checked on the next lookup
_discovered = False

F = TypeVar("F", bound=Callable)


def missing_interface(module: ModuleType) -> list[str]:
    """The required interface functions ``module`` lacks (``"param_groups or build_optimizer"`` for a pair)."""
    out = []
    for req in REQUIRED:
        alts = (req,) if isinstance(req, str) else req
        if not any(callable(getattr(module, a, None)) for a in alts):
            out.append(" or ".join(alts))
    return out


def _check(name: str, module: ModuleType) -> None:
    missing = missing_interface(module)
    if missing:
        if _REGISTRY.get(name) is module:
            del _REGISTRY[name]
        raise TypeError(f"method module {module.__name__} (registered as {name!r}) lacks {', '.join(missing)}; a "
                        "method module defines build_model, param_groups or build_optimizer, training_step and "
                        "cam_forward (see wsss_core.methods.base)")


def _initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def register_method(name: str) -> Callable[[F], F]:
    """Decorator for a method module's ``build_model``: registers the function's module as method ``name``.

    The module's interface (:data:`REQUIRED`) is checked now, or, when the decorator runs while the module is still
    being imported (the functions after ``build_model`` do not exist yet), at the end of the import that triggered
    it (:func:`get_method`, :func:`registered_methods`, :func:`load_plugins`). A missing function is a TypeError
    naming it; ``name`` already registered by another module is a ValueError (re-registering from the same module,
    e.g. on reload, replaces it)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        if module is None:
            raise TypeError(f"register_method({name!r}) decorates {fn!r}, whose module is not imported")
        prev = _REGISTRY.get(name)
        if prev is not None and prev.__name__ != module.__name__:
            raise ValueError(f"method {name!r} is already registered by {prev.__name__}; {module.__name__} cannot "
                             "register it too (choose another name)")
        if _initializing(module):
            _REGISTRY[name] = module
            _PENDING.add(name)
        else:
            _check(name, module)
            _REGISTRY[name] = module
            _PENDING.discard(name)
        return fn

    return decorator


def _check_pending() -> None:
    for name in sorted(_PENDING):
        _PENDING.discard(name)
        module = _REGISTRY.get(name)
        if module is None:
            continue
        if sys.modules.get(module.__name__) is not module:  # its import failed (and raised): forget it
            del _REGISTRY[name]
            continue
        _check(name, module)


def _builtin_modules() -> list[str]:
    package = importlib.import_module(__name__.rpartition(".")[0])
    return [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
            if not (info.name.startswith("_") or info.name.endswith("_ops") or info.name in NOT_METHODS)]


_DECLARED = re.compile(r"""^@register_method\(\s*["']([^"']+)["']\s*\)""", re.M)


@lru_cache(maxsize=None)
def builtin_methods() -> dict[str, str]:
    """Built-in method name -> module name, read from the modules' ``@register_method("...")`` lines (no import)."""
    out = {}
    for mod in _builtin_modules():
        path = Path(importlib.util.find_spec(mod).origin)
        for name in _DECLARED.findall(path.read_text(encoding="utf-8")):
            out[name] = mod
    return out


def _discover() -> None:
    """Import every built-in method module of this package once (each registers itself)."""
    global _discovered
    if _discovered:
        return
    for mod in _builtin_modules():
        importlib.import_module(mod)
    _discovered = True


def registered_methods() -> list[str]:
    """The names of all registered methods (built-ins, all imported now, and loaded plugins), sorted."""
    _discover()
    _check_pending()
    return sorted(_REGISTRY)


def known_methods() -> list[str]:
    """The method names that :func:`get_method` can return now (built-ins and loaded plugins), importing nothing."""
    return sorted(set(_REGISTRY) | set(builtin_methods()))


def check_method_name(name: str) -> None:
    """A KeyError, listing the known names with the closest spelling, unless ``name`` is a known method (no
    import)."""
    if name in known_methods():
        return
    known = known_methods()
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown method {name!r}{hint} known: {known} (a method module outside wsss_core.methods "
                   "registers itself when listed in the config key method_plugins)")


def get_method(name: str) -> ModuleType:
    """The method module registered as ``name`` (a built-in is imported on first use); an unknown name is a KeyError
    listing the known ones (with the closest spelling)."""
    _check_pending()
    if name not in _REGISTRY and name in builtin_methods():
        importlib.import_module(builtin_methods()[name])
        _check_pending()
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    check_method_name(name)
    raise KeyError(f"method {name!r} is declared in {builtin_methods().get(name)} but did not register")


def load_plugins(modules: Sequence[str]) -> list[str]:
    """Import the method modules ``modules`` (dotted names, anywhere on ``sys.path``; config key
    ``method_plugins``) so that they register themselves; returns the names they registered. A module that cannot
    be imported is a ConfigError naming it."""
    if isinstance(modules, str):
        modules = [modules]
    _check_pending()
    before = set(_REGISTRY)
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(f"method plugin {mod!r} (method_plugins) cannot be imported: {exc}. Fix: put its "
                              "package on the Python path (pip install -e it, or PYTHONPATH) or correct the "
                              "dotted name") from exc
        _check_pending()
    return sorted(set(_REGISTRY) - before)
