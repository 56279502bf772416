"""The MAF tabular benchmarks (POWER, GAS, HEPMASS, MINIBOONE, BSDS300) from their published files.

Files and preprocessing follow Papamakarios et al. 2017 ("Masked Autoregressive Flow", the data
release at https://zenodo.org/record/1161203), also used by FFJORD. The files are user-supplied:
``root`` is the directory that holds ``power/``, ``gas/``, ``hepmass/``, ``miniboone/`` and ``BSDS300/``.
Preprocessing, per set (as in the MAF code; the normalisation statistics differ between sets):

- POWER (``power/data.npy``, 7 measurements and a time column): shuffle with ``RandomState(42)``, drop columns 3 and 1,
  add uniform noise (0.001 to the first column, 0.01 to the second, 1 to the next three, none to the
  time column), test = last 10%, validation = last 10% of the rest; normalise by the mean/std
  (ddof=0) of train + validation. dim 6.
- GAS (``gas/ethylene_CO.pickle``, a pandas DataFrame): drop ``Meth``, ``Eth``, ``Time``; repeatedly
  drop the first column correlated > 0.98 with another; normalise by the mean/std (ddof=1) of all
  rows; test = last 10%, validation = last 10% of the rest (no shuffle). dim 8.
- HEPMASS (``hepmass/1000_train.csv``, ``hepmass/1000_test.csv``): keep signal rows (first column
  == 1) and drop that label column; drop the test file's last column; normalise both by the train
  file's mean/std (ddof=1); drop features whose smallest value occurs more than 5 times (MAF's
  rule, which counts the smallest value) and constant features; validation = last 10% of train.
  dim 21.
- MINIBOONE (``miniboone/data.npy``, already cleaned): test = last 10%, validation = last 10% of
  the rest; normalise by the mean/std (ddof=0) of train + validation. dim 43.
- BSDS300 (``BSDS300/BSDS300.hdf5`` with ``train``, ``validation``, ``test`` datasets): used as is.
  dim 63.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from ._images import Dataset
from ._toy import _check_seed

TABULAR_NAMES = ("power", "gas", "hepmass", "miniboone", "bsds300")

_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
_SOURCE = ("the MAF data release (Papamakarios et al. 2017), https://zenodo.org/record/1161203 "
           "(data.tar.gz; unpack it and pass the folder that holds power/, gas/, hepmass/, miniboone/, "
           "BSDS300/ as root)")


def _paths(name: str, root) -> list[str]:
    paths = [os.path.join(os.fspath(root), rel) for rel in _FILES[name]]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{name.upper()} needs the file {p!r}, which does not exist; "
                                    f"it comes from {_SOURCE}")
    return paths


def _tail_split(data: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(head, tail) with the tail the last int(fraction * n) rows (MAF's split)."""
    k = int(fraction * data.shape[0])
    if k < 1:
        raise ValueError(f"too few rows ({data.shape[0]}) to split off {fraction:.0%}")
    return data[:-k], data[-k:]


def _load_power(root, seed: int):
    (path,) = _paths("power", root)
    data = np.load(path, allow_pickle=False).astype(np.float64)
    if data.ndim != 2 or data.shape[1] != 8:
        raise ValueError(f"{path}: expected a [N, 8] array (MAF's POWER: 7 measurements and time), got shape {data.shape}")
    rng = np.random.RandomState(seed)  # local legacy generator: MAF's split and noise use RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, [1, 3], axis=1)  # global reactive power, global intensity
    # MAF draws the voltage noise first, then the active-power noise, then the sub-meterings.
    voltage = 0.01 * rng.rand(n, 1)
    active = 0.001 * rng.rand(n, 1)
    submeter = rng.rand(n, 3)  # the three sub-meterings are integer watt-hours
    noise = np.hstack([active, voltage, submeter, np.zeros((n, 1))])  # no noise on the time column
    data = data + noise
    rest, test = _tail_split(data)
    train, val = _tail_split(rest)
    mu, sd = rest.mean(0), rest.std(0)
    return train, val, test, mu, sd


def _load_gas(root, allow_pickle: bool):
    (path,) = _paths("gas", root)
    if not allow_pickle:
        raise ValueError(f"GAS is published as a pandas pickle ({path}); unpickling runs code stored in the "
                         "file, so it is only loaded with an explicit allow_pickle=True for a file you trust")
    import pandas as pd

    df = pd.read_pickle(path)
    missing = [c for c in ("Meth", "Eth", "Time") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: expected MAF's ethylene_CO DataFrame with columns Meth, Eth, Time; "
                         f"missing {missing}")
    df = df.drop(columns=["Meth", "Eth", "Time"]).astype(np.float64)
    while True:  # drop the first column that is > 0.98 correlated with some other column
        high = (df.corr() > 0.98).to_numpy().sum(1)
        over = np.flatnonzero(high > 1)
        if over.size == 0:
            break
        df = df.drop(columns=df.columns[over[0]])
    df = (df - df.mean()) / df.std()
    data = df.to_numpy()
    rest, test = _tail_split(data)
    train, val = _tail_split(rest)
    return train, val, test, list(df.columns)


def _smallest_value_count(column: np.ndarray) -> int:
    c = Counter(column.tolist())
    return c[min(c)]


def _load_hepmass(root):
    train_path, test_path = _paths("hepmass", root)
    import pandas as pd

    tr = pd.read_csv(train_path, index_col=False)
    te = pd.read_csv(test_path, index_col=False)
    tr = tr[tr[tr.columns[0]] == 1].drop(columns=tr.columns[0])
    te = te[te[te.columns[0]] == 1].drop(columns=te.columns[0])
    te = te.drop(columns=te.columns[-1])  # MAF: the test file carries one column too many
    if tr.shape[0] < 2:
        raise ValueError(f"{train_path}: fewer than 2 signal rows (first column == 1)")
    mu, sd = tr.mean(), tr.std()
    tr = (tr - mu) / sd
    te = ((te - mu) / sd).reindex(columns=tr.columns)  # align by column name
    train = tr.to_numpy(np.float64)
    test = te.to_numpy(np.float64)
    keep = [j for j in range(train.shape[1])
            if np.isfinite(sd.iloc[j]) and sd.iloc[j] > 0 and _smallest_value_count(train[:, j]) <= 5]
    kept_columns = [str(tr.columns[j]) for j in keep]
    train, test = train[:, keep], test[:, keep]
    if not np.isfinite(test).all():
        raise ValueError(f"{test_path}: after preprocessing the test set has missing values; its columns "
                         f"{list(te.columns)} do not match the train file's")
    train, val = _tail_split(train)
    return train, val, test, kept_columns


def _load_miniboone(root):
    (path,) = _paths("miniboone", root)
    data = np.load(path, allow_pickle=False).astype(np.float64)
    if data.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array, got shape {data.shape}")
    rest, test = _tail_split(data)
    train, val = _tail_split(rest)
    mu, sd = rest.mean(0), rest.std(0)
    return train, val, test, mu, sd


def _load_bsds300(root):
    (path,) = _paths("bsds300", root)
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in ("train", "validation", "test") if k not in f]
        if missing:
            raise ValueError(f"{path}: expected datasets train, validation, test; missing {missing}")
        return f["train"][()], f["validation"][()], f["test"][()]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def tabular(name: str, root, *, allow_pickle: bool = False, seed: int = 42) -> Dataset:
    """Load one of the MAF tabular benchmarks from its published file(s), preprocessed as in MAF.

    Args:
        name: ``power``, ``gas``, ``hepmass``, ``miniboone`` or ``bsds300`` (case-insensitive).
        root: directory holding the unpacked MAF data (``power/data.npy``, ``gas/ethylene_CO.pickle``,
            ``hepmass/1000_{train,test}.csv``, ``miniboone/data.npy``, ``BSDS300/BSDS300.hdf5``).
        allow_pickle: must be ``True`` to load GAS, which is published as a pandas pickle
            (unpickling can run arbitrary code; only do it for a file you trust). Ignored otherwise.
        seed: POWER's shuffle/noise seed (MAF uses 42, the default); ignored by the other sets,
            whose published splits are fixed.

    Returns:
        :class:`Dataset` with float32 ``train``/``val``/``test``, ``dim``, ``name``; ``bits_per_dim``
        and ``log_prob`` are ``None``. ``info`` holds the normalisation constants or kept columns.

    Raises:
        ValueError: unknown name, missing ``root``, GAS without ``allow_pickle=True``, malformed file.
        FileNotFoundError: a file is missing (the message names the expected path and the source).
    """
    if not isinstance(name, str) or name.lower() not in TABULAR_NAMES:
        raise ValueError(f"unknown tabular dataset {name!r}; expected one of {', '.join(TABULAR_NAMES)}")
    name = name.lower()
    if root is None or not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"tabular({name!r}) needs root=<directory with the MAF data>, got {root!r}; "
                         f"the data comes from {_SOURCE}")
    info: dict = {"root": os.fspath(root)}
    if name == "power":
        train, val, test, mu, sd = _load_power(root, _check_seed(seed))
        info.update(mean=mu, std=sd, seed=int(seed))
        train, val, test = ((a - mu) / sd for a in (train, val, test))
    elif name == "gas":
        train, val, test, cols = _load_gas(root, allow_pickle)
        info["columns"] = cols
    elif name == "hepmass":
        train, val, test, cols = _load_hepmass(root)
        info["columns"] = cols
    elif name == "miniboone":
        train, val, test, mu, sd = _load_miniboone(root)
        info.update(mean=mu, std=sd)
        train, val, test = ((a - mu) / sd for a in (train, val, test))
    else:
        train, val, test = _load_bsds300(root)
    train, val, test = _t(train), _t(val), _t(test)
    dims = {train.shape[1], val.shape[1], test.shape[1]}
    if len(dims) != 1:
        raise ValueError(f"{name}: the splits have different widths {sorted(dims)}")
    return Dataset(name=name, train=train, val=val, test=test, dim=int(train.shape[1]), info=info)
