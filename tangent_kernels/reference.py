"""Primal + tangent ops in plain PyTorch: the oracle for every kernel and the fallback backend.

Each op maps ``(primal inputs, tangent inputs, frozen params, param offsets) -> (y, y_t)``.
A tangent input or a parameter offset of ``None`` is zero. When every tangent input and offset
is ``None`` the output tangent is zero as well and is returned as ``None``.

The formulas are written out by hand (DESIGN.md §1) rather than derived with ``torch.func.jvp``,
so that the tests, which compare against ``torch.func.jvp``, check them independently. Gradients
come from ordinary autograd through these formulas, second-order terms included.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def computes_16bit_in_float32(op):
    """Run ``op`` in float32 when its first argument is float16/bfloat16 (the other arguments of
    that dtype are widened too) and round ``(y, y_t)`` back, as torch's own softmax, layer norm
    and math attention do: the reductions and the cancellations in these tangent formulas
    (``S_t − rowsum(P ⊙ S_t)``, ``x_t − mean(x_t)``) lose most of a 16-bit result's digits when
    evaluated in 16 bits. The result has the first argument's dtype, whatever the others'."""

    @functools.wraps(op)
    def wrapper(first, *args, **kwargs):
        low = first.dtype if first.dtype in (torch.float16, torch.bfloat16) else None
        if low is None:
            return op(first, *args, **kwargs)

        def widened(a):
            return a.float() if isinstance(a, Tensor) and a.dtype == low else a

        y, y_t = op(first.float(), *map(widened, args), **{name: widened(a) for name, a in kwargs.items()})
        return y.to(low), None if y_t is None else y_t.to(low)

    return wrapper


def add_tangents(*terms: Tensor | None) -> Tensor | None:
    """Sum the terms that are not ``None``; ``None`` when all are (a zero tangent)."""
    present = [term for term in terms if term is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def linear_jvp(
    x: Tensor,
    x_t: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    d_weight: Tensor | None = None,
    d_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``y = x W0ᵀ + b0``, ``y_t = x_t W0ᵀ + x dWᵀ + db``."""
    y = F.linear(x, weight, bias)
    y_t = add_tangents(
        None if x_t is None else F.linear(x_t, weight),
        None if d_weight is None else F.linear(x, d_weight),
        d_bias,
    )
    if y_t is not None and y_t.shape != y.shape:  # only d_bias present: broadcast to the output
        y_t = y_t.expand_as(y).contiguous()
    return y, y_t


def gelu_derivative(x: Tensor, approximate: str = "none") -> Tensor:
    """``d gelu(x) / dx`` for the exact (erf) or the tanh form."""
    if approximate == "none":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * x**3)
        tanh_inner = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * x * x)
        return 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner * tanh_inner) * d_inner
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def gelu_jvp(x: Tensor, x_t: Tensor | None, approximate: str = "none") -> tuple[Tensor, Tensor | None]:
    """``y = gelu(x)``, ``y_t = gelu'(x) · x_t``; the derivative of a 16-bit ``x`` in float32 (x³
    overflows float16 from |x| ~ 40, and its gradient then was NaN)."""
    y = F.gelu(x, approximate=approximate)
    if x_t is None:
        return y, None
    if x.dtype in (torch.float16, torch.bfloat16):
        return y, (gelu_derivative(x.float(), approximate) * x_t.float()).to(x.dtype)
    return y, gelu_derivative(x, approximate) * x_t


def normalized(x: Tensor, eps: float, centered: bool = True) -> tuple[Tensor, Tensor]:
    """``(x̂, rstd)`` over the last dimension, ``x̂ = (x − mean) · rstd`` (RMSNorm, ``centered=False``:
    the mean taken as zero). A row whose sum or sum of squares would overflow (|x| ~ 1e19 in
    float32) is normalized divided by its largest magnitude (x̂ does not depend on it); rows holding
    inf or NaN give NaN. No features: an empty ``x̂``."""
    if x.shape[-1] == 0:
        return x, x.new_ones((*x.shape[:-1], 1))
    # the scale is a constant to autograd (x̂ does not depend on it; its gradient overflowed)
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    safe = torch.finfo(x.dtype).max ** 0.5 / (4 * x.shape[-1])
    scale = torch.where((peak > safe) & peak.isfinite(), peak, torch.ones_like(peak))
    inv_scale = 1.0 / scale
    centered_x = scaled = x * inv_scale
    if centered:
        mean = scaled.mean(dim=-1, keepdim=True)
        # one refinement: the rounding of the mean no longer shows as variance (a constant row of
        # 12345.678 gave x̂ = ±0.7; torch's Welford gives 0)
        mean = mean + (scaled - mean).mean(dim=-1, keepdim=True)
        centered_x = scaled - mean
    variance = (centered_x * centered_x).mean(dim=-1, keepdim=True)
    # a constant row: x̂ = 0 and rstd = eps^-½ (eps · inv_scale² underflows for a huge row)
    constant = variance == 0
    rstd_scaled = torch.rsqrt(torch.where(constant, eps, variance + eps * (inv_scale * inv_scale)))
    return centered_x * rstd_scaled, torch.where(constant, rstd_scaled, rstd_scaled * inv_scale)


@computes_16bit_in_float32
def layer_norm_jvp(
    x: Tensor,
    x_t: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    d_weight: Tensor | None = None,
    d_bias: Tensor | None = None,
    eps: float = 1e-6,
    centered: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Layer norm over the last dimension and its tangent.

    ``y_t = g0 · (x_t − mean(x_t) − x̂ · mean(x̂ · x_t)) / σ + dg · x̂ + db``; ``centered=False``
    is RMSNorm (the means of ``x`` and ``x_t`` taken as zero).
    """
    x_hat, rstd = normalized(x, eps, centered)
    y = x_hat if weight is None else x_hat * weight
    if bias is not None:
        y = y + bias

    x_hat_t = None
    if x_t is not None:
        x_t_centered = x_t - x_t.mean(dim=-1, keepdim=True) if centered else x_t  # Σ x̂ = 0 only up to rounding
        x_hat_t = (x_t_centered - x_hat * (x_hat * x_t_centered).mean(dim=-1, keepdim=True)) * rstd
        if weight is not None:
            x_hat_t = x_hat_t * weight
    y_t = add_tangents(x_hat_t, None if d_weight is None else x_hat * d_weight, d_bias)
    if y_t is not None and y_t.shape != y.shape:  # only d_bias present
        y_t = y_t.expand_as(y).contiguous()
    return y, y_t


def mlp_jvp(
    x: Tensor,
    x_t: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    d_fc1_weight: Tensor | None = None,
    d_fc1_bias: Tensor | None = None,
    d_fc2_weight: Tensor | None = None,
    d_fc2_bias: Tensor | None = None,
    approximate: str = "none",
) -> tuple[Tensor, Tensor | None]:
    """``fc2(gelu(fc1(x)))`` (timm's ``Mlp``) and its tangent."""
    h, h_t = linear_jvp(x, x_t, fc1_weight, fc1_bias, d_fc1_weight, d_fc1_bias)
    a, a_t = gelu_jvp(h, h_t, approximate)
    return linear_jvp(a, a_t, fc2_weight, fc2_bias, d_fc2_weight, d_fc2_bias)


def expand_kv_heads(t: Tensor | None, num_q_heads: int) -> Tensor | None:
    """Repeat grouped key/value heads ``(B, Hkv, N, D)`` to ``(B, Hq, N, D)``."""
    if t is None or t.shape[1] == num_q_heads:
        return t
    return t.repeat_interleave(num_q_heads // t.shape[1], dim=1)


def attention_bias(
    q_len: int,
    k_len: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The additive score bias ``(B or 1, 1, Lq, Lk)`` for a causal and/or key-padding mask.

    ``causal`` is aligned top-left (query i sees keys 0..i), as in
    ``torch.nn.functional.scaled_dot_product_attention``. A boolean ``key_padding_mask`` of
    shape ``(B, Lk)`` marks padding keys with ``True`` (as in ``nn.MultiheadAttention``); a
    floating one is added to the scores.
    """
    bias = None
    if causal:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~allowed, -math.inf)
        bias = bias[None, None]
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            key_bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=device)
            key_bias = key_bias.masked_fill(key_padding_mask, -math.inf)
        else:
            key_bias = key_padding_mask.to(dtype)
        key_bias = key_bias[:, None, None, :]
        bias = key_bias if bias is None else bias + key_bias
    return bias


@computes_16bit_in_float32
def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_t: Tensor | None,
    k_t: Tensor | None,
    v_t: Tensor | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention on ``(B, H, N, D)`` tensors and its tangent, with N×N scores.

    ``S_t = s (Q_t Kᵀ + Q K_tᵀ)``, ``O_t = (P ⊙ S_t) V + P V_t − rowsum(P ⊙ S_t) ⊙ O``.
    Key/value heads may divide the query heads (grouped-query attention). A query row whose keys
    are all masked gives zeros, as torch's scaled_dot_product_attention does.
    """
    num_q_heads = q.shape[1]
    k, v, k_t, v_t = (expand_kv_heads(t, num_q_heads) for t in (k, v, k_t, v_t))
    if k.shape[-2] == 0:  # no keys: zeros (products over an empty dimension), as torch's SDPA gives
        no_weights = q @ k.transpose(-2, -1)
        out_t = add_tangents(
            None if q_t is None else (q_t @ k.transpose(-2, -1)) @ v,
            None if k_t is None else (q @ k_t.transpose(-2, -1)) @ v,
            None if v_t is None else no_weights @ v_t,
        )
        return no_weights @ v, out_t
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] else 1.0) if scale is None else scale

    scores = (q @ k.transpose(-2, -1)) * scale
    bias = attention_bias(q.shape[-2], k.shape[-2], causal, key_padding_mask, scores.dtype, q.device)
    if bias is not None:
        scores = scores + bias
    row_max = scores.amax(dim=-1, keepdim=True)
    fully_masked = row_max == -math.inf
    weights = torch.exp(scores - torch.where(fully_masked, 0.0, row_max))
    # a fully masked row divides by 1: clamping its 0 to the smallest float overflowed in the backward
    weights = weights / torch.where(fully_masked, 1.0, weights.sum(dim=-1, keepdim=True))
    out = weights @ v

    scores_t = add_tangents(
        None if q_t is None else q_t @ k.transpose(-2, -1),
        None if k_t is None else q @ k_t.transpose(-2, -1),
    )
    weighted_scores_t = None
    if scores_t is not None:
        # P ⊙ (S_t − rowsum(P ⊙ S_t)): the − rowsum(P ⊙ S_t) ⊙ O term centred before the product
        # with V, so a large common part of S_t cancels exactly (a single key at scale 30 was 5e-5
        # off in float32); 0 in a fully masked row, also where scores_t · scale is ±inf
        weighted = weights * (scores_t * scale)
        centered = weighted - weights * weighted.sum(dim=-1, keepdim=True)
        weighted_scores_t = torch.where(fully_masked, 0.0, centered)
    out_t = add_tangents(
        None if weighted_scores_t is None else weighted_scores_t @ v,
        None if v_t is None else weights @ v_t,
    )
    return out, out_t
