"""The e2e benchmark module behind `jsp-fast bench e2e` (tiny sizes) and its RESULTS.md section."""
from __future__ import annotations

import argparse

import pytest

from jsp_fast.app import bench as bc


def test_run_e2e_tiny_and_markdown(tmp_path):
    provs = ("dense", "sparse", "native")
    rows = bc.run_e2e(datasets=("toy",), sparsities=(0.9,), providers=provs, repeats=1, n=64,
                      prune_method="random", quiet=True)
    assert {(r["op"], r["provider"]) for r in rows} == {(o, p) for o in ("sample", "log_prob") for p in provs}
    nfe = {(r["op"], r["provider"]): r["nfe"] for r in rows}
    assert all(nfe[(o, "native")] == nfe[(o, "sparse")] for o in ("sample", "log_prob"))
    for r in rows:
        assert r["nfe"] > 0 and r["seconds"] > 0
        assert r["max_abs_diff"] < 1e-3
    md = bc.format_markdown(rows, "jsp-fast bench e2e --n 64", "dopri5", 1e-5, "random")
    assert md.startswith(bc.SECTION) and "| toy |" in md and "× dense" in md

    res = tmp_path / "RESULTS.md"
    res.write_text("# Results\n\n## Kernels\n\nkernel rows\n")
    bc.write_section(res, md)
    bc.write_section(res, md)  # replaced, not duplicated
    text = res.read_text()
    assert text.count(bc.SECTION) == 1 and "kernel rows" in text
    bc.write_section(res, md, append=True)
    text = res.read_text()
    assert text.count(bc.SECTION) == 1 and text.count("| toy |") == 4 and text.index("## Kernels") < text.index(bc.SECTION)
    # A section in the middle keeps what follows it.
    res.write_text("# R\n\n## End to end\n\nold\n\n## Later\n\nlater rows\n")
    bc.write_section(res, md)
    text = res.read_text()
    assert "old" not in text and "later rows" in text and text.index(bc.SECTION) < text.index("## Later")
    # Another heading (bench/report.py's layer section) leaves "End to end" alone.
    bc.write_section(res, "## Layer\n\nlayer rows\n", heading="## Layer")
    bc.write_section(res, "## Layer\n\nnewer rows\n", heading="## Layer")
    text = res.read_text()
    assert text.count("## Layer") == 1 and "newer rows" in text and "layer rows" not in text
    assert "later rows" in text and text.count(bc.SECTION) == 1


def test_arguments():
    p = argparse.ArgumentParser()
    bc.add_arguments(p)
    a = p.parse_args(["e2e", "--datasets", "toy", "--sparsities", "0.8,0.9", "--providers", "dense,sparse"])
    assert a.datasets == ("toy",) and a.sparsities == (0.8, 0.9) and a.providers == ("dense", "sparse")
    for bad in (["--datasets", "mnist"], ["--sparsities", "1.5"], ["--providers", "gpu"], ["--prune", "nope"],
                ["--repeats", "0"], ["--n", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_cli_sample_and_eval_fast(tmp_path):
    import json

    import numpy as np
    import torch

    import jsp_fast as jf
    from jsp_fast.app import cli

    torch.manual_seed(0)
    model = jf.CNF(dim=2, hidden=(32, 32))
    jf.prune(model, "random", 0.5, data=torch.randn(64, 2), granularity="block", block=(16, 16))
    ck = tmp_path / "ck"
    jf.save(ck, model)
    outs = {}
    for fast in (False, True):
        flag = ["--fast"] if fast else []
        npy, js = tmp_path / f"s{fast}.npy", tmp_path / f"e{fast}.json"
        assert cli.main(["sample", "--checkpoint", str(ck), "--n", "50", "--out", str(npy), *flag]) == 0
        assert cli.main(["eval", "--checkpoint", str(ck), "--dataset", "8gaussians", "--max-n", "200",
                         "--json", str(js), "--no-progress", *flag]) == 0
        outs[fast] = (np.load(npy), json.loads(js.read_text()))
    assert np.abs(outs[True][0] - outs[False][0]).max() < 1e-4
    assert abs(outs[True][1]["nll"] - outs[False][1]["nll"]) < 1e-4
