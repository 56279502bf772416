"""Shared pieces of the Triton kernels: activation codes and their jit helpers, dtype and config rules.

Activation codes are ``jsp_fast._act.CODES`` (shared with the C++/CUDA kernels).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _act as _activations  # (_act is the jit helper below)

ACT_CODES = _activations.CODES

# Under TRITON_INTERPRET=1 kernels run on the CPU through NumPy: one config, no autotuning.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def act_code(activation) -> int:
    """The kernel code of an activation name (None means "none"); a ValueError for an unknown one."""
    return _activations.code(activation)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator type: float64 for float64 data, float32 otherwise (fp16/bf16 included)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype, tf32: bool | None = None) -> str:
    """``input_precision`` of ``tl.dot``: IEEE fp32 unless TF32 is asked for (or allowed globally).

    CNF solves are sensitive to the field's accuracy, so the default follows
    ``torch.backends.cuda.matmul.allow_tf32`` (False by default), like cuBLAS does for ``F.linear``.
    """
    if dtype != torch.float32:
        return "ieee"
    if tf32 is None:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "ieee"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(t: torch.Tensor, name: str = "x") -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU); {name} is on "
                       f"{t.device}")


def check_dtype(t: torch.Tensor, name: str = "x") -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got {t.dtype}")


def use_dot(*dims: int) -> bool:
    """``tl.dot`` needs every dimension >= 16 on GPUs; smaller tiles use broadcast-multiply-sum."""
    return min(dims) >= 16


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ---- jit helpers ---------------------------------------------------------------------------------
# act(pre) and act'(pre) given y = act(pre); written with exp only so they run in the interpreter
# and in fp64 alike:
#   tanh     = sign(x) (1 - e) / (1 + e), e = exp(-2|x|)    tanh'     = 1 - y^2
#   softplus = max(x, 0) + log(1 + exp(-|x|))                softplus' = sigmoid(x)
#   elu      = x > 0 ? x : exp(x) - 1                         elu'      = x > 0 ? 1 : y + 1
#   relu     = max(x, 0)                                      relu'     = x > 0
#   sigmoid  = 1 / (1 + exp(-x))                              sigmoid'  = y (1 - y)
@triton.jit
def _act(pre, ACT: tl.constexpr):
    out = pre
    if ACT == 1:
        e = tl.exp(-2.0 * tl.abs(pre))
        t = (1.0 - e) / (1.0 + e)
        out = tl.where(pre < 0, -t, t)
    elif ACT == 2:
        out = tl.maximum(pre, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(pre)))
    elif ACT == 3:
        out = tl.where(pre > 0, pre, tl.exp(tl.minimum(pre, 0.0)) - 1.0)
    elif ACT == 4:
        out = tl.maximum(pre, 0.0)
    elif ACT == 5:
        out = 1.0 / (1.0 + tl.exp(-pre))
    return out


@triton.jit
def _act_grad(pre, y, ACT: tl.constexpr):
    d = tl.full(pre.shape, 1.0, pre.dtype)
    if ACT == 1:
        d = 1.0 - y * y
    elif ACT == 2:
        d = 1.0 / (1.0 + tl.exp(-pre))
    elif ACT == 3:
        d = tl.where(pre > 0, 1.0, y + 1.0)
    elif ACT == 4:
        d = tl.where(pre > 0, 1.0, 0.0)
    elif ACT == 5:
        d = y * (1.0 - y)
    return d


@triton.jit
def _tile_dot(a, b_t, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b_t^T for a [M, K], b_t [N, K]."""
    if USE_DOT:
        # out_dtype: triton < 3.8 asserts on a float64 acc with the default (float32) out_dtype
        acc = tl.dot(a, tl.trans(b_t), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        acc += tl.sum(a[:, None, :].to(acc.dtype) * b_t[None, :, :].to(acc.dtype), axis=2)
    return acc


@triton.jit
def _tile_dot_nn(a, b, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for a [M, K], b [K, N]."""
    if USE_DOT:
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        acc += tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
    return acc


def configs(block_b=(32, 64, 128), warps=(4, 8), stages=(2, 3), name="BLOCK_B"):
    """Autotune configs on a GPU; a single one under the interpreter."""
    if INTERPRET:
        return [triton.Config({name: 16}, num_warps=1, num_stages=1)]
    return [triton.Config({name: b}, num_warps=w, num_stages=s)
            for b in block_b for w in warps for s in stages]
