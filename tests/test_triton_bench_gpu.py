"""bench/gpu.py on the CPU: argument parsing, config generation, target checks, the no-CUDA message,
and one tiny --smoke pass through every benchmark under the Triton interpreter.

The smoke pass forces the Triton fused field with ``SparseODEnet.from_odenet(net, fused="triton")``
and fails when another engine runs instead."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("jsp_fast_bench_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_defaults_cover_the_requested_grid(gpu):
    args = gpu.parse_args([])
    assert min(args.widths) == 64 and max(args.widths) == 4096
    assert min(args.batches) == 4096 and max(args.batches) == 65536
    assert max(args.densities) == 0.5 and min(args.densities) == 0.05
    assert max(args.field_widths) <= 512 and args.field_sparsity == 0.9
    cfgs = gpu.layer_configs(args)
    assert len(cfgs) == len(args.widths) * len(args.batches) * len(args.densities)
    c = next(c for c in cfgs if c.width == 2048 and c.density == 0.1)
    assert c.n_blocks == 64 * 64 and c.kept == round(0.1 * 4096)
    assert all(f.width <= 512 for f in gpu.field_configs(args))


def test_quick_and_overrides(gpu):
    args = gpu.parse_args(["--quick", "--widths", "128,100", "--densities", "0.2", "--providers", "ours_fp32"])
    assert args.providers == ("ours_fp32",)
    assert [c.width for c in gpu.layer_configs(args)] == [128] * len(args.batches)  # 100 is not 32-aligned
    with pytest.raises(SystemExit):
        gpu.parse_args(["--densities", "0"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--providers", "magic"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--widths", "64,x"])
    assert gpu.parse_args(["--smoke"]).repeats == 1 and gpu.parse_args([]).repeats == 20


def test_check_targets(gpu):
    lay = dict(width=2048, batch=16384, density=0.1)
    recs = [dict(bench="layer_fwd", provider=p, config=lay, ms=ms) for p, ms in
            (("ours_fp32", 1.0), ("torch_bsr_fp32", 2.0), ("cublas_fp32", 1.5))]
    fld = dict(width=256, batch=16384, sparsity=0.9)
    recs += [dict(bench="field", provider="dense_eager", config=fld, ms=6.0),
             dict(bench="field", provider="ours_fused", config=fld, ms=1.0)]
    t = gpu.check_targets(recs)
    assert t["fused_field_ge_5x_eager"] is True
    assert t["wide_ge_1_5x_torch_bsr"] is True and t["wide_ahead_of_cublas"] is True
    recs[2]["ms"] = 0.9
    assert gpu.check_targets(recs)["wide_ahead_of_cublas"] is False
    assert gpu.check_targets([])["fused_field_ge_5x_eager"] is None
    assert t["fused_field_cuda_ge_5x_eager"] is None  # no CUDA-build records
    recs.append(dict(bench="field", provider="ours_cuda_fused", config=fld, ms=2.0))
    assert gpu.check_targets(recs)["fused_field_cuda_ge_5x_eager"] is False


def test_no_cuda_message(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main([])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="--smoke needs the Triton interpreter (set by conftest without a GPU)")
def test_smoke_run(gpu, tmp_path):
    out = tmp_path / "r.json"
    rc = gpu.main(["--smoke", "--steps", "1", "--providers", "ours_fp32,cublas_fp32", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["errors"] == {}
    benches = {(r["bench"], r["provider"]) for r in data["records"]}
    assert {("layer_fwd", "ours_fp32"), ("layer_fwd", "cublas_fp32"), ("layer_jvp", "ours_fp32"),
            ("field", "dense_eager"), ("field", "ours_fused"), ("field", "ours_fused_tf32"),
            ("solve", "ours_eager"), ("solve", "dense_eager"), ("e2e", "ours_log_prob"),
            ("e2e", "stepped_log_prob"), ("e2e", "ours_rk4_graph_log_prob"), ("e2e", "dense_sample")} <= benches
    assert not [r for r in data["records"] if "error" in r["extra"]]
    assert all(r["ms"] > 0 for r in data["records"])
    # every fused provider was checked against dense on the same inputs (TF32 is exact fp32 on the CPU)
    errs = {(r["bench"], r["provider"]): r["extra"]["max_abs_err_vs_dense"] for r in data["records"]
            if "max_abs_err_vs_dense" in r["extra"]}
    assert {("field", "ours_fused"), ("field", "ours_fused_tf32"), ("solve", "ours_eager")} <= set(errs)
    assert max(errs.values()) < 1e-4
    # on the CPU "auto" takes the C++ field (the interpreter is never automatic); its log-densities agree
    e2e = [r for r in data["records"] if r["bench"] == "e2e"]
    assert {r["config"]["engine"] for r in e2e} == {"cpu"} and all(r["config"]["device_solve"] for r in e2e)
    assert max(r["extra"]["max_abs_logp_err"] for r in e2e) < 1e-3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the Triton fused field on the CPU needs the interpreter")
def test_forced_engine_is_checked(gpu):
    """The field benches ask SparseODEnet for one fused engine and refuse to time another one."""
    import gpu_fields  # noqa: PLC0415  (bench/ is on sys.path once gpu.py is loaded)
    from jsp_fast.cnf import ODEnet  # noqa: PLC0415

    net = ODEnet(2, (32, 32), "tanh")
    z = torch.randn(5, 2)
    with torch.no_grad():
        fast = gpu_fields.fused(net, "triton", z, z[None])
        f, jv = fast.jvp(torch.tensor(0.3), z, z[None])
        f_ref, jv_ref = net.jvp(torch.tensor(0.3), z, z[None])
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(jv, jv_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises((RuntimeError, ValueError)):
        gpu_fields.fused(net, "cuda", z, z[None])  # no CUDA engine on the CPU: an error, not the cpu engine
