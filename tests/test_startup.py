"""Start-up cost: ``jsp-fast --help`` imports nothing heavy, a subcommand's ``--help`` only what its
options need, and the lazy package root still serves every public name."""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchdiffeq", "triton", "matplotlib", "jsp_fast._C", "sklearn", "scipy")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules loaded after running ``code`` in a fresh interpreter."""
    script = (f"import sys, json\n{code}\n"
              f"print('@@' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.rsplit("@@", 1)[1])


def _help(*argv: str) -> str:
    return ("from jsp_fast.app import cli\n"
            f"try:\n    cli.main({list(argv)!r})\nexcept SystemExit:\n    pass")


def test_top_level_help_imports_nothing_heavy():
    assert _loaded_after(_help("--help")) == []
    assert _loaded_after(_help("--version")) == []


@pytest.mark.parametrize("command", ["train", "sample", "eval", "demo", "compare", "bench"])
def test_subcommand_help_skips_the_compiled_core_triton_and_matplotlib(command):
    loaded = _loaded_after(_help(command, "--help"))
    assert not {"triton", "matplotlib", "jsp_fast._C"} & set(loaded), loaded


def test_import_jsp_fast_is_free():
    assert _loaded_after("import jsp_fast") == []


PUBLIC = ["CNF", "SolverError", "prune", "remove_pruning", "data", "train", "save", "load", "sparse", "ops",
          "backends", "sparsify", "errors"]


def test_lazy_root_serves_every_public_name():
    import jsp_fast as jf

    for name in PUBLIC:
        assert getattr(jf, name) is not None, name
        exec(f"from jsp_fast import {name}", {})
    assert set(PUBLIC) <= set(dir(jf)) and set(jf.__all__) == set(PUBLIC)
    assert callable(jf.prune) and jf.prune.METHODS and callable(jf.sparsify)
    assert jf.ops.bsr_linear is not None and "torch" in jf.backends.available()
    assert jf.cnf.CNF is jf.CNF and jf.training.train is jf.train  # subpackages, as the eager root had them
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jf.nope  # noqa: B018
    assert jf.errors.__name__ == "jsp_fast.errors"


def test_jf_prune_stays_the_function_when_the_subpackage_loads_first():
    """Importing ``jsp_fast.prune`` sets the subpackage as an attribute of the root; the eager root
    rebound the name to the function afterwards, the lazy root must keep it so."""
    code = ("import jsp_fast.prune\nimport jsp_fast as jf\nfrom jsp_fast.prune import METHODS\n"
            "import jsp_fast.training\n"
            "assert callable(jf.prune) and jf.prune.__name__ == 'prune', jf.prune\n"
            "from jsp_fast import prune\nassert callable(prune)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
