"""jsp_fast: pruned continuous normalizing flows that actually run faster.

The public names load on first use (PEP 562): ``import jsp_fast`` costs nothing, so ``jsp-fast
--help`` (whose module lives inside this package) starts without importing torch, torchdiffeq,
the compiled core or Triton. ``jf.CNF``, ``from jsp_fast import prune`` etc. behave as before.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ._version import __version__  # noqa: F401

# public name -> (module, attribute); attribute None: the module itself
_EXPORTS = {
    "CNF": (".cnf", "CNF"), "SolverError": (".errors", "SolverError"),
    "prune": (".prune", "prune"), "remove_pruning": (".prune", "remove_pruning"),
    "train": (".training", "train"), "save": (".training", "save"), "load": (".training", "load"),
    "sparsify": (".sparse", "sparsify"),
    "data": (".data", None), "sparse": (".sparse", None), "ops": (".ops", None),
    "backends": (".backends", None), "errors": (".errors", None),
    "_C": ("._ext", "_C"),  # None when the compiled core failed to import
}

__all__ = ["errors", "CNF", "SolverError", "prune", "remove_pruning", "data", "train", "save", "load", "sparse", "ops",
           "backends", "sparsify"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        # Subpackages (jf.cnf, jf.training, ...) were attributes of the eager root: import on access.
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'jsp_fast' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``jf.prune`` is the function, but ``jsp_fast.prune`` is also a subpackage, and importing a
    submodule sets it as an attribute of its parent. The eager ``__init__`` rebound the name to the
    function afterwards; here any import of the subpackage would, so keep the function instead."""

    def __setattr__(self, name, value):
        if name == "prune" and isinstance(value, types.ModuleType):
            value = value.prune
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
