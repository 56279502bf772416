"""torchrun scale-out: 2 gloo processes on this machine against the single-process run.

Every distributed run is a real ``python -m torch.distributed.run`` subprocess (localhost, one
thread per process, a timeout on each). Equality tests use the exact trace and a fixed-step solver:
under them the distributed run is the single-process one up to float rounding (see
``jsp_fast/training/_ddp.py`` for why Hutchinson noise and adaptive solvers differ).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import jsp_fast as jf
from jsp_fast.app import cli
from jsp_fast.training import _dist, load_checkpoint
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

SCRIPT = str(Path(__file__).with_name("_ddp_script.py"))
TIMEOUT = 180  # seconds for one launch on a loaded 2-core machine
PG_TIMEOUT = "30"  # JSP_FAST_DIST_TIMEOUT inside the workers


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", JSP_FAST_DIST_TIMEOUT=PG_TIMEOUT, JSP_FAST_DEBUG="")
    return env


def _torchrun(args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def _two_nodes(args: list) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one process each meeting through c10d rendezvous: the multi-node
    launch, on one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "jsp-fast-test",
           *map(str, args)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT)
            out.append(subprocess.CompletedProcess(cmd, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _python(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env())


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _cli(*args) -> int:
    return cli.main([str(a) for a in args])


def _assert_params_close(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.bool or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


# -- unit pieces (no processes) ------------------------------------------------------------------------
def test_seeds_and_shards():
    assert _dist.shard_seed(7, 0) == 7  # one shard: exactly model.sample(n, seed)
    seeds = {_dist.shard_seed(s, i) for s in range(4) for i in range(1, 50)}
    assert len(seeds) == 4 * 49  # no overlap between (seed, shard) streams, unlike seed + i
    assert _dist.derive_seed(1, 2, 3) != _dist.derive_seed(1, 3, 2)
    assert _dist.shards(40, 16) == [(0, 0, 16), (1, 16, 32), (2, 32, 40)]
    assert not _dist.launched() and not _dist.active() and _dist.world() == 1  # plain pytest run


def test_structure_digest_sees_one_flipped_mask_entry():
    torch.manual_seed(0)
    m = jf.CNF(2, hidden=(8, 8))
    jf.prune(m, "random", 0.5, torch.randn(16, 2), seed=0)
    d = _dist.structure_digest(m)
    layer = m.net.layers[1]
    mask = layer.mask.clone()
    mask[3, 2] = ~mask[3, 2]
    layer.set_mask(mask)
    assert _dist.structure_digest(m) != d


def test_distributed_flag_outside_torchrun():
    x = jf.data.toy("8gaussians", n=64, seed=0)
    m = jf.CNF(2, hidden=(4,), solver="euler")
    with pytest.raises(ValueError, match="torchrun"):
        jf.train(m, x, steps=1, batch_size=8, distributed=True, progress=False)
    with pytest.raises(TypeError, match="distributed"):
        jf.train(m, x, steps=1, batch_size=8, distributed="yes", progress=False)


def test_one_shard_sample_is_model_sample(tmp_path, one_thread):
    torch.manual_seed(0)
    m = jf.CNF(2, hidden=(8,), solver="euler")
    jf.save(tmp_path / "ck", m)
    assert _cli("sample", "--checkpoint", tmp_path / "ck", "--n", 10, "--seed", 3, "--out", tmp_path / "s.npy") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), m.sample(10, seed=3).numpy())


# -- training ------------------------------------------------------------------------------------------
TRAIN = ["--dataset", "8gaussians", "--n", 640, "--steps", 4, "--batch-size", 32, "--lr", 1e-2, "--eval-every", 2,
         "--val-max", 64, "--hidden", "8,8", "--solver", "euler", "--trace", "exact", "--prune", "random",
         "--sparsity", 0.5, "--threads", 1, "--no-progress", "--seed", 1]


def test_cli_train_two_processes_match_one(tmp_path, one_thread):
    assert _cli("train", *TRAIN, "--out", tmp_path / "one") == 0
    res = _ok(_torchrun(["-m", "jsp_fast.app.cli", "--", "train", *TRAIN, "--out", tmp_path / "two"]))
    assert res.stdout.count("step 4:") == 1  # rank 0 alone reports
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    # masks: pruned once on rank 0 (jf.train checked them equal on both ranks), as one process prunes
    _assert_params_close(one.model.state_dict(), two.model.state_dict())
    assert any(k.endswith("weight_mask") for k in two.model.state_dict())
    for r1, r2 in zip(one.history.rows, two.history.rows, strict=True):
        for k in ("train_nll", "val_nll", "R", "nfe_forward", "nfe_backward"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-5), (r1["step"], k)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["prune"]["kept"] == \
        json.loads((tmp_path / "one" / "run.json").read_text())["prune"]["kept"]


def test_different_masks_on_ranks_are_caught(tmp_path):
    res = _torchrun([SCRIPT, "--bad-mask-rank", 1])
    assert res.returncode != 0
    assert "pruning masks" in res.stderr and "differ across ranks" in res.stderr


def test_block_sparse_model_trains_under_ddp(tmp_path):
    # twice in one process: the second jf.train reuses the group the first joined
    _ok(_python([SCRIPT, "--sparse", "--repeat", 2, "--params", tmp_path / "one.safetensors"]))
    _ok(_torchrun([SCRIPT, "--sparse", "--repeat", 2, "--params", tmp_path / "two.safetensors"]))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert any(k.endswith(".values") for k in one)  # the kept blocks are the trained parameters
    _assert_params_close(one, two)


def test_killed_rank_stops_the_other_and_resume_with_two_and_one(tmp_path):
    ck = tmp_path / "ck"
    t = time.perf_counter()
    # rank 1 (alone on "node" 2) dies at step 5; checkpoints were written at steps 2 and 4
    node0, node1 = _two_nodes([SCRIPT, "--ckpt", ck, "--steps", 6, "--kill-rank", 1, "--kill-step", 5])
    assert time.perf_counter() - t < TIMEOUT
    assert node0.returncode != 0 and node1.returncode != 0
    assert "DistributedError" in node0.stderr and "another process died" in node0.stderr
    assert "SIGKILL" in node1.stderr
    state = load_checkpoint(ck)  # the last good checkpoint, complete (manifest verified)
    assert state.extra["step"] == 4
    assert not list(ck.glob(".last.tmp-*"))
    shutil.copytree(ck, tmp_path / "ck1")

    _ok(_python([SCRIPT, "--steps", 6, "--params", tmp_path / "ref.safetensors"]))  # uninterrupted, one process
    _ok(_torchrun([SCRIPT, "--ckpt", ck, "--steps", 6, "--params", tmp_path / "two.safetensors"]))
    _ok(_python([SCRIPT, "--ckpt", tmp_path / "ck1", "--steps", 6, "--params", tmp_path / "one.safetensors"]))
    ref = load_file(tmp_path / "ref.safetensors")
    _assert_params_close(ref, load_file(tmp_path / "two.safetensors"))
    _assert_params_close(ref, load_file(tmp_path / "one.safetensors"))
    assert [r["step"] for r in load_checkpoint(ck).history.rows] == list(range(7))


# -- sample / eval / compare ---------------------------------------------------------------------------
@pytest.fixture
def hutch_checkpoint(tmp_path, one_thread):
    run = tmp_path / "run"
    assert _cli("train", "--dataset", "8gaussians", "--n", 256, "--steps", 2, "--batch-size", 32, "--hidden", "8,8",
                "--trace", "hutchinson", "--solver", "dopri5", "--eval-every", 2, "--val-max", 32, "--R-every", 0,
                "--threads", 1, "--no-progress", "--out", run) == 0
    return run


def test_sharded_sample_and_eval_equal_single_process(tmp_path, hutch_checkpoint):
    run = hutch_checkpoint
    sample = ["sample", "--checkpoint", run, "--n", 40, "--shard-size", 16, "--seed", 3, "--threads", 1]
    ev = ["eval", "--checkpoint", run, "--max-n", 40, "--batch-size", 16, "--seed", 2, "--tol", 1e-4,
          "--threads", 1, "--no-progress"]
    assert _cli(*sample, "--out", tmp_path / "one.npy") == 0
    assert _cli(*ev, "--json", tmp_path / "one.json") == 0
    # sampling over two "nodes" (c10d rendezvous), eval over two local processes
    for r in _two_nodes(["-m", "jsp_fast.app.cli", "--", *sample, "--out", tmp_path / "two.npy"]):
        _ok(r)
    _ok(_torchrun(["-m", "jsp_fast.app.cli", "--", *ev, "--json", tmp_path / "two.json"]))
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == (40, 2) and np.isfinite(one).all()
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    e1, e2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for k in ("nll", "R", "nfe_forward_mean", "true_nll"):
        assert e2[k] == pytest.approx(e1[k], rel=1e-9, abs=1e-12), k
    assert e2["n"] == e1["n"] == 40


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _report_body(path: Path) -> list[str]:
    """report.md without the command block and the wall-time column."""
    lines, out, fence, wall = path.read_text().splitlines(), [], False, None
    for line in lines:
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        if line.startswith("|"):
            cells = line.split("|")
            if "wall s" in line:
                wall = [c.strip() for c in cells].index("wall s")
            if wall is not None and len(cells) > wall:
                del cells[wall]
            line = "|".join(cells)
        out.append(line)
    return out


def test_compare_over_two_ranks_equals_one(tmp_path, one_thread):
    args = ["compare", "--dataset", "8gaussians", "--methods", "random,magnitude", "--sparsities", 0.5, "--seeds", 0,
            "--no-references", "--steps", 2, "--hidden", "8,8", "--solver", "euler", "--n", 256, "--n-test", 64,
            "--n-samples", 8, "--eval-every", 2, "--R-every", 1, "--batch-size", 32, "--threads", 1]
    assert _cli(*args, "--out", tmp_path / "one") == 0
    res = _ok(_torchrun(["-m", "jsp_fast.app.cli", "--", *args, "--out", tmp_path / "two"]))
    assert res.stdout.count("report:") == 1
    names = sorted(p.name for p in (tmp_path / "one" / "runs").glob("*.json"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "two" / "runs").glob("*.json"))
    for n in names:
        r1, r2 = (json.loads((tmp_path / d / "runs" / n).read_text()) for d in ("one", "two"))
        assert _strip_seconds(r1) == _strip_seconds(r2), n
    b1, b2 = _report_body(tmp_path / "one" / "report.md"), _report_body(tmp_path / "two" / "report.md")
    assert any(re.match(r"\| (random|magnitude) \|", line) for line in b1)
    assert b1 == b2
