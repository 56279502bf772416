"""Block-sparse backends: ``jf.backends.available()`` and the registry (see ``jsp_fast/sparse/_backends.py``)."""
from __future__ import annotations

from .sparse._backends import ENV_VAR, available, register_backend, resolve, unregister_backend

__all__ = ["available", "register_backend", "unregister_backend", "resolve", "ENV_VAR"]
