"""Loads the compiled core, jsp_fast._C, once.

The pure-torch parts of the package work without it (the `torch` backend is the reference), so by
default a failed import is kept and reported by the features that need it instead of breaking
`import jsp_fast`. Where the core must be there (CI, a benchmark run), ``JSP_FAST_REQUIRE_C=1`` turns
a missing module, or one without the core entry points, into an ImportError at import time.
"""
from __future__ import annotations

import os

# What every build of _C exports (the CUDA entry points only exist in CUDA builds).
CORE_NAMES = ("bsr_fwd", "bsr_jvp", "bsr_t_matmul", "bsr_weight_grad", "FieldPlanF32", "FieldPlanF64",
              "act_codes", "build_info")
REQUIRE_ENV = "JSP_FAST_REQUIRE_C"

try:
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:
    _C = None
    IMPORT_ERROR = exc


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


if _required():
    if _C is None:
        raise ImportError(f"{REQUIRE_ENV}=1 but jsp_fast._C (the compiled core) failed to import: "
                          f"{IMPORT_ERROR}") from IMPORT_ERROR
    _missing = [name for name in CORE_NAMES if not hasattr(_C, name)]
    if _missing:
        raise ImportError(f"{REQUIRE_ENV}=1 but jsp_fast._C ({getattr(_C, '__file__', '?')}) lacks "
                          f"{', '.join(_missing)}: a partial or stale build; rebuild with `pip install .`")


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
