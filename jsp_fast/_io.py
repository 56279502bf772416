"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace`` over the target.

A reader (or a run resumed after a kill) sees the old file or the new one, never half of one. The
temp name starts with a dot and ends in ``.tmp`` so an interrupted write is recognisable as ours.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (the parent folder must exist).

    ``mode``: the file's permission bits; by default 0o666 less the process umask, as ``open`` would
    give (``mkstemp`` alone would leave 0o600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON (floats for anything else float-like, e.g. NumPy scalars), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=float) + "\n")
