"""Checkpoints are checked by schema before any tensor reaches a module: every defect is a
CheckpointError naming the file and the field, and nothing outside the directory is ever read."""
import hashlib
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import jsp_fast as jf
from jsp_fast.errors import CheckpointError
from jsp_fast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, hidden=(8, 8)):
    torch.manual_seed(seed)
    m = jf.CNF(2, hidden=hidden, rtol=1e-3, atol=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in m.net.layers:
        layer.set_mask(torch.rand(layer.linear.weight.shape, generator=g) < 0.5)
    return m


@pytest.fixture
def saved(tmp_path):
    """A pruned model with an optimizer and a history, saved; its directory."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    (-m.log_prob(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))).mean()).backward()
    opt.step()
    hist = jf.training.History([{"step": 1, "train_nll": 3.0}])
    return jf.save(tmp_path / "ck", m, optimizer=opt, history=hist, extra={"step": 1, "rng": torch.get_rng_state()})


def _cfg(path):
    return json.loads((path / "config.json").read_text())


def _put_cfg(path, cfg):
    (path / "config.json").write_text(json.dumps(cfg) if not isinstance(cfg, bytes) else cfg.decode())


def _put_file(path, name, data: bytes):
    """Replace a data file and fix its manifest entry, so only the schema can catch the defect."""
    (path / name).write_bytes(data)
    cfg = _cfg(path)
    cfg["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _put_cfg(path, cfg)


def _edit_tensors(path, fn, name="model.safetensors"):
    sd = st_load((path / name).read_bytes())
    fn(sd)
    _put_file(path, name, st_save(sd))


def _edit_cfg(fn):
    def edit(path):
        cfg = _cfg(path)
        fn(cfg)
        _put_cfg(path, cfg)
    return edit


def _set_model(key, value):
    return _edit_cfg(lambda c: c["model"].__setitem__(key, value))


def _state_json(fn):
    def edit(path):
        sj = json.loads((path / "state.json").read_text())
        fn(sj)
        _put_file(path, "state.json", json.dumps(sj).encode())
    return edit


def _nan(sd):
    sd["net.layers.1.linear.weight"][0, 0] = float("nan")


CASES = {
    # config.json itself
    "config_is_a_list": (lambda p: _put_cfg(p, [1, 2]), "config.json"),
    "config_is_a_string": (lambda p: _put_cfg(p, "jsp_fast.checkpoint"), "config.json"),
    "files_null": (_edit_cfg(lambda c: c.__setitem__("files", None)), "'files'"),
    "files_entry_a_string": (_edit_cfg(lambda c: c["files"].__setitem__("model.safetensors", "x")),
                             "files.model.safetensors"),
    "sha256_not_hex": (_edit_cfg(lambda c: c["files"]["model.safetensors"].__setitem__("sha256", 5)), "sha256"),
    "version_a_string": (_edit_cfg(lambda c: c.__setitem__("version", "one")), "'version'"),
    "version_a_float": (_edit_cfg(lambda c: c.__setitem__("version", 1.5)), "'version'"),
    "version_from_the_future": (_edit_cfg(lambda c: c.__setitem__("version", 99)), "upgrade jsp_fast"),
    "class_not_cnf": (_edit_cfg(lambda c: c.__setitem__("class", "Evil")), "'class'"),
    "masks_not_a_list": (_edit_cfg(lambda c: c.__setitem__("masks", "net")), "'masks'"),
    "masks_name_no_layer": (_edit_cfg(lambda c: c.__setitem__("masks", ["net.nope"])), "net.nope"),
    "extra_a_list": (_edit_cfg(lambda c: c.__setitem__("extra", [1])), "'extra'"),
    "manifest_names_a_path": (_edit_cfg(lambda c: c["files"].__setitem__(
        "../outside.safetensors", c["files"]["model.safetensors"])), "outside.safetensors"),
    # the model config
    "model_missing": (_edit_cfg(lambda c: c.pop("model")), "'model'"),
    "model_a_list": (_edit_cfg(lambda c: c.__setitem__("model", [2, 8])), "'model'"),
    "dim_a_string": (_set_model("dim", "2"), "model.dim"),
    "hidden_a_dict": (_set_model("hidden", {"a": 1}), "model.hidden"),
    "hidden_negative": (_set_model("hidden", [8, -8]), "model.hidden"),
    "hidden_absurd": (_set_model("hidden", [1_000_000_000]), "model.hidden"),
    "hidden_too_many_parameters": (_set_model("hidden", [100_000, 100_000]), "refusing more than"),
    "activation_unknown": (_set_model("activation", "gelu2"), "model.activation"),
    "rtol_negative": (_set_model("rtol", -1.0), "model.rtol"),
    "T_nan": (_set_model("T", float("nan")), "model.T"),
    "adjoint_a_string": (_set_model("adjoint", "yes"), "model.adjoint"),
    "unknown_model_field_with_a_path": (_set_model("root", "/etc/passwd"), "model.root"),
    "solver_options_not_a_dict": (_set_model("options", [1]), "model.options"),
    "max_num_steps_negative": (_set_model("options", {"max_num_steps": -1}), "max_num_steps"),
    "step_size_zero": (_set_model("options", {"step_size": 0}), "step_size"),
    "unknown_solver_option": (_set_model("options", {"norm": "os.system"}), "unknown solver option"),
    # tensors
    "safetensors_garbage": (lambda p: _put_file(p, "model.safetensors", b"\xff" * 64), "model.safetensors"),
    "safetensors_huge_header_length": (lambda p: _put_file(p, "model.safetensors",
                                                           (10**12).to_bytes(8, "little") + b"{}"),
                                       "model.safetensors"),
    "mask_wrong_shape": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "net.layers.0.weight_mask", torch.ones(3, 3, dtype=torch.bool))), "net.layers.0.weight_mask"),
    "mask_not_bool": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "net.layers.0.weight_mask", sd["net.layers.0.weight_mask"].float())), "bool mask"),
    "weight_wrong_shape": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "net.layers.1.linear.weight", torch.zeros(8, 7))), "net.layers.1.linear.weight"),
    "weight_integer": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "net.layers.1.linear.bias", torch.zeros(8, dtype=torch.int64))), "floating-point"),
    "unexpected_tensor": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__("net.evil", torch.zeros(2))),
                          "unexpected"),
    "missing_tensor": (lambda p: _edit_tensors(p, lambda sd: sd.pop("net.layers.2.linear.bias")), "missing"),
    "nan_parameter": (lambda p: _edit_tensors(p, _nan), "NaN"),
    "optimizer_tensor_nan": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "optimizer.0.exp_avg", torch.full_like(sd["optimizer.0.exp_avg"], float("inf"))), "state.safetensors"),
        "NaN or inf"),
    "state_tensor_unknown_name": (lambda p: _edit_tensors(p, lambda sd: sd.__setitem__(
        "weird", torch.zeros(1)), "state.safetensors"), "unexpected tensors"),
    # state.json
    "state_json_garbage": (lambda p: _put_file(p, "state.json", b"{not json"), "state.json"),
    "state_json_a_number": (lambda p: _put_file(p, "state.json", b"3"), "state.json"),
    "state_ids_null": (_state_json(lambda sj: sj["optimizer"].__setitem__("state_ids", None)), "state_ids"),
    "param_groups_a_dict": (_state_json(lambda sj: sj["optimizer"].__setitem__("param_groups", {})),
                            "param_groups"),
    "history_rows_strings": (_state_json(lambda sj: sj.__setitem__("history", {"rows": ["a"]})), "history"),
    "step_negative": (_edit_cfg(lambda c: c["extra"].__setitem__("step", -3)), "extra.step"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_defects_are_checkpoint_errors_naming_file_and_field(saved, case):
    corrupt, needle = CASES[case]
    corrupt(saved)
    with pytest.raises(CheckpointError) as info:
        jf.load(saved)
    msg = str(info.value)
    assert needle in msg, msg
    assert str(saved) in msg, msg  # names the checkpoint (and its file)


def test_a_valid_checkpoint_still_loads_and_keeps_float64(tmp_path, saved):
    m = jf.load(saved)
    assert sum(layer.mask is not None for layer in m.net.layers) == 3
    d = _model().double()
    loaded = jf.load(jf.save(tmp_path / "d", d))
    assert loaded.sqrt_T.dtype == torch.float64  # was silently rounded to float32
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x), d.log_prob(x))


def test_absurd_size_refused_before_allocating(saved, monkeypatch):
    _set_model("hidden", [100_000, 100_000])(saved)  # 10^10 weights: 40 GB

    def no_build(*a, **k):
        raise AssertionError("a module was built")

    monkeypatch.setattr(jf.CNF, "from_config", classmethod(no_build))
    with pytest.raises(CheckpointError, match="parameters"):
        jf.load(saved)


# -- nothing outside the directory is read or executed ---------------------------------------------
_OPENED: list | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


def _load_recording_opens(path, root):
    """jf.load(path) (or its CheckpointError); the files opened under ``root``."""
    global _OPENED
    _OPENED = []
    try:
        try:
            jf.load(path)
            err = None
        except CheckpointError as exc:
            err = exc
    finally:
        opened, _OPENED = _OPENED, None
    return err, [p for p in opened if p.startswith(os.path.realpath(root))]


class _Plant:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling it creates the marker file


def test_planted_pickle_is_never_executed(tmp_path, saved):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(marker))
    (saved / "model.pt").write_bytes(payload)  # beside: never opened
    err, opened = _load_recording_opens(saved, tmp_path)
    assert err is None
    assert not any(p.endswith("model.pt") for p in opened)
    _put_file(saved, "model.safetensors", payload)  # in place of the weights: refused, not unpickled
    err, _ = _load_recording_opens(saved, tmp_path)
    assert isinstance(err, CheckpointError) and "safetensors" in str(err)
    assert not marker.exists()


def test_extra_files_are_ignored_unless_listed(tmp_path, saved):
    (saved / "evil.safetensors").write_bytes(st_save({"x": torch.zeros(1)}))
    (saved / "notes.txt").write_text("hi")
    err, opened = _load_recording_opens(saved, tmp_path)
    assert err is None
    assert {os.path.basename(p) for p in opened} <= {"config.json", "model.safetensors", "state.safetensors",
                                                     "state.json"}
    data = (saved / "evil.safetensors").read_bytes()
    cfg = _cfg(saved)
    cfg["files"]["evil.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _put_cfg(saved, cfg)
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        jf.load(saved)


def test_symlink_out_of_the_directory_is_never_read(tmp_path, saved):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(saved / "model.safetensors", outside / "model.safetensors")  # same bytes: the manifest matches
    os.symlink(outside / "model.safetensors", saved / "model.safetensors")
    err, opened = _load_recording_opens(saved, tmp_path)
    assert isinstance(err, CheckpointError) and "outside the checkpoint directory" in str(err)
    assert not any(p.startswith(str(outside.resolve())) for p in opened)
    # a symlink to a file inside the directory is harmless
    os.unlink(saved / "model.safetensors")
    os.replace(outside / "model.safetensors", saved / "weights.bin")
    os.symlink("weights.bin", saved / "model.safetensors")
    assert jf.load(saved) is not None


def test_paths_in_the_config_are_never_opened(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    path = jf.save(tmp_path / "ck", _model(), extra={"data": str(secret), "root": str(tmp_path)})
    err, opened = _load_recording_opens(path, tmp_path)
    assert err is None
    assert all(p.startswith(str(path.resolve())) for p in opened), opened
    assert ckpt.load_checkpoint(path).extra["data"] == str(secret)  # kept as a string, not followed
