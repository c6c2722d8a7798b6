"""The second-order attention backward, flash style: ``O(N)`` memory, ``P`` recomputed per tile.

It computes what ``tangent_kernels.attention_second_order.primal_grads`` does (the gradient of
``<G_o, O> + <G, O_t>`` with respect to ``Q, K, V`` and an additive key bias; the formulas are in
that module) without ever holding a score matrix: ``P = 2^(S·log2e − lse)`` comes back per tile from
the forward's base-2 ``lse``, and the row statistics the formulas need are computed first:

    r = rowsum(P ⊙ S_t),   c = rowsum(G ⊙ O),   δ = rowsum(G ⊙ O_t) + rowsum(G_o ⊙ O)

by a query-tile program with two passes over the keys (``r``, then ``rowsum(G ⊙ O_t)`` =
``Σ P ⊙ ((A − c)(S_t − r) + G V_tᵀ)`` with ``A = G Vᵀ``). Per tile, then, with ``S_t − r``
centered in fp32 before anything is rounded to the tile dtype (as the forward kernel does):

    dS_t = P ⊙ (A − c),   dP = (A − c) ⊙ (S_t − r) + G V_tᵀ + G_o Vᵀ,   dS = P ⊙ (dP − δ).

Query-tile programs accumulate ``dQ = s(dS K + dS_t K_t)``; key-tile programs accumulate ``dK = s(dSᵀ Q +
dS_tᵀ Q_t)`` and ``dV = (P ⊙ (S_t − r))ᵀ G + Pᵀ G_o`` over every query head of their group (no
atomics), and the key bias gradient ``Σ dS`` per key/value head (summed over heads by the launcher).

Layout, masks and grouped heads as in ``attention.py``: ``(B, H, N, D)`` with unit stride along D,
causal top-left, boolean or additive key padding, fully masked rows (``lse = +inf``) give zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_row_offsets, check_served, dot_precision, launcher, tile_class, unit_last_stride
from .attention import MASK_BOOL, _mask_arguments, _masked_scores, head_dim_block, tiled_specs, tuned
from .math import dot


@triton.jit
def _probs_and_tangent_scores(
    q, q_t,  # [BLOCK_M, BLOCK_D] query tiles (q_t read only if HAS_Q_T)
    k, k_t,  # [BLOCK_N, BLOCK_D] key tiles (k_t read only if HAS_K_T)
    lse,  # [BLOCK_M] base-2 log-sum-exp of the forward
    rows, cols, k_len, scale, mask_row, stride_mask_n,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``(P, S_t)`` of one tile: softmax weights from ``lse`` and the tangent scores (natural units,
    zero without ``q_t`` and ``k_t``)."""
    s = dot(q, tl.trans(k), None, DOT_PRECISION)
    s = _masked_scores(s, rows, cols, k_len, scale * 1.4426950408889634, mask_row, stride_mask_n, MASK_KIND,
                       IS_CAUSAL)  # fmt: skip
    p = tl.exp2(s - lse[:, None])
    s_t = tl.zeros(s.shape, dtype=tl.float32)
    if HAS_Q_T:
        s_t = dot(q_t, tl.trans(k), s_t, DOT_PRECISION)
    if HAS_K_T:
        s_t = dot(q, tl.trans(k_t), s_t, DOT_PRECISION)
    return p, s_t * scale


@triton.jit
def _score_grads(
    q, q_t, g, go,  # [BLOCK_M, BLOCK_D] query-side tiles: Q, Q_T, G (upstream of O_t), G_o (upstream of O)
    k, k_t, v, v_t,  # [BLOCK_N, BLOCK_D] key-side tiles
    lse, r, c, delta,  # [BLOCK_M] row statistics (module docstring)
    rows, cols, k_len, scale, mask_row, stride_mask_n,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr, HAS_GO: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``(P, S_t − r, dS, dS_t)`` of one [BLOCK_M, BLOCK_N] tile."""
    p, s_t = _probs_and_tangent_scores(q, q_t, k, k_t, lse, rows, cols, k_len, scale, mask_row, stride_mask_n,
                                       HAS_Q_T, HAS_K_T, MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip
    centered = s_t - r[:, None]
    a = dot(g, tl.trans(v), None, DOT_PRECISION) - c[:, None]  # A − c
    grad_p = a * centered
    if HAS_V_T:
        grad_p = dot(g, tl.trans(v_t), grad_p, DOT_PRECISION)
    if HAS_GO:
        grad_p = dot(go, tl.trans(v), grad_p, DOT_PRECISION)
    return p, centered, p * (grad_p - delta[:, None]), p * a


@triton.jit
def _second_order_stats_kernel(
    Q, Q_T, G, GO, O,  # [B, Hq, Lq, D] query side (Q_T if HAS_Q_T, GO if HAS_GO)
    K, K_T, V, V_T,  # [B, Hkv, Lk, D] key side (K_T if HAS_K_T, V_T if HAS_V_T)
    MASK,  # [B, Lk] key-padding mask, uint8 (True = padding) or additive float (if MASK_KIND != 0)
    LSE,  # [B, Hq, Lq] fp32 base-2 log-sum-exp from the forward (+inf for fully masked rows)
    R, C, DELTA,  # [B, Hq, Lq] fp32 outputs r, c, δ (module docstring)
    stride_qb, stride_qh, stride_qm, stride_qtb, stride_qth, stride_qtm,
    stride_gb, stride_gh, stride_gm, stride_gob, stride_goh, stride_gom, stride_ob, stride_oh, stride_om,
    stride_kb, stride_kh, stride_kn, stride_ktb, stride_kth, stride_ktn,
    stride_vb, stride_vh, stride_vn, stride_vtb, stride_vth, stride_vtn,
    stride_mask_b, stride_mask_n,
    num_q_heads, group_size, q_len, k_len, head_dim,
    scale,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr, HAS_GO: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    start_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    kv_h = h // group_size

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < head_dim
    q_tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=q_tile_mask, other=0.0)  # fmt: skip
    q_t = q
    if HAS_Q_T:
        q_t = tl.load(Q_T + b * stride_qtb + h * stride_qth + rows[:, None] * stride_qtm + offs_d[None, :],
                      mask=q_tile_mask, other=0.0)  # fmt: skip
    g = tl.load(G + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :],
                mask=q_tile_mask, other=0.0)  # fmt: skip
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=q_tile_mask, other=0.0).to(tl.float32)  # fmt: skip
    c = tl.sum(g.to(tl.float32) * o, axis=1)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GO:
        go = tl.load(GO + b * stride_gob + h * stride_goh + rows[:, None] * stride_gom + offs_d[None, :],
                     mask=q_tile_mask, other=0.0)  # fmt: skip
        delta = tl.sum(go.to(tl.float32) * o, axis=1)
    stats = bh.to(tl.int64) * q_len + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
    k_base = K + b * stride_kb + kv_h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + kv_h * stride_vh + offs_d[None, :]
    k_t_base = K_T + b * stride_ktb + kv_h * stride_kth + offs_d[None, :]
    v_t_base = V_T + b * stride_vtb + kv_h * stride_vth + offs_d[None, :]
    mask_row = MASK + b * stride_mask_b

    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M)
    r = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_Q_T or HAS_K_T:
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_tile_mask = (cols < k_len)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_tile_mask, other=0.0)
            k_t = k
            if HAS_K_T:
                k_t = tl.load(k_t_base + cols[:, None] * stride_ktn, mask=kv_tile_mask, other=0.0)
            p, s_t = _probs_and_tangent_scores(q, q_t, k, k_t, lse, rows, cols, k_len, scale, mask_row,
                                               stride_mask_n, HAS_Q_T, HAS_K_T, MASK_KIND, IS_CAUSAL,
                                               DOT_PRECISION)  # fmt: skip
            r += tl.sum(p * s_t, axis=1)
    for start_n in range(0, hi, BLOCK_N):  # rowsum(G ⊙ O_t) = Σ P ⊙ ((A − c)(S_t − r) + G V_tᵀ)
        cols = start_n + offs_n
        kv_tile_mask = (cols < k_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_tile_mask, other=0.0)
        k_t = k
        if HAS_K_T:
            k_t = tl.load(k_t_base + cols[:, None] * stride_ktn, mask=kv_tile_mask, other=0.0)
        p, s_t = _probs_and_tangent_scores(q, q_t, k, k_t, lse, rows, cols, k_len, scale, mask_row,
                                           stride_mask_n, HAS_Q_T, HAS_K_T, MASK_KIND, IS_CAUSAL,
                                           DOT_PRECISION)  # fmt: skip
        weighted = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_Q_T or HAS_K_T:
            v = tl.load(v_base + cols[:, None] * stride_vn, mask=kv_tile_mask, other=0.0)
            weighted = (dot(g, tl.trans(v), None, DOT_PRECISION) - c[:, None]) * (s_t - r[:, None])
        if HAS_V_T:
            v_t = tl.load(v_t_base + cols[:, None] * stride_vtn, mask=kv_tile_mask, other=0.0)
            weighted = dot(g, tl.trans(v_t), weighted, DOT_PRECISION)
        delta += tl.sum(p * weighted, axis=1)
    tl.store(R + stats, r, mask=row_ok)
    tl.store(C + stats, c, mask=row_ok)
    tl.store(DELTA + stats, delta, mask=row_ok)


@triton.jit
def _second_order_dq_kernel(
    Q, Q_T, G, GO,  # [B, Hq, Lq, D] query side (Q_T if HAS_Q_T, GO if HAS_GO)
    K, K_T, V, V_T,  # [B, Hkv, Lk, D] key side (K_T if HAS_K_T, V_T if HAS_V_T)
    MASK,  # [B, Lk] key-padding mask (read only if MASK_KIND != 0)
    LSE, R, C, DELTA,  # [B, Hq, Lq] fp32 row statistics
    DQ,  # [B, Hq, Lq, D] contiguous gradient of Q
    stride_qb, stride_qh, stride_qm, stride_qtb, stride_qth, stride_qtm,
    stride_gb, stride_gh, stride_gm, stride_gob, stride_goh, stride_gom,
    stride_kb, stride_kh, stride_kn, stride_ktb, stride_kth, stride_ktn,
    stride_vb, stride_vh, stride_vn, stride_vtb, stride_vth, stride_vtn,
    stride_mask_b, stride_mask_n,
    num_q_heads, group_size, q_len, k_len, head_dim,
    scale,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr, HAS_GO: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    start_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    kv_h = h // group_size

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < head_dim
    q_tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=q_tile_mask, other=0.0)  # fmt: skip
    q_t = q
    if HAS_Q_T:
        q_t = tl.load(Q_T + b * stride_qtb + h * stride_qth + rows[:, None] * stride_qtm + offs_d[None, :],
                      mask=q_tile_mask, other=0.0)  # fmt: skip
    g = tl.load(G + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :],
                mask=q_tile_mask, other=0.0)  # fmt: skip
    go = g
    if HAS_GO:
        go = tl.load(GO + b * stride_gob + h * stride_goh + rows[:, None] * stride_gom + offs_d[None, :],
                     mask=q_tile_mask, other=0.0)  # fmt: skip
    stats = bh.to(tl.int64) * q_len + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
    r = tl.load(R + stats, mask=row_ok, other=0.0)
    c = tl.load(C + stats, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + kv_h * stride_vh + offs_d[None, :]
    k_t_base = K_T + b * stride_ktb + kv_h * stride_kth + offs_d[None, :]
    v_t_base = V_T + b * stride_vtb + kv_h * stride_vth + offs_d[None, :]
    mask_row = MASK + b * stride_mask_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_tile_mask = (cols < k_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_tile_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=kv_tile_mask, other=0.0)
        k_t = k
        if HAS_K_T:
            k_t = tl.load(k_t_base + cols[:, None] * stride_ktn, mask=kv_tile_mask, other=0.0)
        v_t = v
        if HAS_V_T:
            v_t = tl.load(v_t_base + cols[:, None] * stride_vtn, mask=kv_tile_mask, other=0.0)
        _, _, ds, ds_t = _score_grads(q, q_t, g, go, k, k_t, v, v_t, lse, r, c, delta, rows, cols, k_len,
                                      scale, mask_row, stride_mask_n, HAS_Q_T, HAS_K_T, HAS_V_T, HAS_GO,
                                      MASK_KIND, IS_CAUSAL, DOT_PRECISION)  # fmt: skip
        dq = dot(ds.to(k.dtype), k, dq, DOT_PRECISION)
        if HAS_K_T:
            dq = dot(ds_t.to(k_t.dtype), k_t, dq, DOT_PRECISION)

    out = bh.to(tl.int64) * q_len * head_dim + rows[:, None] * head_dim + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=q_tile_mask)


@triton.jit
def _second_order_dkdv_kernel(
    Q, Q_T, G, GO,  # [B, Hq, Lq, D] query side (Q_T if HAS_Q_T, GO if HAS_GO)
    K, K_T, V, V_T,  # [B, Hkv, Lk, D] key side (K_T if HAS_K_T, V_T if HAS_V_T)
    MASK,  # [B, Lk] key-padding mask (read only if MASK_KIND != 0)
    LSE, R, C, DELTA,  # [B, Hq, Lq] fp32 row statistics
    DK, DV,  # [B, Hkv, Lk, D] contiguous gradients of K and V
    D_BIAS,  # [B, Hkv, Lk] fp32 Σ dS over the group's heads and the queries (written only if MASK_GRAD)
    stride_qb, stride_qh, stride_qm, stride_qtb, stride_qth, stride_qtm,
    stride_gb, stride_gh, stride_gm, stride_gob, stride_goh, stride_gom,
    stride_kb, stride_kh, stride_kn, stride_ktb, stride_kth, stride_ktn,
    stride_vb, stride_vh, stride_vn, stride_vtb, stride_vth, stride_vtn,
    stride_mask_b, stride_mask_n,
    num_kv_heads, group_size, q_len, k_len, head_dim,
    scale,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr, HAS_GO: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_n_blocks = tl.cdiv(k_len, BLOCK_N)
    pid = tl.program_id(0)
    start_n = (pid % num_n_blocks) * BLOCK_N
    bh_kv = pid // num_n_blocks
    b = (bh_kv // num_kv_heads).to(tl.int64)
    kv_h = (bh_kv % num_kv_heads).to(tl.int64)
    num_q_heads = num_kv_heads * group_size

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_tile_mask = (cols < k_len)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=kv_tile_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                mask=kv_tile_mask, other=0.0)  # fmt: skip
    k_t = k
    if HAS_K_T:
        k_t = tl.load(K_T + b * stride_ktb + kv_h * stride_kth + cols[:, None] * stride_ktn + offs_d[None, :],
                      mask=kv_tile_mask, other=0.0)  # fmt: skip
    v_t = v
    if HAS_V_T:
        v_t = tl.load(V_T + b * stride_vtb + kv_h * stride_vth + cols[:, None] * stride_vtn + offs_d[None, :],
                      mask=kv_tile_mask, other=0.0)  # fmt: skip
    mask_row = MASK + b * stride_mask_b
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    d_bias = tl.zeros([BLOCK_N], dtype=tl.float32)

    lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    for member in range(0, group_size):
        h = kv_h * group_size + member
        q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
        q_t_base = Q_T + b * stride_qtb + h * stride_qth + offs_d[None, :]
        g_base = G + b * stride_gb + h * stride_gh + offs_d[None, :]
        go_base = GO + b * stride_gob + h * stride_goh + offs_d[None, :]
        stats_base = (b * num_q_heads + h) * q_len
        for start_m in range(lo, q_len, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            q_tile_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm, mask=q_tile_mask, other=0.0)
            q_t = q
            if HAS_Q_T:
                q_t = tl.load(q_t_base + rows[:, None] * stride_qtm, mask=q_tile_mask, other=0.0)
            g = tl.load(g_base + rows[:, None] * stride_gm, mask=q_tile_mask, other=0.0)
            go = g
            if HAS_GO:
                go = tl.load(go_base + rows[:, None] * stride_gom, mask=q_tile_mask, other=0.0)
            lse = tl.load(LSE + stats_base + rows, mask=row_ok, other=float("inf"))
            r = tl.load(R + stats_base + rows, mask=row_ok, other=0.0)
            c = tl.load(C + stats_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + stats_base + rows, mask=row_ok, other=0.0)
            p, centered, ds, ds_t = _score_grads(
                q, q_t, g, go, k, k_t, v, v_t, lse, r, c, delta, rows, cols, k_len, scale, mask_row,
                stride_mask_n, HAS_Q_T, HAS_K_T, HAS_V_T, HAS_GO, MASK_KIND, IS_CAUSAL, DOT_PRECISION,
            )  # fmt: skip
            dk = dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_PRECISION)
            if HAS_Q_T:
                dk = dot(tl.trans(ds_t.to(q_t.dtype)), q_t, dk, DOT_PRECISION)
            if HAS_Q_T or HAS_K_T:
                dv = dot(tl.trans((p * centered).to(g.dtype)), g, dv, DOT_PRECISION)
            if HAS_GO:
                dv = dot(tl.trans(p.to(go.dtype)), go, dv, DOT_PRECISION)
            if MASK_GRAD:
                d_bias += tl.sum(ds, axis=0)

    out = bh_kv.to(tl.int64) * k_len * head_dim + cols[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_tile_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_tile_mask)
    if MASK_GRAD:
        tl.store(D_BIAS + bh_kv.to(tl.int64) * k_len + cols, d_bias, mask=cols < k_len)


# ----------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per tile class and padded head dim, as in
# attention.py (the first config of each list is spill-free on sm_80/86/89/90, launched over
# N=4096 and N=197, and within 99 KB).
# A program here holds about twice the tiles of the flash backward's (k, v, k_t, v_t on the key
# side; q, q_t, G, G_o on the query side) and makes about twice its products, so the tiles are
# smaller and most configs take 8 warps. Exceptions, from the census (no spill-free or fitting
# tile found): IEEE fp32 at head dim 128 spills even at 16×16 (dq 268 bytes, dkdv 476; 16 warps
# spill more), and the key-tile kernel's fp32 TF32 tiles at head dim 128 take 112 KB of shared
# memory at any tile size (the eight 16×128 fp32 tiles), more than sm_86/89/120 give a block: there
# the launch raises OutOfResources and the torch recomputation serves. fp32 tiles at head dim 256
# do not fit at all: ``serves`` leaves them to the torch recomputation.

_STATS_CONFIGS = {
    "16-bit": {16: [(64, 64, 4, 2)], 32: [(64, 64, 8, 2)], 64: [(64, 32, 4, 2)], 128: [(16, 32, 8, 2)],
               256: [(16, 16, 8, 3)]},
    "tf32": {16: [(64, 32, 4, 2)], 32: [(64, 32, 4, 2)], 64: [(64, 16, 8, 3)], 128: [(16, 32, 8, 1)]},
    "ieee": {16: [(32, 32, 4, 2)], 32: [(32, 16, 4, 2)], 64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1)]},
}  # fmt: skip
_DQ_CONFIGS = {
    "16-bit": {16: [(64, 64, 8, 2)], 32: [(64, 64, 8, 2)], 64: [(64, 32, 8, 2)], 128: [(32, 32, 8, 1)],
               256: [(16, 32, 8, 1)]},
    "tf32": {16: [(64, 32, 4, 2)], 32: [(64, 32, 8, 2)], 64: [(32, 32, 8, 2)], 128: [(16, 16, 8, 1)]},
    "ieee": {16: [(32, 32, 8, 1)], 32: [(32, 32, 8, 1)], 64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1)]},
}  # fmt: skip
_DKDV_CONFIGS = {
    "16-bit": {16: [(32, 64, 8, 2)], 32: [(32, 32, 8, 2)], 64: [(32, 32, 8, 2)], 128: [(32, 32, 8, 1)],
               256: [(16, 16, 8, 1)]},
    "tf32": {16: [(32, 32, 8, 2)], 32: [(32, 32, 8, 2)], 64: [(16, 32, 8, 2)], 128: [(16, 16, 8, 1)]},
    "ieee": {16: [(32, 32, 8, 2)], 32: [(16, 32, 8, 1)], 64: [(16, 16, 8, 1)], 128: [(16, 16, 8, 1)]},
}  # fmt: skip


def serves(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether these kernels ship tiles for ``dtype`` at ``head_dim`` (fp32 up to 128, 16-bit up to 256)."""
    return head_dim_block(head_dim) in _DQ_CONFIGS[tile_class(dtype.itemsize, dot_precision(dtype))]


_KEY = ["q_len", "k_len", "head_dim", "HAS_Q_T", "HAS_K_T", "HAS_V_T", "HAS_GO", "MASK_KIND", "IS_CAUSAL",
        "DOT_PRECISION"]  # fmt: skip
_stats = tuned(_second_order_stats_kernel, _STATS_CONFIGS, _KEY)
_dq = tuned(_second_order_dq_kernel, _DQ_CONFIGS, _KEY)
_dkdv = tuned(_second_order_dkdv_kernel, _DKDV_CONFIGS, [*_KEY, "MASK_GRAD"])


# ----------------------------------------------------------------------------------------------
# launcher

_QUERY_SIDE = (("q", "Q"), ("qt", "Q_T"), ("g", "G"), ("go", "GO"))
_KEY_SIDE = (("k", "K"), ("kt", "K_T"), ("v", "V"), ("vt", "V_T"))


def _pointers_and_strides(tensors: dict) -> dict:
    """``{POINTER: tensor, stride_<x>b/h/m|n: ...}`` for the kernels' tensor arguments."""
    arguments = {}
    for (short, name), t in tensors.items():
        axis = "n" if name in ("K", "K_T", "V", "V_T") else "m"
        arguments.update({name: t, f"stride_{short}b": t.stride(0), f"stride_{short}h": t.stride(1),
                          f"stride_{short}{axis}": t.stride(2)})  # fmt: skip
    return arguments


@launcher
def primal_grads(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, scale, causal, key_padding_mask,
                 mask_grad):  # fmt: skip
    """``(dQ, dK, dV, d mask or None)`` of ``<grad_o, O> + <grad_o_t, O_t>``, as
    ``attention_second_order.primal_grads``, from the forward's ``o`` and base-2 ``lse``.

    ``grad_o_t`` is required (this is the second-order path); ``grad_o`` and each tangent may be
    ``None``. Tensors are read with unit stride along the head dim (copied where they have another).
    """
    check_served("q", q)
    q, k, v, q_t, k_t, v_t = map(unit_last_stride, (q, k, v, q_t, k_t, v_t))
    grad_o, grad_o_t, o = map(unit_last_stride, (grad_o, grad_o_t, o))
    check_row_offsets(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t, grad_o=grad_o, grad_o_t=grad_o_t, o=o)
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    mask, stride_mask_b, stride_mask_n, mask_kind = _mask_arguments(key_padding_mask, q)
    flags = dict(HAS_Q_T=q_t is not None, HAS_K_T=k_t is not None, HAS_V_T=v_t is not None,
                 HAS_GO=grad_o is not None, MASK_KIND=mask_kind, IS_CAUSAL=bool(causal),
                 DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=head_dim_block(head_dim))  # fmt: skip
    query_side = dict(zip(_QUERY_SIDE, (q, q_t, grad_o_t, grad_o)))
    key_side = dict(zip(_KEY_SIDE, (k, k_t, v, v_t)))
    placeholders = {**{key: q for key in _QUERY_SIDE}, **{key: k for key in _KEY_SIDE}}
    tensors = {key: (placeholders[key] if t is None else t) for key, t in {**query_side, **key_side}.items()}
    common = dict(**_pointers_and_strides(tensors), MASK=mask, stride_mask_b=stride_mask_b,
                  stride_mask_n=stride_mask_n, group_size=num_q_heads // num_kv_heads, q_len=q_len,
                  k_len=k_len, head_dim=head_dim, scale=scale, **flags)  # fmt: skip

    def stats_like():
        return torch.empty((batch, num_q_heads, q_len), dtype=torch.float32, device=q.device)

    r, c, delta = stats_like(), stats_like(), stats_like()

    def grid_q(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * num_q_heads,)

    _stats[grid_q](O=o, stride_ob=o.stride(0), stride_oh=o.stride(1), stride_om=o.stride(2), LSE=lse, R=r,
                   C=c, DELTA=delta, num_q_heads=num_q_heads, **common)  # fmt: skip
    dq = torch.empty((batch, num_q_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    _dq[grid_q](LSE=lse, R=r, C=c, DELTA=delta, DQ=dq, num_q_heads=num_q_heads, **common)

    dk = torch.empty((batch, num_kv_heads, k_len, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    d_bias = r  # a placeholder unless the mask gradient is asked for
    if mask_grad:
        d_bias = torch.empty((batch, num_kv_heads, k_len), dtype=torch.float32, device=q.device)

    def grid_kv(meta):
        return (triton.cdiv(k_len, meta["BLOCK_N"]) * batch * num_kv_heads,)

    _dkdv[grid_kv](LSE=lse, R=r, C=c, DELTA=delta, DK=dk, DV=dv, D_BIAS=d_bias, num_kv_heads=num_kv_heads,
                   MASK_GRAD=bool(mask_grad), **common)  # fmt: skip
    d_mask = d_bias.sum(dim=1).to(key_padding_mask.dtype) if mask_grad else None
    return dq, dk, dv, d_mask


def compile_specs(tokens):
    """Every (name, kernel, launch args, num_warps, num_stages) this module can launch over ``tokens``
    queries and keys, each with
    every feature on (all tangents, both upstream streams, a boolean mask, causal; for the key-tile
    kernel also the mask gradient), which holds the most tiles at once."""
    fp32_pointers = {"LSE", "R", "C", "DELTA", "D_BIAS"}
    flags = dict(HAS_Q_T=True, HAS_K_T=True, HAS_V_T=True, HAS_GO=True, MASK_KIND=MASK_BOOL, IS_CAUSAL=True)
    kernels = (("stats", _second_order_stats_kernel, _STATS_CONFIGS, flags),
               ("dq", _second_order_dq_kernel, _DQ_CONFIGS, flags),
               ("dkdv", _second_order_dkdv_kernel, _DKDV_CONFIGS, {**flags, "MASK_GRAD": True}))  # fmt: skip
    yield from tiled_specs(kernels, fp32_pointers, tokens)
