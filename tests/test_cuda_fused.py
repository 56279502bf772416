"""The fused CUDA MLP (csrc/cuda/fused_mlp*): value and tangents of a whole block-sparse concatsquash net.

(a) Host check, no GPU needed: csrc/cuda/host_check.cpp runs the kernel's own CTA program
    (fused_mlp_math.h: activations, derivatives, scale/shift, BSR traversal on both the vectorised and
    the generic path, tile plan, tangent chunks, ragged last tile) on the CPU, one phase at a time for
    every thread; compared here with a float64 NumPy reference on random weights and block masks.
(b) GPU: the real kernel through jsp_fast.sparse.backends.cuda against a torch reference (skipped without a
    CUDA device and a module built with JSP_FAST_CUDA=ON).
(c) The Python launcher's errors without a CUDA build / with bad arguments.

Tolerance: fp32 accumulation over k <= 128 inputs per layer against float64: errors ~1e-6 relative
to the activations' scale; 2e-5 * (1 + |ref|) leaves a margin of ~10x.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ACTS = {"none": 0, "tanh": 1, "softplus": 2, "elu": 3, "relu": 4, "sigmoid": 5}


# ---- float64 reference ---------------------------------------------------------------------------
def _act(a: int, p: np.ndarray) -> np.ndarray:
    if a == 1:
        return np.tanh(p)
    if a == 2:
        return np.where(p > 20, p, np.log1p(np.exp(np.minimum(p, 20))))
    if a == 3:
        return np.where(p > 0, p, np.expm1(np.minimum(p, 0)))
    if a == 4:
        return np.maximum(p, 0)
    if a == 5:
        return 1 / (1 + np.exp(-p))
    return p


def _dact(a: int, p: np.ndarray) -> np.ndarray:
    if a == 1:
        return 1 - np.tanh(p) ** 2
    if a == 2:
        return 1 / (1 + np.exp(-p))
    if a == 3:
        return np.where(p > 0, 1.0, np.exp(np.minimum(p, 0)))
    if a == 4:
        return (p > 0).astype(np.float64)
    if a == 5:
        s = 1 / (1 + np.exp(-p))
        return s * (1 - s)
    return np.ones_like(p)


def _dense(layer) -> np.ndarray:
    n, k, bm, bk = layer["n"], layer["k"], layer["bm"], layer["bk"]
    w = np.zeros((n, k))
    for br in range(n // bm):
        for j in range(layer["row_ptr"][br], layer["row_ptr"][br + 1]):
            c = layer["col_idx"][j]
            w[br * bm:(br + 1) * bm, c * bk:(c + 1) * bk] += layer["values"][j]
    return w


def reference(layers, x, x_dot, t):
    h, hv = x.astype(np.float64), x_dot.astype(np.float64)
    for L in layers:
        w = _dense(L)
        n = L["n"]
        if L.get("gate_w") is not None:
            g = 1 / (1 + np.exp(-(L["gate_w"] * t + (L["gate_b"] if L.get("gate_b") is not None else 0))))
            scale = g
            shift = (L["bias"] * g if L.get("bias") is not None else 0) + (
                L["shift_w"] * t if L.get("shift_w") is not None else 0)
        else:
            scale = L["scale"] if L.get("scale") is not None else np.ones(n)
            shift = L["bias"] if L.get("bias") is not None else np.zeros(n)
        pre = h @ w.T * scale + shift
        pre_v = hv @ w.T * scale
        h, hv = _act(L["act"], pre), _dact(L["act"], pre) * pre_v
    return h, hv


def random_layer(rng, n, k, bm, bk, act, density=0.5, mode="concatsquash", empty_rows=()):
    nb, kb = n // bm, k // bk
    grid = rng.random((nb, kb)) < density
    for r in empty_rows:
        grid[r] = False
    rows, cols = np.nonzero(grid)
    layer = {
        "n": n, "k": k, "bm": bm, "bk": bk, "act": act,
        "values": (rng.standard_normal((len(rows), bm, bk)) / np.sqrt(max(1.0, density * k))).astype(np.float32),
        "row_ptr": np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=nb))]).astype(np.int32),
        "col_idx": cols.astype(np.int32),
    }
    vec = lambda: rng.standard_normal(n).astype(np.float32)  # noqa: E731
    if mode == "concatsquash":
        layer.update(gate_w=vec(), gate_b=vec(), shift_w=vec(), bias=vec())
    elif mode == "scale":
        layer.update(scale=vec(), bias=vec())
    return layer


# ---- (a) host check --------------------------------------------------------------------------------
def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++): cannot build csrc/cuda/host_check.cpp")
    exe = tmp_path_factory.mktemp("host_check") / "host_check"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{CUDA_DIR}", str(CUDA_DIR / "host_check.cpp"),
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"host_check failed to compile:\n{res.stderr}"
    return exe


FLAG_KEYS = ("scale", "bias", "gate_w", "gate_b", "shift_w")


def run_host(exe, tmp, layers, x, x_dot, t, budget=112 * 1024, sms=132, force_generic=False):
    B, ntan = x.shape[0], x_dot.shape[0]
    spec = [f"{len(layers)} {B} {ntan} {t!r} {budget} {sms} {int(force_generic)}"]
    floats, ints = [x.ravel(), x_dot.ravel()], []
    for L in layers:
        flags = [int(L.get(key) is not None) for key in FLAG_KEYS]
        spec.append(" ".join(str(v) for v in (L["n"], L["k"], L["bm"], L["bk"], len(L["col_idx"]), L["act"], *flags)))
        floats.append(L["values"].ravel())
        floats += [L[key] for key in FLAG_KEYS if L.get(key) is not None]
        ints += [L["row_ptr"], L["col_idx"]]
    (tmp / "spec.txt").write_text("\n".join(spec) + "\n")
    np.concatenate([np.asarray(f, np.float32).ravel() for f in floats]).tofile(tmp / "f.bin")
    np.concatenate([np.asarray(i, np.int32).ravel() for i in ints] or [np.zeros(0, np.int32)]).tofile(tmp / "i.bin")
    res = subprocess.run([str(exe), "run", str(tmp / "spec.txt"), str(tmp / "f.bin"), str(tmp / "i.bin"),
                          str(tmp / "out.bin")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    out = np.fromfile(tmp / "out.bin", np.float32)
    n = layers[-1]["n"]
    return out[:B * n].reshape(B, n), out[B * n:].reshape(ntan, B, n), res.stdout


def _check(got, ref):
    err = np.abs(got.astype(np.float64) - ref) / (1 + np.abs(ref))
    assert np.isfinite(got).all()
    assert err.max() < 2e-5, f"max scaled error {err.max():.3g}"


def field(rng, dim, hidden, act, block, density=0.5, mode="concatsquash"):
    dims = [dim, *hidden, dim]
    layers = []
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        bm = block[0] if n % block[0] == 0 else n
        bk = block[1] if k % block[1] == 0 else k
        last = i == len(dims) - 2
        layers.append(random_layer(rng, n, k, bm, bk, 0 if last else act, density if bm * bk > 1 else 1.0, mode,
                                   empty_rows=(0,) if (n // bm > 1 and not last) else ()))
    return layers


@pytest.mark.parametrize("act", list(ACTS))
def test_host_all_activations(host_check, tmp_path, act):
    rng = np.random.default_rng(ACTS[act])
    layers = field(rng, 8, (32, 32), ACTS[act], (8, 8))
    x = rng.standard_normal((37, 8)).astype(np.float32)  # odd batch: a ragged last tile
    xd = rng.standard_normal((1, 37, 8)).astype(np.float32)
    y, yd, out = run_host(host_check, tmp_path, layers, x, xd, 0.37)
    assert "vec=111" in out
    ry, ryd = reference(layers, x, xd, 0.37)
    _check(y, ry)
    _check(yd, ryd)


@pytest.mark.parametrize("generic", [False, True])
def test_host_thin_layers_and_generic_path(host_check, tmp_path, generic):
    """dim 2 (bk = 2 and bm = 2: the generic path), odd blocks, exact-trace tangents (T = dim)."""
    rng = np.random.default_rng(5)
    layers = [random_layer(rng, 24, 2, 4, 2, 1, 1.0),      # bk = 2 -> generic
              random_layer(rng, 24, 24, 12, 8, 1, 0.6, empty_rows=(1,)),
              random_layer(rng, 30, 24, 6, 6, 5, 0.6, mode="scale"),  # bk % 4 != 0 -> generic
              random_layer(rng, 2, 30, 2, 10, 0, 1.0)]     # bm = 2 -> generic
    x = rng.standard_normal((13, 2)).astype(np.float32)
    xd = np.stack([np.tile(np.eye(2, dtype=np.float32)[i], (13, 1)) for i in range(2)])
    y, yd, out = run_host(host_check, tmp_path, layers, x, xd, -0.8, force_generic=generic)
    assert ("vec=0000" if generic else "vec=0100") in out
    ry, ryd = reference(layers, x, xd, -0.8)
    _check(y, ry)
    _check(yd, ryd)


def test_host_mixed_activations_no_tangents_plain_layers(host_check, tmp_path):
    """Dynamic instantiation (mixed hidden activations), T = 0, layers without scale/shift."""
    rng = np.random.default_rng(7)
    layers = [random_layer(rng, 16, 4, 4, 4, 2, 0.7, mode="none"),
              random_layer(rng, 16, 16, 8, 4, 3, 0.5, mode="scale", empty_rows=(0, 1)),
              random_layer(rng, 4, 16, 4, 4, 0, 0.9, mode="none")]
    x = rng.standard_normal((9, 4)).astype(np.float32)
    xd = np.zeros((0, 9, 4), np.float32)
    y, yd, out = run_host(host_check, tmp_path, layers, x, xd, 0.0)
    assert "act=6" in out and yd.size == 0
    _check(y, reference(layers, x, xd, 0.0)[0])


def test_host_tangent_chunks_and_wide_layers(host_check, tmp_path):
    """A small shared-memory budget splits T = 5 tangents into chunks; width 512 uses 256 threads."""
    rng = np.random.default_rng(11)
    layers = [random_layer(rng, 512, 8, 32, 8, 1, 0.5),
              random_layer(rng, 64, 512, 32, 32, 1, 0.15, empty_rows=(1,)),
              random_layer(rng, 8, 64, 8, 16, 0, 0.7)]
    x = rng.standard_normal((11, 8)).astype(np.float32)
    xd = rng.standard_normal((5, 11, 8)).astype(np.float32)
    budget = 2 * 512 * 4 + 12 * 2 * 516 * 4  # scale/shift + 12 rows of width 512: tb = 4, tc = 2, 3 chunks
    y, yd, out = run_host(host_check, tmp_path, layers, x, xd, 1.5, budget=budget)
    assert "tb=4 tc=2 chunks=3 grid_x=3 threads=256" in out, out
    ry, ryd = reference(layers, x, xd, 1.5)
    _check(y, ry)
    _check(yd, ryd)


def test_host_extreme_inputs(host_check, tmp_path):
    """Large pre-activations: softplus past its threshold, saturated tanh/sigmoid, elu far negative."""
    rng = np.random.default_rng(3)
    for act in (1, 2, 3, 5):
        layers = [random_layer(rng, 16, 4, 4, 4, act, 1.0, mode="scale"),
                  random_layer(rng, 4, 16, 4, 4, 0, 1.0, mode="none")]
        layers[0]["values"] *= 20
        x = rng.standard_normal((8, 4)).astype(np.float32)
        xd = rng.standard_normal((1, 8, 4)).astype(np.float32)
        y, yd, _ = run_host(host_check, tmp_path, layers, x, xd, 0.0)
        ry, ryd = reference(layers, x, xd, 0.0)
        err = np.abs(yd - ryd) / (1 + np.abs(ryd))
        assert np.abs(y - ry).max() / (1 + np.abs(ry).max()) < 1e-5 and err.max() < 1e-4, act


def _layer_dicts(fused_layers):
    out = []
    for L in fused_layers:
        d = {"n": L.shape[0], "k": L.shape[1], "bm": L.block[0], "bk": L.block[1], "act": L.act,
             "values": L.values.numpy(), "row_ptr": L.row_ptr.numpy(), "col_idx": L.col_idx.numpy()}
        d.update({key: getattr(L, key).numpy() for key in FLAG_KEYS if getattr(L, key) is not None})
        out.append(d)
    return out


@pytest.mark.parametrize("sparse", [True, False])
def test_host_field_layers_of_a_cnf_field(host_check, tmp_path, sparse):
    """field_layers(SparseODEnet or masked ODEnet) -> kernel program == the field's own jvp (float64)."""
    from jsp_fast.cnf import ODEnet  # noqa: PLC0415
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415
    from jsp_fast.sparse import SparseODEnet  # noqa: PLC0415

    torch.manual_seed(1)
    net = ODEnet(3, (32, 48), "tanh")
    for layer in net.layers[1:-1]:
        grid = torch.rand(layer.out_features // 16, layer.in_features // 16) < 0.5
        grid[0] = False  # an empty block row
        layer.set_mask(grid.repeat_interleave(16, 0).repeat_interleave(16, 1))
    field = SparseODEnet.from_odenet(net) if sparse else net
    layers = _layer_dicts(_cuda.field_layers(field))
    assert [L["bm"] for L in layers][1] == 16
    z = torch.randn(21, 3)
    v = torch.randn(2, 21, 3)
    t = 0.6
    y, yd, _ = run_host(host_check, tmp_path, layers, z.numpy(), v.numpy(), t)
    with torch.no_grad():
        rf, rjv = net.double().jvp(torch.tensor(t, dtype=torch.float64), z.double(), v.double())
    _check(y, rf.numpy())
    _check(yd, rjv.numpy())


def test_host_plan_and_validate(host_check):
    res = subprocess.run([str(host_check), "plan"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([str(host_check), "validate"], capture_output=True, text=True)
    lines = dict(line.split("\t", 1) for line in res.stdout.strip().splitlines())
    assert lines.pop("ok") == "OK"
    assert all(msg != "OK" for msg in lines.values()), lines
    assert "does not match the previous layer" in lines["chain"]


# ---- (b) GPU ---------------------------------------------------------------------------------------
def _cuda_ready():
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    return torch.cuda.is_available() and _cuda.built_with_cuda()


needs_gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and jsp_fast._C built with JSP_FAST_CUDA=ON")


def _torch_layers(layers, device):
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    out = []
    for L in layers:
        kw = {key: torch.from_numpy(L[key]).to(device) for key in FLAG_KEYS if L.get(key) is not None}
        out.append(_cuda.FusedLayer(values=torch.from_numpy(L["values"]).to(device),
                                    row_ptr=torch.from_numpy(L["row_ptr"]).to(device),
                                    col_idx=torch.from_numpy(L["col_idx"]).to(device),
                                    shape=(L["n"], L["k"]), act=L["act"], **kw))
    return out


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("width,block,ntan", [(64, (16, 16), 1), (256, (32, 32), 2), (512, (32, 32), 1)])
def test_gpu_matches_reference(act, width, block, ntan):
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    rng = np.random.default_rng(width + ntan)
    layers = field(rng, 6, (width, width), ACTS[act], block, density=0.3)
    B = 1001
    x = rng.standard_normal((B, 6)).astype(np.float32)
    xd = rng.standard_normal((ntan, B, 6)).astype(np.float32)
    y, yd = _cuda.fused_mlp(torch.from_numpy(x).cuda(), _torch_layers(layers, "cuda"),
                            torch.from_numpy(xd).cuda(), t=0.25)
    ry, ryd = reference(layers, x, xd, 0.25)
    _check(y.cpu().numpy(), ry)
    _check(yd.cpu().numpy(), ryd)


@needs_gpu
@pytest.mark.gpu
def test_gpu_sparse_odenet_field():
    """The CNF's field: fused value + exact-trace tangents agree with SparseODEnet.jvp."""
    from jsp_fast.cnf import ODEnet  # noqa: PLC0415
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415
    from jsp_fast.sparse import SparseODEnet  # noqa: PLC0415

    torch.manual_seed(0)
    net = ODEnet(2, (64, 64), "softplus")
    for layer in net.layers[1:-1]:
        grid = torch.rand(layer.out_features // 16, layer.in_features // 16) < 0.4
        layer.set_mask(grid.repeat_interleave(16, 0).repeat_interleave(16, 1))
    sp = SparseODEnet.from_odenet(net, fused="cuda").cuda()
    z = torch.randn(777, 2, device="cuda")
    v = torch.eye(2, device="cuda")[:, None, :].expand(2, 777, 2).contiguous()
    t = torch.tensor(0.3, device="cuda")
    with torch.no_grad():
        assert sp.fused_engine(z, v) == "cuda"
        f, jv = sp.jvp(t, z, v)
        rf, rjv = sp.to_odenet().jvp(t, z, v)
    f2, jv2 = _cuda.fused_mlp(z, _cuda.field_layers(sp, z.device), v, t)  # the function-level API
    torch.testing.assert_close(f2, f, rtol=0, atol=0)
    torch.testing.assert_close(jv2, jv, rtol=0, atol=0)
    torch.testing.assert_close(f, rf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(jv, rjv, rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.gpu
def test_gpu_device_time_graph_capture_and_edge_cases():
    """t as a device scalar (no sync) == t as a float; the launch replays in a CUDA graph with a new t;
    batch 0; no tangents; inference only."""
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    rng = np.random.default_rng(2)
    layers_np = field(rng, 5, (96, 40), ACTS["elu"], (8, 8), density=0.5)
    layers = _torch_layers(layers_np, "cuda")
    x = torch.randn(300, 5, device="cuda")
    xd = torch.randn(3, 300, 5, device="cuda")
    y1, yd1 = _cuda.fused_mlp(x, layers, xd, t=0.7)
    t_dev = torch.tensor(0.7, device="cuda")
    y2, yd2 = _cuda.fused_mlp(x, layers, xd, t=t_dev)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(yd1, yd2, rtol=0, atol=0)
    y3, none = _cuda.fused_mlp(x, layers, None, t=0.7)
    assert none is None
    torch.testing.assert_close(y3, y1, rtol=0, atol=0)
    y0, yd0 = _cuda.fused_mlp(x[:0], layers, xd[:, :0], t=0.7)
    assert y0.shape == (0, 5) and yd0.shape == (3, 0, 5)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _cuda.fused_mlp(x, layers, xd, t=t_dev)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg, ydg = _cuda.fused_mlp(x, layers, xd, t=t_dev)
    t_dev.fill_(-0.4)
    g.replay()
    torch.cuda.synchronize()
    ry, ryd = reference(layers_np, x.cpu().numpy(), xd.cpu().numpy(), -0.4)
    _check(yg.cpu().numpy(), ry)
    _check(ydg.cpu().numpy(), ryd)

    with pytest.raises(RuntimeError, match="inference only"):
        _cuda.fused_mlp(x.requires_grad_(), layers, xd)


# ---- (c) launcher errors ---------------------------------------------------------------------------
def test_launcher_errors_without_cuda_build_or_device():
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    rng = np.random.default_rng(0)
    L = random_layer(rng, 8, 4, 4, 4, 1)
    layers = _torch_layers([L], "cpu")
    x = torch.randn(3, 4)
    if not _cuda.built_with_cuda():
        with pytest.raises(RuntimeError, match="without CUDA"):
            _cuda.fused_mlp(x, layers)
    else:
        with pytest.raises(ValueError, match="CUDA tensor"):
            _cuda.fused_mlp(x, layers)


def test_fused_layer_checks():
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    values = torch.zeros(1, 4, 4)
    rp, ci = torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    _cuda.FusedLayer(values, rp, ci, shape=(8, 4), act="tanh")
    with pytest.raises(ValueError, match="row_ptr"):
        _cuda.FusedLayer(values, rp[:2], ci, shape=(8, 4), act="tanh")
    with pytest.raises(ValueError, match="int32"):
        _cuda.FusedLayer(values, rp.long(), ci, shape=(8, 4), act="tanh")
    with pytest.raises(ValueError, match="activation"):
        _cuda.FusedLayer(values, rp, ci, shape=(8, 4), act="gelu")
    with pytest.raises(ValueError, match="512"):
        _cuda.FusedLayer(torch.zeros(1, 4, 4), torch.zeros(257, dtype=torch.int32), ci, shape=(1028, 4), act=0)
    with pytest.raises(ValueError, match="scale"):
        _cuda.FusedLayer(values, rp, ci, shape=(8, 4), scale=torch.ones(8), gate_w=torch.ones(8))
    w = torch.randn(8, 4)
    dense = _cuda.FusedLayer.from_dense(w, act="relu")
    assert dense.nnzb * dense.block[0] * dense.block[1] == 32
    m = torch.zeros(8, 4, dtype=torch.bool)
    m[4:] = True
    part = _cuda.FusedLayer.from_dense(w, m, block=(4, 4))
    assert part.nnzb == 1 and part.row_ptr.tolist() == [0, 0, 1]


def test_custom_op_fake_shapes():
    """jsp_fast::cuda_fused_mlp is a torch.library op with a fake implementation (torch.compile)."""
    from jsp_fast.sparse.backends import cuda as _cuda  # noqa: PLC0415

    layers = [_cuda.FusedLayer.from_dense(torch.randn(8, 4), act="tanh", gate_w=torch.randn(8),
                                          gate_b=torch.randn(8), shift_w=torch.randn(8)),
              _cuda.FusedLayer.from_dense(torch.randn(3, 8))]
    tensors, meta = [], []
    for L in layers:
        tensors += [None if getattr(L, n) is None else getattr(L, n).to("meta") for n in _cuda._LAYER_TENSORS]
        meta += [L.shape[0], L.shape[1], L.block[0], L.block[1], L.act]
    x, xd, t = torch.empty(5, 4, device="meta"), torch.empty(2, 5, 4, device="meta"), torch.empty((), device="meta")
    y, yd = torch.ops.jsp_fast.cuda_fused_mlp(x, xd, t, tensors, meta)
    assert y.shape == (5, 3) and yd.shape == (2, 5, 3)
    y, yd = torch.ops.jsp_fast.cuda_fused_mlp(x, None, t, tensors, meta)
    assert yd.shape == (0, 5, 3)


@pytest.mark.skipif(not __import__("jsp_fast.sparse.backends.cuda", fromlist=["x"]).built_with_cuda(),
                    reason="jsp_fast._C built without CUDA (bind_cuda is the empty stub)")
def test_binding_checks_arguments():
    """bind_cuda rejects bad sizes, keys and pointers before anything reaches the GPU (no device needed)."""
    from jsp_fast._ext import _C  # noqa: PLC0415

    ok = {"n": 8, "k": 4, "bm": 4, "bk": 4, "nnzb": 1, "act": 1, "values": 64, "row_ptr": 64, "col_idx": 64}
    call = lambda layers, **kw: _C.cuda_fused_mlp(layers, kw.get("x", 64), kw.get("xd"), 64, kw.get("yd"),  # noqa: E731
                                                  kw.get("batch", 3), kw.get("ntan", 0), 0.0, None, None)
    cases = [
        ([], "1 to 16 layers"),
        ([dict(ok, foo=1)], "unknown key 'foo'"),
        ([dict(ok, n=1024)], "'n' must be in"),
        ([dict(ok, bm=3)], "does not tile"),
        ([dict(ok, nnzb=3)], "'nnzb' must be in"),
        ([dict(ok, act=7)], "'act' must be in"),
        ([dict(ok, values=66)], "not aligned"),
        ([dict(ok, values=None)], "values and col_idx are required"),
        ([dict(ok, scale=64, gate_w=64)], "not both"),
        ([ok, dict(ok, k=4)], "does not match the previous layer"),
        ([{k: v for k, v in ok.items() if k != "bm"}], "missing key 'bm'"),
    ]
    for layers, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(layers)
    with pytest.raises(ValueError, match="x_dot and y_dot are required"):
        call([ok], ntan=2)
    with pytest.raises(ValueError, match="batch must be"):
        call([ok], batch=-1)
    call([ok], batch=0)  # nothing to do: returns without touching the device
