"""One training step on the CPU: masked dense vs. torch.compile vs. the block-sparse kernels.

    python bench/train_step.py [--repeats 7] [--sparsities 0.9,0.8] [--threads 2] [--write]
    python bench/train_step.py --plot docs/sparse_training_nll.png [--plot-steps 100]

A step is what ``jf.train`` does per minibatch minus the optimizer update: ``log_prob`` of a batch with
the Hutchinson trace (a dopri5 solve, field evaluated through ``jvp``), the mean NLL, and its backward
(the gradient differentiates through the trace). Digits (64-d), field 512x512x512, batch 256, masks from
``jf.prune(method=..., granularity='block', block=32x32)`` on the untrained model. Providers:

- ``dense``: the masked dense CNF (eager torch),
- ``compiled``: the same with the field's ``forward``/``jvp`` under ``torch.compile`` (compile time excluded),
- ``sparse``: ``jf.sparsify(model)``, trained through the block-sparse per-layer ops — what
  ``jf.train(..., sparse=True)`` runs.

All three solve the same ODE (same weights, same noise per repeat: the RNG is re-seeded before each
step), timed round-robin (``jsp_fast._timing.round_robin``); medians. Prints a markdown table; with
``--write`` replaces the "## Training step (CPU)" section of bench/RESULTS.md.

``--plot PNG`` instead trains the masked dense model and ``jf.train(..., sparse=True)`` from the same
pruned initialisation and seed (the first sparsity of ``--sparsities``) and plots both NLL curves.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import float_list  # noqa: E402
from _results import replace_section  # noqa: E402

import jsp_fast as jf  # noqa: E402
from jsp_fast import _ext  # noqa: E402
from jsp_fast._timing import round_robin  # noqa: E402

SECTION = "## Training step (CPU)"
PROVIDERS = ("dense", "compiled", "sparse")


def build(sparsity: float, method: str, hidden, batch: int, seed: int = 0):
    ds = jf.data.digits(seed=seed)
    x = ds.train[:batch].contiguous()
    torch.manual_seed(seed)
    model = jf.CNF(dim=x.shape[1], hidden=hidden, trace="hutchinson", rtol=1e-5, atol=1e-5)
    jf.prune(model, method, sparsity, data=ds.train[:256], granularity="block", block=(32, 32), seed=seed)
    return model, x


def compile_like(model):
    comp = copy.deepcopy(model)
    comp.net.forward = torch.compile(comp.net.forward, dynamic=False)
    comp.net.jvp = torch.compile(comp.net.jvp, dynamic=False)
    return comp


def step_fn(model, x, seed: int):
    params = [p for p in model.parameters() if p.requires_grad]
    info = {}

    def step():
        torch.manual_seed(seed)
        for p in params:
            p.grad = None
        loss = -model.log_prob(x).mean()
        loss.backward()
        info["nfe"] = (model.nfe["forward"], model.nfe["backward"])
        info["loss"] = float(loss.detach())
    return step, info


def run(sparsities, method, hidden, batch, repeats, providers, quiet=False):
    rows = []
    for sp in sparsities:
        model, x = build(sp, method, hidden, batch)
        models = {"dense": model}
        if "compiled" in providers:
            t0 = time.perf_counter()
            models["compiled"] = compile_like(model)
            fn, _ = step_fn(models["compiled"], x, 0)
            fn()
            fn()
            if not quiet:
                print(f"[{sp:.0%}] torch.compile warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if "sparse" in providers:
            models["sparse"] = jf.sparsify(model)
        fns, infos = {}, {}
        for name in providers:
            fns[name], infos[name] = step_fn(models[name], x, 0)
        times = round_robin(fns, repeats, warmup=1)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        density = sum(int(l.nnzb) * l.block[0] * l.block[1] for l in models.get("sparse", jf.sparsify(model)).net.layers
                      if hasattr(l, "nnzb")) / sum(p.numel() for p in model.prunable_parameters().values())
        rows.append({"sparsity": sp, "density": density, "ms": med, "nfe": {k: v["nfe"] for k, v in infos.items()},
                     "loss": {k: v["loss"] for k, v in infos.items()}})
        if not quiet:
            print(f"[{sp:.0%}] " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), file=sys.stderr)
    return rows


def table(rows, providers) -> str:
    head = ["sparsity (density)", "NFE fwd/bwd"] + [f"{p} ms" for p in providers]
    if "sparse" in providers:
        head += [f"sparse × {p}" for p in providers if p != "sparse"] + ["|Δ loss|"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        nfe = r["nfe"][providers[0]]
        cells = [f"{r['sparsity']:.0%} ({r['density']:.3f})", f"{nfe[0]}/{nfe[1]}"]
        cells += [f"{r['ms'][p]:.1f}" for p in providers]
        if "sparse" in providers:
            cells += [f"{r['ms'][p] / r['ms']['sparse']:.2f}×" for p in providers if p != "sparse"]
            cells.append(f"{abs(r['loss']['sparse'] - r['loss'][providers[0]]):.1e}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(path: str, sparsity: float, method: str, hidden, batch: int, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = jf.data.digits(seed=0)
    model, _ = build(sparsity, method, hidden, batch)
    model.rtol = model.atol = 1e-3
    hists, secs = {}, {}
    for name, sparse in (("masked dense", False), ("sparse (jf.train sparse=True)", True)):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        hists[name] = jf.train(m, ds.train, ds.val, steps=steps, batch_size=batch, lr=1e-3, eval_every=max(steps // 5, 1),
                               seed=0, R_every=0, progress=False, sparse=sparse)
        secs[name] = time.perf_counter() - t0
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (name, h), style in zip(hists.items(), ("-", "--")):
        steps_, nll = h.column("train_nll")
        ax.plot(steps_, nll, style, label=f"{name} train ({secs[name]:.0f} s)")
        vs, vn = h.column("val_nll")
        ax.plot(vs, vn, style, marker="o", label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(f"digits, {'x'.join(map(str, hidden))}, {sparsity:.0%} block sparsity (32x32), batch {batch}, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    (a, b) = (h.column("train_nll")[1] for h in hists.values())
    print(f"max |Δ train NLL| over {steps} steps: {max(abs(x - y) for x, y in zip(a, b)):.2e}; "
          + ", ".join(f"{k}: {v:.1f} s" for k, v in secs.items()) + f" -> {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sparsities", type=float_list, default=(0.9, 0.8))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--method", default="jsp", help="pruning method (default jsp)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--write", action="store_true", help="replace the section of bench/RESULTS.md")
    p.add_argument("--plot", default=None, help="train dense and sparse, plot the NLL curves to this PNG")
    p.add_argument("--plot-steps", type=int, default=100)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.plot:
        plot(a.plot, a.sparsities[0], a.method, (a.hidden,) * a.layers, a.batch, a.plot_steps)
        return 0
    providers = tuple(q for q in PROVIDERS if not (a.no_compile and q == "compiled"))
    hidden = (a.hidden,) * a.layers
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows = run(a.sparsities, a.method, hidden, a.batch, a.repeats, providers)
    load1 = os.getloadavg()[0]
    tab = table(rows, providers)
    print(tab)
    if a.write:
        info = _ext._C.build_info() if _ext._C is not None else {}
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"{SECTION}\n\nMeasured {when}, {a.threads} torch/OpenMP threads, kernels built for "
                f"{info.get('simd', '?')}, torch {torch.__version__}; float32; digits (64-d), field "
                f"{'x'.join(map(str, hidden))}, batch {a.batch}, 32×32 blocks pruned by `{a.method}`; dopri5, "
                f"rtol = atol = 1e-5, Hutchinson trace; medians of {a.repeats} round-robin repeats, "
                f"{time.perf_counter() - t0:.0f} s in all, load average {load0:.1f} at the start and {load1:.1f} "
                f"at the end (the machine is shared: compare ratios within a row).\n\n"
                f"Command: `python bench/train_step.py --repeats {a.repeats} --write`\n\n"
                "A step: `log_prob` of the batch (forward solve with the trace) + `backward` of the mean NLL "
                "(through the trace), no optimizer update. `dense`: the masked dense CNF, eager; `compiled`: its "
                "field's forward/jvp under `torch.compile`; `sparse`: `jf.sparsify(model)` trained through the "
                "block-sparse per-layer ops (what `jf.train(..., sparse=True)` runs). `|Δ loss|`: the NLL of the "
                "sparse step against the dense one (float32 rounding).\n\n" + tab + "\n")
        replace_section(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
