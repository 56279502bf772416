"""jf.prune: scores against finite differences, exact counts, determinism, masks that persist, errors."""
import copy
import sys

import pytest
import torch

import jsp_fast as jf
from jsp_fast.prune import _scores


def _tiny(seed=0, trace="exact"):
    """A float64 field with a fixed-step solver, so L and R are smooth functions of the weights."""
    torch.manual_seed(seed)
    return jf.CNF(2, hidden=(4, 3), activation="tanh", trace=trace, solver="rk4",
                  options={"step_size": 0.25}).double()


def _model(seed=0, hidden=(32, 32)):
    torch.manual_seed(seed)
    return jf.CNF(2, hidden=hidden, rtol=1e-3, atol=1e-3)


def _data(n=64, seed=1, dtype=torch.float32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _LR(model, x):
    with torch.no_grad():
        logp, stats = model.log_prob(x, return_stats=True)
    return float(-logp.mean()), float(stats["R"].mean())


# A few weights per layer; the central difference of L and R in float64 with h=1e-5 has error
# O(h²)·|third derivative| ≈ 1e-10 plus rounding ≈ 1e-16/h ≈ 1e-11, far below the 1e-6 tolerance.
PICKS = [("net.layers.0.linear.weight", (1, 0)), ("net.layers.1.linear.weight", (2, 3)),
         ("net.layers.2.linear.weight", (0, 1)), ("net.layers.2.linear.weight", (1, 2))]


def test_jsp_gradients_match_finite_differences():
    model, x = _tiny(), _data(16, dtype=torch.float64)
    params = model.prunable_parameters()
    dL, dR, L0, R0 = _scores.loss_and_R_grads(model, params, [x])
    assert L0 == pytest.approx(_LR(model, x)[0]) and R0 == pytest.approx(_LR(model, x)[1])
    names = list(params)
    h = 1e-5
    for name, idx in PICKS:
        w = params[name]
        with torch.no_grad():
            w[idx] += h
            Lp, Rp = _LR(model, x)
            w[idx] -= 2 * h
            Lm, Rm = _LR(model, x)
            w[idx] += h
        i = names.index(name)
        assert float(dL[i][idx]) == pytest.approx((Lp - Lm) / (2 * h), rel=1e-5, abs=1e-7)
        assert float(dR[i][idx]) == pytest.approx((Rp - Rm) / (2 * h), rel=1e-5, abs=1e-7)
    # prune() reports exactly dR ⊙ dL as the JSP score.
    result = jf.prune(copy.deepcopy(model), "jsp", 0.5, x)
    for i, name in enumerate(names):
        torch.testing.assert_close(result.scores[name], dR[i] * dL[i])
    assert result.info["L"] == pytest.approx(L0) and result.info["R"] == pytest.approx(R0)


def test_grasp_hessian_product_and_snip_match_finite_differences():
    model, x = _tiny(1), _data(16, dtype=torch.float64)
    params = model.prunable_parameters()
    g, hg = _scores.hessian_grad_product(model, params, [x])
    h = 1e-4
    with torch.no_grad():  # H g ≈ (∇L(θ + h g) − ∇L(θ − h g)) / 2h
        for p, gi in zip(params.values(), g):
            p.add_(gi, alpha=h)
    gp = _scores.loss_grads(model, params, [x])
    with torch.no_grad():
        for p, gi in zip(params.values(), g):
            p.add_(gi, alpha=-2 * h)
    gm = _scores.loss_grads(model, params, [x])
    with torch.no_grad():
        for p, gi in zip(params.values(), g):
            p.add_(gi, alpha=h)
    for a, b, c in zip(hg, gp, gm):
        torch.testing.assert_close(a, (b - c) / (2 * h), rtol=1e-4, atol=1e-7)
    grasp = jf.prune(copy.deepcopy(model), "grasp", 0.5, x)
    snip = jf.prune(copy.deepcopy(model), "snip", 0.5, x)
    for (name, p), gi, hi in zip(params.items(), g, hg):
        torch.testing.assert_close(grasp.scores[name], p.detach() * hi)  # keep largest θ⊙Hg
        torch.testing.assert_close(snip.scores[name], (p.detach() * gi).abs())


CASES = [(m, g, s) for m in jf.prune.METHODS for g in ("unstructured", "block") for s in ("global", "layer")]


@pytest.mark.parametrize("method,granularity,scope,sparsity",
                         [(*c, 0.9) for c in CASES]
                         + [(m, g, s, sp) for m in ("random", "magnitude") for g in ("unstructured", "block")
                            for s in ("global", "layer") for sp in (0.0, 0.37, 0.8, 0.93)])
def test_exact_sparsity_and_masks_applied(method, granularity, scope, sparsity):
    model, x = _model(), _data(32)
    result = jf.prune(model, method, sparsity, x, granularity=granularity, block=(8, 8), scope=scope,
                      rounds=5 if method == "synflow" else None)
    total = sum(p.numel() for p in model.prunable_parameters().values())
    target = round((1 - sparsity) * total)
    kept = sum(int(m.sum()) for m in result.masks.values())
    assert result.total == total and result.kept == kept
    assert abs(kept - target) <= (64 if granularity == "block" else 0)
    for name, p in model.prunable_parameters().items():
        mask = result.masks[name]
        assert mask.dtype == torch.bool and mask.any(), f"{name} emptied"
        assert torch.all(p[~mask] == 0)
        assert result.density[name] == pytest.approx(mask.float().mean().item())
        layer = model.get_submodule(name[: -len(".linear.weight")])
        assert torch.equal(layer.weight_mask, mask)
    if granularity == "block":  # first and last layers (2×32, 32×2) are smaller than 8×8 blocks
        assert set(result.fallback) == {"net.layers.0.linear.weight", "net.layers.2.linear.weight"}
        assert "smaller than the block" in result.fallback["net.layers.0.linear.weight"]
        m = result.masks["net.layers.1.linear.weight"].reshape(4, 8, 4, 8)
        assert torch.all(m.all(dim=(1, 3)) | ~m.any(dim=(1, 3)))  # whole blocks only
    else:
        assert result.fallback == {}


def test_dense_fallback_and_layer_scope_density():
    model = _model(hidden=(32, 32))
    r = jf.prune(model, "magnitude", 0.8, granularity="block", block=(8, 8), fallback="dense")
    assert r.density["net.layers.0.linear.weight"] == 1.0 and "dense" in r.fallback["net.layers.0.linear.weight"]
    assert abs(r.kept - round(0.2 * r.total)) <= 64
    r = jf.prune(_model(), "random", 0.75, scope="layer")
    for d in r.density.values():
        assert d == pytest.approx(0.25, abs=1 / 64)


def test_abs_scores_option():
    model, x = _model(), _data()
    x = x[:16]
    r = jf.prune(copy.deepcopy(model), "jsp", 0.9, x, abs_scores=True)
    signed = jf.prune(copy.deepcopy(model), "jsp", 0.9, x)
    for name in r.scores:
        torch.testing.assert_close(r.scores[name], signed.scores[name].abs())


@pytest.mark.parametrize("method", jf.prune.METHODS)
def test_deterministic_by_seed(method):
    x = _data(128)
    kw = dict(rounds=5, batch_size=32, n_batches=2)
    m1, m2 = _model(3), _model(3)
    m1.trace = m2.trace = "hutchinson"  # noise comes from the seed, not the global RNG
    torch.manual_seed(123)
    a = jf.prune(m1, method, 0.9, x, seed=5, **kw)
    torch.manual_seed(456)
    b = jf.prune(m2, method, 0.9, x, seed=5, **kw)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name])
        torch.testing.assert_close(a.scores[name], b.scores[name])
    if method == "random":
        c = jf.prune(_model(3), method, 0.9, seed=6)
        assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


@pytest.mark.parametrize("method", ["random", "jsp"])
def test_prune_leaves_global_rng_alone(method):
    model = _model()
    model.trace = "hutchinson"
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    jf.prune(model, method, 0.5, _data(), seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_synflow_uses_no_data():
    a = jf.prune(_model(), "synflow", 0.9, None, rounds=10)
    b = jf.prune(_model(), "synflow", 0.9, _data(50, seed=7), rounds=10)
    c = jf.prune(_model(), "synflow", 0.9, _data(50, seed=8) * 10, rounds=10)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]) and torch.equal(a.masks[name], c.masks[name])
        torch.testing.assert_close(a.scores[name], b.scores[name])
    assert a.info["rounds"] == 10


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_masks_survive_optimizer_steps(opt):
    model, x = _model(), _data()
    result = jf.prune(model, "jsp", 0.9, x)
    cls = torch.optim.Adam if opt == "adam" else torch.optim.AdamW
    optim = cls(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        optim.zero_grad()
        (-model.log_prob(x).mean()).backward()
        for name, p in model.prunable_parameters().items():
            assert torch.all(p.grad[~result.masks[name]] == 0)  # pruned weights get no gradient
        optim.step()
        model.apply_masks_()
    for name, p in model.prunable_parameters().items():
        assert torch.all(p[~result.masks[name]] == 0)
        assert torch.any(p[result.masks[name]] != 0)


def test_masks_survive_state_dict_deepcopy_and_checkpoint(tmp_path):
    model, x = _model(), _data()
    result = jf.prune(model, "snip", 0.8, x)
    sd = model.state_dict()
    mask_keys = [k for k in sd if k.endswith("weight_mask")]
    assert len(mask_keys) == len(result.masks)  # each mask stored once, as the buffer
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone.log_prob(x), model.log_prob(x))
    jf.save(tmp_path / "ckpt", model)
    loaded = jf.load(tmp_path / "ckpt")
    assert isinstance(loaded, jf.CNF)
    for name, mask in result.masks.items():
        layer = loaded.get_submodule(name[: -len(".linear.weight")])
        assert layer.weight_mask.dtype == torch.bool and torch.equal(layer.weight_mask, mask)
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name))
        assert torch.all(loaded.get_parameter(name)[~mask] == 0)
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))


def test_remove_pruning_bakes_masks():
    model, x = _model(), _data()
    result = jf.prune(model, "magnitude", 0.7)
    before = model.log_prob(x)
    assert jf.remove_pruning(model) is model
    assert not any(k.endswith("weight_mask") for k in model.state_dict())
    for name, p in model.prunable_parameters().items():
        assert torch.all(p[~result.masks[name]] == 0)
    torch.testing.assert_close(model.log_prob(x), before)


def test_bad_inputs():
    model = _model()
    for s in (-0.1, 1.0, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="sparsity must be"):
            jf.prune(model, "random", s)
    with pytest.raises(ValueError, match=r"unknown pruning method 'l1'.*'jsp'.*'synflow'"):
        jf.prune(model, "l1", 0.5)
    with pytest.raises(ValueError, match="unknown granularity"):
        jf.prune(model, "random", 0.5, granularity="row")
    with pytest.raises(ValueError, match="unknown scope"):
        jf.prune(model, "random", 0.5, scope="local")
    with pytest.raises(ValueError, match="unknown fallback"):
        jf.prune(model, "random", 0.5, granularity="block", fallback="skip")
    with pytest.raises(ValueError, match="block dims must be positive"):
        jf.prune(model, "random", 0.5, granularity="block", block=(0, 8))
    with pytest.raises(ValueError, match=r"does not divide layer net\.layers\.1\.linear\.weight.*"
                                         r"granularity='unstructured'"):
        jf.prune(_model(hidden=(48, 40)), "random", 0.5, granularity="block", block=(16, 16))
    with pytest.raises(ValueError, match=r"net\.layers\.0\.linear\.weight.*smaller than the block.*fallback="):
        jf.prune(model, "random", 0.5, granularity="block", block=(8, 8), fallback="error")
    with pytest.raises(ValueError, match="fewer than the"):
        jf.prune(model, "random", 0.99, granularity="block", block=(16, 16))
    for method in ("jsp", "snip", "grasp"):
        with pytest.raises(ValueError, match=f"method '{method}' scores with data"):
            jf.prune(model, method, 0.5, None)
    with pytest.raises(ValueError, match="non-empty"):
        jf.prune(model, "jsp", 0.5, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="dimension 3 but the model has dim=2"):
        jf.prune(model, "snip", 0.5, torch.randn(8, 3))
    with pytest.raises(TypeError, match="data must be"):
        jf.prune(model, "jsp", 0.5, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        jf.prune(model, "jsp", 0.5, torch.full((4, 2), float("nan")))
    assert not any(k.endswith("weight_mask") for k in model.state_dict())  # nothing was applied


@pytest.mark.parametrize("method,granularity", [("jsp", "unstructured"), ("snip", "block"), ("magnitude", "unstructured")])
def test_iterative_rounds_nest_and_hit_the_count(method, granularity, monkeypatch):
    """rounds=k: k scorings of the field pruned so far, densities (1-s)^(j/k), each mask inside the last."""
    prune_module = sys.modules["jsp_fast.prune"]  # (jf.prune is the function)
    seen = []
    real = prune_module.build_masks

    def spy(scores, sparsity, **kw):
        out = real(scores, sparsity, **kw)
        seen.append((sparsity, {n: m.clone() for n, m in out.items()}))
        return out

    monkeypatch.setattr(prune_module, "build_masks", spy)
    model, x = _model(), _data(32)
    res = jf.prune(model, method, 0.9, x, granularity=granularity, block=(8, 8), rounds=3)
    assert res.info["rounds"] == 3 and len(seen) == 3
    assert [round(sp, 6) for sp, _ in seen] == [round(1 - 0.1 ** (j / 3), 6) for j in (1, 2, 3)]
    for (_, a), (_, b) in zip(seen, seen[1:]):
        assert all(torch.all(b[n] <= a[n]) for n in a)  # pruned once, pruned for good
    total = sum(p.numel() for p in model.prunable_parameters().values())
    assert abs(res.kept - round(0.1 * total)) <= (64 if granularity == "block" else 0)
    assert all(torch.equal(res.masks[n], seen[-1][1][n]) for n in res.masks)


def test_iterative_jsp_differs_from_one_shot_and_is_deterministic():
    x = _data(32)
    one = jf.prune(_model(), "jsp", 0.9, x).masks
    it1 = jf.prune(_model(), "jsp", 0.9, x, rounds=4).masks
    it2 = jf.prune(_model(), "jsp", 0.9, x, rounds=4).masks
    assert all(torch.equal(it1[n], it2[n]) for n in it1)
    assert any(not torch.equal(one[n], it1[n]) for n in one)


def test_failed_round_leaves_the_model_untouched(monkeypatch):
    model, x = _model(), _data(32)
    before = copy.deepcopy(model.state_dict())
    calls = []
    real = _scores.loss_and_R_grads

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver blew up")
        return real(*a, **k)

    monkeypatch.setattr(_scores, "loss_and_R_grads", flaky)
    with pytest.raises(RuntimeError, match="blew up"):
        jf.prune(model, "jsp", 0.9, x, rounds=3)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_rounds():
    for r in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="rounds must be a positive int"):
            jf.prune(_model(), "random", 0.5, rounds=r)
    assert jf.prune(_model(), "synflow", 0.5, rounds=None).info["rounds"] == 100


# ------------------------------------------------------------------------------------------ layers=
DEEP = ("net.layers.0.linear.weight", "net.layers.1.linear.weight", "net.layers.2.linear.weight",
        "net.layers.3.linear.weight")


def _deep(seed=0):
    """2->32, 32->32, 32->32, 32->2; a fixed-step solve keeps the GraSP/JSP scoring passes cheap."""
    torch.manual_seed(seed)
    return jf.CNF(2, hidden=(32, 32, 32), solver="rk4", options={"step_size": 0.5})


def _untouched(model, before, names):
    for name in names:
        layer = model.get_submodule(name[: -len(".linear.weight")])
        assert layer.mask is None and "weight_mask" not in dict(layer.named_buffers())
        assert torch.equal(model.get_parameter(name), before[name]) and before[name].ne(0).all()


@pytest.mark.parametrize("granularity", ["unstructured", "block"])
def test_layers_hidden_excludes_first_and_last_with_exact_density(granularity):
    model, x = _deep(), _data(32)
    before = {n: p.detach().clone() for n, p in model.prunable_parameters().items()}
    r = jf.prune(model, "magnitude", 0.9, x, layers="hidden", granularity=granularity, block=(8, 8))
    assert r.layers == DEEP[1:3] and r.excluded == (DEEP[0], DEEP[3])
    assert set(r.masks) == set(r.density) == set(r.scores) == set(DEEP[1:3])
    assert r.total == 2 * 32 * 32
    assert abs(r.kept - round(0.1 * 2048)) <= (64 if granularity == "block" else 0)
    assert r.fallback == {}  # the tiny first/last layers are not blocked, so they need no fallback
    _untouched(model, before, r.excluded)
    field_kept = sum(int(p.ne(0).sum()) for p in model.prunable_parameters().values())
    assert field_kept == r.kept + 64 + 64
    assert "excluded=" in repr(r)


def test_layers_hidden_block_count_is_within_one_block():
    r = jf.prune(_deep(), "random", 0.8, layers="hidden", granularity="block", block=(8, 8), scope="layer")
    assert abs(r.kept - round(0.2 * 2048)) <= 64 and r.kept % 64 == 0
    for name in DEEP[1:3]:
        m = r.masks[name].reshape(4, 8, 4, 8)
        assert torch.all(m.all(dim=(1, 3)) | ~m.any(dim=(1, 3)))


def test_layers_all_is_the_default_and_selection_keeps_the_scores():
    x = _data(32)
    a = jf.prune(_deep(), "jsp", 0.9, x)
    b = jf.prune(_deep(), "jsp", 0.9, x, layers="all")
    h = jf.prune(_deep(), "jsp", 0.9, x, layers="hidden")
    assert a.layers == DEEP and a.excluded == ()
    for name in DEEP:
        assert torch.equal(a.masks[name], b.masks[name])
    for name in DEEP[1:3]:  # the scores are those of the whole field; only the ranking is restricted
        torch.testing.assert_close(h.scores[name], a.scores[name])
    r = jf.prune(_deep(), "random", 0.9, layers="hidden", seed=4)
    full = jf.prune(_deep(), "random", 0.9, seed=4)
    for name in DEEP[1:3]:
        torch.testing.assert_close(r.scores[name], full.scores[name])


@pytest.mark.parametrize("spec,expect", [
    ("net.layers.1.*", DEEP[1:2]),
    ("net.layers.[03].linear.weight", (DEEP[0], DEEP[3])),
    (["net.layers.2.linear.weight", "net.layers.0.*"], (DEEP[0], DEEP[2])),
    (("net.layers.3.linear.weight",), DEEP[3:]),
    (lambda name: not name.startswith("net.layers.0."), DEEP[1:]),
])
def test_layers_name_filter(spec, expect):
    model = _deep()
    before = {n: p.detach().clone() for n, p in model.prunable_parameters().items()}
    r = jf.prune(model, "random", 0.75, layers=spec, scope="layer")
    assert r.layers == expect and set(r.masks) == set(expect)
    assert r.excluded == tuple(n for n in DEEP if n not in expect)
    _untouched(model, before, r.excluded)
    for name in expect:
        assert r.density[name] == pytest.approx(0.25, abs=1 / 64)


def test_layers_bad_or_empty_selection():
    model = _deep()
    for spec, why in [("net.layers.9.*", "selects no prunable"), (lambda n: False, "selects no prunable"),
                      ("hiden", "selects no prunable"), ([], "bad layers"), (5, "bad layers"), (None, "bad layers"),
                      ([1, 2], "bad layers"), (["net.layers.1.*", "nope"], "'nope' matches no prunable")]:
        with pytest.raises(ValueError, match=why) as e:
            jf.prune(model, "random", 0.5, layers=spec)
        msg = str(e.value)
        assert "'all', 'hidden'" in msg and all(n in msg for n in DEEP), msg
    with pytest.raises(ValueError, match=r"'hidden' selects nothing: the field has 2 prunable"):
        jf.prune(_model(hidden=(32,)), "random", 0.5, layers="hidden")
    assert not any(k.endswith("weight_mask") for k in model.state_dict())


@pytest.mark.parametrize("method", jf.prune.METHODS)
@pytest.mark.parametrize("granularity,scope,rounds", [("unstructured", "global", 1), ("block", "layer", 2)])
def test_every_method_accepts_layers_hidden(method, granularity, scope, rounds):
    model, x = _deep(), _data(32)
    before = {n: p.detach().clone() for n, p in model.prunable_parameters().items()}
    r = jf.prune(model, method, 0.9, x, layers="hidden", granularity=granularity, block=(8, 8), scope=scope,
                 rounds=rounds)
    assert r.layers == DEEP[1:3] and r.info["rounds"] == rounds
    assert abs(r.kept - round(0.1 * 2048)) <= (64 if granularity == "block" else 0)
    for name in r.layers:
        mask = r.masks[name]
        assert mask.any() and torch.all(model.get_parameter(name)[~mask] == 0)
    _untouched(model, before, r.excluded)
    assert torch.equal(r.first_layer_inputs, torch.tensor([32, 32]))  # the input layer stayed dense


def test_first_layer_inputs_counts_kept_weights_per_input_column():
    model, x = _deep(), _data(32)
    r = jf.prune(model, "jsp", 0.95, x)
    counts = r.first_layer_inputs
    assert counts.dtype == torch.int64 and counts.shape == (2,)
    m = r.masks[DEEP[0]]
    assert counts.tolist() == [int(m[:, 0].sum()), int(m[:, 1].sum())]
    assert int(counts.sum()) == int(m.sum())
    mask = torch.zeros(32, 2, dtype=torch.bool)  # by hand: 19 vs 3 kept weights
    mask[:19, 0] = True
    mask[5:8, 1] = True
    model.get_submodule("net.layers.0").set_mask(mask)
    from jsp_fast.prune import _first_layer_inputs
    assert _first_layer_inputs(model, DEEP[0]).tolist() == [19, 3]
