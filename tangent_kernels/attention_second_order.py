"""The gradient of attention's primal and tangent outputs with respect to the primal inputs.

For ``S = s·QKᵀ + bias``, ``P = softmax(S)``, ``O = PV`` and the tangent ``S_t = s(Q_t Kᵀ + Q K_tᵀ)``,
``r = rowsum(P ⊙ S_t)``, ``P_t = P ⊙ (S_t − r)``, ``O_t = P_t V + P V_t``, the gradient of
``L = <G_o, O> + <G, O_t>`` with respect to ``Q, K, V`` (and an additive key bias) is, with
``A = G Vᵀ``, ``c = rowsum(A ⊙ P) = rowsum(G ⊙ O)``:

    dS_t = P ⊙ (A − c)                                    (the ordinary backward's dS for G)
    dP   = G V_tᵀ + (A − c) ⊙ (S_t − r) + G_o Vᵀ
    dS   = P ⊙ (dP − rowsum(P ⊙ dP)),   rowsum(P ⊙ dP) = rowsum(G ⊙ O_t) + rowsum(G_o ⊙ O)
    dQ = s(dS K + dS_t K_t),  dK = s(dSᵀ Q + dS_tᵀ Q_t),  dV = P_tᵀ G + Pᵀ G_o,  d bias = Σ dS

(``dP`` is the gradient with respect to ``P`` plus the row constant ``c·r``, which ``dS`` does not
see; it keeps ``S_t − r`` centered, as the forward kernel does. Grouped-query heads: ``dK, dV`` sum
over the query heads of a group; the bias sums over heads and queries.) The terms in ``G`` are the
second-order ones (the gradient of ``O_t`` with respect to the primal inputs); ``G_o`` is there so
that one pass also gives the gradient of an additive key-padding mask, which needs ``dS`` of both
streams. ``triton/attention_second_order.py`` runs the same formulas as fused kernels.

Everything is recomputed from the inputs, one block of query rows at a time, so memory is
``O(rows · Lk)``, never N×N, and every row statistic is local to its block. It is written in
differentiable torch ops, so gradients of any order follow; when autograd records it (a backward
run with ``create_graph=True``) each block is checkpointed, so the recorded graph keeps the block's
inputs only and recomputes its N×N-sized intermediates when differentiated again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one (batch, heads, rows, keys) score block; about ten such tensors are live at once.
BLOCK_ELEMENTS = 1 << 22


def block_rows(batch: int, num_q_heads: int, k_len: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Query rows per block so that a score block holds about ``block_elements`` elements."""
    return max(1, block_elements // max(1, batch * num_q_heads * k_len))


def primal_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_t: Tensor | None,
    k_t: Tensor | None,
    v_t: Tensor | None,
    grad_o: Tensor | None,
    grad_o_t: Tensor | None,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    mask_grad: bool = False,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dQ, dK, dV, d mask or None)`` of ``<grad_o, O> + <grad_o_t, O_t>`` (formulas above).

    Tensors are ``(B, H, N, D)``; ``k``/``v`` may have fewer heads than ``q`` (grouped-query
    attention); ``None`` is a zero tangent or upstream gradient. ``causal`` is aligned top-left;
    ``key_padding_mask`` is ``(B, Lk)``, boolean with True marking padding, or floating and added
    to the scores; its gradient (``mask_grad``, floating masks only) is ``(B, Lk)``. A query row
    with every key masked contributes nothing. 16-bit inputs are computed in float32. ``rows`` is
    the number of query rows per block (default: ``block_rows``).
    """
    if mask_grad and (key_padding_mask is None or not key_padding_mask.is_floating_point()):
        raise ValueError("mask_grad: only an additive (floating) key_padding_mask has a gradient")
    batch, num_q_heads, q_len, _ = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    def grouped(t: Tensor | None) -> Tensor | None:  # (B, Hq, L, D) -> (B, Hkv, group, L, D)
        # (reshape, not unflatten: torch's legacy vmap, under vectorized autograd.functional, has no rule for it)
        return None if t is None else t.to(compute).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, *t.shape[2:])

    def shared(t: Tensor | None) -> Tensor | None:  # (B, Hkv, L, D) -> (B, Hkv, 1, L, D)
        return None if t is None else t.to(compute).unsqueeze(2)

    keys = (shared(k), shared(v), shared(k_t), shared(v_t))
    queries = (grouped(q), grouped(q_t), grouped(grad_o), grouped(grad_o_t))
    allowed, bias = _key_masks(key_padding_mask, compute)
    rows = rows or block_rows(batch, num_q_heads, k_len)

    dq_blocks, dk, dv, d_bias = [], None, None, None
    for start in range(0, q_len, rows):
        block = queries if rows >= q_len else tuple(None if t is None else t[..., start : start + rows, :] for t in queries)
        block_allowed = allowed
        if causal:
            query_pos = torch.arange(start, min(start + rows, q_len), device=q.device)
            top_left = query_pos[:, None] >= torch.arange(k_len, device=q.device)[None, :]
            block_allowed = top_left if allowed is None else allowed & top_left
        args = (*block, *keys, bias, block_allowed)
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
            grads = checkpoint(_block_grads, *args, scale, mask_grad, use_reentrant=False)
        else:
            grads = _block_grads(*args, scale, mask_grad)
        dq_block, dk_block, dv_block, d_bias_block = grads
        dq_blocks.append(dq_block)
        dk, dv = _add(dk, dk_block), _add(dv, dv_block)
        d_bias = _add(d_bias, d_bias_block)

    dq = torch.cat(dq_blocks, dim=-2).reshape(q.shape).to(q.dtype)
    dk, dv = dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(key_padding_mask.dtype)
    return dq, dk, dv, d_bias


def _key_masks(key_padding_mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """``(allowed keys, additive key bias)``, each broadcastable to ``(B, Hkv, group, rows, Lk)``."""
    if key_padding_mask is None:
        return None, None
    key_padding_mask = key_padding_mask[:, None, None, None, :]
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask, None
    return None, key_padding_mask.to(dtype)


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    return term if total is None else total + term


def _block_grads(q, q_t, grad_o, grad_o_t, k, v, k_t, v_t, bias, allowed, scale, mask_grad):
    """The formulas of the module docstring on one block of query rows.

    Query-side tensors are ``(B, Hkv, group, rows, D)``, key-side ones ``(B, Hkv, 1, Lk, D)``.
    Returns ``(dQ block, dK, dV, d bias or None)``; ``dK, dV`` keep a group axis of size one.
    """
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    # softmax is shift-invariant, so the shift needs no gradient; a fully masked row shifts by 0
    shift = scores.detach().amax(dim=-1, keepdim=True)
    shift = shift.masked_fill(shift == -math.inf, 0.0)
    weights = torch.exp(scores - shift)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.masked_fill(total == 0, 1.0)  # a fully masked row: P = 0, finite gradients

    scores_t = None
    if q_t is not None:
        scores_t = (q_t @ k.transpose(-2, -1)) * scale
    if k_t is not None:
        term = (q @ k_t.transpose(-2, -1)) * scale
        scores_t = term if scores_t is None else scores_t + term
    centered_t = None
    if scores_t is not None:
        centered_t = scores_t - (probs * scores_t).sum(dim=-1, keepdim=True)  # S_t − r

    grad_probs = None if grad_o is None else grad_o @ v.transpose(-2, -1)  # G_o Vᵀ
    grad_scores_t = None  # dS_t
    grad_v = None if grad_o is None else probs.transpose(-2, -1) @ grad_o
    if grad_o_t is not None:
        a = grad_o_t @ v.transpose(-2, -1)
        c = (a * probs).sum(dim=-1, keepdim=True)
        if centered_t is not None:
            grad_scores_t = probs * (a - c)
            grad_probs = _add(grad_probs, (a - c) * centered_t)
            grad_v = _add(grad_v, (probs * centered_t).transpose(-2, -1) @ grad_o_t)
        if v_t is not None:
            grad_probs = _add(grad_probs, grad_o_t @ v_t.transpose(-2, -1))

    if grad_probs is None:  # no term reaches the scores
        grad_scores = torch.zeros_like(probs)
    else:
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
    grad_q = (grad_scores @ k) * scale
    grad_k = (grad_scores.transpose(-2, -1) @ q) * scale
    if grad_scores_t is not None:
        if k_t is not None:
            grad_q = grad_q + (grad_scores_t @ k_t) * scale
        if q_t is not None:
            grad_k = grad_k + (grad_scores_t.transpose(-2, -1) @ q_t) * scale
    grad_k = grad_k.sum(dim=2, keepdim=True)
    grad_v = torch.zeros_like(grad_k) if grad_v is None else grad_v.sum(dim=2, keepdim=True)
    grad_bias = grad_scores.sum(dim=(1, 2, 3)) if mask_grad else None
    return grad_q, grad_k, grad_v, grad_bias
