"""Compile every Triton kernel variant for an NVIDIA target without a GPU (ahead of time, to PTX and a
cubin through the ptxas that ships with triton). Catches what the interpreter cannot: tl.dot shape and
dtype rules, layouts of reshapes, register/shared-memory limits at compile time.

    python -m jsp_fast.kernels._compile_check [--arch 90]      (TRITON_INTERPRET must be unset)

The lent GPU machines run an older triton (3.6.0 in 2026-11) than CI (>= 3.8), and nothing can be
installed there; check that version too before a GPU session (it caught tl.dot's float64 out_dtype):

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python -m jsp_fast.kernels._compile_check
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: the compile check needs the real compiler")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import bsr_grad, bsr_linear, fused_field  # noqa: E402

PTR = {"fp32": "*fp32", "fp64": "*fp64", "bf16": "*bf16", "fp16": "*fp16"}
ACC = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.float32, "fp16": tl.float32}


def _jit(k):
    return k.fn if hasattr(k, "fn") and not isinstance(k, triton.JITFunction) else k


def compile_one(kernel, ptr_types: dict, constexprs: dict, target: GPUTarget, num_warps=4, num_stages=2,
                int_type="i32"):
    """Compile one specialisation; integer arguments are i32, pointers as given in ``ptr_types``."""
    fn = _jit(kernel)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        else:
            sig[name] = int_type
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled) -> dict:
    """REG / STACK / LOCAL (spills) / SHARED of the cubin, from the cuobjdump shipped with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        try:
            text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        except OSError:
            return {}
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def variants():
    """(name, autotuned kernel, pointer types, constexprs without the tuned ones) per shipped variant."""
    out = []
    for dt in ("fp32", "bf16", "fp64"):
        P, A = PTR[dt], ACC[dt]
        acc_ptr = PTR["fp64"] if dt == "fp64" else PTR["fp32"]
        for (bm, bk), act in (((32, 32), 1), ((64, 64), 2), ((16, 16), 3), ((8, 8), 5), ((12, 8), 4)):
            BM, BK = triton.next_power_of_2(bm), triton.next_power_of_2(bk)
            common = dict(bm=bm, bk=bk, BM=BM, BK=BK, USE_DOT=min(bm, bk) >= 16, PRECISION="ieee", ACC=A)
            out.append((f"fwd/{dt}/{bm}x{bk}", bsr_linear._bsr_fwd_kernel,
                        dict(x_ptr=P, v_ptr=P, row_ptr="*i64", col_ptr="*i64", scale_ptr=P, bias_ptr=P, y_ptr=P,
                             prod_ptr=P),
                        dict(common, HAS_SCALE=True, HAS_BIAS=True, ACT=act, STORE_PROD=True)))
            for TT in (1, 4):
                out.append((f"jvp/{dt}/{bm}x{bk}/TT{TT}", bsr_linear._bsr_jvp_kernel,
                            dict(x_ptr=P, xd_ptr=P, v_ptr=P, row_ptr="*i32", col_ptr="*i32", scale_ptr=P,
                                 bias_ptr=P, y_ptr=P, yd_ptr=P),
                            dict(common, TT=TT, HAS_SCALE=True, HAS_BIAS=True, ACT=act)))
            out.append((f"t_matmul/{dt}/{bm}x{bk}", bsr_grad._bsr_t_matmul_kernel,
                        dict(g_ptr=P, v_ptr=P, col_ptr="*i64", t_row_ptr="*i64", t_perm_ptr="*i64", dx_ptr=P),
                        dict(common)))
            out.append((f"weight_grad/{dt}/{bm}x{bk}", bsr_grad._bsr_weight_grad_kernel,
                        dict(g_ptr=P, x_ptr=P, row_idx_ptr="*i64", col_idx_ptr="*i64", part_ptr=acc_ptr),
                        dict(common)))
    for dt, TT, hyper in (("fp32", 1, True), ("fp32", 4, False), ("fp64", 2, True), ("bf16", 1, True)):
        P, A = PTR[dt], ACC[dt]
        S = PTR["fp64"] if dt == "fp64" else PTR["fp32"]
        for blk in (32, 16):
            out.append((f"fused_field/{dt}/blk{blk}/TT{TT}/hyper{int(hyper)}", fused_field._fused_field_kernel,
                        dict(z_ptr=P, e_ptr=P, f_ptr=P, je_ptr=P, scr_ptr=S, meta_ptr="*i32", rp_ptr="*i32",
                             col_ptr="*i32", val_ptr=S, scale_ptr=S, bias_ptr=S, gw_ptr=S, gb_ptr=S, sw_ptr=S,
                             t_ptr=S),
                        dict(BM=blk, BK=blk, BLOCK_B_MAX=fused_field.BLOCK_B_MAX, TT=TT, HAS_T=True,
                             HAS_SCALE=not hyper, HAS_BIAS=not hyper, HYPER=hyper, ACT=1, USE_DOT=True,
                             PRECISION="ieee", ACC=A)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("-k", default="", help="only variants whose name contains this")
    p.add_argument("--verbose", action="store_true", help="one line per autotune config")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = no_clean = 0
    for name, kern, ptrs, consts in variants():
        if args.k not in name:
            continue
        t = time.perf_counter()
        clean, lines = [], []
        for cfg in kern.configs:
            tag = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w={cfg.num_warps},s={cfg.num_stages}"
            try:
                c = compile_one(kern, ptrs, dict(consts, **cfg.kwargs), target, cfg.num_warps, cfg.num_stages)
            except Exception as e:  # a config that does not compile is a bug (the autotuner would crash on it)
                failed += 1
                msg = str(e).strip().splitlines()
                lines.append(f"  FAIL {tag}: {type(e).__name__}: {' | '.join(msg[-3:])[:300]}")
                continue
            r = resources(c)
            spills = r.get("STACK", 0) + r.get("LOCAL", 0)
            if not spills:
                clean.append(tag)
            lines.append(f"  {tag:32s} smem={c.metadata.shared:6d} reg={r.get('REG', '?')} stack={r.get('STACK', '?')}")
        no_clean += not clean
        status = "ok  " if clean else "WARN"
        print(f"{status} {name:36s} {len(kern.configs)} configs, {len(clean)} without spills "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
        if args.verbose or not clean:
            print("\n".join(lines), flush=True)
    print(f"{failed} configs failed to compile; {no_clean} variants without a spill-free config")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
