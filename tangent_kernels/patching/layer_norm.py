"""``layer_norm`` and ``rms_norm`` with torch's signatures and semantics, for calls under forward AD.

torch's forward-AD rule for ``layer_norm`` is a chain of element-wise ops: on the CPU it costs
about 100× the fused ``layer_norm_jvp`` (40 ms against 0.4 ms for 3152×384 float32 rows), so the
routing mode serves ``F.layer_norm`` calls with tangents here: both streams by one call of the
differentiable ``functional.layer_norm_jvp`` on the unpacked dual inputs, in the dtype torch's
own call would compute in (under autocast, or for mixed dtypes: ``_servable``); a norm over several
trailing dims (``LayerNorm([C, H, W])``) as the norm over them flattened into one. Calls it does
not serve run torch's own: no tangent, or a small CPU call that cannot need a second-order term
(below).

Calls without tangents whose inputs require grad (plain autograd, no ``torch.func`` transform)
run ``_LayerNormExactHigherOrder``: torch's forward and backward, but a backward that is itself
differentiable when differentiated (``create_graph=True``). torch's double backward of layer norm
treats the saved mean and rstd as constants when it is differentiated again, so third-order
terms, e.g. the gradient of ``torch.autograd.functional.jvp(..., create_graph=True)``'s tangent
(the double-backward form of MeanFlow's JVP), are silently wrong (pytorch/pytorch#175754).

``F.rms_norm`` calls with tangents run ``functional.rms_norm_jvp`` the same way. torch's rule for
it (a chain of element-wise ops on the CPU) is exact to every order, and slower than the fused
call at every size measured (jvp + backward, fp32, 2 cores, torch/fused: 2×197×256 1.34–1.76×,
8×197×768 1.25–2.91×, 4×1024×1024 1.83–4.14×; the low figure with tangents on the weight, the
high one on the input), so every servable call with a tangent is fused and other calls run
torch's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.autograd import forward_ad

from .. import autocasting, functional, validation
from . import watch


def _dual_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float | None, backend: str,
               centered: bool) -> Tensor:  # fmt: skip
    """Both streams of a layer norm (``centered``) or an RMSNorm by one differentiable fused call on
    the inputs' primals and tangents at the current forward-AD level, returned as a dual tensor
    ``(y, y_t)`` (an ``autograd.Function``'s ``jvp`` rule would compute the primal twice: forward,
    then jvp)."""
    (x, x_t), (weight, weight_t), (bias, bias_t) = (
        _primal_and_tangent(t) if t is not None else (None, None) for t in (x, weight, bias)
    )
    if centered:
        y, y_t = functional.layer_norm_jvp(x, x_t, weight, bias, weight_t, bias_t, eps, backend)
    else:
        y, y_t = functional.rms_norm_jvp(x, x_t, weight, weight_t, eps, backend)
    return forward_ad.make_dual(y, y_t)


def _primal_and_tangent(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """A dual tensor's primal and tangent, the tangent in the primal's dtype (forward AD lets a
    float32 tangent ride on a float64 primal; torch's rules compute in the primal's dtype)."""
    primal, tangent = forward_ad.unpack_dual(t)
    return primal, None if tangent is None else tangent.to(primal.dtype)


def _differentiable_backward(grad_y, x, weight, bias, eps, needs):
    """Layer norm's gradients in plain differentiable ops, mean and rstd recomputed from ``x``
    (16-bit inputs in float32, as torch's kernels compute their statistics)."""
    dtypes = [t.dtype if t is not None else None for t in (x, weight, bias)]
    if x.dtype in (torch.float16, torch.bfloat16):
        grad_y, x = grad_y.float(), x.float()
        weight = None if weight is None else weight.float()
    centered = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    x_hat = centered * rstd
    g = grad_y if weight is None else grad_y * weight
    grads = [
        rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) if needs[0] else None,
        _column_sums(grad_y * x_hat) if needs[1] and weight is not None else None,
        _column_sums(grad_y) if needs[2] and bias is not None else None,
    ]
    return [None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, dtypes)]


def _column_sums(t: Tensor) -> Tensor:
    """``t`` summed over every row, of any number of leading dims (none for a 1-D input)."""
    return t.reshape(-1, t.shape[-1]).sum(0)


class _LayerNormExactHigherOrder(torch.autograd.Function):
    """torch's layer norm over the last dim whose backward, when it is to be differentiated
    (``create_graph=True``), is written in differentiable ops (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: this gradient will be differentiated
            return *_differentiable_backward(grad_y, x, weight, bias, ctx.eps, needs), None
        grads = torch.ops.aten.native_layer_norm_backward(grad_y, x, (x.shape[-1],), mean, rstd, weight, bias, list(needs))
        return *grads, None


def _needs_exact_higher_order(tensors: list[Tensor]) -> bool:
    """A call that builds a plain autograd graph (no ``torch.func`` transform around it)."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    )


# Below this many elements, on the CPU, torch's own forward-AD rule is faster than the fused call,
# whose fixed cost (the routing and the custom op's dispatch) the few rows do not repay. Measured
# on one thread (fp32, jvp + backward to a weight tangent, torch/fused time, best of 7): 197×256
# 0.83x, 512×192 0.93x, 394×256 0.95x, 788×256 1.98x, 394×768 2.27x. Torch's rule has a wrong second derivative (pytorch/pytorch#196700),
# so it serves only calls whose primal inputs do not require grad (no second-order term can be
# asked for). ``TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS`` overrides it (0: always fused).
CPU_FUSED_MIN_ELEMENTS = validation.env_count("TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS", 128 * 1024)


def _torch_is_faster(tensors: list[Tensor]) -> bool:
    """A small CPU call where torch's own rule is faster and exact (see above)."""
    x = tensors[0]
    return (
        x.device.type == "cpu"
        and x.numel() < CPU_FUSED_MIN_ELEMENTS
        and not any(watch.requires_grad_at_any_level(t) for t in tensors)
    )


@torch.compiler.disable
def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.layer_norm``, its tangent by the fused kernel where it serves the call."""
    tensors = [t for t in (input, weight, bias) if t is not None]
    if not _servable(input, normalized_shape, tensors):
        return torch_F.layer_norm(input, normalized_shape, weight, bias, eps)
    tangents = any(watch.has_tangent(t) for t in tensors)
    if not (tangents or _needs_exact_higher_order(tensors)):
        return torch_F.layer_norm(input, normalized_shape, weight, bias, eps)
    if len(normalized_shape) > 1:
        return _over_flattened_dims(layer_norm, input, normalized_shape, weight, bias, eps=eps, backend=backend)
    dtype = autocasting.norm_dtype("layer_norm", input, weight, bias)
    if (tangents and _mixed(tensors)) or dtype != input.dtype:  # the fused kernels take one dtype
        input, weight, bias = autocasting.cast(dtype, input, weight, bias)
        with autocasting.autocast_off(input.device):
            return layer_norm(input, normalized_shape, weight, bias, eps, backend=backend)
    if not tangents:  # (torch's own op, mixed dtypes included, with a backward exact to every order)
        return _LayerNormExactHigherOrder.apply(input, weight, bias, float(eps))[0]
    if _torch_is_faster(tensors):
        return torch_F.layer_norm(input, normalized_shape, weight, bias, eps)
    if not watch.fused_ops_serve_transforms(*tensors):  # plain ops, differentiated by torch
        return functional.layer_norm_jvp(input, None, weight, bias, eps=float(eps), backend="reference")[0]
    return _dual_norm(input, weight, bias, float(eps), backend, centered=True)


@torch.compiler.disable
def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.rms_norm``, its tangent by the fused kernel where it serves the call."""
    tensors = [t for t in (input, weight) if t is not None]
    if not (
        _servable(input, normalized_shape, tensors)
        and any(watch.has_tangent(t) for t in tensors)
        and watch.fused_ops_serve_transforms(*tensors)
    ):
        return torch_F.rms_norm(input, normalized_shape, weight, eps)
    if len(normalized_shape) > 1:
        return _over_flattened_dims(rms_norm, input, normalized_shape, weight, eps=eps, backend=backend)
    if _mixed(tensors) or autocasting.autocast_on(input.device):
        input, weight = autocasting.cast(autocasting.norm_dtype("rms_norm", input, weight), input, weight)
        with autocasting.autocast_off(input.device):
            return rms_norm(input, normalized_shape, weight, eps, backend=backend)
    return _dual_norm(input, weight, None, None if eps is None else float(eps), backend, centered=False)


def _over_flattened_dims(norm, input: Tensor, normalized_shape, *parameters: Tensor | None, **options) -> Tensor:
    """``norm`` over the last ``len(normalized_shape)`` dims of ``input``, as the same norm over
    those dims flattened into one (the fused kernels normalize the last dim only)."""
    dims = len(normalized_shape)
    flat_parameters = (None if p is None else p.flatten() for p in parameters)
    y = norm(input.flatten(-dims), (math.prod(normalized_shape),), *flat_parameters, **options)
    return y.reshape(*y.shape[:-1], *input.shape[-dims:])  # (legacy vmap has no rule for unflatten)


def _servable(input: Tensor, normalized_shape, tensors: list[Tensor]) -> bool:
    """A norm over trailing dimensions of floating tensors on one device. Mixed dtypes and autocast
    are settled by torch's rules first (``autocasting.norm_dtype``): the fused kernels then run on
    the inputs cast to torch's result dtype (CUDA's autocast: float32; the CPU's and mixed dtypes:
    the input's, rounding a float32 parameter of a 16-bit input), with autocast off."""
    return (
        len(normalized_shape) > 0
        and tuple(normalized_shape) == tuple(input.shape[input.dim() - len(normalized_shape):])
        and all(t.is_floating_point() and t.device == input.device for t in tensors)
    )


def _mixed(tensors: list[Tensor]) -> bool:
    """Inputs of more than one dtype (a 16-bit input with float32 parameters: torch returns the
    input's dtype)."""
    return len({t.dtype for t in tensors}) > 1
