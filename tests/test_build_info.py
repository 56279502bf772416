"""The compiled core as built: its version comes from the build, its core entry points are all there,
and ``JSP_FAST_REQUIRE_C=1`` turns a missing or partial ``jsp_fast._C`` into an import error."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jsp_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


def _core():
    # No skip: a CI run without the compiled core must fail here, not pass on the torch fallbacks.
    assert _ext._C is not None, f"jsp_fast._C did not import: {_ext.IMPORT_ERROR}"
    return _ext._C


def _package_version() -> str:
    try:
        return importlib.metadata.version("jsp-fast")
    except importlib.metadata.PackageNotFoundError:  # a plain CMake build on PYTHONPATH, not installed
        import tomllib  # noqa: PLC0415

        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_is_the_packages_and_comes_from_the_build():
    info = _core().build_info()
    # CMakeLists.txt defines both; csrc/bind/module.cpp has no literal to fall back on.
    assert info["version_from"] in ("scikit-build-core", "pyproject.toml"), info
    assert info["version"] == _package_version(), info


# What the Python side calls on every build (the CPU backend, the CPU fused field, the checks).
ENTRY_POINTS = ("bsr_fwd", "bsr_jvp", "bsr_t_matmul", "bsr_weight_grad", "FieldPlanF32", "FieldPlanF64",
                "act_codes", "build_info")


def test_core_entry_points_exist():
    C = _core()
    missing = [name for name in ENTRY_POINTS if not hasattr(C, name)]
    assert not missing, f"jsp_fast._C ({C.__file__}) lacks {missing}"
    assert set(ENTRY_POINTS) <= set(_ext.CORE_NAMES)  # the import-time check (JSP_FAST_REQUIRE_C) covers them
    assert set(C.act_codes()) == {"none", "tanh", "softplus", "elu", "relu", "sigmoid"}
    assert {"version", "openmp", "simd", "cuda"} <= set(C.build_info())
    assert C.FieldPlanF32().num_layers == 0 and C.FieldPlanF64().num_layers == 0


# A finder placed first on sys.meta_path, so it sees `jsp_fast._C` before the real one is found.
_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "jsp_fast._C":
            raise ImportError("jsp_fast._C blocked by the test")
        return None
sys.meta_path.insert(0, Block())
"""
_PARTIAL = """
import importlib.abc, importlib.util, sys
class Partial(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "jsp_fast._C" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):  # a stale build: only some of the entry points
        module.build_info = lambda: {}
        module.bsr_fwd = None
sys.meta_path.insert(0, Partial())
"""


def _run(hook: str, require: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JSP_FAST_REQUIRE_C", None)
    if require:
        env["JSP_FAST_REQUIRE_C"] = "1"
    code = textwrap.dedent(hook) + "import jsp_fast._ext as e\nprint('C is None:', e._C is None)\n"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_missing_core_is_tolerated_by_default():
    # The control for the next test: the hook really hides _C, and without the variable the package
    # imports on its torch fallbacks.
    res = _run(_BLOCK, require=False)
    assert res.returncode == 0, res.stderr
    assert "C is None: True" in res.stdout


@pytest.mark.parametrize("hook,message", [(_BLOCK, "failed to import: jsp_fast._C blocked by the test"),
                                          (_PARTIAL, "lacks bsr_jvp, bsr_t_matmul, bsr_weight_grad")],
                         ids=["missing", "partial"])
def test_require_c_fails_loudly(hook, message):
    res = _run(hook, require=True)
    assert res.returncode != 0, res.stdout
    assert "ImportError" in res.stderr and "JSP_FAST_REQUIRE_C=1" in res.stderr, res.stderr
    assert message in res.stderr, res.stderr
