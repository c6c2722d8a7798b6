"""The fused kernels as ``torch.library`` custom ops, so ``torch.compile`` sees opaque ops.

Each op takes a ``backend`` argument (``"triton"`` or ``"cpp"``) that picks the kernels; it has a
fake implementation (shapes, dtypes and strides without running anything) and, for the forward
ops, the autograd formula of DESIGN.md §2 (``register_autograd``), whose backward is itself an
op. Attention also has its second-order terms: the gradient of ``o_t`` with respect to ``q, k, v``
(the Triton op ``attention_second_order``, or the module of that name in differentiable torch ops)
and the double backward of ``attention_vjp``. Optional results come back as empty tensors (custom
ops return tensors only); ``functional`` turns them into ``None``.

Ops: ``layer_norm_jvp`` / ``layer_norm_vjp``, ``attention_jvp`` / ``attention_vjp`` /
``attention_second_order`` (Triton only), ``gelu_jvp`` (bias add fused; its backward is
element-wise), ``linear_jvp`` (one GEMM for both streams, optional GELU epilogue; Triton only, its
backward is ATen matmuls).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, cpp, validation
from .attention_second_order import primal_grads

NAMESPACE = "tangent_kernels"


def _kernels(name: str, backend: str):
    """The launcher module of ``name`` for ``backend`` (Triton module or C++ adapter)."""
    if backend == "triton":
        from .triton import attention, gelu, layer_norm, linear

        return {"attention": attention, "gelu": gelu, "layer_norm": layer_norm, "linear": linear}[name]
    if backend == "cpp":
        return getattr(cpp, name)
    raise ValueError(f"backend: expected 'triton' or 'cpp' for a fused op, got {backend!r}")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _stats_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """Row statistics (mean, rstd, lse) are fp32, or fp64 for fp64 inputs on the C++ backend."""
    return torch.float64 if dtype == torch.float64 and backend == "cpp" else torch.float32


def _any_requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def second_order_error(op: str, argument: str) -> NotImplementedError:
    return NotImplementedError(
        f"{op}: the gradient of the tangent output with respect to the primal input {argument!r} "
        "(a second-order term) is not implemented in the fused backends; detach it, or use "
        "backend='reference'"
    )


# ----------------------------------------------------------------------------------------------
# layer norm


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_jvp", mutates_args=())
def layer_norm_jvp(
    x: Tensor, x_t: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    d_weight: Optional[Tensor], d_bias: Optional[Tensor], eps: float, centered: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, y_t or empty, mean, rstd)`` of a layer norm over the last dimension (RMSNorm if not
    ``centered``: ``mean`` is then zero)."""
    validation.layer_norm(x, x_t, weight, bias, d_weight, d_bias, eps)
    y, y_t, mean, rstd = _kernels("layer_norm", backend).forward(x, x_t, weight, bias, d_weight, d_bias, eps,
                                                                 centered)  # fmt: skip
    return y, _or_empty(y_t, x), mean, rstd


@layer_norm_jvp.register_fake
def _(x, x_t, weight, bias, d_weight, d_bias, eps, centered, backend):
    validation.layer_norm(x, x_t, weight, bias, d_weight, d_bias, eps)
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=_stats_dtype(x.dtype, backend))
    has_tangent = x_t is not None or d_weight is not None or d_bias is not None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, (torch.empty_like(y) if has_tangent else _empty(x)), stats, torch.empty_like(stats)


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_vjp", mutates_args=())
def layer_norm_vjp(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, centered: bool,
    input_grad: bool, param_grads: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The layer-norm backward for one upstream stream: ``(grad input, Σ g·x̂, Σ g)`` (empty if not asked)."""
    validation.layer_norm_backward_inputs(grad, x, weight, mean, rstd)
    g_x, g_w, g_b = _kernels("layer_norm", backend).backward(grad, x, weight, mean, rstd, centered, input_grad,
                                                             param_grads)  # fmt: skip
    return _or_empty(g_x, x), _or_empty(g_w, x), _or_empty(g_b, x)


@layer_norm_vjp.register_fake
def _(grad, x, weight, mean, rstd, centered, input_grad, param_grads, backend):
    validation.layer_norm_backward_inputs(grad, x, weight, mean, rstd)
    param_dtype = x.dtype if weight is None else weight.dtype
    param = x.new_empty(x.shape[-1], dtype=param_dtype) if param_grads else _empty(x)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device) if input_grad else _empty(x)), param, param.clone()


def _layer_norm_setup(ctx, inputs, output):
    x, x_t, weight, bias, d_weight, _, eps, centered, backend = inputs
    y, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    primal_needs_grad = _any_requires_grad(x, weight)
    if not primal_needs_grad and not _any_requires_grad(bias):
        ctx.mark_non_differentiable(y)  # the primal stream does not depend on tangents or offsets
    # The tangents serve only the second-order terms (y_t differentiated w.r.t. x or the weight):
    # with frozen primal inputs (TAFT) nothing more is saved than for an ordinary layer norm.
    tangents = (x_t, d_weight) if primal_needs_grad else (None, None)
    ctx.save_for_backward(x, weight, mean, rstd, *tangents)
    ctx.backend, ctx.eps, ctx.centered = backend, eps, centered
    ctx.set_materialize_grads(False)


def _layer_norm_second_order(ctx, grad_y_t, needs_x: bool, needs_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradient of ``<grad_y_t, y_t>`` w.r.t. the primal ``x`` and the frozen weight: autograd
    through the reference formula, recomputed from the saved inputs (element-wise work, no more
    memory than ``x``)."""
    from . import reference

    x, weight, _, _, x_t, d_weight = ctx.saved_tensors
    wanted = [t for t, needed in ((x, needs_x), (weight, needs_w)) if needed]
    with torch.enable_grad():
        _, y_t = reference.layer_norm_jvp(x, x_t, weight, None, d_weight, None, ctx.eps, ctx.centered)
        if y_t is None or not y_t.requires_grad:  # only d_bias: y_t does not depend on x or the weight
            return None, None
        found = iter(torch.autograd.grad(y_t, wanted, grad_y_t, allow_unused=True))
    return (next(found) if needs_x else None), (next(found) if needs_w else None)


def _layer_norm_backward_differentiable(ctx, grad_y, grad_y_t) -> tuple:
    """Every gradient by autograd through the reference formula recomputed from the saved inputs,
    differentiable again (``create_graph``: double backward, ``autograd.functional.jvp``). ``y_t``
    is linear in ``x_t`` and the offsets, so where they were not saved zeros stand in for them."""
    from . import reference

    x, weight, _, _, x_t, d_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad[:6]

    def stand_in(saved, like, needed):
        return saved if saved is not None else like.new_zeros(like.shape).requires_grad_() if needed else None

    features = x.new_empty(x.shape[-1])
    inputs = [x, stand_in(x_t, x, needs[1]), weight, stand_in(None, features, needs[3]),
              stand_in(d_weight, features, needs[4]), stand_in(None, features, needs[5])]  # fmt: skip
    with torch.enable_grad():
        y, y_t = reference.layer_norm_jvp(*inputs, ctx.eps, ctx.centered)
        pairs = [(out, grad) for out, grad in ((y, grad_y), (y_t, grad_y_t)) if out is not None and grad is not None]
        wanted = [t for t, needed in zip(inputs, needs) if needed]
        found = iter(torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                         create_graph=True, allow_unused=True) if pairs and wanted else ())  # fmt: skip
    return (*(next(found, None) if needed else None for needed in needs), None, None, None)


def _layer_norm_backward(ctx, grad_y, grad_y_t, _grad_mean, _grad_rstd):
    if torch.is_grad_enabled():  # a backward runs with grad mode on only under create_graph
        return _layer_norm_backward_differentiable(ctx, grad_y, grad_y_t)
    x, weight, mean, rstd, _, _ = ctx.saved_tensors
    needs_x, needs_x_t, needs_w, needs_b, needs_d_w, needs_d_b = ctx.needs_input_grad[:6]
    grads = dict.fromkeys(("x", "x_t", "weight", "bias", "d_weight", "d_bias"))

    def optional(t: Tensor, wanted: bool) -> Tensor | None:
        return t if wanted else None

    if grad_y is not None and (needs_x or needs_w or needs_b):
        g_x, g_w, g_b = layer_norm_vjp(grad_y, x, weight, mean, rstd, ctx.centered, needs_x, needs_w or needs_b,
                                       ctx.backend)  # fmt: skip
        grads["x"], grads["weight"], grads["bias"] = optional(g_x, needs_x), optional(g_w, needs_w), optional(g_b, needs_b)
    if grad_y_t is not None:
        if needs_x_t or needs_d_w or needs_d_b:
            g_x, g_w, g_b = layer_norm_vjp(grad_y_t, x, weight, mean, rstd, ctx.centered, needs_x_t,
                                           needs_d_w or needs_d_b, ctx.backend)  # fmt: skip
            grads["x_t"], grads["d_weight"], grads["d_bias"] = optional(g_x, needs_x_t), optional(g_w, needs_d_w), optional(g_b, needs_d_b)
        if needs_x or needs_w:
            for name, term in zip(("x", "weight"), _layer_norm_second_order(ctx, grad_y_t, needs_x, needs_w)):
                if term is not None:
                    grads[name] = term if grads[name] is None else grads[name] + term
    return grads["x"], grads["x_t"], grads["weight"], grads["bias"], grads["d_weight"], grads["d_bias"], None, None, None


layer_norm_jvp.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ----------------------------------------------------------------------------------------------
# attention


def _bnhd(like: Tensor) -> Tensor:
    """An uninitialised (B, H, N, D) tensor stored as (B, N, H, D), as the kernels write outputs."""
    batch, heads, tokens, head_dim = like.shape
    return like.new_empty((batch, tokens, heads, head_dim)).transpose(1, 2)


@torch.library.custom_op(f"{NAMESPACE}::attention_jvp", mutates_args=())
def attention_jvp(
    q: Tensor, k: Tensor, v: Tensor, q_t: Optional[Tensor], k_t: Optional[Tensor], v_t: Optional[Tensor],
    key_padding_mask: Optional[Tensor], scale: float, causal: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(o, o_t or empty, lse)``; ``lse`` is in the backend's own units (base 2 for Triton)."""
    validation.attention_kernel_inputs(q, k, v, q_t, k_t, v_t, key_padding_mask)
    o, o_t, lse = _kernels("attention", backend).forward(q, k, v, q_t, k_t, v_t, scale, causal, key_padding_mask)
    return o, _or_empty(o_t, q), lse


@attention_jvp.register_fake
def _(q, k, v, q_t, k_t, v_t, key_padding_mask, scale, causal, backend):
    validation.attention_kernel_inputs(q, k, v, q_t, k_t, v_t, key_padding_mask)
    has_tangent = q_t is not None or k_t is not None or v_t is not None
    lse = q.new_empty(q.shape[:3], dtype=_stats_dtype(q.dtype, backend))
    return _bnhd(q), (_bnhd(q) if has_tangent else _empty(q)), lse


@torch.library.custom_op(f"{NAMESPACE}::attention_vjp", mutates_args=())
def attention_vjp(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
    scale: float, causal: bool, need_dq: bool, need_dkv: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The attention VJP at ``(q, k, v)`` for upstream ``grad_out``: ``(dq, dk, dv)`` (empty if not asked)."""
    validation.attention_backward_inputs(grad_out, q, k, v, o, lse, key_padding_mask)
    dq, dk, dv = _kernels("attention", backend).backward(grad_out, q, k, v, o, lse, scale, causal,
                                                         key_padding_mask, need_dq, need_dkv)  # fmt: skip
    return _or_empty(dq, q), _or_empty(dk, k), _or_empty(dv, v)


@attention_vjp.register_fake
def _(grad_out, q, k, v, o, lse, key_padding_mask, scale, causal, need_dq, need_dkv, backend):
    validation.attention_backward_inputs(grad_out, q, k, v, o, lse, key_padding_mask)

    def new(t: Tensor, wanted: bool) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if wanted else _empty(t)

    return new(q, need_dq), new(k, need_dkv), new(v, need_dkv)


@torch.library.custom_op(f"{NAMESPACE}::attention_second_order", mutates_args=())
def attention_second_order(
    q: Tensor, k: Tensor, v: Tensor, q_t: Optional[Tensor], k_t: Optional[Tensor], v_t: Optional[Tensor],
    grad_o: Optional[Tensor], grad_o_t: Tensor, o: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
    scale: float, causal: bool, mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The fused Triton kernels of ``attention_second_order.primal_grads``: ``(dq, dk, dv, d mask or
    empty)`` of ``<grad_o, o> + <grad_o_t, o_t>``, from the Triton forward's ``o`` and ``lse``. It has
    no autograd formula: the backward uses it only where its result is not differentiated again."""
    from .triton import attention_second_order as kernels

    validation.attention_second_order_inputs(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, key_padding_mask)
    grad_o, grad_o_t = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (grad_o, grad_o_t))
    dq, dk, dv, d_mask = kernels.primal_grads(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, scale, causal,
                                              key_padding_mask, mask_grad)  # fmt: skip
    return dq, dk, dv, _or_empty(d_mask, q)


@attention_second_order.register_fake
def _(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, key_padding_mask, scale, causal, mask_grad):
    validation.attention_second_order_inputs(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, key_padding_mask)
    d_mask = key_padding_mask.new_empty(key_padding_mask.shape) if mask_grad else _empty(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_mask  # contiguous, as the kernels


def _fused_second_order(backend: str, q: Tensor) -> bool:
    """Whether the Triton kernels of ``attention_second_order`` serve this dtype and head dim."""
    if backend != "triton":
        return False
    from .triton.attention_second_order import serves

    return serves(q.dtype, q.shape[-1])


def _primal_grads(ctx, q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, mask, mask_grad):
    """``attention_second_order.primal_grads``: on the fused Triton kernels where the result is not
    differentiated again (no ``create_graph``) and there is a second-order term, else recomputed in
    differentiable torch ops (the C++ backend, higher orders, fp32 at head dim 256)."""
    if grad_o_t is not None and not torch.is_grad_enabled() and _fused_second_order(ctx.backend, q):
        from triton.runtime.errors import OutOfResources

        try:
            dq, dk, dv, d_mask = attention_second_order(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, mask,
                                                        ctx.scale, ctx.causal, mask_grad)  # fmt: skip
            return dq, dk, dv, d_mask if mask_grad else None
        except OutOfResources as error:  # e.g. fp32 TF32 tiles at head dim 128 need 112 KB (sm_86/89: 99 KB)
            backends.warn_once("second-order-out-of-resources",
                               f"tangent_kernels: the fused second-order attention kernels do not fit this GPU "
                               f"({error}); the second-order term runs in torch ops (O(rows·Lk) memory)")  # fmt: skip
    return primal_grads(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, scale=ctx.scale, causal=ctx.causal,
                        key_padding_mask=mask, mask_grad=mask_grad)


def _attention_setup(ctx, inputs, output):
    q, k, v, q_t, k_t, v_t, mask, scale, causal, backend = inputs
    o, _, lse = output
    ctx.mark_non_differentiable(lse)
    primal_needs_grad = _any_requires_grad(q, k, v, mask)
    if not primal_needs_grad:
        ctx.mark_non_differentiable(o)  # the primal stream does not depend on the tangents
    # The tangents serve only the gradient of o_t with respect to the primal inputs (a second-order
    # term): with frozen primal inputs (TAFT) nothing more is saved than for ordinary attention.
    tangents = (q_t, k_t, v_t) if primal_needs_grad else (None, None, None)
    ctx.save_for_backward(q, k, v, o, lse, mask, *tangents)
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_o, grad_o_t, _grad_lse):
    """Tangent inputs: the fused VJP at ``(q, k, v)`` with ``grad_o_t`` (DESIGN.md §2). Primal inputs:
    the fused VJP with ``grad_o``, or, where ``o_t`` depends on them (some tangent given) or an
    additive mask needs its gradient, ``attention_second_order.primal_grads`` for both streams."""
    q, k, v, o, lse, mask, q_t, k_t, v_t = ctx.saved_tensors
    needs_q, needs_k, needs_v, needs_q_t, needs_k_t, needs_v_t, needs_mask = ctx.needs_input_grad[:7]
    grads = [None] * 7  # q, k, v, q_t, k_t, v_t, key_padding_mask

    def vjp(grad_out, need_q, need_k, need_v):
        dq, dk, dv = attention_vjp(grad_out, q, k, v, o, lse, mask, ctx.scale, ctx.causal, need_q, need_k or need_v,
                                   ctx.backend)  # fmt: skip
        return dq if need_q else None, dk if need_k else None, dv if need_v else None

    if grad_o_t is not None and (needs_q_t or needs_k_t or needs_v_t):
        grads[3:6] = vjp(grad_o_t, needs_q_t, needs_k_t, needs_v_t)
    second_order = grad_o_t is not None and any(t is not None for t in (q_t, k_t, v_t))
    needs_primal = needs_q or needs_k or needs_v or needs_mask
    if needs_primal and (second_order or (needs_mask and grad_o is not None)):
        grad_o_t = grad_o_t if second_order else None
        dq, dk, dv, d_mask = _primal_grads(ctx, q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, mask,
                                           needs_mask)
        grads[:3] = dq if needs_q else None, dk if needs_k else None, dv if needs_v else None
        grads[6] = d_mask
    elif grad_o is not None and (needs_q or needs_k or needs_v):
        grads[:3] = vjp(grad_o, needs_q, needs_k, needs_v)
    return (*grads, None, None, None)


attention_jvp.register_autograd(_attention_backward, setup_context=_attention_setup)


def _gradient_used(t: Tensor) -> bool:
    """Whether the running backward pass uses a gradient for ``t``. ``needs_input_grad`` says only
    that ``t`` requires grad, but ``torch.autograd.grad(outputs, inputs)`` runs just the branches that
    lead to ``inputs``: the JVP by double backward (``torch.autograd.functional.jvp``) asks for the
    gradient of ``grad_out`` alone, and the second-order term for ``q, k, v`` would be thrown away.
    Where the engine cannot tell (a leaf during ``autograd.grad``, traced graphs), it counts as used."""
    if not t.requires_grad:
        return False
    if t.grad_fn is None:
        return True
    try:
        return torch._C._will_engine_execute_node(t.grad_fn)
    except RuntimeError:
        return True


def _attention_vjp_setup(ctx, inputs, output):
    grad_out, q, k, v, o, lse, mask, scale, causal, need_dq, need_dkv, backend = inputs
    ctx.save_for_backward(grad_out, q, k, v, o, lse, mask)
    ctx.scale, ctx.causal, ctx.backend, ctx.need_dq, ctx.need_dkv = scale, causal, backend, need_dq, need_dkv
    ctx.set_materialize_grads(False)


def _attention_vjp_backward(ctx, grad_dq, grad_dk, grad_dv):
    """The double backward: ``(dq, dk, dv) = Jᵀ·grad_out`` with upstream ``(grad_dq, grad_dk, grad_dv)``.

    With respect to ``grad_out`` it is ``J·(grad_dq, grad_dk, grad_dv)``, the attention tangent along
    them (the one-pass forward kernel); with respect to ``q, k, v`` it is the second-order term of
    ``<grad_out, o_t>`` for those tangents. ``o`` and ``lse`` are the forward's outputs at ``(q, k, v)``,
    passed in precomputed: the gradient for ``q, k, v`` is the total derivative through them, so none
    is returned for ``o`` and ``lse`` (a gradient for ``o`` would reach ``q, k, v`` a second time
    through the forward op's own backward).
    """
    grad_out, q, k, v, o, lse, mask = ctx.saved_tensors
    needs_grad_out, _, _, _, _, _, needs_mask = ctx.needs_input_grad[:7]
    needs_q, needs_k, needs_v = (_gradient_used(t) for t in (q, k, v))
    asked = (ctx.need_dq, ctx.need_dkv, ctx.need_dkv)  # an output not asked for is empty: no tangent
    tangents = [None if t is None or not wanted else t if t.stride(-1) == 1 else t.contiguous()
                for t, wanted in zip((grad_dq, grad_dk, grad_dv), asked)]  # fmt: skip
    grads = [None] * 12
    if all(t is None for t in tangents):
        return tuple(grads)
    if needs_grad_out:
        grads[0] = attention_jvp(q, k, v, *tangents, mask, ctx.scale, ctx.causal, ctx.backend)[1]
    if needs_q or needs_k or needs_v or needs_mask:
        dq, dk, dv, d_mask = _primal_grads(ctx, q, k, v, *tangents, None, grad_out, o, lse, mask, needs_mask)
        grads[1:4] = dq if needs_q else None, dk if needs_k else None, dv if needs_v else None
        grads[6] = d_mask
    return tuple(grads)


attention_vjp.register_autograd(_attention_vjp_backward, setup_context=_attention_vjp_setup)


# ----------------------------------------------------------------------------------------------
# GELU with the bias add fused


@torch.library.custom_op(f"{NAMESPACE}::gelu_jvp", mutates_args=())
def gelu_jvp(
    h: Tensor, h_t: Optional[Tensor], bias: Optional[Tensor], d_bias: Optional[Tensor], approximate: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """For ``u = h + bias``, ``u_t = h_t + d_bias``: ``(gelu(u), gelu'(u) · u_t or empty, gelu'(u))``."""
    validation.bias_activation(h, h_t, bias, d_bias, approximate)
    a, a_t, derivative = _kernels("gelu", backend).forward(h, h_t, bias, d_bias, approximate)
    return a, _or_empty(a_t, h), derivative


@gelu_jvp.register_fake
def _(h, h_t, bias, d_bias, approximate, backend):
    validation.bias_activation(h, h_t, bias, d_bias, approximate)
    a = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    has_tangent = h_t is not None or d_bias is not None
    return a, (torch.empty_like(a) if has_tangent else _empty(h)), torch.empty_like(a)


def _gelu_setup(ctx, inputs, output):
    h, _, bias, _, _, _ = inputs
    a, _, derivative = output
    ctx.mark_non_differentiable(derivative)
    if not _any_requires_grad(h, bias):
        ctx.mark_non_differentiable(a)
    ctx.save_for_backward(derivative)
    ctx.set_materialize_grads(False)


def _gelu_backward(ctx, grad_a, grad_a_t, _grad_derivative):
    (derivative,) = ctx.saved_tensors
    needs_h, needs_h_t, needs_bias, needs_d_bias = ctx.needs_input_grad[:4]
    if grad_a_t is not None and (needs_h or needs_bias):
        raise second_order_error("gelu_jvp", "h" if needs_h else "bias")
    rows = tuple(range(derivative.dim() - 1))
    grad_u = grad_a * derivative if grad_a is not None and (needs_h or needs_bias) else None
    grad_u_t = grad_a_t * derivative if grad_a_t is not None and (needs_h_t or needs_d_bias) else None
    return (
        grad_u if needs_h else None,
        grad_u_t if needs_h_t else None,
        grad_u.sum(rows) if grad_u is not None and needs_bias else None,
        grad_u_t.sum(rows) if grad_u_t is not None and needs_d_bias else None,
        None,
        None,
    )


gelu_jvp.register_autograd(_gelu_backward, setup_context=_gelu_setup)


# ----------------------------------------------------------------------------------------------
# linear (optionally with a GELU epilogue)


@torch.library.custom_op(f"{NAMESPACE}::linear_jvp", mutates_args=())
def linear_jvp(
    x: Tensor, x_t: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], d_weight: Optional[Tensor],
    d_bias: Optional[Tensor], activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, y_t or empty, gelu'(h) or empty)``; with ``activation`` y is ``gelu(h)``, y_t ``gelu'(h) h_t``."""
    validation.linear_layer(x, x_t, weight, bias, d_weight, d_bias, activation)
    y, y_t, derivative = _kernels("linear", backend).forward(x, x_t, weight, bias, d_weight, d_bias, activation)
    return y, _or_empty(y_t, x), _or_empty(derivative, x)


@linear_jvp.register_fake
def _(x, x_t, weight, bias, d_weight, d_bias, activation, backend):
    validation.linear_layer(x, x_t, weight, bias, d_weight, d_bias, activation)
    y = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    has_tangent = x_t is not None or d_weight is not None or d_bias is not None
    return y, (torch.empty_like(y) if has_tangent else _empty(x)), (torch.empty_like(y) if activation != "none" else _empty(x))


def _linear_setup(ctx, inputs, output):
    x, x_t, weight, bias, d_weight, d_bias, activation, _ = inputs
    y, _, derivative = output
    ctx.mark_non_differentiable(derivative)
    if not _any_requires_grad(x, weight, bias):
        ctx.mark_non_differentiable(y)
    ctx.save_for_backward(x, weight, derivative if activation != "none" else None)
    ctx.has_x_t, ctx.has_d_weight, ctx.activation = x_t is not None, d_weight is not None, activation
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_y, grad_y_t, _grad_derivative):
    x, weight, derivative = ctx.saved_tensors
    needs = dict(zip(("x", "x_t", "weight", "bias", "d_weight", "d_bias"), ctx.needs_input_grad[:6]))
    grads = dict.fromkeys(needs)
    x2 = x.reshape(-1, x.shape[-1])

    def vjp(grad, names):  # names: (input, weight, bias) receiving this stream's gradient
        g = grad.reshape(-1, grad.shape[-1])
        if derivative is not None:
            g = g * derivative.reshape(g.shape)
        n_in, n_w, n_b = names
        if needs[n_in]:
            grads[n_in] = (g @ weight.to(g.dtype)).view(x.shape)
        if needs[n_w]:
            grads[n_w] = g.t() @ x2
        if needs[n_b]:
            grads[n_b] = g.sum(0)

    if grad_y_t is not None:
        activated = ctx.activation != "none"  # y_t = gelu'(h) h_t depends on every primal input of h
        second_order = {"x": ctx.has_d_weight or activated, "weight": ctx.has_x_t or activated, "bias": activated}
        for name, depends in second_order.items():
            if needs[name] and depends:
                raise second_order_error("linear_jvp", name)
        vjp(grad_y_t, ("x_t", "d_weight", "d_bias"))
    if grad_y is not None and (needs["x"] or needs["weight"] or needs["bias"]):
        vjp(grad_y, ("x", "weight", "bias"))
    return (*grads.values(), None, None)


linear_jvp.register_autograd(_linear_backward, setup_context=_linear_setup)
