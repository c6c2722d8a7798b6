"""``scaled_dot_product_attention`` with torch's signature and semantics, for calls under forward AD.

A call whose inputs carry no tangent and need no gradient runs torch's own SDPA untouched (any
backend, flash included); one that needs a gradient runs the fused op where it serves the form,
since its backward is differentiable again (double backward), torch's flash SDPA's is not. A call
with tangents runs the fused kernel when it is of a form the kernel serves:
equal batch dims, ``enable_gqa`` heads, no dropout, a value head dim equal to the query's, and
either no mask, ``is_causal``, a key-padding mask (an ``attn_mask`` that broadcasts over heads
and queries, e.g. ``(B, 1, 1, Lk)`` or an expanded ``(B, 1, Lq, Lk)`` view; bool with SDPA's True =
attend, or floating and added) or the causal mask itself as an ``attn_mask`` (CLIP's text tower);
masks written out for every query or repeated over the heads are read by value, once per mask.
Every other form runs torch's math SDPA, whose forward-AD rule is
exact (dropout then applies one mask to both streams); that is said once per reason. Under
``torch.autograd.forward_ad`` outside ``torch.func`` it runs the same math in ops whose tangent
graph can be differentiated (torch's softmax builds one that cannot). Under
``torch.autocast`` the inputs are cast as autocast casts them for torch's SDPA.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import autocasting, forward_mode, validation
from . import watch
from .attention import fused_attention

T = TypeVar("T")


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, its tangent by the fused kernel where
    it serves the call (see the module docstring), by torch's math SDPA otherwise."""
    scale = _module_scale(query) if scale is None else _scale_as_torch_reads_it(scale)
    call = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}
    tangents = any(watch.has_tangent(t) for t in (query, key, value, attn_mask))
    # Without tangents but differentiated, the fused op too: its backward has a backward (torch's
    # flash SDPA has none), so the double-backward form of a JVP (autograd.functional.jvp with
    # create_graph=True) works through a patched model as through timm's unfused attention.
    differentiated = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (query, key, value)
    )
    if not (tangents or differentiated):
        return torch_F.scaled_dot_product_attention(query, key, value, attn_mask, **call)
    q, k, v, mask = autocasting.lower_precision_inputs(query, key, value, attn_mask)
    form = fused_form(q, k, v, mask, dropout_p, is_causal, enable_gqa, scale)
    if isinstance(form, str) and not tangents:
        return torch_F.scaled_dot_product_attention(query, key, value, attn_mask, **call)
    if isinstance(form, str) or math_is_faster(q, k):
        out = _math_sdpa(q, k, v, mask, call)  # (autocast's casts made: the composite math runs without it)
        if isinstance(form, str):  # after the call: a form torch refuses raises, without a warning first
            watch.served_by_math(form)
        else:
            watch.served_small()
        return out
    key_padding_mask, causal = form
    out = fused_attention(
        _as_4d(q),
        _as_4d(k),
        _as_4d(v),
        scale=scale,
        causal=causal,
        key_padding_mask=key_padding_mask,
        backend=backend,
    )
    watch.served_fused()
    return out.reshape(*q.shape[:-1], v.shape[-1])


_local = threading.local()


@contextlib.contextmanager
def scale_when_unset(scale: float | None):
    """SDPA calls inside that pass no ``scale`` use ``scale`` (``None``: SDPA's own, 1/√head dim): a
    module whose attention by hand used its own ``scale``, and whose SDPA branch (``patch`` turned on)
    passes none, keeps computing its own function."""
    previous = getattr(_local, "scale", None)
    _local.scale = scale
    try:
        yield
    finally:
        _local.scale = previous


def _scale_as_torch_reads_it(scale):
    """torch's SDPA takes a ``scale`` given as a bool or a 0-d tensor as the float it holds; anything
    else is left for the checks to refuse."""
    if isinstance(scale, bool) or (isinstance(scale, Tensor) and scale.dim() == 0 and scale.is_floating_point()):
        return float(scale)
    return scale


def _module_scale(query: Tensor) -> float | None:
    """The scale set by ``scale_when_unset`` where it is not SDPA's own for ``query``, else ``None``."""
    scale = getattr(_local, "scale", None)
    return None if scale is None or scale == query.shape[-1] ** -0.5 else scale


# Below this many scores in a call (batch × heads × query length × key length), on the CPU,
# torch's math SDPA under forward AD is faster than the fused kernel: a fused call pays a fixed
# cost (an autograd.Function under torch.func, and the primal computed once by ``forward`` before
# ``jvp`` computes both streams) that few scores do not repay. Measured on 2 idle cores (fp32,
# head dim 64, jvp + backward; math/fused time): B·H = 8: N=197 0.82x, 224 1.11x, 256 1.15x;
# B·H = 6: N=224 0.82x, 256 1.11x; B·H = 96: N=128 1.28x, 256 1.45x: the crossover is at about
# 350-400 thousand scores whatever the shape. The scores math SDPA materializes are small here.
# ``TANGENT_KERNELS_CPU_FUSED_MIN_SCORES`` overrides it (0: always fused).
CPU_FUSED_MIN_SCORES = validation.env_count("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES", 6 * 256 * 256)


def math_is_faster(q: Tensor, k: Tensor) -> bool:
    """A call the fused kernel would serve, but slower than torch's math SDPA (see above)."""
    return q.device.type == "cpu" and math.prod(q.shape[:-1]) * k.shape[-2] < CPU_FUSED_MIN_SCORES


def _math_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, call: dict) -> Tensor:
    """torch's math SDPA (the fused SDPA kernels have no forward-AD rule), where a query row whose
    mask hides every key (a fully padded batch row, causal attention over left padding, a sliding
    window) gives zeros with zero gradients, as torch's default SDPA and the fused kernel do: math
    SDPA's gradients under forward AD are NaN there. Such rows attend to every key, and their
    output is zeroed (tensor ops only: no sync)."""
    sees_nothing = None
    if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        hidden = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == -math.inf
        sees_nothing = hidden.all(dim=-1, keepdim=True)
        attn_mask = attn_mask | sees_nothing if attn_mask.dtype == torch.bool else attn_mask.masked_fill(sees_nothing, 0)
    if forward_mode.forward_ad_api() and not any(forward_mode.legacy_vmapped(t) for t in (query, key, value)):
        out = _composite_sdpa(query, key, value, attn_mask, **call)
    else:
        with sdpa_kernel(SDPBackend.MATH):
            out = torch_F.scaled_dot_product_attention(query, key, value, attn_mask, **call)
    if sees_nothing is None:
        return out
    while sees_nothing.dim() > out.dim():  # a mask with more (unit) leading dims than the scores
        sees_nothing = sees_nothing[0]
    return out.masked_fill(sees_nothing, 0)


def _composite_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
                    is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:  # fmt: skip
    """torch's math SDPA (same products, 16-bit inputs in float32, a negative scale's sign on the
    query, the same dropout draw from the global stream) in ops whose ``forward_ad`` tangent graph
    can be differentiated: under ``torch.autograd.forward_ad`` outside ``torch.func``, torch's
    softmax builds a tangent graph whose backward raises (it modifies an output of its exp in
    place), so no loss on the tangent could train through it. Inputs torch refuses are refused by
    torch (checked on meta tensors); the inputs come cast as autocast casts them, and the math runs
    with autocast off (in float32 for 16-bit inputs, as torch's)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        metas = [None if t is None else t.detach().to("meta") for t in (query, key, value, attn_mask)]
        torch_F.scaled_dot_product_attention(*metas, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    root_scale = math.sqrt(abs(scale))
    with autocasting.autocast_off(query.device):
        scores = (query * math.copysign(root_scale, scale)) @ (key.transpose(-2, -1) * root_scale)
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        elif attn_mask is not None:
            scores = scores + attn_mask
        if scores.shape[-1]:  # (no keys: torch's zeros)
            scores = scores - scores.detach().amax(-1, keepdim=True)
        weights = scores.exp()
        weights = weights / weights.sum(-1, keepdim=True)
        if dropout_p > 0.0:
            weights = torch_F.dropout(weights, dropout_p)
        return (weights @ value).to(dtype)


def fused_form(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool, enable_gqa: bool,
    scale=None,
) -> tuple[Tensor | None, bool] | str:
    """The call (inputs after autocast) as the kernel's ``(key_padding_mask (B, Lk), causal)``, or
    why the kernel cannot serve it."""
    if dropout_p > 0.0:
        return "SDPA with dropout_p > 0"
    if isinstance(scale, float) and not math.isfinite(scale):
        return "SDPA with a scale that is not finite"
    if (
        not (q.dim() == k.dim() == v.dim() >= 2)
        or q.shape[:-3] != k.shape[:-3]
        or k.shape[:-3] != v.shape[:-3]
    ):
        return "SDPA with batch dims that differ between query, key and value (broadcast)"
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and q.is_floating_point()):
        return "SDPA with query, key and value of different dtypes or devices"
    if enable_gqa and q.dim() < 3:
        return "SDPA with enable_gqa on inputs without a head dim"  # (torch refuses it)
    heads = (q.shape[-3], k.shape[-3], v.shape[-3]) if q.dim() > 2 else (1, 1, 1)
    if (
        heads[1] != heads[2]
        or heads[1] == 0
        or (heads[0] != heads[1] and not (enable_gqa and heads[0] % heads[1] == 0))
    ):
        return "SDPA with query heads that key/value heads do not serve"
    if k.shape[-2] != v.shape[-2] or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "SDPA with a value head dim other than the query's"
    if q.numel() == 0 or k.numel() == 0:
        return "SDPA on empty tensors"
    if mask is None:
        return None, is_causal
    if is_causal:
        return "SDPA with both attn_mask and is_causal"  # torch refuses it
    return _mask_form(mask, q, k)


def _mask_form(mask: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor | None, bool] | str:
    """An ``attn_mask`` that only pads keys -> ``(key_padding_mask, False)``; the causal mask,
    alone or with key padding (the same for every head) -> ``(key_padding_mask or None, True)``;
    else why the kernel cannot serve it."""
    if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
        return f"SDPA with an attn_mask of dtype {mask.dtype}"
    if mask.requires_grad or watch.has_tangent(mask):
        return "SDPA with an attn_mask that has a tangent or requires grad"
    if mask.is_floating_point() and q.dtype in (torch.float16, torch.bfloat16) and mask.dtype != q.dtype:
        # the kernels add a floating mask in the inputs' dtype; torch adds it at its own precision
        if forward_mode.vmapped(mask) or not _once_per_mask(held_in_16_bits, mask)[q.dtype]:
            return f"SDPA with a {mask.dtype} attn_mask holding values that {q.dtype} rounds"
    scores = (*q.shape[:-1], k.shape[-2])
    try:
        broadcasts = torch.broadcast_shapes(mask.shape, scores) == scores
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        return "SDPA with an attn_mask that does not broadcast to the scores"
    full = mask.expand(scores)
    query_dim, head_dim = full.dim() - 2, full.dim() - 3
    varies = {d for d in range(full.dim() - 1) if full.shape[d] > 1 and full.stride(d) != 0}
    readable = not forward_mode.vmapped(mask)  # by value (not per example under vmap): once per mask
    if head_dim in varies and readable and _once_per_mask(same_over_heads, full):
        varies.discard(head_dim)  # repeated over the heads: every reading below takes head 0
    if query_dim not in varies and head_dim not in varies:
        keys = full[..., 0, :] if full.dim() == 2 else full[..., 0, 0, :]
        keys = keys.reshape(-1, k.shape[-2])
        return (~keys if keys.dtype == torch.bool else keys.to(q.dtype)), False
    if head_dim not in varies and readable:  # key padding written out per query, maybe causal
        own = mask.reshape((1,) * (full.dim() - mask.dim()) + tuple(mask.shape))
        own = own.reshape(-1, *own.shape[-2:]) if own.dim() <= 3 else own.select(head_dim, 0)
        own = own.reshape(-1, *own.shape[-2:]).expand(-1, *full.shape[-2:])
        per_batch = own.shape[0] in (1, math.prod(full.shape[:-3]))
        found = _once_per_mask(key_padding_over_queries, own) if per_batch else False
        if found is not False:
            padding, causal = found
            return (padding if padding is None or padding.dtype == torch.bool else padding.to(q.dtype)), causal
    return "SDPA with an attn_mask that varies over heads or queries (key padding and causal masks run fused)"


_seen: OrderedDict[tuple[int, str], tuple[Tensor, tuple, object]] = OrderedDict()


def _once_per_mask(question: Callable[[Tensor], T], mask: Tensor) -> T:
    """``question(mask)``, a reading of the mask's values, kept per mask tensor and version (a model
    hands the same mask to every layer), so a GPU syncs once per mask, not per layer."""
    base = mask if mask._base is None else mask._base
    key = (mask.shape, mask.stride(), mask.storage_offset(), base._version)
    seen = _seen.get((id(base), question.__name__))
    if seen is not None and seen[0] is base and seen[1] == key:
        return seen[2]
    answer = question(mask)
    _seen[(id(base), question.__name__)] = (base, key, answer)  # holding ``base`` keeps its id unused
    while len(_seen) > 16:
        _seen.popitem(last=False)
    return answer


def held_in_16_bits(mask: Tensor) -> dict[torch.dtype, bool]:
    """Per 16-bit dtype, whether it holds every value of the floating ``mask`` exactly (0 and -inf
    do; ``torch.finfo(torch.float32).min`` and most biases do not)."""
    return {dtype: bool((mask.to(dtype).to(mask.dtype) == mask).all()) for dtype in (torch.float16, torch.bfloat16)}


def same_over_heads(full: Tensor) -> bool:
    """Whether the mask ``full`` ``(..., H, L, S)`` holds the same values for every head (diffusers'
    ``prepare_attention_mask`` repeats a padding mask over the heads)."""
    return bool((full == full[..., :1, :, :]).all())


def key_padding_over_queries(mask: Tensor) -> tuple[Tensor | None, bool] | bool:
    """Whether ``mask`` ``(B, L, S)`` is a key-padding mask written out for every query, alone (the
    same row for every query, as Hugging Face's BERT builds it) or intersected with SDPA's top-left
    causal mask: ``False`` if neither, else ``(padding, causal)`` with the padding ``(B, S)`` as the
    kernel takes it (bool, True = padding; or floating, added to the scores; ``None``: none). Bool
    masks (True = attend) are read, and floating ones (with the causal mask: 0 or -inf)."""
    if bool((mask == mask[:, :1, :]).all()):  # one row for every query: key padding alone
        row = mask[:, 0, :]
        if mask.dtype == torch.bool:
            return (None if bool(row.all()) else ~row), False
        return (None if not bool(row.any()) else row), False
    attend = mask if mask.dtype == torch.bool else mask == 0
    valid = mask.dtype == torch.bool or bool(((mask == 0) | (mask == -math.inf)).all())
    causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    length, keys = mask.shape[-2], mask.shape[-1]
    last_row = attend[:, -1, :] | (torch.arange(keys, device=mask.device) >= length)  # keys past L: masked anyway
    if valid and torch.equal(attend, causal & last_row[:, None, :]):
        return (None if bool(last_row.all()) else ~last_row), True
    return False


def _as_4d(t: Tensor) -> Tensor:
    """``(..., H, N, D)`` as ``(B, H, N, D)``; a 2-D ``(N, D)`` as ``(1, 1, N, D)``."""
    return t[None, None] if t.dim() == 2 else t.reshape(-1, *t.shape[-3:])
