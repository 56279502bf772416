"""A tiny jf.train run for tests/test_ddp.py, launched with or without torchrun.

Rank 0 saves the final parameters (and masks) to ``--params``. ``--kill-rank R --kill-step K``
SIGKILLs rank R from the step-K callback (a process dying mid-run); ``--bad-mask-rank R`` gives
rank R a different pruning mask; ``--sparse`` trains the block-sparse (jf.sparsify) model;
``--repeat N`` calls ``jf.train`` N times in one process.
"""
from __future__ import annotations

import argparse
import os
import signal

import torch

import jsp_fast as jf
from safetensors.torch import save_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--bad-mask-rank", type=int, default=-1)
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="call jf.train this many times in a row")
    a = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    x = jf.data.toy("8gaussians", n=640, seed=0)
    torch.manual_seed(0)
    hidden = (32, 32) if a.sparse else (8, 8)
    model = jf.CNF(2, hidden=hidden, trace="exact", solver="euler", options={"step_size": 0.25})
    if a.sparse:
        jf.prune(model, "random", 0.5, x[:64], granularity="block", block=(8, 8), seed=0)
        model = jf.sparsify(model, backend="torch")
    else:
        jf.prune(model, "random", 0.5, x[:64], seed=0)
    if rank == a.bad_mask_rank:
        layer = model.net.layers[1]
        m = layer.mask.clone()
        m[0, 0] = ~m[0, 0]
        layer.set_mask(m)

    def callback(row):
        if rank == a.kill_rank and row["step"] == a.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    for _ in range(a.repeat):  # a second call reuses the process group the first one joined
        jf.train(model, x[:512], x[512:], steps=a.steps, batch_size=32, lr=1e-2, eval_every=2, eval_batch=48,
                 R_batch=40, progress=False, checkpoint_dir=a.ckpt, checkpoint_every=a.ckpt_every, callback=callback)
    if rank == 0 and a.params:
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, a.params)


if __name__ == "__main__":
    main()
