"""jsp_fast: pruned continuous normalizing flows that actually run faster."""
from __future__ import annotations

__version__ = "0.1.0"

from ._ext import _C  # noqa: F401  (None when the compiled core failed to import)

from .cnf import CNF, SolverError  # noqa: E402
from .prune import prune, remove_pruning  # noqa: E402
from . import data  # noqa: E402
from .train import train  # noqa: E402
from .checkpoint import save, load  # noqa: E402
from . import sparse, ops, backends  # noqa: E402
from .sparse import sparsify  # noqa: E402
