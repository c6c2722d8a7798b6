"""Speed up unmodified ``torch.func.jvp`` code: fused attention with its own forward-mode rule.

Codebases that linearize a stock model with ``jvp(functional_call(model, ...), (params,),
(dparams,))`` (the ``LinearizedModel`` pattern) fail on fused SDPA or fall back to N×N math
attention. ``fused_attention`` is ``scaled_dot_product_attention`` as an ``autograd.Function``
whose ``jvp`` runs the one-pass primal + tangent kernel, and whose tangent is differentiable
(reverse mode through ``o_t`` reaches ``dparams``). ``patch(model)`` routes the attention of timm
ViT ``Attention`` modules and of ``nn.MultiheadAttention`` through it; ``unpatch`` restores the
model exactly.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import functional, ops
from .backends import select

_PATCHED = "_tangent_kernels_patch"


class _FusedAttention(torch.autograd.Function):
    """``softmax(s·QKᵀ)V`` with the flash backward and the one-pass fused kernel as its JVP rule."""

    @staticmethod
    def forward(q, k, v, key_padding_mask, scale, causal, backend):
        o, _, lse = ops.attention_jvp(q, k, v, None, None, None, key_padding_mask, scale, causal, backend)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, causal, backend = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.save_for_forward(q, k, v, mask)
        ctx.scale, ctx.causal, ctx.backend = scale, causal, backend

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse, mask = ctx.saved_tensors
        needs_q, needs_k, needs_v, needs_mask = ctx.needs_input_grad[:4]
        if needs_mask:
            raise NotImplementedError("fused_attention: the gradient of an additive key_padding_mask is not implemented")
        dq, dk, dv = ops.attention_vjp(grad_o.contiguous(), q, k, v, o, lse, mask, ctx.scale, ctx.causal, needs_q,
                                       needs_k or needs_v, ctx.backend)  # fmt: skip
        return (dq if needs_q else None, dk if needs_k else None, dv if needs_v else None, None, None, None, None)

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, mask_t, *_):
        if mask_t is not None:
            raise NotImplementedError("fused_attention: a tangent of the key_padding_mask is not supported")
        q, k, v, mask = ctx.saved_tensors
        _, o_t = functional.attention_jvp(q, k, v, q_t, k_t, v_t, scale=ctx.scale, causal=ctx.causal,
                                          key_padding_mask=mask, backend=ctx.backend)  # fmt: skip
        return (torch.zeros_like(q) if o_t is None else o_t), None


@torch.compiler.disable
def fused_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False,
                    key_padding_mask: Tensor | None = None, backend: str = "auto") -> Tensor:  # fmt: skip
    """Attention on ``(B, H, N, D)`` tensors through the fused kernels, with a forward-mode rule.

    ``torch.func.jvp`` and ``torch.autograd.forward_ad`` through it compute the tangent with the
    one-pass kernel. Arguments as ``functional.attention_jvp``.

    ``torch.compile`` runs it outside the compiled graph: compiled code drops the ``jvp`` rule
    of an ``autograd.Function`` and silently returns a wrong tangent (seen with torch 2.14;
    pytorch/pytorch#192985), so inside ``torch.func.jvp`` the call runs eagerly, and with
    ``fullgraph=True`` compilation stops with an error instead of a wrong result.
    """
    chosen = select("attention_jvp", backend, q.device, q.dtype)
    if chosen == "reference":
        return functional.attention_jvp(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                        backend="reference")[0]  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.expand(q.shape[0], k.shape[2])
    return _FusedAttention.apply(q, k, v, key_padding_mask, scale, bool(causal), chosen)[0]


def _key_padding_from_sdpa_mask(attn_mask: Tensor, batch: int, k_len: int) -> Tensor | None:
    """An SDPA ``attn_mask`` that only masks keys (broadcast over heads and queries), as a
    ``(B, Lk)`` key-padding mask; ``None`` when it is not of that form."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[3] != k_len:
        return None
    mask = attn_mask[:, 0, 0, :].expand(batch, k_len)
    return ~mask if mask.dtype == torch.bool else mask  # SDPA: True = attend; ours: True = padding


class _FusedSDPAMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls it can serve to ``fused_attention`` and
    the others to torch's math SDPA (the fused SDPA kernels have no forward-AD rule)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch_F.scaled_dot_product_attention:
            fused = _sdpa_as_fused(*args, backend=self.backend, **kwargs)
            if fused is not None:
                return fused
            with sdpa_kernel(SDPBackend.MATH):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def routed_attention(backend: str = "auto") -> _FusedSDPAMode:
    """``with routed_attention(): ...`` runs the ``F.scaled_dot_product_attention`` calls inside
    through ``fused_attention`` where it can serve them, and through torch's math SDPA otherwise."""
    return _FusedSDPAMode(backend)


def _sdpa_as_fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   *, backend="auto"):  # fmt: skip
    """The SDPA call through ``fused_attention``, or ``None`` where it cannot serve it (dropout,
    a general mask, GQA without ``enable_gqa``, a value head dim other than the query's)."""
    if dropout_p > 0.0 or query.dim() != 4 or (query.shape[1] != key.shape[1] and not enable_gqa):
        return None
    if value.shape[-1] != query.shape[-1]:
        return None
    mask = None
    if attn_mask is not None:
        mask = _key_padding_from_sdpa_mask(attn_mask, query.shape[0], key.shape[2])
        if mask is None or is_causal:
            return None
    return fused_attention(query, key, value, scale=scale, causal=is_causal, key_padding_mask=mask, backend=backend)


def _timm_attention_forward(original, *args, **kwargs):
    with routed_attention():
        return original(*args, **kwargs)


def _mha_forward(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
    """``nn.MultiheadAttention.forward`` through ``fused_attention``; attention weights are not
    computed (``None``), as in PyTorch's own fast path."""
    if attn_mask is not None:
        raise NotImplementedError("patched nn.MultiheadAttention: attn_mask is not supported (is_causal=True is)")
    if mha.training and mha.dropout > 0.0:
        raise NotImplementedError(f"patched nn.MultiheadAttention: dropout={mha.dropout} in training is not supported")
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    tgt_len, batch, embed = query.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)

    def heads_of(x, w, b):  # (L, B, E) -> (B, H, L, D)
        return torch_F.linear(x, w, b).view(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads_of(query, w_q, b_q), heads_of(key, w_k, b_k), heads_of(value, w_v, b_v)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.to(q.dtype)
    o = fused_attention(q, k, v, causal=is_causal, key_padding_mask=key_padding_mask)
    o = o.permute(2, 0, 1, 3).reshape(tgt_len, batch, embed)
    out = torch_F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
    return (out.transpose(0, 1) if mha.batch_first else out), None


def has_fused_attn_flag(module: nn.Module) -> bool:
    """timm's attention modules (``Attention``, attention pooling, parallel blocks, ...) carry a
    ``fused_attn`` flag and call ``F.scaled_dot_product_attention`` when it is on."""
    return isinstance(getattr(module, "fused_attn", None), bool)


def patch(model: nn.Module) -> nn.Module:
    """Route the attention of ``model``'s timm attention modules (those with a ``fused_attn`` flag)
    and ``nn.MultiheadAttention`` modules through ``fused_attention`` (in place; returns
    ``model``). Raises for modules it cannot serve."""
    if hasattr(model, _PATCHED):
        raise RuntimeError("patch: this model is already patched (call unpatch first)")
    saved = {}
    for name, module in model.named_modules():
        if has_fused_attn_flag(module):
            saved[name] = (module, module.__dict__.get("forward"), module.fused_attn)
            module.fused_attn = True  # timm then calls F.scaled_dot_product_attention, which the mode routes
            module.forward = functools.partial(_timm_attention_forward, type(module).forward.__get__(module))
        elif isinstance(module, nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                raise NotImplementedError(f"patch: {name or 'model'}: add_bias_kv / add_zero_attn are not supported")
            saved[name] = (module, module.__dict__.get("forward"), None)
            module.forward = functools.partial(_mha_forward, module)
    object.__setattr__(model, _PATCHED, saved)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: every module's ``forward`` and timm's ``fused_attn`` as they were."""
    saved = getattr(model, _PATCHED, None)
    if saved is None:
        raise RuntimeError("unpatch: this model is not patched")
    for module, forward, fused_attn in saved.values():
        if forward is None:
            del module.forward
        else:
            module.forward = forward
        if fused_attn is not None:
            module.fused_attn = fused_attn
    object.__delattr__(model, _PATCHED)
    return model


@contextlib.contextmanager
def patched(model: nn.Module):
    """``with patched(model): ...`` patches for the block and restores the model after."""
    patch(model)
    try:
        yield model
    finally:
        unpatch(model)
