"""jsp_fast: pruned continuous normalizing flows that actually run faster."""
from __future__ import annotations

from ._version import __version__  # noqa: F401

from ._ext import _C  # noqa: F401  (None when the compiled core failed to import)

from . import errors

from .cnf import CNF, SolverError
from .prune import prune, remove_pruning
from . import data
from .training import train, save, load
from . import sparse, ops, backends
from .sparse import sparsify

__all__ = ["errors", "CNF", "SolverError", "prune", "remove_pruning", "data", "train", "save", "load", "sparse", "ops",
           "backends", "sparsify"]
