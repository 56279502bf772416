"""Ahead-of-time compilation of the Triton kernels for sm_90 without a GPU (a subset of the variants;
``python -m jsp_fast.kernels._compile_check`` compiles all of them with every autotune config).

The interpreter cannot catch GPU-only errors (tl.dot shape/dtype rules, layouts of reshapes,
resource limits); compiling through triton's bundled ptxas does. Runs in a subprocess because the
kernels are compiled for the interpreter once TRITON_INTERPRET=1 is set (tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="triton has no bundled ptxas")
@pytest.mark.parametrize("variant", ["fwd/fp32/32x32", "fused_field/fp32/blk32/TT1"])
def test_compiles_for_sm90(variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "jsp_fast.kernels._compile_check", "-k", variant],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "0 configs failed to compile" in out, out[-3000:]
    assert "ok " in out, out[-3000:]
