"""bench/RESULTS.md: each script owns one ``## `` section and replaces only that one."""
from __future__ import annotations

from pathlib import Path

from jsp_fast._io import replace_markdown_section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(section: str, heading: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section that starts with the line ``heading`` (``jsp_fast._io``)."""
    replace_markdown_section(path, section, heading)
