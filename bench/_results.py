"""bench/RESULTS.md: each script owns one ``## `` section and replaces only that one."""
from __future__ import annotations

from pathlib import Path

from jsp_fast._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(section: str, heading: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section that starts with the line ``heading``; ``section`` starts with
    that line too. The rest of the file is kept byte for byte, and the file is replaced atomically."""
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
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    atomic_write_text(path, new)
