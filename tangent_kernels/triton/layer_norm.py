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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DTYPE_NAMES, check_served, dense_vector, rows_2d

MAX_FEATURES = 16384  # one row is held in registers; wider rows need a split-row kernel
# Rows whose largest |x| exceeds this are scaled down first: MAX_FEATURES · (2 · 2^50)² stays
# far below fp32's largest value, so neither the sum nor the sum of squares can overflow.
OVERFLOW_SAFE = tl.constexpr(2.0**50)


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
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    # A row of huge values (its squares overflow fp32 from |x| ~ 1e19) is normalized divided by its
    # largest magnitude; x̂ does not depend on that scale, and other rows are unchanged (scale 1).
    peak = tl.max(tl.abs(x), axis=0)
    scale = tl.where((peak > OVERFLOW_SAFE) & (peak < float("inf")), peak, 1.0)
    inv_scale = 1.0 / scale
    x_scaled = x * inv_scale
    if CENTERED:
        mean_scaled = tl.sum(x_scaled, axis=0) / N
        # one refinement: the rounding of the mean no longer shows as variance (a constant row of
        # 12345.678 gave x̂ = ±0.7; torch's Welford gives 0)
        mean_scaled += tl.sum(tl.where(in_row, x_scaled - mean_scaled, 0.0), axis=0) / N
    else:
        mean_scaled = 0.0
    centered = tl.where(in_row, x_scaled - mean_scaled, 0.0)
    variance_scaled = tl.sum(centered * centered, axis=0) / N
    # a constant row: x̂ = 0 and rstd = eps^-½ (eps · inv_scale² underflows for a huge row)
    constant = variance_scaled == 0.0
    rstd_scaled = 1.0 / tl.sqrt(tl.where(constant, eps, variance_scaled + eps * (inv_scale * inv_scale)))
    x_hat = centered * rstd_scaled
    rstd = tl.where(constant, rstd_scaled, rstd_scaled * inv_scale)
    tl.store(MEAN + row, mean_scaled * scale)
    tl.store(RSTD + row, rstd)

    if HAS_W:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
        y = x_hat * w
    else:
        y = x_hat
    if HAS_B:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)

    if HAS_X_T or HAS_D_W or HAS_D_B:
        y_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_X_T:
            x_t = tl.load(X_T + row * stride_x_t + cols, mask=in_row, other=0.0).to(tl.float32)
            x_t_centered = tl.where(in_row, x_t - tl.sum(x_t, axis=0) / N, 0.0) if CENTERED else x_t
            # Σ x̂ is zero only up to rounding, so x̂ · x_t is summed over the centered x_t: a large
            # mean of x_t times that rounding would swamp y_t
            y_t = (x_t_centered - x_hat * (tl.sum(x_hat * x_t_centered, axis=0) / N)) * rstd
            if HAS_W:
                y_t = y_t * w
        if HAS_D_W:
            y_t += x_hat * tl.load(D_W + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_D_B:
            y_t += tl.load(D_B + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(Y_T + row * stride_y_t + cols, y_t.to(Y_T.dtype.element_ty), mask=in_row)


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
    BLOCK_N: tl.constexpr,
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
            x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
            g = tl.load(G + row * stride_g + cols, mask=in_row, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            x_hat = tl.where(in_row, (x - mean) * rstd, 0.0)
            if PARAM_GRADS:
                g_w_sum += g * x_hat
                g_b_sum += g
            if INPUT_GRAD:
                u = g * w if HAS_W else g
                u_x_hat_mean = tl.sum(u * x_hat, axis=0) / N
                if CENTERED:
                    u = u - tl.sum(u, axis=0) / N
                g_x = (u - x_hat * u_x_hat_mean) * rstd
                tl.store(G_X + row * stride_g_x + cols, g_x.to(G_X.dtype.element_ty), mask=in_row)
    if PARAM_GRADS:
        tl.store(G_W_PARTIAL + pid * N + cols, g_w_sum, mask=in_row)
        tl.store(G_B_PARTIAL + pid * N + cols, g_b_sum, mask=in_row)


def block_size(features: int) -> int:
    """The power-of-two row tile that holds ``features`` columns (at least 16)."""
    return max(triton.next_power_of_2(features), 16)


def num_warps(block: int) -> int:
    """Warps per row: one per 256 columns, between 1 and 16."""
    return min(max(block // 256, 1), 16)




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
    _layer_norm_jvp_fwd_kernel[(x2.shape[0],)](
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
    _layer_norm_bwd_kernel[(programs,)](
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
    ``4 · tokens`` rows as wide as each row tile (``compile_check``: a tensor is its dtype); the
    RMSNorm kernels (``CENTERED=False``, no bias) are named ``rms-fwd`` / ``rms-bwd``."""
    flags_fwd = dict(HAS_X_T=True, HAS_W=True, HAS_B=True, HAS_D_W=True, HAS_D_B=True)
    flags_bwd = dict(HAS_W=True, INPUT_GRAD=True, PARAM_GRADS=True)
    rows = 4 * tokens
    block = 16
    while block <= MAX_FEATURES:
        for dtype in DTYPE_NAMES:
            stats = dict(MEAN=torch.float32, RSTD=torch.float32)
            fwd = dict(**dict.fromkeys(("X", "X_T", "W", "B", "D_W", "D_B", "Y", "Y_T"), dtype), **stats,
                       stride_x=block, stride_x_t=block, stride_y=block, stride_y_t=block, N=block, eps=1e-6,
                       **flags_fwd, BLOCK_N=block)  # fmt: skip
            bwd = dict(**dict.fromkeys(("G", "X", "W", "G_X"), dtype), **stats, G_W_PARTIAL=torch.float32,
                       G_B_PARTIAL=torch.float32, stride_g=block, stride_x=block, stride_g_x=block, M=rows,
                       N=block, rows_per_program=rows // 512 + 1, **flags_bwd, BLOCK_N=block)  # fmt: skip
            for prefix, centered in (("", True), ("rms-", False)):
                yield (f"{prefix}fwd {dtype} BLOCK_N={block}", _layer_norm_jvp_fwd_kernel,
                       dict(fwd, CENTERED=centered, HAS_B=centered, HAS_D_B=centered), num_warps(block), 3)  # fmt: skip
                yield (f"{prefix}bwd {dtype} BLOCK_N={block}", _layer_norm_bwd_kernel,
                       dict(bwd, CENTERED=centered), num_warps(block), 3)  # fmt: skip
        block *= 2
