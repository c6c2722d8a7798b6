"""Layer norm (and RMSNorm) primal + tangent in one pass per row, and the backward of one upstream stream.

Forward (DESIGN.md §1): ``y = g0 · x̂ + b0`` and
``y_t = g0 · (x_t − mean(x_t) − x̂ · mean(x̂ · x_t)) · rstd + dg · x̂ + db``, with the row's mean
and rstd saved in fp32.

Backward (DESIGN.md §2): for an upstream gradient ``g`` of either stream, the input gradient is
the ordinary layer-norm input gradient with ``g0 · g`` as upstream, and the parameter gradients
are the column sums ``Σ g · x̂`` and ``Σ g``. The same kernel serves ``grad y`` (giving the grads
of ``x``, ``g0``, ``b0``) and ``grad y_t`` (giving the grads of ``x_t``, ``dg``, ``db``).

``CENTERED=False`` is RMSNorm: the row mean is taken as zero (saved as zero), so ``x̂ = x · rstd``
with ``rstd = (mean(x²) + eps)^-½``, and the ``mean(x_t)`` and ``mean(g0 · g)`` terms drop out.

A row of up to ``ROW_TILE`` features is held in registers (one tile, read once). A wider row is
walked in tiles of ``WALK_TILE``: the forward reads it three times (its largest magnitude; its
moments, each tile's combined with the others' by Chan's parallel formula; the outputs), the
backward twice per stream (the row's two sums; the input gradient), so no row width spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DTYPE_NAMES, check_served, dense_vector, launcher, rows_2d

ROW_TILE = 4096  # the widest row held in registers (one tile)
# The tile a wider row is walked in, at 8 warps (num_warps): at 16 warps ptxas holds a thread to 64
# registers and the fp16 backward walking 4096-wide tiles spilled 4 bytes on sm_90 (N=197 launch).
WALK_TILE = 2048
# Rows whose largest |x| exceeds this are scaled down first: (2 · 2^40)² summed over 2^31 features
# (an int32 width) stays below fp32's largest value, 2^128, so no sum of a row can overflow.
OVERFLOW_SAFE = tl.constexpr(2.0**40)


@triton.jit
def _overflow_scale(peak):
    """The divisor of a row: its largest magnitude above ``OVERFLOW_SAFE`` (the squares of 1e19
    overflow fp32), else 1; x̂ does not depend on it, and other rows are unchanged."""
    return tl.where((peak > OVERFLOW_SAFE) & (peak < float("inf")), peak, 1.0)


@triton.jit
def _moments(x_scaled, in_tile, count, CENTERED: tl.constexpr):
    """Of one tile's ``count`` columns: ``(mean(x), Σ (x − mean)², x − mean)``, the mean zero for
    RMSNorm."""
    if CENTERED:
        mean = tl.sum(x_scaled, axis=0) / count
        # one refinement: the rounding of the mean no longer shows as variance (a constant row of
        # 12345.678 gave x̂ = ±0.7; torch's Welford gives 0)
        mean += tl.sum(tl.where(in_tile, x_scaled - mean, 0.0), axis=0) / count
    else:
        mean = 0.0
    centered = tl.where(in_tile, x_scaled - mean, 0.0)
    return mean, tl.sum(centered * centered, axis=0), centered


@triton.jit
def _tangent_moments(a, x_t, in_tile, count, CENTERED: tl.constexpr):
    """Of one tile's ``count`` columns: ``(mean(x_t), x_t − mean(x_t), Σ a · (x_t − mean(x_t)))``,
    the mean zero for RMSNorm. ``a`` is x̂ or x − mean: Σ x̂ is zero only up to rounding, so the sum
    is over the centered x_t (a large mean of x_t times that rounding would swamp y_t)."""
    if CENTERED:
        mean_t = tl.sum(x_t, axis=0) / count
    else:
        mean_t = 0.0
    x_t_centered = tl.where(in_tile, x_t - mean_t, 0.0)
    return mean_t, x_t_centered, tl.sum(a * x_t_centered, axis=0)


@triton.jit
def _rstd(squares, N, eps, inv_scale):
    """``(rstd of the scaled row, rstd of the row)`` from its ``Σ (x − mean)²``, scaled."""
    variance_scaled = squares / N
    # a constant row: x̂ = 0 and rstd = eps^-½ (eps · inv_scale² underflows for a huge row)
    constant = variance_scaled == 0.0
    rstd_scaled = 1.0 / tl.sqrt(tl.where(constant, eps, variance_scaled + eps * (inv_scale * inv_scale)))
    return rstd_scaled, tl.where(constant, rstd_scaled, rstd_scaled * inv_scale)


@triton.jit
def _weight(W, cols, in_tile, HAS_W: tl.constexpr):
    """One tile of the frozen weight g0 (1 without one)."""
    if HAS_W:
        w = tl.load(W + cols, mask=in_tile, other=0.0).to(tl.float32)
    else:
        w = 1.0
    return w


@triton.jit
def _store_y(Y, B, cols, in_tile, x_hat, w, HAS_B: tl.constexpr):
    """Write one tile of ``y = g0 · x̂ + b0`` (``Y``: the row's start)."""
    y = x_hat * w
    if HAS_B:
        y += tl.load(B + cols, mask=in_tile, other=0.0).to(tl.float32)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=in_tile)


@triton.jit
def _store_y_t(
    Y_T, D_W, D_B, cols, in_tile, x_hat, x_t_centered, projection, rstd, w,
    HAS_X_T: tl.constexpr, HAS_D_W: tl.constexpr, HAS_D_B: tl.constexpr,
):  # fmt: skip
    """Write one tile of ``y_t`` (``Y_T``: the row's start; ``projection`` is ``mean(x̂ · (x_t −
    mean(x_t)))``)."""
    y_t = tl.zeros_like(x_hat)
    if HAS_X_T:
        y_t = (x_t_centered - x_hat * projection) * rstd * w
    if HAS_D_W:
        y_t += x_hat * tl.load(D_W + cols, mask=in_tile, other=0.0).to(tl.float32)
    if HAS_D_B:
        y_t += tl.load(D_B + cols, mask=in_tile, other=0.0).to(tl.float32)
    tl.store(Y_T + cols, y_t.to(Y_T.dtype.element_ty), mask=in_tile)


@triton.jit
def _layer_norm_jvp_fwd_kernel(
    X,  # [M, N] primal input, row stride stride_x, unit column stride
    X_T,  # [M, N] tangent input (read only if HAS_X_T), row stride stride_x_t
    W,  # [N] frozen weight g0 (read only if HAS_W)
    B,  # [N] frozen bias b0 (read only if HAS_B)
    D_W,  # [N] weight offset dg (read only if HAS_D_W)
    D_B,  # [N] bias offset db (read only if HAS_D_B)
    Y,  # [M, N] primal output, row stride stride_y
    Y_T,  # [M, N] tangent output (written only if HAS_TANGENT), row stride stride_y_t
    MEAN,  # [M] fp32 row means
    RSTD,  # [M] fp32 row reciprocal standard deviations
    stride_x,
    stride_x_t,
    stride_y,
    stride_y_t,
    N,  # features per row
    eps,
    HAS_X_T: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_D_W: tl.constexpr,
    HAS_D_B: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # N rounded up to a power of two: the whole row in one tile
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    scale = _overflow_scale(tl.max(tl.abs(x), axis=0))
    inv_scale = 1.0 / scale
    mean, squares, centered = _moments(x * inv_scale, in_row, N, CENTERED)
    rstd_scaled, rstd = _rstd(squares, N, eps, inv_scale)
    tl.store(MEAN + row, mean * scale)
    tl.store(RSTD + row, rstd)
    x_hat = centered * rstd_scaled
    w = _weight(W, cols, in_row, HAS_W)
    _store_y(Y + row * stride_y, B, cols, in_row, x_hat, w, HAS_B)
    if HAS_X_T or HAS_D_W or HAS_D_B:
        x_t = tl.load(X_T + row * stride_x_t + cols, mask=in_row, other=0.0).to(tl.float32) if HAS_X_T else x_hat
        _, x_t_centered, x_hat_x_t = _tangent_moments(x_hat, x_t, in_row, N, CENTERED)
        _store_y_t(Y_T + row * stride_y_t, D_W, D_B, cols, in_row, x_hat, x_t_centered, x_hat_x_t / N, rstd, w,
                   HAS_X_T, HAS_D_W, HAS_D_B)  # fmt: skip


@triton.jit
def _layer_norm_jvp_fwd_tiled_kernel(
    X, X_T, W, B, D_W, D_B, Y, Y_T, MEAN, RSTD,  # as _layer_norm_jvp_fwd_kernel's
    stride_x, stride_x_t, stride_y, stride_y_t, N, eps,
    HAS_X_T: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_D_W: tl.constexpr,
    HAS_D_B: tl.constexpr, CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the tile a row is walked in
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    X_T += row * stride_x_t
    Y += row * stride_y
    Y_T += row * stride_y_t
    tile = tl.arange(0, BLOCK_N)

    peak = 0.0
    for start in range(0, N, BLOCK_N):
        x = tl.load(X + start + tile, mask=start + tile < N, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.max(tl.abs(x), axis=0))
    scale = _overflow_scale(peak)
    inv_scale = 1.0 / scale

    # the row's moments, each tile's combined with those before it (Chan, Golub and LeVeque)
    count = 0.0
    mean = 0.0
    squares = 0.0
    mean_t = 0.0
    cross = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + tile
        in_tile = cols < N
        tile_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        x_scaled = tl.load(X + cols, mask=in_tile, other=0.0).to(tl.float32) * inv_scale
        tile_mean, tile_squares, centered = _moments(x_scaled, in_tile, tile_count, CENTERED)
        tile_mean_t = 0.0
        tile_cross = 0.0
        if HAS_X_T:
            x_t = tl.load(X_T + cols, mask=in_tile, other=0.0).to(tl.float32)
            tile_mean_t, _, tile_cross = _tangent_moments(centered, x_t, in_tile, tile_count, CENTERED)
        total = count + tile_count
        weight = tile_count / total
        between = count * weight
        delta = tile_mean - mean
        delta_t = tile_mean_t - mean_t
        mean += delta * weight
        mean_t += delta_t * weight
        squares += tile_squares + delta * delta * between
        cross += tile_cross + delta * delta_t * between
        count = total
    rstd_scaled, rstd = _rstd(squares, N, eps, inv_scale)
    tl.store(MEAN + row, mean * scale)
    tl.store(RSTD + row, rstd)

    projection = rstd_scaled * cross / N
    for start in range(0, N, BLOCK_N):
        cols = start + tile
        in_tile = cols < N
        x = tl.load(X + cols, mask=in_tile, other=0.0).to(tl.float32)
        x_hat = tl.where(in_tile, x * inv_scale - mean, 0.0) * rstd_scaled
        w = _weight(W, cols, in_tile, HAS_W)
        _store_y(Y, B, cols, in_tile, x_hat, w, HAS_B)
        if HAS_X_T or HAS_D_W or HAS_D_B:
            x_t = tl.load(X_T + cols, mask=in_tile, other=0.0).to(tl.float32) if HAS_X_T else x_hat
            _store_y_t(Y_T, D_W, D_B, cols, in_tile, x_hat, x_t - mean_t, projection, rstd, w,
                       HAS_X_T, HAS_D_W, HAS_D_B)  # fmt: skip


@triton.jit
def _g_and_x_hat(G, X, MEAN, RSTD, row, stride_g, stride_x, cols, in_tile):
    """One tile of a row: ``(g, x̂)``, zero outside the row."""
    g = tl.load(G + row * stride_g + cols, mask=in_tile, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=in_tile, other=0.0).to(tl.float32)
    return g, tl.where(in_tile, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)


@triton.jit
def _upstream(g, W, cols, in_tile, HAS_W: tl.constexpr):
    """``g0 · g`` of one tile: the upstream gradient of the normalization."""
    return g * tl.load(W + cols, mask=in_tile, other=0.0).to(tl.float32) if HAS_W else g


@triton.jit
def _input_grad(u, x_hat, u_mean, u_x_hat_mean, rstd, CENTERED: tl.constexpr):
    """The layer-norm input gradient of one tile, for upstream ``u`` with the row's ``mean(u)`` and
    ``mean(u · x̂)`` (``mean(u)`` unused by RMSNorm)."""
    if CENTERED:
        u = u - u_mean
    return (u - x_hat * u_x_hat_mean) * rstd


@triton.jit
def _layer_norm_bwd_kernel(
    G,  # [M, N] upstream gradient of one output stream, row stride stride_g
    X,  # [M, N] primal input, row stride stride_x
    W,  # [N] frozen weight g0 (read only if HAS_W)
    MEAN,  # [M] fp32 row means from the forward
    RSTD,  # [M] fp32 row reciprocal standard deviations from the forward
    G_X,  # [M, N] input gradient (written only if INPUT_GRAD), row stride stride_g_x
    G_W_PARTIAL,  # [num_programs, N] fp32 partial sums of g · x̂ (written only if PARAM_GRADS)
    G_B_PARTIAL,  # [num_programs, N] fp32 partial sums of g (written only if PARAM_GRADS)
    stride_g,
    stride_x,
    stride_g_x,
    M,  # rows
    N,  # features per row
    rows_per_program,
    HAS_W: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    PARAM_GRADS: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # N rounded up to a power of two: the whole row in one tile
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    g_w_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_b_sum = tl.zeros([BLOCK_N], dtype=tl.float32)

    first_row = pid * rows_per_program
    for offset in range(0, rows_per_program):
        row = (first_row + offset).to(tl.int64)
        if row < M:
            g, x_hat = _g_and_x_hat(G, X, MEAN, RSTD, row, stride_g, stride_x, cols, in_row)
            if PARAM_GRADS:
                g_w_sum += g * x_hat
                g_b_sum += g
            if INPUT_GRAD:
                u = g * w if HAS_W else g
                g_x = _input_grad(u, x_hat, tl.sum(u, axis=0) / N, tl.sum(u * x_hat, axis=0) / N,
                                  tl.load(RSTD + row), CENTERED)  # fmt: skip
                tl.store(G_X + row * stride_g_x + cols, g_x.to(G_X.dtype.element_ty), mask=in_row)
    if PARAM_GRADS:
        tl.store(G_W_PARTIAL + pid * N + cols, g_w_sum, mask=in_row)
        tl.store(G_B_PARTIAL + pid * N + cols, g_b_sum, mask=in_row)


@triton.jit
def _layer_norm_bwd_tiled_kernel(
    G, X, W, MEAN, RSTD, G_X, G_W_PARTIAL, G_B_PARTIAL,  # as _layer_norm_bwd_kernel's
    stride_g, stride_x, stride_g_x, M, N, rows_per_program,
    HAS_W: tl.constexpr, INPUT_GRAD: tl.constexpr, PARAM_GRADS: tl.constexpr, CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the tile a row is walked in
):  # fmt: skip
    pid = tl.program_id(0)
    tile = tl.arange(0, BLOCK_N)
    first_row = pid * rows_per_program
    if PARAM_GRADS:  # a tile of columns summed over this program's rows at a time
        for start in range(0, N, BLOCK_N):
            cols = start + tile
            in_tile = cols < N
            g_w_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
            g_b_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
            for offset in range(0, rows_per_program):
                row = (first_row + offset).to(tl.int64)
                if row < M:
                    g, x_hat = _g_and_x_hat(G, X, MEAN, RSTD, row, stride_g, stride_x, cols, in_tile)
                    g_w_sum += g * x_hat
                    g_b_sum += g
            tl.store(G_W_PARTIAL + pid * N + cols, g_w_sum, mask=in_tile)
            tl.store(G_B_PARTIAL + pid * N + cols, g_b_sum, mask=in_tile)
    if INPUT_GRAD:  # a row at a time: its two sums, then its gradient
        for offset in range(0, rows_per_program):
            row = (first_row + offset).to(tl.int64)
            if row < M:
                u_sum = 0.0
                u_x_hat_sum = 0.0
                for start in range(0, N, BLOCK_N):
                    cols = start + tile
                    in_tile = cols < N
                    g, x_hat = _g_and_x_hat(G, X, MEAN, RSTD, row, stride_g, stride_x, cols, in_tile)
                    u = _upstream(g, W, cols, in_tile, HAS_W)
                    u_sum += tl.sum(u, axis=0)
                    u_x_hat_sum += tl.sum(u * x_hat, axis=0)
                rstd = tl.load(RSTD + row)
                for start in range(0, N, BLOCK_N):
                    cols = start + tile
                    in_tile = cols < N
                    g, x_hat = _g_and_x_hat(G, X, MEAN, RSTD, row, stride_g, stride_x, cols, in_tile)
                    g_x = _input_grad(_upstream(g, W, cols, in_tile, HAS_W), x_hat, u_sum / N, u_x_hat_sum / N, rstd,
                                      CENTERED)  # fmt: skip
                    tl.store(G_X + row * stride_g_x + cols, g_x.to(G_X.dtype.element_ty), mask=in_tile)


def block_size(features: int) -> int:
    """The row tile for ``features`` columns: the power of two that holds them (at least 16), or
    ``WALK_TILE`` for a row wider than ``ROW_TILE``."""
    if features > ROW_TILE:
        return WALK_TILE
    return max(triton.next_power_of_2(features), 16)


def num_warps(block: int) -> int:
    """Warps per row: one per 256 columns, between 1 and 16."""
    return min(max(block // 256, 1), 16)


def _kernels(features: int) -> tuple:
    """``(forward kernel, backward kernel)`` for rows of ``features``: one tile or walked in tiles."""
    if features <= ROW_TILE:
        return _layer_norm_jvp_fwd_kernel, _layer_norm_bwd_kernel
    return _layer_norm_jvp_fwd_tiled_kernel, _layer_norm_bwd_tiled_kernel


@launcher
def forward(x, x_t, weight, bias, d_weight, d_bias, eps, centered):
    """Launch the forward kernel: returns ``(y, y_t or None, mean, rstd)``."""
    check_served("x", x)
    weight, bias, d_weight, d_bias = map(dense_vector, (weight, bias, d_weight, d_bias))
    n = x.shape[-1]
    x2 = rows_2d(x)
    x_t2 = x2 if x_t is None else rows_2d(x_t)
    has_tangent = x_t is not None or d_weight is not None or d_bias is not None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, so .view(x2.shape) below
    y_t = torch.empty_like(y) if has_tangent else y
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = block_size(n)
    placeholder = x2  # any pointer; never read when the matching HAS_* flag is off
    _kernels(n)[0][(x2.shape[0],)](
        x2, x_t2,
        placeholder if weight is None else weight,
        placeholder if bias is None else bias,
        placeholder if d_weight is None else d_weight,
        placeholder if d_bias is None else d_bias,
        y, y_t, mean, rstd,
        x2.stride(0), x_t2.stride(0), n, n,
        n, eps,
        HAS_X_T=x_t is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_D_W=d_weight is not None, HAS_D_B=d_bias is not None, CENTERED=centered,
        BLOCK_N=block, num_warps=num_warps(block),
    )  # fmt: skip
    return y, (y_t if has_tangent else None), mean, rstd


@launcher
def backward(grad, x, weight, mean, rstd, centered, input_grad, param_grads):
    """Launch the backward kernel for one stream: returns ``(grad input, grad weight, grad bias)``.

    Results that were not asked for are ``None``.
    """
    check_served("x", x)
    weight = dense_vector(weight)
    n = x.shape[-1]
    x2, g2 = rows_2d(x), rows_2d(grad)
    rows = x2.shape[0]
    g_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if input_grad else x2
    programs = max(1, min(rows, _parallel_programs(x.device)))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial_shape = (programs, n) if param_grads else (1, 1)
    g_w_partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device)
    g_b_partial = torch.empty_like(g_w_partial)
    block = block_size(n)
    _kernels(n)[1][(programs,)](
        g2, x2, x2 if weight is None else weight, mean, rstd,
        g_x, g_w_partial, g_b_partial,
        g2.stride(0), x2.stride(0), n,
        rows, n, rows_per_program,
        HAS_W=weight is not None, INPUT_GRAD=input_grad, PARAM_GRADS=param_grads, CENTERED=centered,
        BLOCK_N=block, num_warps=num_warps(block),
    )  # fmt: skip
    grad_input = g_x if input_grad else None
    if not param_grads:
        return grad_input, None, None
    param_dtype = x.dtype if weight is None else weight.dtype
    return grad_input, g_w_partial.sum(0).to(param_dtype), g_b_partial.sum(0).to(param_dtype)


def _parallel_programs(device: torch.device) -> int:
    """How many programs share the rows of the backward: a few per SM on a GPU."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another; few programs mean few partials


def compile_specs(tokens):
    """Every (name, kernel, launch args, num_warps, num_stages) this module can launch, over
    ``4 · tokens`` rows as wide as each row tile, and rows of ``2 · ROW_TILE + tokens`` features
    walked in tiles (``-tiled``; ``compile_check``: a tensor is its dtype); the RMSNorm kernels
    (``CENTERED=False``, no bias) are named ``rms-fwd`` / ``rms-bwd``."""
    rows = 4 * tokens
    widths = [(16 << i, 16 << i, "") for i in range(ROW_TILE.bit_length() - 4)]
    widths.append((2 * ROW_TILE + tokens, WALK_TILE, "-tiled"))
    for features, block, tiled in widths:
        fwd_kernel, bwd_kernel = _kernels(features)
        for dtype in DTYPE_NAMES:
            stats = dict(MEAN=torch.float32, RSTD=torch.float32)
            fwd = dict(**dict.fromkeys(("X", "X_T", "W", "B", "D_W", "D_B", "Y", "Y_T"), dtype), **stats,
                       stride_x=features, stride_x_t=features, stride_y=features, stride_y_t=features, N=features,
                       eps=1e-6, HAS_X_T=True, HAS_W=True, HAS_D_W=True, BLOCK_N=block)  # fmt: skip
            bwd = dict(**dict.fromkeys(("G", "X", "W", "G_X"), dtype), **stats, G_W_PARTIAL=torch.float32,
                       G_B_PARTIAL=torch.float32, stride_g=features, stride_x=features, stride_g_x=features, M=rows,
                       N=features, rows_per_program=rows // 512 + 1, HAS_W=True, INPUT_GRAD=True, PARAM_GRADS=True,
                       BLOCK_N=block)  # fmt: skip
            for prefix, centered in (("", True), ("rms-", False)):
                yield (f"{prefix}fwd{tiled} {dtype} BLOCK_N={block}", fwd_kernel,
                       dict(fwd, CENTERED=centered, HAS_B=centered, HAS_D_B=centered), num_warps(block), 3)  # fmt: skip
                yield (f"{prefix}bwd{tiled} {dtype} BLOCK_N={block}", bwd_kernel,
                       dict(bwd, CENTERED=centered), num_warps(block), 3)  # fmt: skip
