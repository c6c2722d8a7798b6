"""A plain primal-only flash attention forward: the census's yardstick for the forward kernels.

Not shipped (the library's forward is ``tangent_kernels.triton.attention``): it is the smallest
forward with the same layout and conventions (``(B, H, N, D)`` with any batch/head/sequence
strides, head dim padded to a power of two, any key length, no causal or padding mask), so
``benchmarks.ptxas_census`` can count what our kernels spend per key tile beyond plain attention.
Key tiles are read unmasked except the last partial one. Runs on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` (the test against SDPA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tangent_kernels.triton.attention import head_dim_block


@triton.jit
def _key_tile(q, k_ptrs, v_ptrs, m_i, l_i, acc, qk_scale, d_ok, cols, k_len, LAST: tl.constexpr):
    """One online-softmax step over a key tile (scores in log2 units); ``LAST`` masks keys past
    ``k_len``."""
    if LAST:
        kv_mask = (cols < k_len)[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if LAST:
        s = tl.where((cols < k_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _flash_fwd_kernel(
    Q, K, V,  # [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, D] inputs, unit stride along D
    O,  # [B, H, Lq, D] output
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, q_len, k_len, head_dim,
    scale,  # softmax scale
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_mask = (rows < q_len)[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_tiles = k_len // BLOCK_N * BLOCK_N
    for start_n in range(0, full_tiles, BLOCK_N):
        m_i, l_i, acc = _key_tile(q, k_ptrs, v_ptrs, m_i, l_i, acc, qk_scale, d_ok, offs_n, k_len, False)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if full_tiles < k_len:
        m_i, l_i, acc = _key_tile(q, k_ptrs, v_ptrs, m_i, l_i, acc, qk_scale, d_ok, full_tiles + offs_n, k_len, True)
    o = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=q_mask)  # fmt: skip


def flash_forward(q, k, v, scale=None, block_m=64, block_n=32, num_warps=4, num_stages=2):
    """``softmax(q kᵀ · scale) v`` for ``(B, H, N, D)`` tensors with unit stride along D (``scale``
    defaults to ``D^-0.5``)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v: the head dim must have unit stride")
    batch, heads, q_len, head_dim = q.shape
    o = torch.empty_like(q)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _flash_fwd_kernel[grid](
        q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        heads, q_len, k.shape[2], head_dim, head_dim**-0.5 if scale is None else scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim_block(head_dim), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o
