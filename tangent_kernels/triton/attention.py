"""Attention primal + tangent in one flash-style pass, and the flash backward (DESIGN.md §1, §2).

Forward, per query tile, over key tiles with online softmax (scores in log2 units):
``acc = Σ p̃ V``, ``r = Σ rowsum(p̃ ⊙ S_t)``, ``acc_t = Σ (p̃ ⊙ (S_t − c)) V + p̃ V_t``, all rescaled
by ``α = 2^(m_old − m_new)``, where ``c = r / l`` is the running softmax-weighted mean of each row's
tangent scores; then ``O = acc / l``, ``O_t = acc_t / l``. This is DESIGN.md §1's
``acc_t / l − (r / l) ⊙ O`` with the subtraction moved inside the sum: when ``c`` moves by ``δ``,
``acc_t −= δ · acc``. Centering matters for 16-bit (and TF32) tiles: ``p̃ ⊙ (S_t − c)`` is rounded
to the tile dtype before its product with ``V``, and ``S_t`` often has a large per-row constant
(``q_t · k̄``, a key-bias offset) that cancels exactly in ``O_t``; uncentered, its rounding error
swamped ``O_t`` (bf16: 17% relative with a key mean of 10σ, against 0.2% from rounding the output).
The log-sum-exp (base 2) is saved for the backward; no N×N tensor is stored.

Backward: the gradient of a loss through either output stream is the ordinary attention VJP at
``(Q, K, V)`` (for ``O_t`` it reaches ``Q_t, K_t, V_t``), so one flash backward serves both:
``delta = rowsum(dO ⊙ O)``, then key-tile programs accumulate ``dK, dV`` over every query head of
their group (no atomics), and query-tile programs accumulate ``dQ``.

Layout: ``(B, H, N, D)`` tensors with any batch/head/sequence strides and unit stride along D
(so ``(B, N, H, D)`` memory is read in place). Key/value heads may divide the query heads.
A head dim between powers of two runs as two power-of-two blocks of columns where that does less
MMA work than padding (80 = 64 + 16, not 128; ``head_dim_blocks``): two dots summed for ``Q Kᵀ``,
two accumulators for the products with ``V``. Key tiles wholly inside the sequence and below the
causal diagonal run without the key-length and causal masks.
The causal mask is aligned top-left (query i sees keys 0..i), as in torch's SDPA; a boolean
key-padding mask marks padding with True; an additive one is added to the scores. A query row
whose keys are all masked gives zeros.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import (DTYPE_NAMES, autotune, check_row_offsets, check_served, compiled_variants, dot_precision, launcher,
               tile_class, unit_last_stride)
from .math import dot

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _masked_scores(
    s,  # [BLOCK_M, BLOCK_N] fp32 scores q·kᵀ, unscaled
    rows,  # [BLOCK_M] query positions
    cols,  # [BLOCK_N] key positions
    k_len,
    qk_scale,  # softmax scale · log2(e)
    mask_row,  # pointer to this batch's key-padding mask row (read only if MASK_KIND != 0)
    stride_mask_n,
    MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BOUNDED: tl.constexpr = True,
):
    """Scores in log2 units with masked positions at -inf (keys past k_len, causal, padding).

    ``BOUNDED=False`` is for a tile with every key inside ``k_len`` and (causal) at or before every
    query row: only the key-padding mask applies there.
    """
    s = s * qk_scale
    if MASK_KIND == 1:
        padding = tl.load(mask_row + cols * stride_mask_n, mask=cols < k_len, other=1)
    if MASK_KIND == 2:
        bias = tl.load(mask_row + cols * stride_mask_n, mask=cols < k_len, other=0.0)
        s = s + bias.to(tl.float32)[None, :] * 1.4426950408889634
    if BOUNDED:
        valid = (cols < k_len)[None, :]
        if IS_CAUSAL:
            valid = valid & (rows[:, None] >= cols[None, :])
        if MASK_KIND == 1:
            valid = valid & (padding == 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
    elif MASK_KIND == 1:
        s = tl.where((padding == 0)[None, :], s, float("-inf"))
    return s


@triton.jit
def _load_rows(
    row0,  # pointer to row 0 of a tile's source
    rows,  # [BLOCK] the rows to read
    stride,  # stride between rows
    num_rows,  # rows past this read as 0 (only if BOUNDED)
    offs_d,  # [WIDTH] the head-dim columns to read (past head_dim read as 0)
    head_dim,
    BOUNDED: tl.constexpr,
):
    """A ``[BLOCK, WIDTH]`` tile; the row bound is checked only on tiles that can cross it."""
    mask = (offs_d < head_dim)[None, :]
    if BOUNDED:
        mask = mask & (rows < num_rows)[:, None]
    return tl.load(row0 + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(row0, rows, stride, num_rows, offs_d, head_dim, value):
    """Store ``value`` (fp32) as the rows ``rows`` and columns ``offs_d`` of ``row0``'s tensor."""
    mask = (rows < num_rows)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(row0 + rows[:, None] * stride + offs_d[None, :], value.to(row0.dtype.element_ty), mask=mask)


# The tangent products are not merged into dots with a doubled contraction, [q_t | q]·[k | k_t]ᵀ
# and [p_c | p̃]·[V ; V_t]: compiled as a launch for sm_90 and sm_80 (bf16, D = 64 and 128), building
# the doubled tiles (a pointer select, or tl.join) took 3-68% more SASS instructions per key tile
# and one more barrier, and saved at most one wgmma wait (2026-12, Triton 3.8).
@triton.jit
def _fwd_scores(
    s, s_t,  # [BLOCK_M, BLOCK_N] fp32 scores and tangent scores, unscaled, summed so far
    q, q_t,  # [BLOCK_M, WIDTH] query tiles over the columns offs_d (q_t read only if HAS_Q_T)
    k_row0, k_t_row0, stride_kn, stride_ktn,  # key (and key tangent) rows
    cols, k_len, offs_d, head_dim,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, DOT_PRECISION: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """``s += q kᵀ`` and ``s_t += q_t kᵀ + q k_tᵀ`` over one block of head-dim columns."""
    k = _load_rows(k_row0, cols, stride_kn, k_len, offs_d, head_dim, BOUNDED)
    s = dot(q, tl.trans(k), s, DOT_PRECISION)
    if HAS_Q_T:
        s_t = dot(q_t, tl.trans(k), s_t, DOT_PRECISION)
    if HAS_K_T:
        k_t = _load_rows(k_t_row0, cols, stride_ktn, k_len, offs_d, head_dim, BOUNDED)
        s_t = dot(q, tl.trans(k_t), s_t, DOT_PRECISION)
    return s, s_t


@triton.jit
def _fwd_values(
    acc, acc_t,  # [BLOCK_M, WIDTH] fp32 running sums over the columns offs_d
    p, p_c,  # [BLOCK_M, BLOCK_N] fp32 p̃ and p̃ ⊙ (S_t − c) of this tile
    alpha, shift,  # [BLOCK_M] rescaling of the sums so far, and the move of c
    v_row0, v_t_row0, stride_vn, stride_vtn,  # value (and value tangent) rows
    cols, k_len, offs_d, head_dim,
    HAS_S_T: tl.constexpr, HAS_V_T: tl.constexpr, DOT_PRECISION: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """Rescale the sums, re-center ``acc_t`` on the new ``c``, add ``p̃ V`` and ``p_c V + p̃ V_t``
    over one block of head-dim columns."""
    acc = acc * alpha[:, None]
    acc_t = acc_t * alpha[:, None]
    if HAS_S_T:
        acc_t -= shift[:, None] * acc
    v = _load_rows(v_row0, cols, stride_vn, k_len, offs_d, head_dim, BOUNDED)
    acc = dot(p.to(v.dtype), v, acc, DOT_PRECISION)
    if HAS_S_T:
        acc_t = dot(p_c.to(v.dtype), v, acc_t, DOT_PRECISION)
    if HAS_V_T:
        v_t = _load_rows(v_t_row0, cols, stride_vtn, k_len, offs_d, head_dim, BOUNDED)
        acc_t = dot(p.to(v_t.dtype), v_t, acc_t, DOT_PRECISION)
    return acc, acc_t


@triton.jit
def _fwd_tiles(
    acc, acc_t, acc2, acc_t2,  # running sums over head-dim columns offs_d, and offs_d2 (if BLOCK_D2)
    m_i, l_i, r_i, c_i,  # row statistics (module docstring)
    q, q_t, q2, q_t2,  # query tiles over offs_d, and offs_d2 (q_t read only if HAS_Q_T)
    k_row0, v_row0, k_t_row0, v_t_row0,  # pointers to key/value row 0 (tangents if given)
    stride_kn, stride_vn, stride_ktn, stride_vtn,
    lo, hi,  # the key tiles [lo, hi) to visit
    rows, offs_d, offs_d2, head_dim, k_len, scale, qk_scale, mask_row, stride_mask_n,
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """The forward over key tiles ``[lo, hi)``: the online-softmax update of both streams.
    ``BOUNDED``: the tiles may reach past ``k_len`` or (causal) past a query row, so are masked."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        s = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        s, s_t = _fwd_scores(s, s, q, q_t, k_row0, k_t_row0, stride_kn, stride_ktn, cols, k_len, offs_d, head_dim,
                             HAS_Q_T, HAS_K_T, DOT_PRECISION, BOUNDED)  # fmt: skip
        if BLOCK_D2 > 0:
            s, s_t = _fwd_scores(s, s_t, q2, q_t2, k_row0, k_t_row0, stride_kn, stride_ktn, cols, k_len, offs_d2,
                                 head_dim, HAS_Q_T, HAS_K_T, DOT_PRECISION, BOUNDED)  # fmt: skip
        s = _masked_scores(s, rows, cols, k_len, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL, BOUNDED)

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Every score of an unmasked tile without a mask is finite (for finite inputs): the row max
        # is then finite and l > 0 from the first tile on, so the guards below are needed only
        # where a row can have seen nothing but -inf (masked tiles, a padding or additive mask).
        GUARDED: tl.constexpr = BOUNDED or MASK_KIND != 0
        m_shift = m_new
        if GUARDED:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep p = 0, α = 0
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_c = p
        shift = c_i
        if HAS_Q_T or HAS_K_T:
            p_s_t = p * (s_t * scale)
            r_i = r_i * alpha + tl.sum(p_s_t, axis=1)
            l_safe = l_i
            if GUARDED:
                l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # all masked so far: r = 0, c = 0
            c_new = r_i / l_safe
            shift = c_new - c_i  # re-center what is summed so far on c_new
            c_i = c_new
            p_c = p_s_t - c_i[:, None] * p
        acc, acc_t = _fwd_values(
            acc, acc_t, p, p_c, alpha, shift, v_row0, v_t_row0, stride_vn, stride_vtn, cols, k_len, offs_d,
            head_dim, HAS_Q_T or HAS_K_T, HAS_V_T, DOT_PRECISION, BOUNDED)  # fmt: skip
        if BLOCK_D2 > 0:
            acc2, acc_t2 = _fwd_values(
                acc2, acc_t2, p, p_c, alpha, shift, v_row0, v_t_row0, stride_vn, stride_vtn, cols, k_len, offs_d2,
                head_dim, HAS_Q_T or HAS_K_T, HAS_V_T, DOT_PRECISION, BOUNDED)  # fmt: skip
        m_i = m_new
    return acc, acc_t, acc2, acc_t2, m_i, l_i, r_i, c_i


@triton.jit
def _attention_jvp_fwd_kernel(
    Q, K, V,  # [B, Hq, Lq, D], [B, Hkv, Lk, D], [B, Hkv, Lk, D] primal inputs
    Q_T, K_T, V_T,  # tangents, shaped like Q, K, V (read only if HAS_Q_T / HAS_K_T / HAS_V_T)
    MASK,  # [B, Lk] key-padding mask, uint8 (True = padding) or additive float (if MASK_KIND != 0)
    O, O_T,  # [B, Hq, Lq, D] primal and tangent outputs (O_T written only if a tangent is given)
    LSE,  # [B, Hq, Lq] fp32 base-2 log-sum-exp of the scaled scores (+inf for fully masked rows)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_qtb, stride_qth, stride_qtm,
    stride_ktb, stride_kth, stride_ktn,
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_om,
    stride_otb, stride_oth, stride_otm,
    stride_mask_b, stride_mask_n,
    num_q_heads, group_size,  # query heads per key/value head
    q_len, k_len, head_dim,
    scale,  # softmax scale
    HAS_Q_T: tl.constexpr, HAS_K_T: tl.constexpr, HAS_V_T: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # head-dim columns [0, BLOCK_D), then BLOCK_D2 more
):  # fmt: skip
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    start_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    kv_h = h // group_size

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_row0 = Q + b * stride_qb + h * stride_qh
    q_t_row0 = Q_T + b * stride_qtb + h * stride_qth
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_row0, rows, stride_qm, q_len, offs_d, head_dim, True)
    q_t = q
    if HAS_Q_T:
        q_t = _load_rows(q_t_row0, rows, stride_qtm, q_len, offs_d, head_dim, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the head dim's second block of columns (if any); placeholders otherwise
    offs_d2, q2, q_t2, acc2 = offs_d, q, q_t, acc
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _load_rows(q_row0, rows, stride_qm, q_len, offs_d2, head_dim, True)
        q_t2 = q2
        if HAS_Q_T:
            q_t2 = _load_rows(q_t_row0, rows, stride_qtm, q_len, offs_d2, head_dim, True)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    acc_t, acc_t2 = acc, acc2
    k_row0 = K + b * stride_kb + kv_h * stride_kh
    v_row0 = V + b * stride_vb + kv_h * stride_vh
    k_t_row0 = K_T + b * stride_ktb + kv_h * stride_kth
    v_t_row0 = V_T + b * stride_vtb + kv_h * stride_vth
    mask_row = MASK + b * stride_mask_b
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key tiles [0, full) lie inside k_len and (causal) before every row of this query tile: they
    # run unmasked; the rest, up to hi (the last partial tile, the causal diagonal), masked.
    hi = k_len
    full = k_len // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M)
        full = tl.minimum(k_len, start_m * BLOCK_M) // BLOCK_N * BLOCK_N
    acc, acc_t, acc2, acc_t2, m_i, l_i, r_i, c_i = _fwd_tiles(
        acc, acc_t, acc2, acc_t2, m_i, l_i, r_i, c_i, q, q_t, q2, q_t2, k_row0, v_row0, k_t_row0, v_t_row0,
        stride_kn, stride_vn, stride_ktn, stride_vtn, 0, full, rows, offs_d, offs_d2, head_dim, k_len, scale,
        qk_scale, mask_row, stride_mask_n, HAS_Q_T, HAS_K_T, HAS_V_T, MASK_KIND, IS_CAUSAL, DOT_PRECISION,
        BLOCK_N, BLOCK_D2, False)  # fmt: skip
    acc, acc_t, acc2, acc_t2, m_i, l_i, r_i, c_i = _fwd_tiles(
        acc, acc_t, acc2, acc_t2, m_i, l_i, r_i, c_i, q, q_t, q2, q_t2, k_row0, v_row0, k_t_row0, v_t_row0,
        stride_kn, stride_vn, stride_ktn, stride_vtn, full, hi, rows, offs_d, offs_d2, head_dim, k_len, scale,
        qk_scale, mask_row, stride_mask_n, HAS_Q_T, HAS_K_T, HAS_V_T, MASK_KIND, IS_CAUSAL, DOT_PRECISION,
        BLOCK_N, BLOCK_D2, True)  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a fully masked row: acc is 0, so O is 0
    o_row0 = O + b * stride_ob + h * stride_oh
    o_t_row0 = O_T + b * stride_otb + h * stride_oth
    _store_rows(o_row0, rows, stride_om, q_len, offs_d, head_dim, acc / l_safe[:, None])
    if BLOCK_D2 > 0:
        _store_rows(o_row0, rows, stride_om, q_len, offs_d2, head_dim, acc2 / l_safe[:, None])
    if HAS_Q_T or HAS_K_T or HAS_V_T:
        _store_rows(o_t_row0, rows, stride_otm, q_len, offs_d, head_dim, acc_t / l_safe[:, None])
        if BLOCK_D2 > 0:
            _store_rows(o_t_row0, rows, stride_otm, q_len, offs_d2, head_dim, acc_t2 / l_safe[:, None])
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + bh.to(tl.int64) * q_len + rows, lse, mask=rows < q_len)


@triton.jit
def _attention_bwd_delta_kernel(
    O,  # [B, Hq, Lq, D] primal output
    DO,  # [B, Hq, Lq, D] upstream gradient of one output stream
    DELTA,  # [B, Hq, Lq] fp32 rowsum(dO ⊙ O)
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_q_heads, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    rows = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (rows < q_len)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=tile_mask, other=0.0).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * q_len + rows, tl.sum(o * do, axis=1), mask=rows < q_len)


@triton.jit
def _dkdv_tiles(
    dk, dv, dk2, dv2,  # [BLOCK_N, width] fp32 running gradients of this key tile over offs_d, offs_d2
    k, v, k2, v2,  # this key tile over offs_d, and offs_d2 (if BLOCK_D2)
    q_row0, do_row0, stride_qm, stride_dom,  # this query head's Q and dO rows
    lse_row, delta_row,  # pointers to this query head's LSE and DELTA rows
    lo, hi, gap_at, gap,  # the query tiles [lo, hi), those from gap_at on moved up by gap
    cols, q_len, k_len, offs_d, offs_d2, head_dim, qk_scale, mask_row, stride_mask_n,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D2: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """Accumulate ``dK, dV`` over query tiles. ``BOUNDED``: the tiles may reach past ``q_len`` or
    (causal) hold queries before some of these keys, so they are masked. Keys past ``k_len`` need
    no mask here: they reach only their own rows of dK and dV, which are not stored."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.where(start_m < gap_at, 0, gap) + tl.arange(0, BLOCK_M)
        q = _load_rows(q_row0, rows, stride_qm, q_len, offs_d, head_dim, BOUNDED)
        do = _load_rows(do_row0, rows, stride_dom, q_len, offs_d, head_dim, BOUNDED)
        if BOUNDED:
            lse = tl.load(lse_row + rows, mask=rows < q_len, other=float("inf"))
            delta = tl.load(delta_row + rows, mask=rows < q_len, other=0.0)
        else:
            lse = tl.load(lse_row + rows)
            delta = tl.load(delta_row + rows)
        s = dot(q, tl.trans(k), None, DOT_PRECISION)
        dp = dot(do, tl.trans(v), None, DOT_PRECISION)
        if BLOCK_D2 > 0:
            q2 = _load_rows(q_row0, rows, stride_qm, q_len, offs_d2, head_dim, BOUNDED)
            do2 = _load_rows(do_row0, rows, stride_dom, q_len, offs_d2, head_dim, BOUNDED)
            s = dot(q2, tl.trans(k2), s, DOT_PRECISION)
            dp = dot(do2, tl.trans(v2), dp, DOT_PRECISION)
        s = _masked_scores(s, rows, cols, k_len, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL, BOUNDED)
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        dv = dot(tl.trans(p.to(do.dtype)), do, dv, DOT_PRECISION)
        dk = dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_PRECISION)
        if BLOCK_D2 > 0:
            dv2 = dot(tl.trans(p.to(do2.dtype)), do2, dv2, DOT_PRECISION)
            dk2 = dot(tl.trans(ds.to(q2.dtype)), q2, dk2, DOT_PRECISION)
    return dk, dv, dk2, dv2


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,  # primal inputs, as in the forward
    DO,  # [B, Hq, Lq, D] upstream gradient
    LSE, DELTA,  # [B, Hq, Lq] fp32 from the forward and the delta kernel
    MASK,  # [B, Lk] key-padding mask (read only if MASK_KIND != 0)
    DK, DV,  # [B, Hkv, Lk, D] contiguous gradients of K and V
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mask_b, stride_mask_n,
    num_kv_heads, group_size, q_len, k_len, head_dim,
    scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # head-dim columns [0, BLOCK_D), then BLOCK_D2 more
):  # fmt: skip
    num_n_blocks = tl.cdiv(k_len, BLOCK_N)
    pid = tl.program_id(0)
    start_n = (pid % num_n_blocks) * BLOCK_N
    bh_kv = pid // num_n_blocks
    b = (bh_kv // num_kv_heads).to(tl.int64)
    kv_h = (bh_kv % num_kv_heads).to(tl.int64)
    num_q_heads = num_kv_heads * group_size

    cols = start_n + tl.arange(0, BLOCK_N)
    k_row0 = K + b * stride_kb + kv_h * stride_kh
    v_row0 = V + b * stride_vb + kv_h * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_row0, cols, stride_kn, k_len, offs_d, head_dim, True)
    v = _load_rows(v_row0, cols, stride_vn, k_len, offs_d, head_dim, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # the head dim's second block of columns (if any); placeholders otherwise
    offs_d2, k2, v2, dk2 = offs_d, k, v, dk
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = _load_rows(k_row0, cols, stride_kn, k_len, offs_d2, head_dim, True)
        v2 = _load_rows(v_row0, cols, stride_vn, k_len, offs_d2, head_dim, True)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    dv, dv2 = dk, dk2
    mask_row = MASK + b * stride_mask_b
    qk_scale = scale * 1.4426950408889634

    # Query tiles before lo see none of these keys (causal); those in [lo, diagonal) see some and the
    # last may be partial: these run masked (one loop, over the gap), the rest [diagonal, full) not.
    lo = 0
    diagonal = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diagonal = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, q_len)
    full = tl.maximum(q_len // BLOCK_M * BLOCK_M, diagonal)
    for g in range(0, group_size):
        h = kv_h * group_size + g
        q_row0 = Q + b * stride_qb + h * stride_qh
        do_row0 = DO + b * stride_dob + h * stride_doh
        lse_row = LSE + (b * num_q_heads + h) * q_len
        delta_row = DELTA + (b * num_q_heads + h) * q_len
        dk, dv, dk2, dv2 = _dkdv_tiles(
            dk, dv, dk2, dv2, k, v, k2, v2, q_row0, do_row0, stride_qm, stride_dom, lse_row, delta_row,
            diagonal, full, full, 0, cols, q_len, k_len, offs_d, offs_d2, head_dim, qk_scale, mask_row,
            stride_mask_n, MASK_KIND, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_D2, False)  # fmt: skip
        dk, dv, dk2, dv2 = _dkdv_tiles(
            dk, dv, dk2, dv2, k, v, k2, v2, q_row0, do_row0, stride_qm, stride_dom, lse_row, delta_row,
            lo, diagonal + q_len - full, diagonal, full - diagonal, cols, q_len, k_len, offs_d, offs_d2,
            head_dim, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_D2,
            True)  # fmt: skip

    out_row0 = bh_kv.to(tl.int64) * k_len * head_dim  # DK and DV are contiguous
    _store_rows(DK + out_row0, cols, head_dim, k_len, offs_d, head_dim, dk * scale)
    _store_rows(DV + out_row0, cols, head_dim, k_len, offs_d, head_dim, dv)
    if BLOCK_D2 > 0:
        _store_rows(DK + out_row0, cols, head_dim, k_len, offs_d2, head_dim, dk2 * scale)
        _store_rows(DV + out_row0, cols, head_dim, k_len, offs_d2, head_dim, dv2)

@triton.jit
def _dq_tiles(
    dq, dq2,  # [BLOCK_M, width] fp32 running gradient of this query tile over offs_d, offs_d2
    q, do, q2, do2, lse, delta,  # this query tile and its dO over offs_d and offs_d2, its rows' LSE, delta
    k_row0, v_row0, stride_kn, stride_vn,  # key and value rows
    lo, hi,  # the key tiles [lo, hi) to visit
    rows, k_len, offs_d, offs_d2, head_dim, qk_scale, mask_row, stride_mask_n,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """Accumulate ``dQ`` over key tiles ``[lo, hi)``, masked if ``BOUNDED`` (as in the forward)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_row0, cols, stride_kn, k_len, offs_d, head_dim, BOUNDED)
        v = _load_rows(v_row0, cols, stride_vn, k_len, offs_d, head_dim, BOUNDED)
        s = dot(q, tl.trans(k), None, DOT_PRECISION)
        dp = dot(do, tl.trans(v), None, DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = _load_rows(k_row0, cols, stride_kn, k_len, offs_d2, head_dim, BOUNDED)
            v2 = _load_rows(v_row0, cols, stride_vn, k_len, offs_d2, head_dim, BOUNDED)
            s = dot(q2, tl.trans(k2), s, DOT_PRECISION)
            dp = dot(do2, tl.trans(v2), dp, DOT_PRECISION)
        s = _masked_scores(s, rows, cols, k_len, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL, BOUNDED)
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, DOT_PRECISION)
        if BLOCK_D2 > 0:
            dq2 = dot(ds.to(k2.dtype), k2, dq2, DOT_PRECISION)
    return dq, dq2


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V,  # primal inputs, as in the forward
    DO,  # [B, Hq, Lq, D] upstream gradient
    LSE, DELTA,  # [B, Hq, Lq] fp32 from the forward and the delta kernel
    MASK,  # [B, Lk] key-padding mask (read only if MASK_KIND != 0)
    DQ,  # [B, Hq, Lq, D] contiguous gradient of Q
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mask_b, stride_mask_n,
    num_q_heads, group_size, q_len, k_len, head_dim,
    scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # head-dim columns [0, BLOCK_D), then BLOCK_D2 more
):  # fmt: skip
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    start_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    kv_h = h // group_size

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_row0 = Q + b * stride_qb + h * stride_qh
    do_row0 = DO + b * stride_dob + h * stride_doh
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_row0, rows, stride_qm, q_len, offs_d, head_dim, True)
    do = _load_rows(do_row0, rows, stride_dom, q_len, offs_d, head_dim, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the head dim's second block of columns (if any); placeholders otherwise
    offs_d2, q2, do2, dq2 = offs_d, q, do, dq
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _load_rows(q_row0, rows, stride_qm, q_len, offs_d2, head_dim, True)
        do2 = _load_rows(do_row0, rows, stride_dom, q_len, offs_d2, head_dim, True)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * q_len + rows, mask=rows < q_len, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + rows, mask=rows < q_len, other=0.0)
    k_row0 = K + b * stride_kb + kv_h * stride_kh
    v_row0 = V + b * stride_vb + kv_h * stride_vh
    mask_row = MASK + b * stride_mask_b
    qk_scale = scale * 1.4426950408889634

    # unmasked key tiles, then the masked ones (as in the forward)
    hi = k_len
    full = k_len // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M)
        full = tl.minimum(k_len, start_m * BLOCK_M) // BLOCK_N * BLOCK_N
    dq, dq2 = _dq_tiles(dq, dq2, q, do, q2, do2, lse, delta, k_row0, v_row0, stride_kn, stride_vn, 0, full, rows,
                        k_len, offs_d, offs_d2, head_dim, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL,
                        DOT_PRECISION, BLOCK_N, BLOCK_D2, False)  # fmt: skip
    dq, dq2 = _dq_tiles(dq, dq2, q, do, q2, do2, lse, delta, k_row0, v_row0, stride_kn, stride_vn, full, hi, rows,
                        k_len, offs_d, offs_d2, head_dim, qk_scale, mask_row, stride_mask_n, MASK_KIND, IS_CAUSAL,
                        DOT_PRECISION, BLOCK_N, BLOCK_D2, True)  # fmt: skip

    out_row0 = DQ + bh.to(tl.int64) * q_len * head_dim  # DQ is contiguous
    _store_rows(out_row0, rows, head_dim, q_len, offs_d, head_dim, dq * scale)
    if BLOCK_D2 > 0:
        _store_rows(out_row0, rows, head_dim, q_len, offs_d2, head_dim, dq2 * scale)

# ----------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per tile class (see tile_class) and head-dim
# width (``tile_width``: a power of two, or 48 / 96 / 192 for a head dim split in two blocks of
# columns, whose loop bodies hold both blocks' tiles). Chosen without a GPU, from ptxas's counts for
# each config compiled as a B=4 H=16 N=4096 launch specializes it, every feature on (every config on
# sm_80/sm_90; the first ones on sm_80, sm_86 and sm_90, and on six targets in the census:
# benchmarks/results/ptxas-2026-12-02b): the first config of each list, the only one that runs with
# autotuning off, is the largest tile found that ptxas compiles without register spills on sm_80,
# sm_86, sm_89 and sm_90 and within 99 KB of shared memory (sm_86/89), launched over N=4096 and
# over N=197 (lengths and mask strides not divisible by 16: narrower loads, more registers; the
# first tiles of 18 lists spilled 4-672 bytes there and were re-picked, ptxas-2026-12-02e);
# tests/test_compile_targets.py holds every list to that. The others are alternatives for the autotuner (some spill a little or
# need more than 99 KB), which at launch drops those over the device's shared memory. With the
# masked key tiles in a loop of their own, the forward with every tangent sits at 255 registers on
# sm_80/86 from head dim 64 up, and its former first tiles there (128×64, 64×32) spilled 4-96
# bytes: its first configs are smaller, and the larger tiles, spill-free on sm_90 (where wgmma reads
# the query tiles from shared memory) and fewer instructions per key, follow for the autotuner.
# fp32 tiles take twice the shared memory of 16-bit ones; exact (IEEE) fp32 products run on the FMA
# units, where every thread holds far more of each tile, so that class has the smallest tiles.
# Exceptions: IEEE fp32 at head dim 256, where even 16×16 spills (the least found); launched over
# N=197, IEEE fp32 at 192 (8-28 bytes) and TF32 at 256 (4 bytes on sm_80), the least found.

_FWD_CONFIGS = {
    "16-bit": {
        16: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
        32: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
        48: [(128, 32, 8, 3), (64, 32, 4, 2), (128, 64, 8, 3)],
        64: [(64, 32, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        96: [(64, 16, 8, 3), (64, 16, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)],
        128: [(32, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)],
        192: [(32, 32, 8, 2), (16, 32, 4, 2), (64, 32, 8, 2)],
        256: [(16, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2)],
    },
    "tf32": {
        16: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        32: [(128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        48: [(128, 16, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2)],
        64: [(64, 32, 4, 2), (32, 64, 4, 2)],
        96: [(16, 32, 8, 2), (32, 16, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
        128: [(16, 32, 8, 2), (32, 16, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
        192: [(16, 16, 8, 2), (16, 16, 8, 1), (16, 32, 8, 1)],
        256: [(16, 16, 8, 2), (16, 16, 8, 1), (16, 32, 8, 1)],
    },
    "ieee": {
        16: [(32, 64, 8, 2), (64, 32, 8, 2)],
        32: [(64, 16, 8, 2), (16, 32, 8, 2)],
        48: [(64, 16, 8, 2), (32, 16, 4, 2)],
        64: [(32, 16, 8, 3), (32, 16, 4, 2), (64, 16, 8, 2)],
        96: [(16, 16, 8, 1), (16, 16, 4, 2), (16, 16, 8, 2)],
        128: [(16, 16, 8, 2), (16, 32, 8, 1)],
        192: [(16, 16, 8, 2), (16, 16, 8, 1)],
        256: [(16, 16, 8, 1)],
    },
}
_DKDV_CONFIGS = {
    "16-bit": {
        16: [(32, 128, 4, 3), (64, 64, 4, 3)],
        32: [(64, 64, 4, 3), (32, 128, 4, 3)],
        48: [(32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
        64: [(128, 16, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
        96: [(16, 32, 4, 2), (32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
        128: [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
        192: [(16, 32, 8, 2), (32, 32, 8, 1)],
        256: [(32, 32, 8, 1), (16, 32, 8, 2)],
    },
    "tf32": {
        16: [(128, 32, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)],
        32: [(64, 64, 4, 3), (32, 128, 4, 3)],
        48: [(64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
        64: [(64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
        96: [(16, 16, 4, 2), (32, 32, 4, 2), (32, 64, 8, 1)],
        128: [(32, 32, 4, 2), (32, 64, 8, 1)],
        192: [(16, 16, 4, 1), (16, 32, 8, 1)],
        256: [(16, 16, 4, 1), (16, 32, 8, 1)],
    },
    "ieee": {
        16: [(64, 64, 8, 1), (64, 64, 8, 2), (32, 64, 8, 2)],
        32: [(32, 64, 8, 1), (32, 64, 8, 2), (64, 32, 4, 1)],
        48: [(32, 64, 8, 1), (64, 32, 8, 1)],
        64: [(32, 64, 8, 1), (64, 32, 8, 1)],
        96: [(16, 16, 8, 1), (16, 16, 4, 1), (16, 32, 4, 1), (16, 64, 8, 1)],
        128: [(16, 64, 8, 1), (16, 32, 4, 1), (16, 32, 8, 1)],
        192: [(16, 32, 8, 1), (16, 16, 4, 1)],
        256: [(16, 16, 4, 3), (16, 16, 8, 2), (16, 16, 4, 1), (16, 32, 8, 1)],
    },
}
_DQ_CONFIGS = {
    "16-bit": {
        16: [(128, 32, 4, 3), (64, 64, 4, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3)],
        48: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)],
        64: [(128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)],
        96: [(128, 32, 8, 2), (64, 64, 4, 2)],
        128: [(128, 32, 8, 2), (64, 64, 4, 2)],
        192: [(32, 32, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 1)],
    },
    "tf32": {
        16: [(128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        32: [(128, 32, 4, 3), (64, 64, 4, 3)],
        48: [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        64: [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        96: [(64, 16, 8, 2), (32, 16, 8, 1), (32, 32, 4, 1), (64, 32, 4, 2)],
        128: [(64, 16, 8, 3), (32, 32, 4, 1), (64, 64, 4, 2), (64, 32, 4, 2)],
        192: [(16, 32, 8, 1), (16, 16, 4, 1), (32, 32, 4, 2)],
        256: [(16, 16, 8, 1), (32, 32, 4, 2), (32, 32, 4, 1)],
    },
    "ieee": {
        16: [(32, 64, 4, 2), (64, 64, 4, 2)],
        32: [(64, 64, 8, 2), (32, 64, 4, 2)],
        48: [(32, 32, 4, 2), (64, 32, 8, 2)],
        64: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
        96: [(16, 16, 8, 1), (64, 16, 8, 2), (32, 16, 4, 1)],
        128: [(32, 16, 8, 3), (64, 16, 8, 1), (32, 32, 4, 1)],
        192: [(16, 16, 8, 2), (16, 32, 8, 1), (32, 16, 8, 1)],
        256: [(16, 32, 8, 1), (32, 16, 8, 1)],
    },
}


def _configs(table):
    """Each distinct config of ``table`` once (the autotuner keys configs by identity)."""
    configs = {}
    for by_head_dim in table.values():
        for entries in by_head_dim.values():
            for block_m, block_n, warps, stages in entries:
                if (block_m, block_n, warps, stages) not in configs:
                    configs[block_m, block_n, warps, stages] = triton.Config(
                        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
                    )
    return list(configs.values())


def tile_width(block_d: int, block_d2: int = 0) -> int:
    """The key of a head dim's tile list: its block width ``block_d``, or for a head dim split in two
    blocks (``head_dim_blocks``) one and a half times the first, the widest split it holds (48 =
    32 + 16, 96 = 64 + 32 for 72/80/96, 192 = 128 + 64): a split runs both blocks' tiles in one loop
    body, so it has lists of its own, not those of its padded width."""
    return block_d * 3 // 2 if block_d2 else block_d


def _pruner(table):
    """Keep the configs listed for the call's element width and head-dim blocks (``tile_width``), in
    order; a kernel without split lists (no ``BLOCK_D2``) takes those of the padded head dim."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        by_width = table[tile_class(args["Q"].element_size(), args["DOT_PRECISION"])]
        width = tile_width(args.get("BLOCK_D", 0), args.get("BLOCK_D2", 0))
        wanted = by_width[width] if width in by_width else by_width[head_dim_block(args["head_dim"])]
        by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        return [by_key[entry] for entry in wanted]

    return prune


LENGTHS = ("q_len", "k_len")  # autotuned per power-of-two bucket of these
_FWD_KEY = ["q_len", "k_len", "head_dim", "HAS_Q_T", "HAS_K_T", "HAS_V_T", "MASK_KIND", "IS_CAUSAL", "DOT_PRECISION"]
_BWD_KEY = ["q_len", "k_len", "head_dim", "MASK_KIND", "IS_CAUSAL", "DOT_PRECISION"]


def tuned(kernel, table, key):
    """``kernel`` autotuned over the configs of ``table`` (``_pruner``), keyed on ``key`` with the
    sequence lengths bucketed."""
    return autotune(_configs(table), key, _pruner(table), LENGTHS)(kernel)


_attention_jvp_fwd = tuned(_attention_jvp_fwd_kernel, _FWD_CONFIGS, _FWD_KEY)
_attention_bwd_dkdv = tuned(_attention_bwd_dkdv_kernel, _DKDV_CONFIGS, _BWD_KEY)
_attention_bwd_dq = tuned(_attention_bwd_dq_kernel, _DQ_CONFIGS, _BWD_KEY)


# ----------------------------------------------------------------------------------------------
# launchers


def head_dim_block(head_dim: int) -> int:
    """The power-of-two tile width that holds ``head_dim`` (at least 16, the smallest dot size)."""
    return max(16, triton.next_power_of_2(head_dim))


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_D2)``: the head dim as a power-of-two block of columns and, where that does
    less MMA work than one padded block, a second smaller one (``tl.dot`` needs power-of-two sizes
    of at least 16): 72 and 80 → 64 + 16, 96 → 64 + 32, 40 → 32 + 16, against 128 and 64 padded.
    ``BLOCK_D2`` is 0 where one block serves."""
    padded = head_dim_block(head_dim)
    first = padded // 2
    if first >= 16:
        second = max(16, triton.next_power_of_2(head_dim - first))
        if first + second < padded:
            return first, second
    return padded, 0




def _mask_arguments(key_padding_mask, placeholder):
    """``(pointer tensor, stride over batch, stride over keys, MASK_KIND)`` for the kernels."""
    if key_padding_mask is None:
        return placeholder, 0, 0, MASK_NONE
    if key_padding_mask.dtype == torch.bool:
        mask = key_padding_mask.view(torch.uint8)
        return mask, mask.stride(0), mask.stride(1), MASK_BOOL
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1), MASK_ADDITIVE


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bnhd_like(t: torch.Tensor) -> torch.Tensor:
    """A ``(B, H, N, D)`` output stored as ``(B, N, H, D)``, so that merging the heads after
    attention (``o.transpose(1, 2).reshape(B, N, H·D)``) is a view, not a copy."""
    batch, heads, tokens, head_dim = t.shape
    return torch.empty((batch, tokens, heads, head_dim), dtype=t.dtype, device=t.device).transpose(1, 2)


@launcher
def forward(q, k, v, q_t, k_t, v_t, scale, causal, key_padding_mask):
    """Launch the forward: returns ``(o, o_t or None, lse)`` with ``lse`` in base 2."""
    check_served("q", q)
    q, k, v, q_t, k_t, v_t = map(unit_last_stride, (q, k, v, q_t, k_t, v_t))
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    has_tangent = q_t is not None or k_t is not None or v_t is not None
    o = _bnhd_like(q)
    o_t = _bnhd_like(q) if has_tangent else o
    check_row_offsets(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t, o=o)
    lse = torch.empty((batch, num_q_heads, q_len), dtype=torch.float32, device=q.device)
    mask, stride_mask_b, stride_mask_n, mask_kind = _mask_arguments(key_padding_mask, q)
    q_t_, k_t_, v_t_ = (q if q_t is None else q_t), (k if k_t is None else k_t), (v if v_t is None else v_t)
    block_d, block_d2 = head_dim_blocks(head_dim)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * num_q_heads,)

    _attention_jvp_fwd[grid](
        Q=q, K=k, V=v, Q_T=q_t_, K_T=k_t_, V_T=v_t_, MASK=mask, O=o, O_T=o_t, LSE=lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_qtb=q_t_.stride(0), stride_qth=q_t_.stride(1), stride_qtm=q_t_.stride(2),
        stride_ktb=k_t_.stride(0), stride_kth=k_t_.stride(1), stride_ktn=k_t_.stride(2),
        stride_vtb=v_t_.stride(0), stride_vth=v_t_.stride(1), stride_vtn=v_t_.stride(2),
        stride_ob=o.stride(0), stride_oh=o.stride(1), stride_om=o.stride(2),
        stride_otb=o_t.stride(0), stride_oth=o_t.stride(1), stride_otm=o_t.stride(2),
        stride_mask_b=stride_mask_b, stride_mask_n=stride_mask_n,
        num_q_heads=num_q_heads, group_size=num_q_heads // num_kv_heads,
        q_len=q_len, k_len=k_len, head_dim=head_dim, scale=scale,
        HAS_Q_T=q_t is not None, HAS_K_T=k_t is not None, HAS_V_T=v_t is not None,
        MASK_KIND=mask_kind, IS_CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d, BLOCK_D2=block_d2,
    )  # fmt: skip
    return o, (o_t if has_tangent else None), lse


@launcher
def backward(grad_out, q, k, v, o, lse, scale, causal, key_padding_mask, need_dq, need_dkv):
    """The attention VJP at ``(q, k, v)`` for upstream ``grad_out``: ``(dq, dk, dv)``.

    Gradients that were not asked for are ``None``.
    """
    check_served("q", q)
    grad_out, q, k, v, o = map(unit_last_stride, (grad_out, q, k, v, o))
    check_row_offsets(grad_out=grad_out, q=q, k=k, v=v, o=o)
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    block_d = head_dim_block(head_dim)
    mask, stride_mask_b, stride_mask_n, mask_kind = _mask_arguments(key_padding_mask, q)
    common = dict(
        Q=q, K=k, V=v, DO=grad_out, MASK=mask,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_dob=grad_out.stride(0), stride_doh=grad_out.stride(1), stride_dom=grad_out.stride(2),
        stride_mask_b=stride_mask_b, stride_mask_n=stride_mask_n,
        group_size=num_q_heads // num_kv_heads, q_len=q_len, k_len=k_len, head_dim=head_dim, scale=scale,
        MASK_KIND=mask_kind, IS_CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    blocks = dict(zip(("BLOCK_D", "BLOCK_D2"), head_dim_blocks(head_dim)))

    delta = torch.empty((batch, num_q_heads, q_len), dtype=torch.float32, device=q.device)
    delta_block = 64
    _attention_bwd_delta_kernel[(triton.cdiv(q_len, delta_block) * batch * num_q_heads,)](
        o, grad_out, delta, *_strides(o), *_strides(grad_out), num_q_heads, q_len, head_dim,
        BLOCK_M=delta_block, BLOCK_D=block_d,
    )  # fmt: skip

    dq = dk = dv = None
    if need_dkv:
        dk = torch.empty((batch, num_kv_heads, k_len, head_dim), dtype=k.dtype, device=k.device)
        dv = torch.empty((batch, num_kv_heads, k_len, head_dim), dtype=v.dtype, device=v.device)

        def grid_kv(meta):
            return (triton.cdiv(k_len, meta["BLOCK_N"]) * batch * num_kv_heads,)

        _attention_bwd_dkdv[grid_kv](LSE=lse, DELTA=delta, DK=dk, DV=dv, num_kv_heads=num_kv_heads, **common, **blocks)
    if need_dq:
        dq = torch.empty((batch, num_q_heads, q_len, head_dim), dtype=q.dtype, device=q.device)

        def grid_q(meta):
            return (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * num_q_heads,)

        _attention_bwd_dq[grid_q](LSE=lse, DELTA=delta, DQ=dq, num_q_heads=num_q_heads, **common, **blocks)
    return dq, dk, dv


# The launch the compile checks specialize for: batch and heads of a mid-size model (B=4, H=16).
BATCH, HEADS = 4, 16


def launch_args(kernel, dtype, tokens, head_dim, fp32_pointers, constexprs):
    """Launch values of every argument of an attention kernel over contiguous ``(B, H, tokens,
    head_dim)`` tensors in ``dtype`` (``compile_check``: a tensor is its dtype); pointers named in
    ``fp32_pointers`` are fp32 row statistics, ``MASK`` a boolean key mask as bytes."""
    strides = {"b": HEADS * tokens * head_dim, "h": tokens * head_dim, "m": head_dim, "n": head_dim}
    ints = {"num_q_heads": HEADS, "num_kv_heads": HEADS, "num_heads": HEADS, "group_size": 1, "q_len": tokens,
            "k_len": tokens, "head_dim": head_dim, "stride_mask_b": tokens, "stride_mask_n": 1}  # fmt: skip
    args = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            args[arg] = constexprs[arg]
        elif arg in fp32_pointers:
            args[arg] = torch.float32
        elif arg == "MASK":
            args[arg] = torch.uint8
        elif arg.isupper():
            args[arg] = dtype
        elif arg == "scale":
            args[arg] = head_dim**-0.5
        else:
            args[arg] = ints[arg] if arg in ints else strides[arg[-1]]
    return args


def _head_dim_blocks_of_list(kernel, width):
    """``(head-dim block constexprs, name suffix)`` that ``kernel`` launches with for its tile list
    ``width`` (``tile_width``): one block of a power-of-two width, or the widest split of a split
    list (64 + 32 for 96, which holds 72 and 80 as 64 + 16)."""
    if width & (width - 1) == 0:
        return {"BLOCK_D": width, **({"BLOCK_D2": 0} if "BLOCK_D2" in kernel.arg_names else {})}, ""
    first, second = width * 2 // 3, width // 3
    return {"BLOCK_D": first, "BLOCK_D2": second}, f" split={first}+{second}"


def tiled_specs(kernels, fp32_pointers, tokens):
    """Compile specs of tiled attention kernels over ``tokens`` queries and keys: for ``(name,
    kernel, config table, constexpr flags)`` in ``kernels``, every config of its tile class in
    every compiled variant (``launch_args`` for the pointers)."""
    for dtype, precision, label in compiled_variants():
        for kernel_name, kernel, table, flags in kernels:
            for block_d, entries in table[tile_class(dtype.itemsize, precision)].items():
                blocks, split = _head_dim_blocks_of_list(kernel, block_d)
                for block_m, block_n, warps, stages in entries:
                    constexprs = {**flags, "DOT_PRECISION": precision, "BLOCK_M": block_m,
                                  "BLOCK_N": block_n, **blocks}  # fmt: skip
                    head_dim = blocks["BLOCK_D"] + blocks.get("BLOCK_D2", 0)
                    args = launch_args(kernel, dtype, tokens, head_dim, fp32_pointers, constexprs)
                    yield (f"{kernel_name} {label} D={block_d} M={block_m} N={block_n} w={warps} s={stages}{split}",
                           kernel, args, warps, stages)  # fmt: skip


def compile_specs(tokens):
    """Every (name, kernel, launch args, num_warps, num_stages) this module can launch, over
    ``tokens`` queries and keys.

    The forward is checked with every feature on (all tangents, a boolean key mask, causal),
    which holds the most tiles at once; the backward kernels likewise.
    """
    fp32_pointers = {"LSE", "DELTA"}
    kernels = (
        ("fwd", _attention_jvp_fwd_kernel, _FWD_CONFIGS,
         dict(HAS_Q_T=True, HAS_K_T=True, HAS_V_T=True, MASK_KIND=MASK_BOOL, IS_CAUSAL=True)),
        ("dkdv", _attention_bwd_dkdv_kernel, _DKDV_CONFIGS, dict(MASK_KIND=MASK_BOOL, IS_CAUSAL=True)),
        ("dq", _attention_bwd_dq_kernel, _DQ_CONFIGS, dict(MASK_KIND=MASK_BOOL, IS_CAUSAL=True)),
    )  # fmt: skip
    yield from tiled_specs(kernels, fp32_pointers, tokens)
    for dtype, name in DTYPE_NAMES.items():
        for block_d in (width for width in _FWD_CONFIGS["16-bit"] if width & (width - 1) == 0):
            args = launch_args(_attention_bwd_delta_kernel, dtype, tokens, block_d, {"DELTA"},
                               {"BLOCK_M": 64, "BLOCK_D": block_d})  # fmt: skip
            yield f"delta {name} D={block_d}", _attention_bwd_delta_kernel, args, 4, 3
