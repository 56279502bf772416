"""`jsp-fast figure2` end to end on a tiny budget (real mnist14 digits, a 28-wide field, 3 steps, 2 seeds):
the records of every cell and row, resume, the report's tables and statistics, and the figures' axes."""
import argparse
import json

import pytest

from jsp_fast.app import _fig2_plots, _fig2_report, cli, figure2

pytest.importorskip("mlxtend")

CELLS = ("block-all", "block-hidden", "unstructured-all", "unstructured-hidden")
ROWS = ("random", "jsp", "jsp-abs", "jsp-rounds2")


def _argv(out, *extra):
    return ["figure2", "--dataset", "mnist14", "--steps", "3", "--seeds", "0,1", "--hidden", "28,28",
            "--block", "4,4", "--rounds", "2", "--out", str(out), "--n-test", "40", "--n-R", "8", "--R-batch", "8",
            "--R-every", "2", "--n-samples", "16", "--prune-batch", "64", "--batch-size", "32", "--threads", "1",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig2") / "out"
    assert cli.main(_argv(out)) == 0
    return out


def test_runs_every_cell_row_and_seed(tiny):
    for cell in CELLS:
        for row in ROWS:
            for seed in (0, 1):
                rec = json.loads((tiny / "runs" / cell / f"{row}_0.9_s{seed}.json").read_text())
                assert rec["cell"] == cell and rec["method"] == row and rec["sparsity"] == 0.9
                pr = rec["prune"]
                assert pr["method"] == "jsp" or row == "random"
                assert pr["abs_scores"] == (row == "jsp-abs") and pr["rounds"] == (2 if row == "jsp-rounds2" else 1)
                assert abs(pr["kept"] / pr["total"] - 0.1) < 0.02
                layers = cell.split("-")[1]
                assert pr["layers"] == layers and bool(pr["excluded"]) == (layers == "hidden")
                h = rec["history"]
                assert h["R_step"] == [0, 2, 3] and len(h["R"]) == 3 and h["val_bpd_step"]
                assert rec["test_nfe_forward"] > 0 and rec["test_R"] > 0 and "test_bpd" in rec
                assert rec["measure"]["R_estimator"] == "hutchinson" and rec["measure"]["R_probes"] == 8
                assert rec["samples_shape"] == [14, 14] and len(rec["samples"]) == 16
    for seed in (0, 1):  # every row of a seed prunes the same initialization, the dense run's
        sums = {json.loads(p.read_text())["init_checksum"] for p in (tiny / "runs").glob(f"*/*_s{seed}.json")}
        assert len(sums) == 1
    assert sums != {json.loads((tiny / "runs" / "dense" / "dense_s0.json").read_text())["init_checksum"]}


def test_report_has_tables_statistics_and_figures(tiny):
    report = (tiny / "report.md").read_text()
    assert "jsp-fast figure2 --dataset mnist14" in report
    assert "## JSP vs random, paired" in report and "Student-t" in report and "sign-test" in report
    assert "## Verdict per claim" in report and "**block-hidden**: R lower than random?" in report
    for cell in CELLS:
        assert f"### {cell}" in report and f"| {cell} | jsp | 2 |" in report
    assert "| jsp-rounds2 | 2 |" in report and "| dense | 2 |" in report
    assert "plain `log_prob`" in report and "8 Rademacher vectors" in report
    for f in ("figure2.png", "R_training.png", "nll_training.png", "nfe_training.png"):
        assert (tiny / f).stat().st_size > 10_000 and f"![{f}]({f})" in report
    for cell in CELLS[1:]:  # the poster's panels for every other cell too (figure2.png is the first)
        f = f"figure2-{cell}.png"
        assert (tiny / f).stat().st_size > 10_000 and f"![{f}]({f})" in report
    assert not (tiny / f"figure2-{CELLS[0]}.png").exists()


def test_figures_have_axes_units_and_legends(tiny):
    records = figure2.load_records(tiny)
    cells, dense = _fig2_report.by_cell(records)
    val = json.loads((tiny / "val_images.json").read_text())
    fig = _fig2_plots.figure2_fig(cells["block-all"], "block-all", val)
    samples, images, r_ax = fig.axes
    assert "JSP-pruned" in samples.get_title() and "validation" in images.get_title()
    assert len(samples.images) == 1 and len(images.images) == 1
    assert r_ax.get_xlabel() == "training step" and "‖J‖_F" in r_ax.get_ylabel() and r_ax.get_yscale() == "log"
    assert [t.get_text() for t in r_ax.get_legend().get_texts()] == ["random (n=2)", "jsp (n=2)"]
    assert len(r_ax.collections) == 2  # the ± std bands
    for spec in _fig2_plots.CURVES:
        fig = _fig2_plots.curves_fig(cells, dense, spec)
        assert [ax.get_title() for ax in fig.axes] == list(CELLS)
        assert spec[3].split(" (")[0] in fig.axes[0].get_ylabel()
        for ax in fig.axes:
            assert ax.get_xlabel() == "training step"
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels == ["random (n=2)", "jsp (n=2)", "jsp-abs (n=2)", "jsp-rounds2 (n=2)", "dense (n=2)"]
    assert "bits/dim" in _fig2_plots.CURVES[1][3]


def test_rerun_resumes_and_other_settings_are_refused(tiny, capsys):
    mtime = (tiny / "runs" / "block-all" / "jsp_0.9_s0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(_argv(tiny)) == 0
    assert "34 of 34 runs already done" in capsys.readouterr().out
    assert (tiny / "runs" / "block-all" / "jsp_0.9_s0.json").stat().st_mtime_ns == mtime
    assert cli.main(_argv(tiny, "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "lr=0.002 now 0.01" in err and len(err.strip().splitlines()) == 1
    assert cli.main(_argv(tiny, "--report-only")) == 0


def test_plan_defaults_and_bad_options(tmp_path, capsys):
    p = argparse.ArgumentParser()
    figure2.add_arguments(p)
    args = p.parse_args([])
    specs = figure2.plan(args)
    assert len(specs) == 3 + 4 * 4 * 3  # dense + cells x rows x seeds
    assert {s.cell for s in specs} == {"dense", *CELLS}
    assert figure2.default_model(196) == ((224, 224), "hutchinson", (14, 14))
    assert figure2.default_model(784) == ((1024, 1024), "hutchinson", (16, 16))
    assert figure2.default_model(2) == ((64, 64, 64), "exact", (8, 8))
    for extra, needle in ((("--variants", "abs,l1"), "abs, rounds, none"), (("--layers", "first"), "all, hidden"),
                          (("--variants", "none,abs"), "cannot be combined"), (("--sparsity", "1.5"), "[0, 1)")):
        code = cli.main(_argv(tmp_path / "bad", *extra)) if "cannot" in needle else None
        if code is None:
            with pytest.raises(SystemExit) as exc:
                cli.main(_argv(tmp_path / "bad", *extra))
            code = exc.value.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err


def test_block_cells_train_on_the_sparse_kernels(tiny, tmp_path):
    """Block cells train, measure and sample the block-sparse model (jf.train(sparse=True)); --no-sparse
    trains the masked dense model instead, with the same result up to float rounding."""
    for cell in CELLS:
        rec = json.loads((tiny / "runs" / cell / "jsp_0.9_s0.json").read_text())
        assert rec["sparse_training"] == cell.startswith("block")
    out = tmp_path / "dense-trained"
    argv = _argv(out, "--no-sparse", "--seeds", "0", "--variants", "none", "--no-dense", "--layers", "hidden",
                 "--granularity", "block")
    assert cli.main(argv) == 0
    for row in ("random", "jsp"):
        a = json.loads((out / "runs" / "block-hidden" / f"{row}_0.9_s0.json").read_text())
        b = json.loads((tiny / "runs" / "block-hidden" / f"{row}_0.9_s0.json").read_text())
        assert a["sparse_training"] is False
        assert a["history"]["train_nll"] == pytest.approx(b["history"]["train_nll"], rel=1e-4)
        assert a["test_nll"] == pytest.approx(b["test_nll"], rel=1e-4) and a["test_nfe_forward"] == b["test_nfe_forward"]


def test_a_verdict_from_one_pair_says_there_is_no_interval():
    from jsp_fast.app import _stats

    assert "no interval from 1 pair" in _fig2_report._claim(_stats.paired([1.0], [0.5]), "R")
    assert "interval contains 0" in _fig2_report._claim(_stats.paired([1.0, 2.0, 3.0], [0.5, 0.4, 0.1]), "R")
    assert _fig2_report._claim(_stats.paired([1.0, 1.1, 1.2], [0.0, 0.0, 0.0]), "R").startswith("**no, R is higher**")
