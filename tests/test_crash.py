"""Crash-safe runs: nothing a user wrote is deleted, a resume never silently changes the run, and a
``jsp-fast train`` killed with SIGKILL at any moment (checkpoint writes included) leaves a loadable
checkpoint from which it ends exactly where an uninterrupted run ends."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import jsp_fast as jf
from jsp_fast.errors import ConfigError, ResumeMismatchError
from jsp_fast.training import checkpoint as ckpt
from _cli_util import run


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TRAIN = ["train", "--dataset", "8gaussians", "--n", 200, "--hidden", "8,8", "--batch-size", 32, "--eval-every", 2,
         "--threads", 1, "--no-progress", "--rtol", 1e-2, "--atol", 1e-2]


def _params(path) -> dict:
    return {k: v.clone() for k, v in jf.load(path).state_dict().items()}


# -- never delete what the project did not write ---------------------------------------------------
def test_no_resume_never_deletes_user_files(capsys, tmp_path):
    out = tmp_path / "u"
    (out / "last").mkdir(parents=True)
    (out / "last" / "thesis.tex").write_text("x")
    code, _, err = run(capsys, *TRAIN, "--steps", 2, "--out", out, "--no-resume")
    assert code == 2 and "thesis.tex" in err and "refusing" in err, err
    assert (out / "last" / "thesis.tex").read_text() == "x"
    # a user's config.json alone does not make a checkpoint either
    (out / "last" / "thesis.tex").unlink()
    (out / "last" / "config.json").write_text('{"mine": 1}')
    code, _, err = run(capsys, *TRAIN, "--steps", 2, "--out", out, "--no-resume")
    assert code == 2 and (out / "last" / "config.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("name", ["history.json", "run.json"])
def test_train_never_overwrites_foreign_run_files(capsys, tmp_path, name):
    out = tmp_path / "u"
    out.mkdir()
    (out / name).write_text("my notes")
    code, _, err = run(capsys, *TRAIN, "--steps", 1, "--out", out, "--no-resume")
    assert code == 2 and name in err and "refusing" in err, err
    assert (out / name).read_text() == "my notes" and not (out / "last").exists()


def test_user_files_inside_a_checkpoint_survive_the_next_save(tmp_path):
    path = jf.save(tmp_path / "c", jf.CNF(2, hidden=(4,)))
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        jf.save(path, jf.CNF(2, hidden=(4,)))
    assert (path / "notes.txt").read_text() == "mine"


def test_train_checks_checkpoint_dir_before_any_step(tmp_path):
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    steps = []
    kw = dict(steps=2, batch_size=16, progress=False, callback=steps.append)
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / "data.csv").write_text("1,2")
    with pytest.raises(ConfigError, match="not a jsp_fast checkpoint"):
        jf.train(jf.CNF(2, hidden=(4,)), x, checkpoint_dir=tmp_path / "run", **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        jf.train(jf.CNF(2, hidden=(4,)), x, checkpoint_dir=tmp_path / "file" / "run", **kw)
    with pytest.raises(ConfigError, match="is a file"):
        jf.train(jf.CNF(2, hidden=(4,)), x, checkpoint_dir=tmp_path / "file", **kw)
    assert steps == [] and (tmp_path / "run" / "last" / "data.csv").exists()


# -- after a crash between the two renames of a save -----------------------------------------------
def _crash_between_renames(run_dir: Path) -> Path:
    """What a save killed after moving ``last`` aside and before renaming the new one in leaves."""
    moved = run_dir / ".last.old-0123456789ab"
    os.rename(run_dir / "last", moved)
    (run_dir / ".last.tmp-0123456789ab").mkdir()  # old-style name (no pid): stale
    (run_dir / ".last.tmp-0123456789ab" / "model.safetensors").write_bytes(b"half")
    return moved


def test_no_resume_after_crash_between_renames_starts_over(capsys, tmp_path):
    out = tmp_path / "r"
    assert run(capsys, *TRAIN, "--steps", 2, "--out", out)[0] == 0
    _crash_between_renames(out)
    code, o, err = run(capsys, *TRAIN, "--steps", 1, "--out", out, "--no-resume")
    assert code == 0, err
    assert "resuming" not in err and o.startswith("step 1:")
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last", "run.json"]
    assert [r["step"] for r in json.loads((out / "history.json").read_text())["rows"]] == [0, 1]


def test_sample_and_eval_accept_a_run_dir_after_crash_between_renames(capsys, tmp_path):
    out = tmp_path / "r"
    assert run(capsys, *TRAIN, "--steps", 2, "--out", out)[0] == 0
    _crash_between_renames(out)
    code, _, err = run(capsys, "sample", "--checkpoint", out, "--n", 10, "--out", tmp_path / "s.npy",
                       "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--max-n", 20, "--tol", 1e-2, "--no-progress")
    assert code == 0, err


def test_stale_temporaries_are_cleaned_and_foreign_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_style = run_dir / ".last.tmp-0123456789ab"
    killed = run_dir / f".last.tmp-{dead.pid}-0123456789ab"
    alive = run_dir / f".last.tmp-{os.getppid()}-0123456789ab"   # a live writer: maybe mid-save
    foreign = run_dir / ".last.tmp-mine"
    for d in (old_style, killed, alive, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    (foreign / "thesis.tex").write_text("x")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    jf.train(jf.CNF(2, hidden=(4,)), x, steps=1, batch_size=16, progress=False, checkpoint_dir=run_dir)
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted(["last", alive.name, foreign.name]), left


# -- a resume never silently changes the run -------------------------------------------------------
def _pruned(sparsity, seed=0):
    torch.manual_seed(seed)
    m = jf.CNF(2, hidden=(16, 16), rtol=1e-3, atol=1e-3)
    x = jf.data.toy("8gaussians", n=64, seed=0)
    jf.prune(m, "random", sparsity, x, seed=seed)
    return m


def test_resume_with_other_settings_stops_with_the_differences(tmp_path):
    x = jf.data.toy("8gaussians", n=256, seed=0)
    kw = dict(steps=2, batch_size=32, progress=False, R_every=0)
    jf.train(_pruned(0.5), x, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ResumeMismatchError, match="masks") as info:  # the README quickstart rerun at 0.9
        jf.train(_pruned(0.9), x, checkpoint_dir=tmp_path, **kw)
    assert [d[0] for d in info.value.differences] == ["masks"]
    assert "density 0.500" in str(info.value) and "density 0.100" in str(info.value)
    other = jf.data.toy("checkerboard", n=256, seed=0)
    with pytest.raises(ResumeMismatchError, match="train_data"):
        jf.train(_pruned(0.5), other, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ResumeMismatchError, match="lr"):
        jf.train(_pruned(0.5), x, checkpoint_dir=tmp_path, lr=0.1, **kw)
    m = _pruned(0.5)
    m.rtol = 1e-5
    with pytest.raises(ResumeMismatchError, match="model.rtol"):
        jf.train(m, x, checkpoint_dir=tmp_path, **kw)
    before = _params(tmp_path)
    # the same settings with more steps resume; "force" resumes with a warning; False starts over
    assert len(jf.train(_pruned(0.5), x, checkpoint_dir=tmp_path, **{**kw, "steps": 3})) == 4
    with pytest.warns(UserWarning, match="train_data"):
        hist = jf.train(_pruned(0.5), other, checkpoint_dir=tmp_path, resume="force", **{**kw, "steps": 4})
    assert [r["step"] for r in hist] == [0, 1, 2, 3, 4]
    hist = jf.train(_pruned(0.9), x, checkpoint_dir=tmp_path, resume=False, **kw)
    assert [r["step"] for r in hist] == [0, 1, 2]
    assert not torch.equal(_params(tmp_path)["net.layers.1.weight_mask"], before["net.layers.1.weight_mask"])


def test_cli_resume_on_other_data_or_pruning_stops(capsys, tmp_path):
    out = tmp_path / "R2"
    pr = ["--prune", "random", "--sparsity", 0.5]
    assert run(capsys, *TRAIN, *pr, "--steps", 2, "--out", out)[0] == 0
    argv = [a if a != "8gaussians" else "checkerboard" for a in TRAIN]
    code, _, err = run(capsys, *argv, *pr, "--steps", 3, "--out", out)
    assert code == 2 and "train_data" in err and "--resume-anyway" in err, err
    code, _, err = run(capsys, *TRAIN, "--prune", "random", "--sparsity", 0.9, "--steps", 3, "--out", out)
    assert code == 2 and "sparsity" in err, err
    code, o, err = run(capsys, *argv, *pr, "--steps", 3, "--out", out, "--resume-anyway")
    assert code == 0 and "resuming" in err and o.startswith("step 3:"), err


# -- SIGKILL at random moments ---------------------------------------------------------------------
# The child runs the real command; KILL_AT=<function>:<n> makes it SIGKILL itself at the n-th call of
# a function of the checkpoint write, so every phase of a save is hit deterministically.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    kill = os.environ.get("KILL_AT")
    if kill:
        what, n = kill.split(":")
        from jsp_fast.training import checkpoint as ck
        count = [0]
        def wrap(real):
            def f(*a, **k):
                count[0] += 1
                if count[0] == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            return f
        if what == "write":
            ck._write = wrap(ck._write)
        elif what == "rename":
            ck.os.rename = wrap(os.rename)
        elif what == "rmtree":
            ck.shutil.rmtree = wrap(ck.shutil.rmtree)
    from jsp_fast.app.cli import main
    sys.exit(main(sys.argv[1:]))
""")

CRASH_ARGS = [*TRAIN, "--prune", "random", "--sparsity", 0.5, "--checkpoint-every", 1, "--R-every", 1,
              "--reg-kinetic", 0.01]
STEPS = 40


def _child(out: Path, kill_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, KILL_AT=kill_at or "")
    return subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, CRASH_ARGS), "--steps", str(STEPS),
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _loadable_if_any(out: Path) -> int:
    """The step of the checkpoint a kill left (0 if none was ever completed); it must load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "missing after an interrupted save": expected here
        if not ckpt.exists(out / "last"):
            assert not (out / "last").exists()
            return 0
        return ckpt.load_checkpoint(out).extra["step"]


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_an_identical_end(capsys, tmp_path):
    ref = tmp_path / "ref"
    code, _, err = run(capsys, *CRASH_ARGS, "--steps", STEPS, "--out", ref)
    assert code == 0, err
    out = tmp_path / "run"
    steps = []
    # every phase of a save: weights written, before config.json, between and after the renames
    for kill_at in ("write:4", "write:7", "rename:3", "rename:4", "rmtree:2"):
        p = _child(out, kill_at)
        _, err = p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        steps.append(_loadable_if_any(out))
    # and at seeded random moments of training (mostly in steps, sometimes in a write)
    rng = random.Random(1234)
    t_end = time.monotonic() + 40
    for _ in range(6):
        if time.monotonic() > t_end:
            break
        before = _stamp(out / "last")
        p = _child(out)
        t0 = time.monotonic()
        while _stamp(out / "last") == before and p.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.005)  # wait for this process's first save (after its imports)
        time.sleep(rng.uniform(0.0, 0.2))  # a few steps and saves
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        steps.append(_loadable_if_any(out))
        if p.returncode == 0:  # a fast machine finished the run before the kill: nothing left to interrupt
            break
    # progress was kept, never lost; the kills at the save phases fell inside the run (the steps are in
    # the failure message)
    assert steps == sorted(steps) and 0 < steps[4] < STEPS, steps
    code, o, err = run(capsys, *CRASH_ARGS, "--steps", STEPS, "--out", out)
    assert code == 0 and o.startswith(f"step {STEPS}:"), err
    want, got = _params(ref), _params(out)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last", "run.json"]
    hist = json.loads((out / "history.json").read_text())["rows"]
    assert [r["step"] for r in hist] == list(range(STEPS + 1))


def test_compare_killed_resumes_without_redoing_finished_runs(tmp_path):
    """SIGKILL during a compare grid: every record on disk is whole, and the rerun skips them (their
    files untouched) and runs only the rest."""
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "jsp_fast.app.cli", "compare", "--dataset", "8gaussians", "--out", str(out),
            "--methods", "jsp,random", "--sparsities", "0.8", "--seeds", "0,1", "--steps", "3",
            "--batch-size", "32", "--hidden", "8,8", "--eval-every", "3", "--n-samples", "20",
            "--prune-batch", "64", "--n-test", "50", "--eval-tol", "1e-3", "--no-references", "--threads", "1"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = out / "runs"
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 120 and not list(runs.glob("*.json")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    done = {f.name: f.stat().st_mtime_ns for f in runs.glob("*.json")}
    assert done, "the grid was killed before its first run finished"
    for f in runs.glob("*.json"):
        json.loads(f.read_text())  # whole, never half-written
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{len(done)} of 4 runs already done" in res.stdout
    assert {f.name: f.stat().st_mtime_ns for f in runs.glob("*.json") if f.name in done} == done
    assert len(list(runs.glob("*.json"))) == 4 and (out / "report.md").exists()
