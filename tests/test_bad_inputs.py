"""The bad-input matrix: each public function × each kind of bad input gives the documented error
type with a message saying what was expected (README, "Bad input"). Cases that crash or mislead
today are ``xfail(strict=True)`` with the reason, so fixing one turns its test red until the marker
goes."""
from __future__ import annotations

import pytest
import torch

import jsp_fast as jf

NAN = float("nan")


def cnf(**kw):
    torch.manual_seed(0)
    return jf.CNF(2, hidden=(16, 16), rtol=1e-3, atol=1e-3, **kw)


def X(n=32, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1))


def block_weight():
    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(64, 32, dtype=torch.bool)
    mask[:32, :16] = mask[32:, 16:] = True
    return W, mask, jf.sparse.BlockSparseWeight.from_dense(W, mask, block=(16, 16))


def saved(tmp_path):
    jf.save(tmp_path / "ck", cnf())
    return tmp_path / "ck"


def _missing_cuda():
    return pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")



# (id, call(tmp_path), expected exception, message regex)
CASES = [
    # -- jf.CNF construction: values and names
    ("CNF/dim-zero", lambda t: jf.CNF(0), ValueError, r"dim must be a positive int, got 0"),
    ("CNF/dim-float", lambda t: jf.CNF(2.5), ValueError, r"positive int"),
    ("CNF/hidden-zero", lambda t: jf.CNF(2, hidden=(0,)), ValueError, r"positive integers"),
    ("CNF/hidden-string", lambda t: jf.CNF(2, hidden="64"), (TypeError, ValueError), r"hidden"),
    ("CNF/unknown-activation", lambda t: jf.CNF(2, activation="swish"), ValueError, r"unknown activation 'swish'"),
    ("CNF/unknown-trace", lambda t: jf.CNF(2, trace="foo"), ValueError, r"unknown trace 'foo'; expected"),
    ("CNF/unknown-solver", lambda t: jf.CNF(2, solver="rk99"), ValueError, r"unknown solver 'rk99'; expected"),
    ("CNF/unknown-noise", lambda t: jf.CNF(2, trace="hutchinson", noise="x"), ValueError, r"unknown noise"),
    ("CNF/rtol-negative", lambda t: jf.CNF(2, rtol=-1.0), ValueError, r"rtol and atol must be positive"),
    ("CNF/rtol-nan", lambda t: jf.CNF(2, rtol=NAN), ValueError, r"must be positive"),
    ("CNF/T-inf", lambda t: jf.CNF(2, T=float("inf")), ValueError, r"positive finite"),
]

for meth in ("log_prob", "transform"):
    def call(x, meth=meth):
        return getattr(cnf(), meth)(x)

    CASES += [
        (f"{meth}/wrong-dim", lambda t, c=call: c(X(dim=3)), ValueError, r"shape \[n, 2\], got \(32, 3\)"),
        (f"{meth}/1-D", lambda t, c=call: c(torch.randn(2)), ValueError, r"shape \[n, 2\], got \(2,\)"),
        (f"{meth}/3-D", lambda t, c=call: c(torch.randn(4, 8, 2)), ValueError, r"shape \[n, 2\]"),
        (f"{meth}/int-dtype", lambda t, c=call: c(torch.ones(4, 2, dtype=torch.long)), TypeError, r"floating-point"),
        (f"{meth}/float64-vs-float32", lambda t, c=call: c(X().double()), TypeError, r"float64 but the model is"),
        (f"{meth}/not-a-tensor", lambda t, c=call: c([[0.0, 1.0]]), TypeError, r"torch.Tensor of shape \[n, 2\]"),
        (f"{meth}/meta-input", lambda t, c=call: c(torch.empty(4, 2, device="meta")), ValueError,
         r"x is on the meta device"),
        (f"{meth}/nan", lambda t, c=call: c(torch.tensor([[NAN, 0.0]])), ValueError, r"NaN or inf"),
        (f"{meth}/inf", lambda t, c=call: c(torch.tensor([[float("inf"), 0.0]])), ValueError, r"NaN or inf"),
    ]

CASES += [
    ("sample/n-zero", lambda t: cnf().sample(0), ValueError, r"n must be a positive int, got 0"),
    ("sample/n-float", lambda t: cnf().sample(2.5), ValueError, r"positive int"),
    ("CNF/meta-model", lambda t: cnf().to("meta").log_prob(torch.empty(4, 2, device="meta")), ValueError, r"meta"),

    # -- jf.prune
    ("prune/sparsity-one", lambda t: jf.prune(cnf(), "random", 1.0, data=X()), ValueError, r"\[0, 1\), got 1.0"),
    ("prune/sparsity-negative", lambda t: jf.prune(cnf(), "random", -0.1, data=X()), ValueError, r"\[0, 1\)"),
    ("prune/sparsity-nan", lambda t: jf.prune(cnf(), "random", NAN, data=X()), ValueError, r"\[0, 1\)"),
    ("prune/unknown-method", lambda t: jf.prune(cnf(), "best", 0.5, data=X()), ValueError,
     r"unknown pruning method 'best'; expected one of"),
    ("prune/no-data", lambda t: jf.prune(cnf(), "jsp", 0.5), ValueError, r"scores with data"),
    ("prune/data-wrong-dim", lambda t: jf.prune(cnf(), "jsp", 0.5, data=X(dim=3)), ValueError, r"dimension 3"),
    ("prune/data-1-D", lambda t: jf.prune(cnf(), "jsp", 0.5, data=torch.randn(2)), ValueError, r"\[n, 2\]"),
    ("prune/data-nan", lambda t: jf.prune(cnf(), "jsp", 0.5, data=torch.full((8, 2), NAN)), ValueError, r"NaN"),
    ("prune/data-empty", lambda t: jf.prune(cnf(), "jsp", 0.5, data=torch.empty(0, 2)), ValueError, r"non-empty"),
    ("prune/data-int", lambda t: jf.prune(cnf(), "jsp", 0.5, data=torch.ones(8, 2, dtype=torch.long)), TypeError,
     r"floating point"),
    ("prune/data-meta", lambda t: jf.prune(cnf(), "jsp", 0.5, data=torch.empty(8, 2, device="meta")),
     ValueError, r"meta"),
    ("prune/block-zero", lambda t: jf.prune(cnf(), "random", 0.5, granularity="block", block=(0, 4)), ValueError,
     r"block dims must be positive, got \(0, 4\)"),
    ("prune/unknown-granularity", lambda t: jf.prune(cnf(), "random", 0.5, granularity="x"), ValueError,
     r"unknown granularity"),
    ("prune/unknown-scope", lambda t: jf.prune(cnf(), "random", 0.5, scope="x"), ValueError, r"unknown scope"),
    ("prune/not-a-CNF", lambda t: jf.prune(torch.nn.Linear(2, 2), "random", 0.5), TypeError, r"jf.CNF"),

    # -- jf.train
    ("train/steps-zero", lambda t: jf.train(cnf(), X(), steps=0, progress=False), ValueError, r"steps"),
    ("train/batch-zero", lambda t: jf.train(cnf(), X(), steps=1, batch_size=0, progress=False), ValueError,
     r"batch_size"),
    ("train/lr-nan", lambda t: jf.train(cnf(), X(), steps=1, lr=NAN, progress=False), ValueError, r"lr"),
    ("train/unknown-reg", lambda t: jf.train(cnf(), X(), steps=1, reg={"foo": 1.0}, progress=False), ValueError,
     r"unknown reg key"),
    ("train/data-wrong-dim", lambda t: jf.train(cnf(), X(dim=3), steps=1, progress=False), ValueError,
     r"dimension 3"),
    ("train/data-1-D", lambda t: jf.train(cnf(), torch.randn(32), steps=1, progress=False), ValueError,
     r"\[n, dim\]"),
    ("train/data-nan", lambda t: jf.train(cnf(), torch.full((32, 2), NAN), steps=1, progress=False), ValueError,
     r"NaN or inf"),
    ("train/data-empty", lambda t: jf.train(cnf(), torch.empty(0, 2), steps=1, progress=False), ValueError,
     r"empty"),
    ("train/val-empty", lambda t: jf.train(cnf(), X(), torch.empty(0, 2), steps=1, progress=False), ValueError,
     r"val data is empty"),
    ("train/data-int", lambda t: jf.train(cnf(), torch.ones(32, 2, dtype=torch.long), steps=1, progress=False),
     TypeError, r"floating-point"),
    ("train/data-float64", lambda t: jf.train(cnf(), X().double(), steps=1, progress=False), TypeError,
     r"float64"),
    ("train/data-meta", lambda t: jf.train(cnf(), torch.empty(32, 2, device="meta"), steps=1, progress=False),
     ValueError, r"meta"),
    ("train/not-a-CNF", lambda t: jf.train(torch.nn.Linear(2, 2), X(), steps=1, progress=False), TypeError,
     r"jf.CNF"),

    # -- jf.save / jf.load
    ("save/not-a-CNF", lambda t: jf.save(t / "c", torch.nn.Linear(2, 2)), TypeError, r"can only save a jf.CNF"),
    ("save/onto-a-file", lambda t: (t / "f").write_text("x") and jf.save(t / "f", cnf()), FileExistsError,
     r"not a jsp_fast checkpoint; refusing"),
    ("load/missing", lambda t: jf.load(t / "nope"), jf.training.CheckpointError, r"does not exist"),
    ("load/a-file", lambda t: (t / "f").write_text("x") and jf.load(t / "f"), jf.training.CheckpointError,
     r"is a file"),
    ("load/not-a-checkpoint", lambda t: jf.load(t), jf.training.CheckpointError, r"not a jsp_fast checkpoint"),
    ("load/path-None", lambda t: jf.load(None), TypeError, r"str or Path"),
    pytest.param("load/missing-cuda", lambda t: jf.load(saved(t), device="cuda"), ValueError, r"CUDA",
                 marks=_missing_cuda()),
    ("load/unknown-device", lambda t: jf.load(saved(t), device="tpu"), ValueError, r"tpu"),

    # -- jf.sparsify
    ("sparsify/not-a-module", lambda t: jf.sparsify("x"), TypeError, r"expects an nn.Module"),
    ("sparsify/unknown-backend", lambda t: jf.sparsify(cnf(), backend="foo"), ValueError,
     r"unknown or unavailable block-sparse backend 'foo'"),

    # -- jf.ops.bsr_linear and its weight
    ("from_dense/mask-wrong-shape", lambda t: jf.sparse.BlockSparseWeight.from_dense(
        block_weight()[0], block_weight()[1][:32], block=(16, 16)), ValueError, r"mask has shape \(32, 32\)"),
    ("from_dense/block-not-dividing", lambda t: jf.sparse.BlockSparseWeight.from_dense(
        block_weight()[0], block_weight()[1], block=(24, 16)), ValueError, r"not a multiple of the block"),
    ("from_dense/1-D-weight", lambda t: jf.sparse.BlockSparseWeight.from_dense(
        block_weight()[0][0], block_weight()[1][0], block=(16, 16)), ValueError, r"2-d tensor"),
    ("bsr_linear/wrong-features", lambda t: jf.ops.bsr_linear(torch.randn(8, 31), block_weight()[2]), ValueError,
     r"x must be \[\.\.\., 32\]"),
    ("bsr_linear/float64-vs-float32", lambda t: jf.ops.bsr_linear(torch.randn(8, 32).double(), block_weight()[2]),
     TypeError, r"float64 but the weight is torch.float32"),
    ("bsr_linear/int-dtype", lambda t: jf.ops.bsr_linear(torch.ones(8, 32, dtype=torch.long), block_weight()[2]),
     TypeError, r"int64"),
    ("bsr_linear/meta-input", lambda t: jf.ops.bsr_linear(torch.empty(8, 32, device="meta"), block_weight()[2]),
     ValueError, r"x is on meta but the weight is on cpu"),
    ("bsr_linear/scale-wrong-size", lambda t: jf.ops.bsr_linear(torch.randn(8, 32), block_weight()[2],
                                                                scale=torch.ones(7)), ValueError, r"64 outputs"),
    ("bsr_linear/bias-2-D", lambda t: jf.ops.bsr_linear(torch.randn(8, 32), block_weight()[2],
                                                        bias=torch.ones(1, 64)), ValueError, r"vector"),
    ("bsr_linear/unknown-activation", lambda t: jf.ops.bsr_linear(torch.randn(8, 32), block_weight()[2],
                                                                  activation="swish"), ValueError,
     r"unknown activation 'swish'"),
    ("bsr_linear/dense-weight", lambda t: jf.ops.bsr_linear(torch.randn(8, 32), torch.randn(64, 32)), TypeError,
     r"BlockSparseWeight"),
    ("bsr_linear/not-a-tensor", lambda t: jf.ops.bsr_linear([[0.0] * 32], block_weight()[2]), TypeError,
     r"must be a tensor"),
    ("bsr_linear_jvp/tangent-wrong-features", lambda t: jf.ops.bsr_linear_jvp(
        torch.randn(8, 32), torch.randn(8, 31), block_weight()[2], None, None, None), ValueError, r"x_dot"),

    # -- jf.data.get
    ("data/unknown-name", lambda t: jf.data.get("nosuch"), ValueError, r"unknown dataset 'nosuch'; expected"),
    ("data/n-zero", lambda t: jf.data.get("moons", n=0), ValueError, r"positive int"),
    ("data/n-too-small", lambda t: jf.data.get("moons", n=4), ValueError, r"at least 5"),
    ("data/seed-negative", lambda t: jf.data.get("moons", seed=-1), ValueError, r"non-negative"),
    ("data/unknown-option", lambda t: jf.data.get("moons", alpha=1), ValueError, r"no extra options"),
    ("data/tabular-no-root", lambda t: jf.data.get("power"), ValueError, r"needs root="),
    ("data/tabular-missing-files", lambda t: jf.data.get("power", root=t), FileNotFoundError, r"does not exist"),
]


CASES = [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in CASES]
CASES = [c if c.id else pytest.param(*c.values, marks=c.marks, id=c.values[0]) for c in CASES]


@pytest.mark.parametrize("case, call, exc, match", CASES)
def test_bad_input(tmp_path, one_thread, case, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


# -- the inputs that are fine: non-contiguous tensors, a 1-D input where an op documents it,
# an empty batch for the op, NaN propagating through a linear map (as in F.linear)
def test_non_contiguous_inputs_give_the_contiguous_result(one_thread):
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)).t()
    assert not x.is_contiguous()
    m = cnf()
    with torch.no_grad():
        torch.testing.assert_close(m.log_prob(x), m.log_prob(x.contiguous()))
        torch.testing.assert_close(m.transform(x), m.transform(x.contiguous()))
    xs = torch.randn(32, 8, generator=torch.Generator().manual_seed(4)).t()
    w = block_weight()[2]
    torch.testing.assert_close(jf.ops.bsr_linear(xs, w), jf.ops.bsr_linear(xs.contiguous(), w))
    r1 = jf.prune(cnf(), "jsp", 0.5, data=x)
    r2 = jf.prune(cnf(), "jsp", 0.5, data=x.contiguous())
    assert all(torch.equal(r1.masks[k], r2.masks[k]) for k in r1.masks)
    assert len(jf.train(cnf(), x, steps=1, batch_size=8, progress=False).rows) == 2


def test_bsr_linear_follows_f_linear_on_1d_empty_and_nan():
    W, mask, w = block_weight()
    ref = W * mask
    x1 = torch.randn(32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(jf.ops.bsr_linear(x1, w), torch.nn.functional.linear(x1, ref))
    assert jf.ops.bsr_linear(torch.empty(0, 32), w).shape == (0, 64)
    xn = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    xn[1, 0] = NAN
    y = jf.ops.bsr_linear(xn, w)
    assert torch.isnan(y[1]).any() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("meth", ["log_prob", "transform"])
def test_empty_batch(meth):
    """An empty batch either gives an empty result or a ValueError that says so; never a solver error."""
    try:
        out = getattr(cnf(), meth)(torch.empty(0, 2))
    except ValueError as exc:
        assert "empty" in str(exc)
    else:
        assert out.shape[0] == 0
