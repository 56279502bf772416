"""Checkpoints: safetensors + JSON round trips (dense, pruned, trainer state), atomic writes."""
import json
import os

import pytest
import torch

import jsp_fast as jf
from jsp_fast.training import checkpoint as ckpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("hidden", (8, 8))
    return jf.CNF(2, rtol=1e-4, atol=1e-4, **kw)


def _prune_randomly(model, density=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in model.net.layers:
        m = torch.rand(layer.linear.weight.shape, generator=g) < density
        layer.set_mask(m)
        masks[id(layer)] = m
    return masks


X = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))


def test_dense_round_trip(tmp_path):
    model = _model()
    want = model.log_prob(X)
    path = jf.save(tmp_path / "dense", model)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = jf.load(path)
    assert loaded.config() == model.config()
    assert not any(k.endswith("weight_mask") for k in loaded.state_dict())
    assert torch.equal(loaded.log_prob(X), want)


def test_pruned_round_trip_keeps_masks_once(tmp_path):
    model = _model(hidden=(16, 16))
    _prune_randomly(model)
    want = model.log_prob(X)
    path = jf.save(tmp_path / "pruned", model)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("weight_mask") for k in keys) == len(model.net.layers)
    assert not any("orig" in k for k in keys)
    loaded = jf.load(path)
    for a, b in zip(model.net.layers, loaded.net.layers):
        assert b.mask is not None and b.mask.dtype == torch.bool and torch.equal(a.mask, b.mask)
        assert torch.equal(a.linear.weight, b.linear.weight)
    assert torch.equal(loaded.log_prob(X), want)
    assert json.loads((path / "config.json").read_text())["masks"] == [f"net.layers.{i}" for i in range(3)]


def test_learned_end_time_round_trip(tmp_path):
    model = _model(train_T=True, T=0.7)
    loaded = jf.load(jf.save(tmp_path / "c", model))
    assert isinstance(loaded.sqrt_T, torch.nn.Parameter)
    assert torch.equal(loaded.log_prob(X), model.log_prob(X))


def test_optimizer_history_and_extra_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(2):
        opt.zero_grad()
        (-model.log_prob(X).mean()).backward()
        opt.step()
    from jsp_fast.training import History
    hist = History([{"step": 1, "train_nll": 2.5}], meta={"a": 1})
    rng = torch.get_rng_state()
    ckpt.save(tmp_path / "c", model, optimizer=opt, history=hist, extra={"step": 2, "rng": rng, "tag": "x"})
    state = ckpt.load_checkpoint(tmp_path / "c")
    assert state.extra["step"] == 2 and state.extra["tag"] == "x" and torch.equal(state.extra["rng"], rng)
    assert state.history.rows == hist.rows and state.history.meta == hist.meta
    opt2 = torch.optim.Adam(state.model.parameters(), lr=1.0)
    opt2.load_state_dict(state.optimizer)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-2
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k]), (pid, k)


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c"
    old = _model(seed=0)
    jf.save(path, old)
    new = _model(seed=1)
    real = ckpt._write
    calls = []

    def crash(p, data):  # dies after the weights are written, before config.json
        calls.append(p.name)
        if p.name == "config.json":
            raise KeyboardInterrupt("simulated crash")
        return real(p, data)

    monkeypatch.setattr(ckpt, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        jf.save(path, new, optimizer=torch.optim.Adam(new.parameters()))
    assert "model.safetensors" in calls
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary left behind
    assert torch.equal(jf.load(path).log_prob(X), old.log_prob(X))


def test_crash_between_renames_falls_back_to_previous(tmp_path, monkeypatch):
    path = tmp_path / "c"
    old = _model(seed=0)
    jf.save(path, old)
    real = os.rename
    n = []

    def rename(a, b):
        n.append(1)
        real(a, b)
        if len(n) == 1:  # the old checkpoint has been moved aside: die before the new one lands
            raise SystemExit("simulated power loss")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SystemExit):
        jf.save(path, _model(seed=1))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted save"):
        got = jf.load(path)
    assert torch.equal(got.log_prob(X), old.log_prob(X))
    jf.save(path, got)  # the next good save clears the moved-aside copy
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_half_written_directory_is_rejected(tmp_path):
    path = jf.save(tmp_path / "c", _model())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        jf.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        jf.load(path)
    assert not ckpt.exists(tmp_path / "nothing")


def test_bad_paths(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        jf.load(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("user data")
    with pytest.raises(ckpt.CheckpointError, match="not a jsp_fast checkpoint"):
        jf.load(tmp_path / "d")
    with pytest.raises(FileExistsError, match="refusing"):
        jf.save(tmp_path / "d", _model())
    assert (tmp_path / "d" / "mine.txt").read_text() == "user data"


def test_never_unpickles(tmp_path, monkeypatch):
    path = jf.save(tmp_path / "c", _model(), optimizer=torch.optim.Adam(_model().parameters()))

    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    import pickle
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    ckpt.load_checkpoint(path)
    assert {p.suffix for p in path.iterdir()} <= {".json", ".safetensors"}
