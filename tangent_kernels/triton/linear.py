"""Linear primal + tangent as one Triton GEMM, with an optional GELU epilogue (DESIGN.md §1).

``y = x W0ᵀ + b0`` and ``y_t = x_t W0ᵀ + x dWᵀ + db``: per K step the kernel loads one tile of
``x``, ``x_t``, ``W0`` and ``dW`` and issues three products, so each tile of ``x`` and ``W0`` is
read once for both streams (the tangent is the GEMM ``[x_t, x] · [W0, dW]ᵀ`` with K doubled).
With ``ACTIVATION`` the epilogue writes ``gelu(h)``, ``gelu'(h) · h_t`` and ``gelu'(h)`` (which
the backward needs) instead of ``h`` and ``h_t``. The backward is cuBLAS matmuls (``ops.py``).
"""

from __future__ import annotations

import functools
import json
import pathlib

import torch
import triton
import triton.language as tl

from . import (DTYPE_NAMES, autotune, check_served, compiled_variants, dense_vector, dot_precision, launcher,
               rows_2d, tile_class)
from .math import dot, gelu_and_derivative

ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _linear_jvp_kernel(
    X,  # [M, K] primal input, row stride stride_xm, unit column stride
    X_T,  # [M, K] tangent input (read only if HAS_X_T), row stride stride_xtm
    W,  # [N, K] frozen weight W0, row stride stride_wn
    D_W,  # [N, K] weight offset dW (read only if HAS_D_W), row stride stride_dwn
    B,  # [N] frozen bias (read only if HAS_B)
    D_B,  # [N] bias offset (read only if HAS_D_B)
    Y,  # [M, N] primal output (gelu(h) with an activation), contiguous
    Y_T,  # [M, N] tangent output, contiguous (written only if a tangent input or offset is given)
    DERIVATIVE,  # [M, N] gelu'(h), contiguous (written only if ACTIVATION != 0)
    M, N, K,
    stride_xm, stride_xtm, stride_wn, stride_dwn,
    HAS_X_T: tl.constexpr, HAS_D_W: tl.constexpr, HAS_B: tl.constexpr, HAS_D_B: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped ordering: GROUP_M row tiles share each column tile of W while it is in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x_mask = (rows < M)[:, None] & (ks < K)[None, :]
        w_mask = (cols < N)[:, None] & (ks < K)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=x_mask, other=0.0)
        w = tl.load(W + cols[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        acc = dot(x, tl.trans(w), acc, DOT_PRECISION)
        if HAS_X_T:
            x_t = tl.load(X_T + rows[:, None] * stride_xtm + ks[None, :], mask=x_mask, other=0.0)
            acc_t = dot(x_t, tl.trans(w), acc_t, DOT_PRECISION)
        if HAS_D_W:
            d_w = tl.load(D_W + cols[:, None] * stride_dwn + ks[None, :], mask=w_mask, other=0.0)
            acc_t = dot(x, tl.trans(d_w), acc_t, DOT_PRECISION)

    col_ok = cols < N
    if HAS_B:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_D_B:
        acc_t += tl.load(D_B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = rows[:, None] * N + cols[None, :]
    out_mask = (rows < M)[:, None] & col_ok[None, :]
    if ACTIVATION != 0:
        acc, derivative = gelu_and_derivative(acc, ACTIVATION == 2)
        acc_t = derivative * acc_t
        tl.store(DERIVATIVE + out, derivative.to(DERIVATIVE.dtype.element_ty), mask=out_mask)
    tl.store(Y + out, acc.to(Y.dtype.element_ty), mask=out_mask)
    if HAS_X_T or HAS_D_W or HAS_D_B:
        tl.store(Y_T + out, acc_t.to(Y_T.dtype.element_ty), mask=out_mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per tile class (see triton.tile_class); four
# operand tiles per stage, each entry compiling for sm_80 and sm_90 within shared memory, the first
# (the one that runs with autotuning off) without register spills and within 99 KB
# (tests/test_compile_targets.py). 128×128 tiles hold two fp32 accumulators and spill 190-450 bytes
# as a real launch compiles them, so they are left to the autotuner. The IEEE fp32 tiles are the ones
# that spill least by ptxas's count (benchmarks/ptxas_census.py): in IEEE precision the TF32 tiles
# compiled to 32 registers and 15-17 KB of spills per thread on sm_80.
_CONFIGS = {
    "16-bit": [(128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
               (128, 128, 64, 8, 2), (64, 64, 64, 4, 3)],
    "tf32": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2)],
    "ieee": [(64, 64, 16, 8, 2), (32, 32, 32, 4, 2), (128, 64, 16, 8, 2)],
}
GROUP_M = 8


def _triton_configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
            for width in _CONFIGS for m, n, k, w, s in _CONFIGS[width]]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wanted = _CONFIGS[tile_class(args["X"].element_size(), args["DOT_PRECISION"])]
    keyed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages): c for c in configs}
    return [keyed[entry] for entry in wanted]


_KEY = ["M", "N", "K", "HAS_X_T", "HAS_D_W", "ACTIVATION", "DOT_PRECISION"]
_linear_jvp = autotune(_triton_configs(), _KEY, _prune, lengths=("M",))(_linear_jvp_kernel)  # M: batch · tokens


# Where the fused kernel measured faster than the composite path (cuBLAS GEMMs + one element-wise
# kernel): {GPU name: [[out, in], ...] weight shapes}, written by `python -m benchmarks.linear_paths`
# from a GPU run of the mlp suite (modes "ours fused GEMM" and "ours composite"). Without a
# measurement for a GPU and shape, the composite path runs.
MEASURED_PATHS = pathlib.Path(__file__).with_name("linear_paths.json")


@functools.cache
def _fused_faster() -> dict[str, frozenset[tuple[int, int]]]:
    table = json.loads(MEASURED_PATHS.read_text()) if MEASURED_PATHS.exists() else {}
    return {gpu: frozenset(tuple(shape) for shape in shapes) for gpu, shapes in table.items()}


def fused_measured_faster(weight_shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether benchmarks measured the fused GEMM faster for this weight shape on this GPU."""
    if device.type != "cuda":
        return False
    return tuple(weight_shape) in _fused_faster().get(torch.cuda.get_device_name(device), frozenset())






@launcher
def forward(x, x_t, weight, bias, d_weight, d_bias, activation):
    """Launch the kernel: ``(y, y_t or None, gelu'(h) or None)`` shaped like ``x`` with ``N`` features."""
    check_served("x", x)
    features_out = weight.shape[0]
    x2 = rows_2d(x)
    x_t2 = x2 if x_t is None else rows_2d(x_t)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    d_w = weight if d_weight is None else (d_weight if d_weight.stride(-1) == 1 else d_weight.contiguous())
    bias, d_bias = dense_vector(bias), dense_vector(d_bias)
    has_tangent = x_t is not None or d_weight is not None or d_bias is not None
    shape = (*x.shape[:-1], features_out)
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    y_t = torch.empty_like(y) if has_tangent else y
    derivative = torch.empty_like(y) if activation != "none" else y
    m, k = x2.shape

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(features_out, meta["BLOCK_N"]),)

    if m and features_out:
        _linear_jvp[grid](
            X=x2, X_T=x_t2, W=weight, D_W=d_w, B=weight if bias is None else bias, D_B=weight if d_bias is None else d_bias,
            Y=y, Y_T=y_t, DERIVATIVE=derivative, M=m, N=features_out, K=k,
            stride_xm=x2.stride(0), stride_xtm=x_t2.stride(0), stride_wn=weight.stride(0), stride_dwn=d_w.stride(0),
            HAS_X_T=x_t is not None, HAS_D_W=d_weight is not None, HAS_B=bias is not None, HAS_D_B=d_bias is not None,
            ACTIVATION=ACTIVATIONS[activation], DOT_PRECISION=dot_precision(x.dtype),
        )  # fmt: skip
    return y, (y_t if has_tangent else None), (derivative if activation != "none" else None)


def compile_specs(tokens):
    """Every config for every dtype, with every input present and the tanh-GELU epilogue, for a
    768 → 3072 projection of ``4 · tokens`` rows (``compile_check``: a tensor is its dtype)."""
    rows, n, k = 4 * tokens, 3072, 768
    for dtype, precision, label in compiled_variants():
        tensors = dict.fromkeys(("X", "X_T", "W", "D_W", "B", "D_B", "Y", "Y_T", "DERIVATIVE"), dtype)
        for m_, n_, k_, warps, stages in _CONFIGS[tile_class(dtype.itemsize, precision)]:
            args = dict(**tensors, M=rows, N=n, K=k, stride_xm=k, stride_xtm=k, stride_wn=k, stride_dwn=k,
                        HAS_X_T=True, HAS_D_W=True, HAS_B=True, HAS_D_B=True, ACTIVATION=2, DOT_PRECISION=precision,
                        BLOCK_M=m_, BLOCK_N=n_, BLOCK_K=k_, GROUP_M=GROUP_M)  # fmt: skip
            yield f"linear {label} M={m_} N={n_} K={k_} w={warps} s={stages}", _linear_jvp_kernel, args, warps, stages
