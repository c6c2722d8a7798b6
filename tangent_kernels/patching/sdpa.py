"""``scaled_dot_product_attention`` with torch's signature and semantics, for calls under forward AD.

A call whose inputs carry no tangent runs torch's own SDPA untouched (any backend, flash
included). A call with tangents runs the fused kernel when it is of a form the kernel serves:
equal batch dims, ``enable_gqa`` heads, no dropout, a value head dim equal to the query's, and
either no mask, ``is_causal``, or a key-padding mask (an ``attn_mask`` that broadcasts over heads
and queries, e.g. ``(B, 1, 1, Lk)`` or an expanded ``(B, 1, Lq, Lk)`` view; bool with SDPA's True =
attend, or floating and added). Every other form runs torch's math SDPA, whose forward-AD rule is
exact (dropout then applies one mask to both streams); that is said once per reason. Under
``torch.autocast`` the inputs are cast as autocast casts them for torch's SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import watch
from .attention import autocast_inputs, fused_attention


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, backend: str = "auto") -> Tensor:  # fmt: skip
    """``torch.nn.functional.scaled_dot_product_attention``, its tangent by the fused kernel where
    it serves the call (see the module docstring), by torch's math SDPA otherwise."""
    if not any(watch.has_tangent(t) for t in (query, key, value, attn_mask)):
        return torch_F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa)  # fmt: skip
    q, k, v, mask = autocast_inputs(query, key, value, attn_mask)
    reason = unserved_reason(q, k, v, mask, dropout_p, is_causal, enable_gqa)
    if reason is None:
        out = fused_attention(_as_4d(q), _as_4d(k), _as_4d(v), scale=scale, causal=is_causal,
                              key_padding_mask=_key_padding(mask, q, k), backend=backend)  # fmt: skip
        watch.served_fused()
        return out.reshape(*q.shape[:-1], v.shape[-1])
    with sdpa_kernel(SDPBackend.MATH):  # the fused SDPA kernels have no forward-AD rule
        out = torch_F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                   enable_gqa=enable_gqa)  # fmt: skip
    watch.served_by_math(reason)  # after the call: a form torch refuses raises, without a warning first
    return out


def unserved_reason(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool,
                    enable_gqa: bool) -> str | None:  # fmt: skip
    """Why the fused kernel cannot serve this SDPA call (inputs after autocast); ``None`` if it can."""
    if dropout_p > 0.0:
        return "SDPA with dropout_p > 0"
    if not (q.dim() == k.dim() == v.dim() >= 2) or q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
        return "SDPA with batch dims that differ between query, key and value (broadcast)"
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and q.is_floating_point()):
        return "SDPA with query, key and value of different dtypes or devices"
    heads = (q.shape[-3], k.shape[-3], v.shape[-3]) if q.dim() > 2 else (1, 1, 1)
    if heads[1] != heads[2] or heads[1] == 0 or (heads[0] != heads[1] and not (enable_gqa and heads[0] % heads[1] == 0)):
        return "SDPA with query heads that key/value heads do not serve"
    if k.shape[-2] != v.shape[-2] or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "SDPA with a value head dim other than the query's"
    if q.numel() == 0 or k.numel() == 0:
        return "SDPA on empty tensors"
    if mask is not None:
        return _mask_reason(mask, q, k, is_causal)
    return None


def _mask_reason(mask: Tensor, q: Tensor, k: Tensor, is_causal: bool) -> str | None:
    if is_causal:
        return "SDPA with both attn_mask and is_causal"  # torch refuses it
    if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
        return f"SDPA with an attn_mask of dtype {mask.dtype}"
    if mask.requires_grad or watch.has_tangent(mask):
        return "SDPA with an attn_mask that has a tangent or requires grad"
    scores = (*q.shape[:-1], k.shape[-2])
    try:
        if torch.broadcast_shapes(mask.shape, scores) != scores:
            return "SDPA with an attn_mask that does not broadcast to the scores"
    except RuntimeError:
        return "SDPA with an attn_mask that does not broadcast to the scores"
    full = mask.expand(scores)
    per_query = [d for d in range(max(full.dim() - 3, 0), full.dim() - 1) if full.shape[d] > 1 and full.stride(d) != 0]
    if per_query:
        return "SDPA with an attn_mask that varies over heads or queries (only key-padding masks run fused)"
    return None


def _as_4d(t: Tensor) -> Tensor:
    """``(..., H, N, D)`` as ``(B, H, N, D)``; a 2-D ``(N, D)`` as ``(1, 1, N, D)``."""
    return t[None, None] if t.dim() == 2 else t.reshape(-1, *t.shape[-3:])


def _key_padding(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """A key-padding SDPA mask as ``functional``'s ``(B, Lk)`` one (bool: True = padding)."""
    if mask is None:
        return None
    full = mask.expand(*q.shape[:-1], k.shape[-2])
    keys = full[..., 0, :] if full.dim() == 2 else full[..., 0, 0, :]
    keys = keys.reshape(-1, k.shape[-2])
    return ~keys if keys.dtype == torch.bool else keys.to(q.dtype)
