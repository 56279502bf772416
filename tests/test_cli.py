"""The jsp-fast command: --help everywhere, a tiny demo, train -> resume -> sample -> eval, and
one-line errors (exit code 2, no traceback) for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from jsp_fast.app import cli
from _cli_util import run


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _one_line_error(code, err):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    assert "Traceback" not in err


SUBCOMMANDS = {"demo", "train", "sample", "eval", "compare", "bench", "figure2"}


def test_help_for_every_subcommand(capsys):
    # The full set, named here: a subcommand that fails to build must fail this test, not vanish.
    assert set(cli.COMMANDS) == SUBCOMMANDS
    code, top, _ = run(capsys, "--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in top, name
        code, out, err = run(capsys, name, "--help")
        assert code == 0, (name, err)
        assert out.startswith(f"usage: jsp-fast {name}")


@pytest.mark.parametrize("module", ["compare", "bench"])
def test_a_broken_subcommand_fails_loudly(module):
    """A subcommand module that cannot be imported is an error of its command, with the import error
    (it used to be skipped silently, so `jsp-fast --help` simply no longer listed it). The list of
    subcommands is static: a broken module never vanishes from `jsp-fast --help`; running it (or
    building the full parser) fails."""
    prelude = f"import sys; sys.modules['jsp_fast.app.{module}'] = None\nfrom jsp_fast.app import cli\n"
    for call in (f"sys.exit(cli.main(['{module}', '--help']))", "cli.build_parser()"):
        res = subprocess.run([sys.executable, "-c", prelude + call], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and res.returncode != 2, res.stdout
        assert "ImportError" in res.stderr or "ModuleNotFoundError" in res.stderr
        assert f"jsp_fast.app.{module}" in res.stderr
    res = subprocess.run([sys.executable, "-c", prelude + "sys.exit(cli.main(['--help']))"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and f"    {module} " in res.stdout


def test_no_subcommand_is_an_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err


def test_entry_point_module_runs():
    res = subprocess.run([sys.executable, "-m", "jsp_fast.app.cli", "eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--checkpoint" in res.stdout


def test_console_script_points_at_the_cli():
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"jsp-fast": "jsp_fast.app.cli:main"}


def test_demo_tiny_budget(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--steps", 20, "--hidden", "32,32", "--n-test", 200, "--grid", 20,
                            "--out", out, "--no-progress")
    assert code == 0, err
    for f in ("data.png", "samples.png", "density.png", "demo.png", "training.png"):
        assert (out / f).stat().st_size > 1000, f
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "8gaussians" and m["train"]["steps"] == 20
    assert m["nll_gap"] == pytest.approx(m["test_nll"] - m["true_nll"])
    assert m["initial_val_nll"] > m["final_val_nll"]  # 20 steps already help
    assert m["nfe"]["test_forward"] > 0 and m["time_s"]["total"] > 0
    assert "gap" in stdout
    # By default the demo prunes with JSP into 8x8 blocks and reruns the trained model block-sparse.
    assert m["prune"]["method"] == "jsp" and m["prune"]["granularity"] == "block"
    assert m["prune"]["density"] == pytest.approx(0.2, abs=0.05)
    sp = m["sparse_speed"]
    assert sp["sparse_layers"] >= 1 and sp["max_abs_dlogp"] < 1e-2 and sp["median_abs_dlogp"] <= sp["max_abs_dlogp"]
    assert sp["sample_ms"]["sparse"] > 0 and sp["log_prob_ms"]["dense"] > 0
    assert "block-sparse field" in stdout
    # The demo's checkpoint feeds the other commands.
    code, _, err = run(capsys, "sample", "--checkpoint", out / "checkpoint", "--n", 50, "--out", tmp_path / "s.npy")
    assert code == 0, err
    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    # eval of the demo directory reads the demo's own test points: the same NLL as metrics.json.
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--json", tmp_path / "e.json", "--no-progress")
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["split"] == "test" and e["n"] == m["test_points"] == 200
    assert abs(e["nll"] - m["test_nll"]) < 1e-4
    assert "test split" in m["test_set"] and "8gaussians/test (200 points" in stdout


def test_train_resume_sample_eval(capsys, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train", "--dataset", "8gaussians", "--n", 300, "--hidden", "8,8", "--batch-size", 32,
              "--lr", 1e-2, "--eval-every", 2, "--prune", "random", "--sparsity", 0.5, "--out", run_dir,
              "--threads", 1, "--no-progress", "--reg-kinetic", 0.01]
    code, out, err = run(capsys, *common, "--steps", 2)
    assert code == 0, err
    assert "pruned with random" in err and (run_dir / "last" / "config.json").exists()
    code, out, err = run(capsys, *common, "--steps", 4)
    assert code == 0, err
    assert "resuming" in err and out.startswith("step 4:")
    hist = json.loads((run_dir / "history.json").read_text())["rows"]
    assert [r["step"] for r in hist] == [0, 1, 2, 3, 4]
    cfg = json.loads((run_dir / "last" / "config.json").read_text())
    assert len(cfg["masks"]) == 3  # the pruned model was checkpointed with its masks

    code, out, err = run(capsys, "sample", "--checkpoint", run_dir, "--n", 100, "--seed", 1,
                         "--out", tmp_path / "s.png", "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(capsys, "eval", "--checkpoint", run_dir, "--max-n", 40, "--tol", 1e-3,
                         "--json", tmp_path / "e.json", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["dataset"] == "8gaussians" and res["n"] == 40 and "nll_gap" in res and res["nfe_forward_mean"] > 0
    assert "NLL" in out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "nosuchset", "--out", "{tmp}/r"], "unknown dataset 'nosuchset'"),
    (["eval", "--checkpoint", "{tmp}/nowhere", "--dataset", "8gaussians"], "no such file"),
    (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/s.npy"], "not a jsp_fast checkpoint"),
    (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/s.txt"], ".npy or .png"),
    (["sample", "--checkpoint", "{tmp}", "--out", "{tmp}/no/dir/s.npy"], "does not exist"),
    (["train", "--dataset", "power", "--root", "{tmp}/missing", "--out", "{tmp}/r"], "not a directory"),
    (["train", "--dataset", "8gaussians", "--steps", "0", "--out", "{tmp}/r"], "positive integer"),
    (["train", "--dataset", "8gaussians", "--lr", "-1", "--out", "{tmp}/r"], "positive number"),
    (["train", "--dataset", "8gaussians", "--sparsity", "1.5", "--out", "{tmp}/r"], "sparsity in [0, 1)"),
    (["train", "--dataset", "8gaussians", "--hidden", "64,x", "--out", "{tmp}/r"], "comma-separated"),
    (["train", "--dataset", "8gaussians", "--prune", "best", "--steps", "1", "--out", "{tmp}/r"],
     "unknown pruning method"),
    (["demo", "--dataset", "digits", "--out", "{tmp}/d"], "2-D toy set"),
    (["demo", "--out", "{tmp}/file.txt"], "not a directory"),
    (["nosuchcommand"], "invalid choice"),
    (["train", "--dataset", "8gaussians", "--device", "tpu", "--out", "{tmp}/r"], "expected cpu, cuda or cuda:N"),
    (["sample", "--checkpoint", "{tmp}", "--device", "cuda:x", "--out", "{tmp}/s.npy"], "expected cpu, cuda"),
] + ([] if torch.cuda.is_available() else [
    (["eval", "--checkpoint", "{tmp}", "--device", "cuda", "--dataset", "8gaussians"], "no CUDA device here"),
]))
def test_clear_errors(capsys, tmp_path, argv, needle):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    _one_line_error(code, err)
    assert needle in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_sample_eval_on_cuda(capsys, tmp_path):
    """--device cuda end to end, with --fast taking the GPU fused field; densities match the CPU's."""
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--dataset", "8gaussians", "--n", 500, "--hidden", "32,32", "--steps", 3,
                       "--prune", "jsp", "--sparsity", 0.5, "--granularity", "block", "--block", "16,16",
                       "--out", run_dir, "--no-progress", "--device", "cuda")
    assert code == 0, err
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--n", 64, "--out", tmp_path / "s.npy",
                       "--device", "cuda", "--fast")
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
    res = {}
    for dev in ("cpu", "cuda"):
        code, _, err = run(capsys, "eval", "--checkpoint", run_dir, "--max-n", 64, "--device", dev, "--fast",
                           "--json", tmp_path / f"{dev}.json", "--no-progress")
        assert code == 0, err
        res[dev] = json.loads((tmp_path / f"{dev}.json").read_text())
    assert abs(res["cpu"]["nll"] - res["cuda"]["nll"]) < 1e-3
