"""``multi_head_attention_forward`` with torch's signature and semantics, for calls under forward AD.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``; the routing mode hands those
calls here. A call without tangents that needs no gradient runs torch's own function (one that
needs a gradient is computed here, so that its backward is differentiable again: the
double-backward form of a JVP; torch's flash SDPA's backward is not). ``need_weights=True`` runs
torch's own function too (its weights need the N×N scores: math attention, said once); every
other call is computed here as torch computes it, with two differences that change no value:
the projections run on 2-D ``(tokens, E)`` views (so the weight gradients are single GEMMs, not
per-token batched products), and the attention is ``sdpa.scaled_dot_product_attention`` (the
fused kernel for no mask, ``is_causal``, key-padding and causal masks; torch's math SDPA for other
masks and for dropout, with one dropout mask for both streams).
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import Tensor

from . import watch
from .sdpa import scaled_dot_product_attention


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``torch.nn.functional.multi_head_attention_forward``; see the module docstring."""
    arguments = {
        "query": query,
        "key": key,
        "value": value,
        "embed_dim_to_check": embed_dim_to_check,
        "num_heads": num_heads,
        "in_proj_weight": in_proj_weight,
        "in_proj_bias": in_proj_bias,
        "bias_k": bias_k,
        "bias_v": bias_v,
        "add_zero_attn": add_zero_attn,
        "dropout_p": dropout_p,
        "out_proj_weight": out_proj_weight,
        "out_proj_bias": out_proj_bias,
        "training": training,
        "key_padding_mask": key_padding_mask,
        "need_weights": need_weights,
        "attn_mask": attn_mask,
        "use_separate_proj_weight": use_separate_proj_weight,
        "q_proj_weight": q_proj_weight,
        "k_proj_weight": k_proj_weight,
        "v_proj_weight": v_proj_weight,
        "static_k": static_k,
        "static_v": static_v,
        "average_attn_weights": average_attn_weights,
        "is_causal": is_causal,
    }
    tangents = any(watch.has_tangent(t) for t in arguments.values())
    differentiated = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in arguments.values()
    )
    if not tangents and (need_weights or not differentiated):
        return torch_F.multi_head_attention_forward(**arguments)
    if need_weights:
        result = torch_F.multi_head_attention_forward(**arguments)
        watch.served_by_math(
            "nn.MultiheadAttention with need_weights=True (pass need_weights=False for the fused kernel)"
        )
        return result
    del arguments["need_weights"], arguments["average_attn_weights"]
    return _attention(**arguments, backend=backend), None


def _attention(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training,
    key_padding_mask,
    attn_mask,
    use_separate_proj_weight,
    q_proj_weight,
    k_proj_weight,
    v_proj_weight,
    static_k,
    static_v,
    is_causal,
    backend,
):
    """``multi_head_attention_forward``'s output for ``need_weights=False``; checks and order as torch's."""
    is_batched = torch_F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    key_padding_mask = torch_F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=torch_F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None:
        attn_mask = None  # torch's rule: the hint replaces the mask
    else:
        attn_mask = torch_F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        is_causal = is_causal and key_padding_mask is None
    if embed_dim != embed_dim_to_check:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}"
        )
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight and key.shape[:2] != value.shape[:2]:
        raise AssertionError(
            f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
        )
    if not use_separate_proj_weight and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    batch_major = _batch_major(query)
    q, k, v = _project(
        query,
        key,
        value,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else None,
    )
    if attn_mask is not None:
        attn_mask = _sdpa_attn_mask(attn_mask, bsz, num_heads, tgt_len, src_len)
    k, v, attn_mask, key_padding_mask = _extend_keys(
        k,
        v,
        attn_mask,
        key_padding_mask,
        bias_k,
        bias_v,
        static_k,
        static_v,
        add_zero_attn,
        bsz,
        num_heads,
        head_dim,
    )
    if key_padding_mask is not None:
        torch_F._check_key_padding_mask(key_padding_mask, k.shape[2], bsz)
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, k.shape[2])
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    o = scaled_dot_product_attention(
        q, k, v, attn_mask, dropout_p if training else 0.0, is_causal, backend=backend
    )
    if batch_major:  # (B, H, L, D) -> rows (B·L, E), out (L, B, E) as a view of (B, L, E)
        out = torch_F.linear(
            o.transpose(1, 2).reshape(bsz * tgt_len, embed_dim), out_proj_weight, out_proj_bias
        )
        out = out.view(bsz, tgt_len, out.shape[-1]).transpose(0, 1)
    else:
        out = torch_F.linear(
            o.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim), out_proj_weight, out_proj_bias
        )
        out = out.view(tgt_len, bsz, out.shape[-1])
    return out if is_batched else out.squeeze(1)


def _batch_major(x: Tensor) -> bool:
    """``x`` is ``(L, B, E)`` stored as ``(B, L, E)`` (a ``batch_first`` input, transposed by
    ``nn.MultiheadAttention``): its rows are then read in batch-major order, without a copy."""
    return x.transpose(0, 1).is_contiguous()


def _rows(x: Tensor) -> Tensor:
    """``(L, B, E)`` as a 2-D ``(tokens, E)`` matrix: a view in the order memory holds it."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1]) if _batch_major(x) else x.reshape(-1, x.shape[-1])


def _heads(y: Tensor, like: Tensor, parts: int, num_heads: int) -> list[Tensor]:
    """The projection ``(tokens, parts·E)`` of ``like`` ``(L, B, E_in)``, as ``parts`` (B, H, L, D) views."""
    length, batch = like.shape[:2]
    head_dim = y.shape[-1] // (parts * num_heads)  # not -1: ambiguous for an empty batch or sequence
    if _batch_major(like):
        return list(y.view(batch, length, parts, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0))
    return list(y.view(length, batch, parts, num_heads, head_dim).permute(2, 1, 3, 0, 4).unbind(0))


def _project(query, key, value, num_heads, in_proj_weight, in_proj_bias, separate_weights):
    """q, k, v as ``(B, H, L, D)`` views of 2-D projections, sharing GEMMs where torch does."""
    biases = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
    if separate_weights is not None:
        return [
            _heads(torch_F.linear(_rows(x), w, b), x, 1, num_heads)[0]
            for x, w, b in zip((query, key, value), separate_weights, biases)
        ]
    if query is key and key is value:
        return _heads(torch_F.linear(_rows(query), in_proj_weight, in_proj_bias), query, 3, num_heads)
    embed = query.shape[-1]
    if key is value:
        w_q, w_kv = in_proj_weight.split([embed, 2 * embed])
        b_q, b_kv = (None, None) if in_proj_bias is None else in_proj_bias.split([embed, 2 * embed])
        q = _heads(torch_F.linear(_rows(query), w_q, b_q), query, 1, num_heads)[0]
        return [q, *_heads(torch_F.linear(_rows(key), w_kv, b_kv), key, 2, num_heads)]
    return [
        _heads(torch_F.linear(_rows(x), w, b), x, 1, num_heads)[0]
        for x, w, b in zip((query, key, value), in_proj_weight.chunk(3), biases)
    ]


def _sdpa_attn_mask(attn_mask: Tensor, bsz: int, num_heads: int, tgt_len: int, src_len: int) -> Tensor:
    """torch's 2-D ``(L, S)`` or 3-D ``(B·H, L, S)`` mask, checked as torch does, as ``(1|B, 1|H, L, S)``."""
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
            )
        return attn_mask.view(1, 1, tgt_len, src_len)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(bsz * num_heads, tgt_len, src_len)}."
            )
        return attn_mask.view(bsz, num_heads, tgt_len, src_len)
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _extend_keys(
    k,
    v,
    attn_mask,
    key_padding_mask,
    bias_k,
    bias_v,
    static_k,
    static_v,
    add_zero_attn,
    bsz,
    num_heads,
    head_dim,
):
    """``bias_k``/``bias_v`` (one more key), ``static_k``/``static_v`` (given keys) and
    ``add_zero_attn`` (a zero key), as torch applies them, masks padded with a zero column."""

    def pad(mask):
        return None if mask is None else torch_F.pad(mask, (0, 1))

    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise AssertionError(
                f"bias cannot be added to static {'key' if static_k is not None else 'value'}."
            )
        k = torch.cat([k, bias_k.reshape(1, num_heads, 1, head_dim).expand(bsz, -1, -1, -1)], dim=2)
        v = torch.cat([v, bias_v.reshape(1, num_heads, 1, head_dim).expand(bsz, -1, -1, -1)], dim=2)
        attn_mask, key_padding_mask = pad(attn_mask), pad(key_padding_mask)
    elif bias_k is not None or bias_v is not None:
        raise AssertionError(
            f"{'bias_k' if bias_k is not None else 'bias_v'} is set but "
            f"{'bias_v' if bias_k is not None else 'bias_k'} is None"
        )
    for name, given in (("static_k", static_k), ("static_v", static_v)):
        if given is not None and (given.size(0) != bsz * num_heads or given.size(2) != head_dim):
            raise AssertionError(
                f"expecting {name} of shape ({bsz * num_heads}, S, {head_dim}), got {tuple(given.shape)}"
            )
    k = k if static_k is None else static_k.view(bsz, num_heads, static_k.shape[1], head_dim)
    v = v if static_v is None else static_v.view(bsz, num_heads, static_v.shape[1], head_dim)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        attn_mask, key_padding_mask = pad(attn_mask), pad(key_padding_mask)
    return k, v, attn_mask, key_padding_mask
