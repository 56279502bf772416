"""``registry.resolve`` is the one chooser of per-layer backends and fused fields; a missing backend is
a loud error, never a silent dense fallback; the compute layer's import rules hold.

Runs on the CPU: the "triton" fused field under TRITON_INTERPRET=1 (conftest), and fake backends
registered for the test stand in for a GPU where a rule (priority, width limit) is what is tested.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _triton_util import INTERPRET

import jsp_fast as jf
from jsp_fast.cnf import ODEnet
from jsp_fast.sparse import SparseODEnet, registry
from jsp_fast.sparse.backends import cuda as cuda_backend
from jsp_fast.sparse.backends import triton as triton_backend
from jsp_fast.sparse.backends.torch_ref import TorchBackend
from jsp_fast.sparse.registry import FieldShape

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
HAS_CPU_FIELD = "cpu" in jf.backends.available(fused=True)
needs_interpreter = pytest.mark.skipif(not (INTERPRET and triton_backend.IMPORT_ERROR is None),
                                       reason="the triton backend runs on the CPU only under TRITON_INTERPRET=1")


def _net(seed=0, hidden=(32, 48), block=16):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ODEnet(3, hidden, "tanh").double()
    with torch.no_grad():
        for layer in net.layers:
            layer.hyper_gate.weight.normal_(0, 1, generator=gen)
            layer.linear.bias.normal_(0, 0.5, generator=gen)
        for layer in net.layers[1:-1]:
            n, k = layer.linear.weight.shape
            g = torch.rand(n // block, k // block, generator=gen) < 0.5
            g[-1, -1] = True
            layer.set_mask(g.repeat_interleave(block, 0).repeat_interleave(block, 1))
    return net


def _data(B=7, T=2, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.tensor(0.37, dtype=dtype), torch.randn(B, 3, generator=gen, dtype=dtype),
            torch.randn(T, B, 3, generator=gen, dtype=dtype))


class _FakeField:
    """A fused field that refuses wide fields, as the GPU ones do."""

    def __init__(self, max_width=512):
        self.max_width, self.runs = max_width, 0

    def check(self, field, dtype, device):
        return None if field.max_width <= self.max_width else f"wider than {self.max_width}"

    def pack(self, layers, activation, dtype, device):
        return None

    def run(self, packed, t, z, v):
        self.runs += 1
        return torch.zeros_like(z), None if v is None else torch.zeros_like(v)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    field = _FakeField()
    registry.register_backend("fake", None, devices=("cpu",), priority=50, fused=field)
    yield field
    registry.unregister_backend("fake")


# ---- the chooser ---------------------------------------------------------------------------------
def test_resolve_fused_priority_widths_and_grad(fake):
    narrow, wide = FieldShape((3, 64, 3)), FieldShape((3, 528, 3))
    assert registry.resolve("auto", CPU, torch.float64, field=narrow) == "fake"  # highest priority wins
    # wider than the fake takes: the next fused field ("cpu" has no width limit), else per-layer
    assert registry.resolve("auto", CPU, torch.float64, field=wide) == ("cpu" if HAS_CPU_FIELD else None)
    assert registry.resolve("fake", CPU, torch.float64, field=wide) is None
    with pytest.raises(ValueError, match="wider than 512"):
        registry.resolve("fake", CPU, torch.float64, field=wide, strict=True)
    # a gradient is needed: always the per-layer ops, even for a forced engine
    assert registry.resolve("fake", CPU, torch.float64, field=narrow, grad=True, strict=True) is None
    assert registry.resolve("auto", CPU, torch.float64, field=narrow, grad=True) is None
    # a fused-only backend serves no per-layer op, and "auto" never gives one to the ops
    assert registry.resolve("auto", CPU, torch.float64) in ("cpu", "torch")
    with pytest.raises(ValueError, match="offers only a fused field"):
        registry.resolve("fake", CPU, torch.float64)
    assert "fake" not in jf.backends.available() and "fake" in jf.backends.available(fused=True)


def test_field_and_engine_follow_the_registry(fake):
    net = SparseODEnet.from_odenet(_net())
    t, z, v = _data()
    with torch.no_grad():
        assert net.fused_engine(z, v) == "fake"
        net.jvp(t, z, v)
    assert fake.runs == 1
    assert net.fused_engine(z, v) is None  # parameters require grad: per-layer
    wide = SparseODEnet.from_odenet(_net(hidden=(32, 528)))
    with torch.no_grad():
        assert wide.fused_engine(z) == ("cpu" if HAS_CPU_FIELD else None)


def test_negative_priority_is_never_auto(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.register_backend("slow", TorchBackend(), devices=("cpu",), priority=-5, fused=_FakeField())
    try:
        assert registry.resolve("auto", CPU, torch.float16, field=FieldShape((3, 8, 3))) != "slow"
        assert registry.resolve("slow", CPU, torch.float16, field=FieldShape((3, 8, 3))) == "slow"
        assert registry.resolve("auto", CPU, torch.float16) == "torch"
    finally:
        registry.unregister_backend("slow")


def test_env_var_overrides_auto_for_ops_and_fields(monkeypatch):
    net = SparseODEnet.from_odenet(_net())
    _, z, _ = _data()
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    with torch.no_grad():
        assert net.fused_engine(z) is None  # "torch" has no fused field
    assert registry.resolve("auto", CPU, torch.float32) == "torch"
    assert registry.resolve("cpu" if HAS_CPU_FIELD else "torch", CPU, torch.float32) != "auto"
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown block-sparse backend 'nope'"):
        registry.resolve("auto", CPU, torch.float32)
    # an explicit engine is not overridden
    if HAS_CPU_FIELD:
        forced = SparseODEnet.from_odenet(_net(), fused="cpu")
        with torch.no_grad():
            assert forced.fused_engine(z) == "cpu"


@needs_interpreter
def test_env_var_picks_triton_field(monkeypatch):
    net = SparseODEnet.from_odenet(_net())
    _, z, _ = _data()
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    with torch.no_grad():
        assert net.fused_engine(z) == "triton"


@needs_interpreter
def test_fused_engine_name_forces_it():
    net = _net()
    t, z, v = _data()
    forced = SparseODEnet.from_odenet(net, fused="triton")  # per-layer backend stays "auto"
    assert forced.backend == "auto" and forced.fused == "triton"
    with torch.no_grad():
        assert forced.fused_engine(z, v) == "triton"
        f, jv = forced.jvp(t, z, v)
        f0, jv0 = net.jvp(t, z, v)
        with pytest.raises(ValueError, match="fused field 'triton' cannot run"):
            forced.fused_engine(z.to(torch.bfloat16))  # the interpreter has no bfloat16: loud
    torch.testing.assert_close(f, f0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jv, jv0, rtol=1e-10, atol=1e-10)
    assert forced.fused_engine(z) is None  # a gradient is needed: per-layer ops
    model = jf.CNF(dim=3, net=net).double()
    assert jf.sparsify(model, fused="triton").net.fused == "triton"
    assert jf.sparsify(model, fused=False).net.fused is False


def test_fused_argument_errors():
    net = _net()
    with pytest.raises(ValueError, match="unknown or unavailable fused field 'tpu'"):
        SparseODEnet.from_odenet(net, fused="tpu")
    with pytest.raises(ValueError, match="unknown or unavailable fused field 'torch'"):
        SparseODEnet.from_odenet(net, fused="torch")  # a backend without a fused field
    with pytest.raises(TypeError, match="fused must be"):
        SparseODEnet.from_odenet(net, fused=1)
    if not cuda_backend.available():
        with pytest.raises(ValueError, match="unknown or unavailable fused field 'cuda'"):
            jf.sparsify(jf.CNF(dim=3, net=net), fused="cuda")
    if HAS_CPU_FIELD:
        forced = SparseODEnet.from_odenet(net, fused="cpu")
        with torch.no_grad(), pytest.raises(ValueError, match="fused field 'cpu' cannot run"):
            forced.fused_engine(torch.randn(4, 3, dtype=torch.float16))


def test_gpu_field_limits_are_stated():
    wide, deep = FieldShape((3, 528, 3)), FieldShape((3,) + (64,) * 17 + (3,))
    assert "512" in triton_backend.TritonField().check(wide, torch.float32, torch.device("cuda"))
    assert "512" in cuda_backend.CudaField().check(wide, torch.float32, torch.device("cuda"))
    assert "16" in cuda_backend.CudaField().check(deep, torch.float32, torch.device("cuda"))
    assert cuda_backend.CudaField().check(FieldShape((3, 512, 3)), torch.float32, torch.device("cuda")) is None


# ---- missing backends are loud ---------------------------------------------------------------------
def test_a_missing_backend_raises_instead_of_running_dense(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.register_backend("gone", TorchBackend(), devices=("cpu",))
    net = SparseODEnet.from_odenet(_net(), backend="gone", fused=False)
    registry.unregister_backend("gone")
    t, z, v = _data()
    with pytest.raises(ValueError, match="unknown block-sparse backend 'gone'"):
        net(t, z)
    with pytest.raises(ValueError, match="unknown block-sparse backend 'gone'"):
        net.jvp(t, z, v)
    with pytest.raises(ValueError, match="unknown or unavailable block-sparse backend 'gone'"):
        SparseODEnet.from_odenet(_net(), backend="gone")
    # "cuda" is a fused field only: it never serves a per-layer op
    assert "offers only a fused field" in registry.get("cuda").op_refusal(None, torch.float32, torch.device("cuda"))
    with pytest.raises(TypeError, match="needs the primitives"):
        registry.register_backend("empty", None)
    with pytest.raises(TypeError, match="fused field lacks"):
        registry.register_backend("half", None, fused=object())


# ---- import rules ----------------------------------------------------------------------------------
def test_importing_jsp_fast_does_not_import_triton():
    code = "import sys, jsp_fast, jsp_fast.sparse.backends.triton; assert 'triton' not in sys.modules, 'triton'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
