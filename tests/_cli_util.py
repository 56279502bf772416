"""Running the ``jsp-fast`` command in-process for tests (not collected: leading underscore)."""
from __future__ import annotations

from jsp_fast.app import cli


def run(capsys, *argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``jsp-fast ARGV`` (argparse's own exits included)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err

