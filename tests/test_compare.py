"""`jsp-fast compare` end to end on a tiny budget: runs, JSONs, resume, report and plots; options
reach jf.train by name; the record's curves come from jf.train's real History."""
import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import jsp_fast as jf
from jsp_fast.app import cli, compare
from jsp_fast.training import History


def _fake_dataset(args, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    x = centers[torch.randint(2, (600,), generator=g)] + 0.3 * torch.randn(600, 2, generator=g)
    return SimpleNamespace(train=x[:400], val=x[400:500], test=x[500:], dim=2)


def _argv(tmp_path, *extra):
    return ["--dataset", "fake", "--out", str(tmp_path / "cmp"), "--methods", "jsp,random",
            "--sparsities", "0.8", "--seeds", "0,1", "--steps", "2", "--batch-size", "32",
            "--hidden", "8,8", "--eval-every", "2", "--n-samples", "50", "--prune-batch", "64",
            "--n-test", "50", "--eval-tol", "1e-3", "--no-references", *extra]


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return p.parse_args(_argv(tmp_path, *extra))


def _cli(capsys, tmp_path, *extra):
    """``jsp-fast compare ...`` as a user runs it: (exit code, stderr)."""
    try:
        code = cli.main(["compare", *_argv(tmp_path, *extra)])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(compare, "_dataset", _fake_dataset)


def test_compare_runs_resumes_and_reports(tmp_path, fake_data, capsys):
    args = _args(tmp_path)
    assert compare.run(args) == 0
    out = tmp_path / "cmp"
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(runs) == 2 * 2  # methods × sparsities × seeds
    assert not list((out / "runs").glob("*.tmp")) and not list((out / "runs").glob(".*"))
    rec = json.loads((out / "runs" / "jsp_0.8_s1.json").read_text())
    assert rec["method"] == "jsp" and rec["sparsity"] == 0.8 and rec["seed"] == 1
    assert len(rec["history"]["nfe_forward"]) == 2 and len(rec["history"]["R"]) >= 1
    assert rec["test_nfe_forward"] > 0 and rec["test_R"] > 0 and len(rec["samples"]) == 50
    assert abs(rec["prune"]["kept"] - 0.2 * rec["prune"]["total"]) <= 1
    # Widths and block shapes are stored as typed, the form of the runs already in docs/results.
    assert rec["settings"]["hidden"] == "8,8" and rec["settings"]["block"] == "16,16"
    assert rec["config"]["hidden"] == [8, 8] and rec["config"]["block"] == "16,16"
    report = (out / "report.md").read_text()
    assert "| jsp | 0.8 | 2 |" in report and "Against random pruning" in report
    # A reference run joins the report.
    ref_args = argparse.Namespace(**{**vars(args), "no_references": False, "methods": ("jsp",), "seeds": (0,)})
    assert compare.run(ref_args) == 0  # adds dense_s0 and rnode_s0; jsp_0.8_s0 is skipped
    report = (out / "report.md").read_text()
    assert "| dense | – | 1 |" in report and "| rnode | – | 1 |" in report
    for f in ("R_training.png", "nfe_training.png", "nll_vs_sparsity.png", "samples.png"):
        assert (out / f).stat().st_size > 0 and f in report
    # Rerun: every run is skipped (the JSONs are not rewritten).
    mtime = (out / "runs" / "jsp_0.8_s1.json").stat().st_mtime_ns
    capsys.readouterr()
    assert compare.run(args) == 0
    assert "4 of 4 runs already done" in capsys.readouterr().out
    assert (out / "runs" / "jsp_0.8_s1.json").stat().st_mtime_ns == mtime


def test_stored_runs_of_docs_results_are_reused(tmp_path, capsys):
    """The runs committed under docs/results were made by the old module: rerunning their command
    must find every one of them (same settings), train nothing, and rebuild the report."""
    src = Path(__file__).parents[1] / "docs" / "results" / "pinwheel-layer-scope"
    if not src.is_dir():
        pytest.skip("docs/results not in this checkout")
    out = tmp_path / "pinwheel"
    shutil.copytree(src / "runs", out / "runs")
    argv = (src / "command.txt").read_text().split()[3:]  # after "python -m jsp_fast._compare"
    i = argv.index("--out")
    argv[i + 1] = str(out)
    assert cli.main(["compare", *argv]) == 0
    n = len(list((out / "runs").glob("*.json")))
    assert f"{n} of {n} runs already done" in capsys.readouterr().out
    assert "| jsp | 0.8 | 3 |" in (out / "report.md").read_text()


def test_compare_refuses_to_mix_settings(tmp_path, fake_data, capsys):
    assert compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random")) == 0
    capsys.readouterr()
    code, err = _cli(capsys, tmp_path, "--seeds", "0", "--methods", "random", "--steps", "1")
    assert code == 2 and "steps=2 now 1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, needle", [
    (("--methods", "jsp,l1"), "subset of jsp, random"), (("--sparsities", "1.0"), "sparsities in [0, 1)"),
    (("--seeds", "0,x"), "integers >= 0"), (("--hidden", "8,0"), "positive integers"),
    (("--reg-pruned", "-1"), "number >= 0"), (("--rnode", "-0.1"), "number >= 0"),
])
def test_compare_rejects_bad_values(tmp_path, fake_data, capsys, extra, needle):
    code, err = _cli(capsys, tmp_path, *extra)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not list((tmp_path / "cmp" / "runs").glob("*.json"))


def test_curves_from_a_real_history():
    """The record's curves read jf.train's History through its own API (rows, column)."""
    torch.manual_seed(0)
    model = jf.CNF(2, hidden=(8, 8), rtol=1e-3, atol=1e-3)
    x = torch.randn(64, 2)
    hist = jf.train(model, x, x[:16], steps=3, batch_size=16, eval_every=2, R_every=2, progress=False)
    c = compare.curves(hist)
    assert c["step"] == [1, 2, 3]
    assert c["train_nll"] == [r["train_nll"] for r in hist.rows[1:]]
    assert c["nfe_forward"] == [float(r["nfe_forward"]) for r in hist.rows[1:]]
    assert c["nfe_backward"] == [float(r["nfe_backward"]) for r in hist.rows[1:]] and min(c["nfe_backward"]) > 0
    assert c["R_step"] == [0, 2] and c["R"] == [hist[0]["R"], hist[2]["R"]]
    assert c["val_step"] == [0, 2, 3] and c["val_nll"] == hist.column("val_nll")[1]
    json.dumps(c)  # goes into the run record as is


def test_curves_take_only_a_history():
    with pytest.raises(TypeError, match="History"):
        compare.curves({"step": [1], "train_nll": [2.0], "nfe_forward": [8], "nfe_backward": [9]})
    assert compare.curves(History())["step"] == []


def test_reg_pruned_trains_pruned_runs_with_rnode(tmp_path, fake_data, monkeypatch):
    """--reg-pruned λ hands RNODE weights to jf.train for pruned runs (and only for them)."""
    regs = []
    real = compare.train
    monkeypatch.setattr(compare, "train", lambda *a, **k: regs.append(k.get("reg")) or real(*a, **k))
    assert compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random", "--reg-pruned", "0.1")) == 0
    assert regs and all(r == {"kinetic": 0.1, "jacobian": 0.1} for r in regs)
    rec = json.loads(next((tmp_path / "cmp" / "runs").glob("random_*.json")).read_text())
    assert rec["settings"]["reg_pruned"] == 0.1


def test_an_option_train_does_not_take_fails_the_run(tmp_path, fake_data, monkeypatch, capsys):
    """A train() without one of the options (as after a rename) must fail the run, not drop the
    option while the record's settings still claim it."""
    real = compare.train

    def train_without_R_every(model, train, val=None, *, steps, batch_size, lr, reg, eval_every, seed,
                              progress, bits_per_dim=None):
        return real(model, train, val, steps=steps, batch_size=batch_size, lr=lr, reg=reg, eval_every=eval_every,
                    seed=seed, progress=progress, bits_per_dim=bits_per_dim)

    monkeypatch.setattr(compare, "train", train_without_R_every)
    assert compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random")) == 1
    assert "R_every" in capsys.readouterr().out
    assert not list((tmp_path / "cmp" / "runs").glob("*.json"))
