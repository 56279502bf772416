"""Block-sparse backends: ``jf.backends.available()`` and the registry (``jsp_fast/sparse/registry.py``)."""
from __future__ import annotations

from .sparse.registry import ENV_VAR, available, fused_field, register_backend, resolve, unregister_backend

__all__ = ["available", "register_backend", "unregister_backend", "resolve", "fused_field", "ENV_VAR"]
