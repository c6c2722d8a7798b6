"""``fused_attention``: softmax attention whose forward-AD tangent is the one-pass primal + tangent
kernel, differentiable (reverse mode through ``o_t`` reaches the tangents' sources, e.g. the
``dparams`` of a ``LinearizedModel``, and the primal inputs: second order).

Under forward AD the call unpacks the dual inputs at the current level and runs the differentiable
``functional.attention_jvp`` once, for both streams, and packs ``(o, o_t)`` back into a dual
tensor. An ``autograd.Function`` with a ``jvp`` rule would compute the primal twice: torch runs
its ``forward`` before its ``jvp`` (a third of the fused call's time at 256 tokens on the CPU).
Calls without a tangent at the current level run ``_FusedAttention``, whose backward has a
backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import autocasting, backends, functional, ops, validation
from . import watch


class _FusedAttention(torch.autograd.Function):
    """``softmax(s·QKᵀ + mask)V`` with the flash backward (itself differentiable), for calls
    without tangents. The mask is a constant: callers pass only masks without a tangent and not
    requiring grad."""

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
        ctx.scale, ctx.causal, ctx.backend = scale, causal, backend

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse, mask = ctx.saved_tensors
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
        dq, dk, dv = ops.attention_vjp(
            grad_o.contiguous(),
            q,
            k,
            v,
            o,
            lse,
            mask,
            ctx.scale,
            ctx.causal,
            needs_q,
            needs_k or needs_v,
            ctx.backend,
        )
        return (
            dq if needs_q else None,
            dk if needs_k else None,
            dv if needs_v else None,
            None,
            None,
            None,
            None,
        )


def _dual_attention(duals, key_padding_mask, scale, causal, backend) -> Tensor:
    """Both streams by one differentiable fused call, returned as a dual tensor ``(o, o_t)``."""
    (q, q_t), (k, k_t), (v, v_t) = duals
    o, o_t = functional.attention_jvp(
        q, k, v, q_t, k_t, v_t, scale=scale, causal=causal, key_padding_mask=key_padding_mask, backend=backend
    )
    return forward_ad.make_dual(o, o_t)


def _kernel_backend(q: Tensor, backend: str) -> str:
    """The backend for the fused op: ``backend`` resolved; on Triton, head dims past its limit
    run the reference under ``"auto"`` and raise otherwise."""
    chosen = backends.select("attention_jvp", backend, q.device, q.dtype)
    if chosen == "triton":
        from ..triton.attention import MAX_HEAD_DIM

        if q.shape[-1] > MAX_HEAD_DIM:
            reason = f"q: the triton attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
            if backend != "auto":
                raise backends.BackendUnavailableError(reason)
            chosen = backends.select("attention_jvp", "reference", q.device, q.dtype)
    return chosen


@torch.compiler.disable
def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention on ``(B, H, N, D)`` tensors through the fused kernels, with a forward-mode rule.

    ``torch.func.jvp`` and ``torch.autograd.forward_ad`` through it compute both streams with one
    call of the one-pass kernel (see the module docstring). Arguments as ``functional.attention_jvp`` (``key_padding_mask``: ``(B, Lk)``,
    bool with True = padding, or floating and added to the scores). Under ``torch.autocast`` the
    inputs are cast as autocast casts them for ``scaled_dot_product_attention``. A floating mask
    with a tangent, or requiring grad, runs the reference (its tangent and gradient are exact there).

    ``torch.compile`` runs it outside the compiled graph: compiled code drops the ``jvp`` rule
    of an ``autograd.Function`` and silently returns a wrong tangent (seen with torch 2.14;
    pytorch/pytorch#192985), so inside ``torch.func.jvp`` the call runs eagerly, and with
    ``fullgraph=True`` compilation stops with an error instead of a wrong result.
    """
    q, k, v, key_padding_mask = autocasting.lower_precision_inputs(q, k, v, key_padding_mask)
    key_padding_mask = validation.attention(q, k, v, None, None, None, key_padding_mask)
    scale, causal = validation.attention_scale(scale, q.shape[-1]), validation.flag("causal", causal)
    chosen = _kernel_backend(q, backend)
    if chosen != "reference" and not watch.fused_ops_serve_transforms(q, k, v):
        if backend != "auto":
            raise backends.BackendUnavailableError(
                f"backend {backend!r}: under these torch.func transforms attention runs on the reference only"
            )
        chosen = "reference"
    if key_padding_mask is not None and (
        key_padding_mask.requires_grad or watch.has_tangent(key_padding_mask)
    ):
        if chosen != "reference" and backend != "auto":
            raise backends.BackendUnavailableError(
                f"backend {backend!r}: a key_padding_mask with a tangent or requiring grad runs on the "
                "reference backend only"
            )
        chosen = "reference"
    if chosen == "reference" or q.numel() == 0 or k.shape[2] == 0:
        return functional.attention_jvp(
            q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, backend="reference"
        )[0]
    duals = [forward_ad.unpack_dual(t) for t in (q, k, v)]
    if any(tangent is not None for _, tangent in duals):
        return _dual_attention(duals, key_padding_mask, scale, causal, chosen)
    return _FusedAttention.apply(q, k, v, key_padding_mask, scale, causal, chosen)[0]
