"""`jsp-fast compare` end to end on a tiny budget: runs, JSONs, resume, report and plots."""
import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from jsp_fast import _compare


def _fake_dataset(args, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    x = centers[torch.randint(2, (600,), generator=g)] + 0.3 * torch.randn(600, 2, generator=g)
    return SimpleNamespace(train=x[:400], val=x[400:500], test=x[500:], dim=2)


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    _compare.add_arguments(p)
    return p.parse_args(["--dataset", "fake", "--out", str(tmp_path / "cmp"), "--methods", "jsp,random",
                         "--sparsities", "0.8", "--seeds", "0,1", "--steps", "2", "--batch-size", "32",
                         "--hidden", "8,8", "--eval-every", "2", "--n-samples", "50", "--prune-batch", "64",
                         "--n-test", "50", "--eval-tol", "1e-3", "--no-references", *extra])


def test_compare_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_compare, "_dataset", _fake_dataset)
    args = _args(tmp_path)
    assert _compare.run(args) == 0
    out = tmp_path / "cmp"
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(runs) == 2 * 2  # methods × sparsities × seeds
    assert not list((out / "runs").glob("*.tmp"))
    rec = json.loads((out / "runs" / "jsp_0.8_s1.json").read_text())
    assert rec["method"] == "jsp" and rec["sparsity"] == 0.8 and rec["seed"] == 1
    assert len(rec["history"]["nfe_forward"]) == 2 and len(rec["history"]["R"]) >= 1
    assert rec["test_nfe_forward"] > 0 and rec["test_R"] > 0 and len(rec["samples"]) == 50
    assert abs(rec["prune"]["kept"] - 0.2 * rec["prune"]["total"]) <= 1
    report = (out / "report.md").read_text()
    assert "| jsp | 0.8 | 2 |" in report and "Against random pruning" in report
    # A reference run joins the report.
    ref_args = argparse.Namespace(**{**vars(args), "no_references": False, "methods": "jsp", "seeds": "0"})
    assert _compare.run(ref_args) == 0  # adds dense_s0 and rnode_s0; jsp_0.8_s0 is skipped
    report = (out / "report.md").read_text()
    assert "| dense | – | 1 |" in report and "| rnode | – | 1 |" in report
    for f in ("R_training.png", "nfe_training.png", "nll_vs_sparsity.png", "samples.png"):
        assert (out / f).stat().st_size > 0 and f in report
    # Rerun: every run is skipped (the JSONs are not rewritten).
    mtime = (out / "runs" / "jsp_0.8_s1.json").stat().st_mtime_ns
    capsys.readouterr()
    assert _compare.run(args) == 0
    assert "4 of 4 runs already done" in capsys.readouterr().out
    assert (out / "runs" / "jsp_0.8_s1.json").stat().st_mtime_ns == mtime


def test_compare_refuses_to_mix_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_compare, "_dataset", _fake_dataset)
    assert _compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random")) == 0
    assert _compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random", "--steps", "1")) == 2
    assert "steps=2 now 1" in capsys.readouterr().err


def test_compare_rejects_bad_methods(tmp_path, monkeypatch):
    monkeypatch.setattr(_compare, "_dataset", _fake_dataset)
    assert _compare.run(_args(tmp_path, "--methods", "jsp,l1")) == 2
    assert not list((tmp_path / "cmp" / "runs").glob("*.json"))
    assert _compare.run(_args(tmp_path, "--sparsities", "1.0")) == 2


@pytest.mark.parametrize("hist", [
    [{"step": 1, "train_nll": 2.0, "nfe": {"forward": 8, "backward": 9}, "R": 0.5, "val_nll": 2.1}],
    {"step": [1], "train_nll": [2.0], "nfe_forward": [8], "nfe_backward": [9], "R": [0.5], "val_nll": [2.1]},
])
def test_history_formats(hist):
    c = _compare._curves(hist)
    assert c["train_nll"] == [2.0] and c["nfe_forward"] == [8.0] and c["nfe_backward"] == [9.0]
    assert c["R"] == [0.5] and c["R_step"] == [1] and c["val_nll"] == [2.1]


def test_history_object_from_jf_train():
    from jsp_fast.train import History
    h = History([{"step": 0, "R": 0.1, "val_nll": 3.0},
                 {"step": 1, "train_nll": 2.5, "nfe_forward": 14, "nfe_backward": 20}])
    c = _compare._curves(h)
    assert c["step"] == [1] and c["R_step"] == [0] and c["val_step"] == [0] and c["nfe_forward"] == [14.0]


def test_reg_pruned_trains_pruned_runs_with_rnode(tmp_path, monkeypatch):
    """--reg-pruned λ hands RNODE weights to jf.train for pruned runs (and only for them)."""
    import sys

    train_mod = sys.modules["jsp_fast.train"]  # (jsp_fast.train is also the function's name)
    monkeypatch.setattr(_compare, "_dataset", _fake_dataset)
    regs = []
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: regs.append(k.get("reg")) or real(*a, **k))
    assert _compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random", "--reg-pruned", "0.1")) == 0
    assert regs and all(r == {"kinetic": 0.1, "jacobian": 0.1} for r in regs)
    rec = json.loads(next((tmp_path / "cmp" / "runs").glob("random_*.json")).read_text())
    assert rec["settings"]["reg_pruned"] == 0.1
    assert _compare.run(_args(tmp_path, "--seeds", "0", "--methods", "random", "--reg-pruned", "-1")) == 2
