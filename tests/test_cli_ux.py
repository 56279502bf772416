"""What a user of the ``jsp-fast`` command meets: one error discipline, outputs checked before the
work, compare validating its grid up front, every default in --help, run/demo directories as
--checkpoint, block-fallback warnings, and readable figures."""
import argparse
import json
import os
from types import SimpleNamespace

import pytest
import torch

import jsp_fast as jf
from jsp_fast.app import _common, cli, compare, plots, runners
from _cli_util import run


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def one_line(code, err) -> str:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny saved (untrained) CNF and a run.json beside it, as ``train`` leaves them."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = jf.CNF(2, hidden=(8, 8), rtol=1e-3, atol=1e-3)
    jf.save(d / "checkpoint", model)
    (d / "run.json").write_text(json.dumps({"dataset": "8gaussians", "n": 100, "seed": 0, "root": None}))
    return d


def _never(*a, **k):
    raise AssertionError("the work started before the output path was checked")


# -- 1. one error discipline -----------------------------------------------------------------------
def test_library_value_error_is_one_line_with_its_type(capsys, tmp_path):
    # jf.data.get refuses n < 5 with a ValueError: the line names the type, so it never reads as
    # a usage message when it is a library check (or a bug).
    code, _, err = run(capsys, "train", "--dataset", "8gaussians", "--n", 3, "--out", tmp_path / "r")
    line = one_line(code, err)
    assert "ValueError: " in line and "at least 5" in line and "JSP_FAST_DEBUG" in line


@pytest.mark.parametrize("exc, ours", [
    (ValueError("v"), True), (TypeError("t"), True), (IsADirectoryError(21, "Is a directory"), True),
    (PermissionError(13, "denied"), True), (FloatingPointError("nan loss"), True),
    (jf.SolverError("underflow in dt"), True), (jf.training.CheckpointError("bad"), True),
    (RuntimeError("CUDA error: an illegal memory access"), False), (KeyError("k"), False),
    (AttributeError("a"), False), (ZeroDivisionError("z"), False), (NotImplementedError(), False),
])
def test_which_errors_become_one_line(monkeypatch, capsys, exc, ours):
    def boom(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "eval", ("runners", "eval_args", "_boom", "x"))
    monkeypatch.setattr(runners, "_boom", boom, raising=False)
    argv = ["eval", "--checkpoint", "x"]
    if ours:
        code, _, err = run(capsys, *argv)
        assert type(exc).__name__ in one_line(code, err)
        monkeypatch.setenv("JSP_FAST_DEBUG", "1")
    with pytest.raises(type(exc)):  # a bug keeps its traceback; JSP_FAST_DEBUG=1 shows ours too
        cli.main(argv)


# -- 2. outputs checked before the work ------------------------------------------------------------
def test_sample_into_a_directory_is_refused_before_sampling(capsys, tmp_path, ckpt, monkeypatch):
    (tmp_path / "dir.npy").mkdir()
    monkeypatch.setattr(_common, "load_checkpoint", _never)
    code, _, err = run(capsys, "sample", "--checkpoint", ckpt, "--out", tmp_path / "dir.npy")
    assert "is a directory" in one_line(code, err)


def test_eval_json_into_a_directory_is_refused_before_evaluating(capsys, tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(runners, "_eval_sums", _never)
    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--json", tmp_path, "--no-progress")
    assert "--json" in (line := one_line(code, err)) and "is a directory" in line
    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--json", tmp_path / "no" / "m.json")
    assert "does not exist" in one_line(code, err)


def test_bench_outside_the_repository_fails_before_benchmarking(capsys, tmp_path, monkeypatch):
    from jsp_fast.app import bench

    monkeypatch.chdir(tmp_path)  # no bench/ here: the default --results bench/RESULTS.md cannot be written
    monkeypatch.setattr(bench, "run_e2e", _never)
    code, _, err = run(capsys, "bench", "e2e", "--datasets", "toy", "--quiet")
    line = one_line(code, err)
    assert "--results bench/RESULTS.md" in line and "--no-write" in line
    code, _, err = run(capsys, "bench", "e2e", "--results", tmp_path, "--quiet")
    assert "expected a .md file" in one_line(code, err)


def test_a_png_that_cannot_be_drawn_is_refused_before_sampling(capsys, tmp_path, monkeypatch):
    jf.save(tmp_path / "ck3", jf.CNF(3, hidden=(4,)))
    monkeypatch.setattr(jf.CNF, "sample", _never)
    code, _, err = run(capsys, "sample", "--checkpoint", tmp_path / "ck3", "--out", tmp_path / "s.png")
    assert "cannot plot 3-dimensional samples" in one_line(code, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_directory(capsys, tmp_path, ckpt):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(capsys, "sample", "--checkpoint", ckpt, "--out", ro / "s.npy")
        assert "not writable" in one_line(code, err)
    finally:
        ro.chmod(0o700)


# -- 3. compare validates the whole grid before any run --------------------------------------------
def _fake_dataset(args, seed):
    if args.dataset != "fake":
        return compare.get_data(args.dataset, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 2, generator=g)
    return SimpleNamespace(name="fake", train=x[:400], val=x[400:500], test=x[500:], dim=2)


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(compare, "_dataset", _fake_dataset)


def _cmp(tmp_path, *extra):
    return ["compare", "--dataset", "fake", "--out", tmp_path / "cmp", "--methods", "jsp,random", "--sparsities",
            "0.5", "--seeds", "0", "--steps", 1, "--batch-size", 32, "--hidden", "8,8", "--eval-every", 1,
            "--n-samples", 0, "--prune-batch", 32, "--n-test", 20, "--eval-tol", "1e-3", "--no-references",
            "--threads", 1, *extra]


@pytest.mark.parametrize("extra, needle", [
    (("--dataset", "nosuchset"), "unknown dataset 'nosuchset'"),
    (("--solver", "rk99"), "invalid choice: 'rk99'"),
    (("--activation", "swish"), "invalid choice: 'swish'"),
    (("--hidden", ""), "comma-separated positive integers"),
    (("--steps", "0"), "positive integer"),
    (("--batch-size", "0"), "positive integer"),
    (("--block", "0,4"), "positive integers"),
    # 64-wide layers keep too few weights at 99% for one 32x32 block each: jf.prune's per-layer floor.
    (("--hidden", "64,64", "--granularity", "block", "--block", "32,32", "--sparsities", "0.99"), "--sparsity 0.99"),
])
def test_compare_bad_grid_is_one_error_before_any_run(capsys, tmp_path, fake_data, monkeypatch, extra, needle):
    monkeypatch.setattr(compare, "run_one", _never)
    code, _, err = run(capsys, *_cmp(tmp_path, *extra))
    assert needle in one_line(code, err)
    assert not (tmp_path / "cmp").exists()  # nothing started, nothing written


def test_compare_keeps_command_txt_when_a_rerun_is_refused(capsys, tmp_path, fake_data):
    assert run(capsys, *_cmp(tmp_path, "--methods", "random"))[0] == 0
    cmd = (tmp_path / "cmp" / "command.txt").read_text()
    code, _, err = run(capsys, *_cmp(tmp_path, "--methods", "random", "--steps", 2))
    assert "different settings" in one_line(code, err)
    assert (tmp_path / "cmp" / "command.txt").read_text() == cmd


def test_report_only_never_writes_its_own_command(capsys, tmp_path, fake_data):
    assert run(capsys, *_cmp(tmp_path, "--methods", "random"))[0] == 0
    out = tmp_path / "cmp"
    argv = ["compare", "--out", out, "--report-only"]
    assert run(capsys, *argv)[0] == 0
    report = (out / "report.md").read_text()
    assert "--report-only" not in report and "--methods random" in report
    (out / "command.txt").unlink()  # runs copied without their command
    assert run(capsys, *argv)[0] == 0
    assert "--report-only" not in (out / "report.md").read_text()


def test_a_failed_run_does_not_hide_the_others(capsys, tmp_path, fake_data, monkeypatch):
    real = compare.run_one

    def flaky(args, method, sparsity, seed):
        if method == "random":
            raise jf.SolverError("underflow in dt")
        return real(args, method, sparsity, seed)

    monkeypatch.setattr(compare, "run_one", flaky)
    code, _, err = run(capsys, *_cmp(tmp_path))
    assert code == 1 and "random_0.5_s0" in err
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| jsp | 0.5 | 1 |" in report
    assert "## Failed runs (1)" in report and "`random_0.5_s0`: SolverError: underflow in dt" in report
    # --report-only still lists it; a rerun that succeeds clears it.
    assert run(capsys, "compare", "--out", tmp_path / "cmp", "--report-only")[0] == 1
    monkeypatch.setattr(compare, "run_one", real)
    assert run(capsys, *_cmp(tmp_path))[0] == 0
    assert "Failed runs" not in (tmp_path / "cmp" / "report.md").read_text()


# -- 4. an empty split ------------------------------------------------------------------------------
def test_empty_split_is_a_clear_error(capsys, ckpt, monkeypatch):
    ds = jf.data.get("8gaussians", n=100)
    empty = SimpleNamespace(**{**vars(ds), "test": ds.test[:0]})
    monkeypatch.setattr(_common, "dataset", lambda *a, **k: empty)
    monkeypatch.setattr(runners, "_eval_sums", _never)
    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--no-progress")
    assert "the test split is empty" in one_line(code, err)


# -- 6. what a newcomer sees ------------------------------------------------------------------------
def _help(capsys, command: str) -> str:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    return " ".join(out.split())  # argparse wraps lines


@pytest.mark.parametrize("command, shown", [
    ("sample", ["--n N number of samples (default: 1000)", "--seed SEED sampling seed (default: 0)"]),
    ("compare", ["(default: 300)", "(default: 0,1,2)", "(default: 0.8,0.9,0.95)", "(default: dopri5)"]),
    ("eval", ["(default: 1024)", "(default: test)"]),
    ("train", ["(default: tanh)", "(default: global)"]),
])
def test_help_shows_defaults(capsys, command, shown):
    text = _help(capsys, command)
    for s in shown:
        assert s in text, s


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_with_a_default_shows_it(command):
    p = cli.build_parser([command])
    sp = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    fmt = sp._get_formatter()
    missing = [a.option_strings[0] for a in sp._actions
               if a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
               and "default" not in fmt._expand_help(a).lower()]
    assert not missing


def test_checkpoint_may_be_a_demo_directory(capsys, tmp_path, ckpt):
    code, out, err = run(capsys, "sample", "--checkpoint", ckpt, "--n", 10, "--out", tmp_path / "s.npy")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--max-n", 10, "--tol", 1e-3, "--no-progress")
    assert code == 0 and "8gaussians/test (10 points" in out, err


def test_block_larger_than_the_layers_is_warned(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--dataset", "8gaussians", "--n", 100, "--hidden", "8,8", "--steps", 1,
                         "--batch-size", 16, "--eval-every", 1, "--prune", "random", "--sparsity", 0.5,
                         "--granularity", "block", "--block", "16,16", "--out", tmp_path / "r", "--no-progress",
                         "--threads", 1)
    assert code == 0, err
    assert "warning: block 16x16 fits 0 of 3 pruned layers" in err
    assert "block 16x16 fits 0 of 3 pruned layers" in out.splitlines()[-1]


def test_density_plot_has_axes_and_a_colour_bar(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    logp = -torch.linspace(0, 4, 16 * 16).reshape(16, 16)
    plots.density_png(tmp_path / "d.png", logp, 3.0, "t")
    axes = saved[0].axes
    assert len(axes) == 2 and axes[1].get_ylabel() == "density"  # the image and its colour bar
    assert axes[0].get_xlabel() and len(axes[0].get_xticks()) > 0


def test_nll_limits_keep_the_true_density_inside():
    # A first-step spike and a true NLL below every curve value: the dashed line used to sit on the frame.
    vals = [40.0] + [3.5 - 0.01 * i for i in range(100)]
    lo, hi = plots.nll_ylim(vals, true_nll=2.8)
    assert lo < 2.8 - 0.05 and hi < 10  # inside, with room; the spike does not flatten the curve
    lo, hi = plots.nll_ylim([], None)
    assert lo < hi
