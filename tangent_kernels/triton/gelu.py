"""GELU primal + tangent fused with the bias add, element-wise (DESIGN.md §1).

For ``u = h + bias`` and ``u_t = h_t + d_bias`` (biases broadcast over the last dimension) it
writes ``a = gelu(u)``, ``a_t = gelu'(u) · u_t`` and ``gelu'(u)``, which the MLP's backward
needs for both streams. The MLP's GEMMs stay in cuBLAS; this is the one kernel between them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DTYPE_NAMES, check_served, dense_vector, launcher
from .math import gelu_and_derivative

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _gelu_jvp_kernel(
    H,  # [M, N] pre-activation without bias, contiguous
    H_T,  # [M, N] its tangent (read only if HAS_H_T)
    BIAS,  # [N] frozen bias (read only if HAS_BIAS)
    D_BIAS,  # [N] bias offset (read only if HAS_D_BIAS)
    A,  # [M, N] gelu(u)
    A_T,  # [M, N] gelu'(u) · u_t (written only if HAS_H_T or HAS_D_BIAS)
    DERIVATIVE,  # [M, N] gelu'(u)
    numel,
    N,
    HAS_H_T: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D_BIAS: tl.constexpr, TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    cols = offsets % N
    u = tl.load(H + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + cols, mask=inside, other=0.0).to(tl.float32)
    value, derivative = gelu_and_derivative(u, TANH)
    tl.store(A + offsets, value.to(A.dtype.element_ty), mask=inside)
    tl.store(DERIVATIVE + offsets, derivative.to(DERIVATIVE.dtype.element_ty), mask=inside)
    if HAS_H_T or HAS_D_BIAS:
        u_t = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_H_T:
            u_t += tl.load(H_T + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_D_BIAS:
            u_t += tl.load(D_BIAS + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(A_T + offsets, (derivative * u_t).to(A_T.dtype.element_ty), mask=inside)


@launcher
def forward(h, h_t, bias, d_bias, approximate):
    """Launch the kernel: returns ``(a, a_t or None, gelu'(u))``."""
    check_served("h", h)
    h = h.contiguous()
    h_t = None if h_t is None else h_t.contiguous()
    bias, d_bias = dense_vector(bias), dense_vector(d_bias)
    has_tangent = h_t is not None or d_bias is not None
    a, derivative = torch.empty_like(h), torch.empty_like(h)
    a_t = torch.empty_like(h) if has_tangent else a
    numel = h.numel()
    if numel:
        _gelu_jvp_kernel[(triton.cdiv(numel, BLOCK),)](
            h, h if h_t is None else h_t, h if bias is None else bias, h if d_bias is None else d_bias,
            a, a_t, derivative, numel, h.shape[-1],
            HAS_H_T=h_t is not None, HAS_BIAS=bias is not None, HAS_D_BIAS=d_bias is not None,
            TANH=approximate == "tanh", BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return a, (a_t if has_tangent else None), derivative


def compile_specs(tokens):
    """The kernel for every dtype and both GELU forms, with every input present, over ``4 · tokens``
    rows of 3072 features (``compile_check``: a tensor is its dtype)."""
    features = 3072
    for dtype in DTYPE_NAMES:
        tensors = dict.fromkeys(("H", "H_T", "BIAS", "D_BIAS", "A", "A_T", "DERIVATIVE"), dtype)
        for tanh in (False, True):
            args = dict(**tensors, numel=4 * tokens * features, N=features, HAS_H_T=True, HAS_BIAS=True,
                        HAS_D_BIAS=True, TANH=tanh, BLOCK=BLOCK)  # fmt: skip
            yield f"gelu {dtype} tanh={tanh}", _gelu_jvp_kernel, args, NUM_WARPS, 3
