"""Loads the compiled core, jsp_fast._C, once.

The pure-torch parts of the package work without it (the `torch` backend is the reference), so a
failed import is kept and reported by the features that need it instead of breaking `import jsp_fast`.
"""
from __future__ import annotations

try:
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    IMPORT_ERROR = exc


def require_C():
    """Return the compiled module or raise a clear error saying how to build it."""
    if _C is None:
        raise RuntimeError(
            "jsp_fast._C (the compiled CPU/CUDA kernels) is not available: "
            f"{IMPORT_ERROR}. Reinstall with `pip install .` from the source tree "
            "(needs a C++17 compiler and CMake >= 3.18), or use backend='torch'."
        )
    return _C


def has(name: str) -> bool:
    """True when the compiled module exists and exports `name`."""
    return _C is not None and hasattr(_C, name)
