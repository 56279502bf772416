"""What bench/gpu.py's stages share: the device, random block masks and fields, and the timing.

Timing is ``jsp_fast._timing.round_robin`` (the project's one timing helper): the providers of one
config are timed in turn within each repeat, with the device synchronised inside the timed call. Not
``triton.testing.do_bench``: its CUDA events leave out the host work of a launch (argument checks,
plan look-ups, Python), which is most of what a narrow field costs and exactly what the fused engines
remove; and round-robin gives every provider of a config the same machine state.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
from typing import Callable

import torch

from jsp_fast._timing import median_time, round_robin, synchronizer
from jsp_fast.cnf import ODEnet

from gpu_config import FieldConfig, Record


def require_device(smoke: bool) -> torch.device:
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or use --smoke to exercise it on the CPU")
    return torch.device("cuda")


def environment(device: torch.device) -> dict:
    import triton  # noqa: PLC0415

    from jsp_fast import _ext  # noqa: PLC0415

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               device=str(device), interpreter=os.environ.get("TRITON_INTERPRET", "0"),
               build_info=_ext.require_C().build_info())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def random_grid(nb_r: int, nb_c: int, kept: int, gen: torch.Generator) -> torch.Tensor:
    """A [nb_r, nb_c] block mask with exactly ``kept`` blocks, drawn from ``gen``."""
    idx = torch.randperm(nb_r * nb_c, generator=gen)[:kept]
    g = torch.zeros(nb_r * nb_c, dtype=torch.bool)
    g[idx] = True
    return g.reshape(nb_r, nb_c)


def make_field(cfg: FieldConfig, activation: str, device: torch.device, gen: torch.Generator) -> ODEnet:
    """A concatsquash field whose hidden-to-hidden layers keep (1 - sparsity) of their blocks."""
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    net = ODEnet(cfg.dim, (cfg.width,) * cfg.depth, activation)
    bs = cfg.block
    for layer in net.layers[1:-1]:
        n, k = layer.linear.weight.shape
        kept = max(1, round((1 - cfg.sparsity) * (n // bs) * (k // bs)))
        g = random_grid(n // bs, k // bs, kept, gen)
        layer.set_mask(g.repeat_interleave(bs, 0).repeat_interleave(bs, 1))
    return net.to(device)


def with_tf32(flag: bool, fn: Callable) -> Callable:
    """``fn`` run with TF32 matmuls on or off (cuBLAS and our Triton kernels read the same switch);
    set inside the call because round-robin interleaves providers of both kinds."""
    def run():
        torch.backends.cuda.matmul.allow_tf32 = flag
        return fn()
    return run


def max_abs_err(out, ref) -> float:
    """The largest absolute difference over matching tensors of two (nested) tuples."""
    if isinstance(out, torch.Tensor):
        return (out.float() - ref.float()).abs().max().item()
    return max(max_abs_err(o, r) for o, r in zip(out, ref))


def time_providers(fns: dict[str, Callable], repeats: int, device: torch.device) -> dict[str, tuple[float, str | None]]:
    """``{name: (median ms, error or None)}``: each provider is called once untimed (compilation,
    autotuning, packed plans; a provider that fails there, e.g. out of memory, gets NaN and its error
    and the others go on), then all are timed round-robin."""
    sync = synchronizer(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    out, ok = {}, {}
    try:
        for name, fn in fns.items():
            try:
                fn()
                sync()
                ok[name] = fn
            except Exception as e:  # noqa: BLE001 - one provider failing must not lose the run
                out[name] = (math.nan, repr(e)[:300])
        try:
            for name, ts in round_robin(ok, repeats, warmup=0, device=device).items():
                out[name] = (1e3 * statistics.median(ts), None)
        except Exception:  # noqa: BLE001 - a failure mid-way: time the providers one by one instead
            for name, fn in ok.items():
                try:
                    out[name] = (1e3 * median_time(fn, repeats, warmup=0, device=device), None)
                except Exception as e:  # noqa: BLE001
                    out[name] = (math.nan, repr(e)[:300])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {name: out[name] for name in fns}


def to_records(bench: str, conf: dict, timed: dict, extra: dict | None = None, label: str = "") -> list[Record]:
    """Records of ``time_providers``' results (a provider's error goes into its ``extra``), printed as
    they come; ``extra``: more fields per provider name (e.g. its error against dense)."""
    records = []
    for name, (ms, err) in timed.items():
        more = dict((extra or {}).get(name, {}))
        if err is not None:
            more["error"] = err
        records.append(Record(bench, name, conf, ms, more))
        print(f"  {bench:9s} {label} {name:16s} {ms:9.4f} ms", flush=True)
    return records
