"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace`` over the target.

A reader (or a run resumed after a kill) sees the old file or the new one, never half of one. The
temp name starts with a dot and ends in ``.tmp`` so an interrupted write is recognisable as ours.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "replace_markdown_section"]


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


def replace_markdown_section(path: str | os.PathLike, section: str, heading: str, append: bool = False) -> None:
    """Replace (or add at the end) the section of the markdown file ``path`` that starts with the line
    ``heading`` and runs to the next ``## `` line; ``section`` starts with that heading too. The rest
    of the file is kept byte for byte and the file is replaced atomically (``bench/RESULTS.md``: each
    benchmark owns one section). ``append``: keep the section's earlier runs and add this one after
    them (under one heading)."""
    if not section.startswith(heading):
        raise ValueError(f"section must start with its heading {heading!r}, got {section[:40]!r}")
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        if append:
            section = "".join(lines[start:end]).rstrip("\n") + "\n\n---\n" + section.split("\n", 1)[1]
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    atomic_write_text(path, new)
