"""One public entry per primal + tangent op: validate, pick the backend, apply autograd.

Every op returns ``(y, y_t)``; a tangent argument of ``None`` is zero, and ``y_t`` is ``None``
when every tangent input and parameter offset is ``None``. ``backend`` is one of ``"auto"``,
``"triton"``, ``"cpp"``, ``"reference"``; ``last_backend(op)`` tells which one ran.

Gradients of the fused backends follow DESIGN.md §2: the gradient that reaches the tangent
inputs and the parameter offsets is the transpose of the tangent map, computed by the ordinary
backward of the primal layer. The gradient of ``y_t`` with respect to a primal input (a
second-order term) is not implemented there and raises ``NotImplementedError``; ``"auto"``
therefore runs the reference (which has it) when a primal input requires grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference
from .backends import last_backend  # noqa: F401  (part of the public API)

__all__ = ["layer_norm_jvp", "last_backend"]


def _check_floating(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_like(name: str, t: Tensor | None, like: Tensor, like_name: str, shape=None) -> None:
    """``t`` (if given) must be a tensor on ``like``'s device, of its dtype, and of ``shape``."""
    if t is None:
        return
    _check_floating(name, t)
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (as {like_name}), got {t.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (as {like_name}), got {t.dtype}")
    expected = like.shape if shape is None else torch.Size(shape)
    if t.shape != expected:
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def _primal_requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _second_order_error(op: str, argument: str) -> NotImplementedError:
    return NotImplementedError(
        f"{op}: the gradient of the tangent output with respect to the primal input {argument!r} "
        "(a second-order term) is not implemented in the fused backends; detach it, or use "
        "backend='reference'"
    )


# ----------------------------------------------------------------------------------------------
# layer norm


def _layer_norm_kernels(backend: str):
    if backend == "triton":
        from .triton import layer_norm

        return layer_norm
    return backends.cpp.layer_norm


class _LayerNormJvp(torch.autograd.Function):
    """Fused layer norm primal + tangent with the backward of DESIGN.md §2."""

    @staticmethod
    def forward(ctx, kernels, x, x_t, weight, bias, d_weight, d_bias, eps):
        y, y_t, mean, rstd = kernels.forward(x, x_t, weight, bias, d_weight, d_bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.kernels = kernels
        ctx.has_x_t = x_t is not None
        ctx.set_materialize_grads(False)
        return y, y_t

    @staticmethod
    def backward(ctx, grad_y, grad_y_t):
        x, weight, mean, rstd = ctx.saved_tensors
        _, needs_x, needs_x_t, needs_w, needs_b, needs_d_w, needs_d_b, _ = ctx.needs_input_grad
        grads = dict.fromkeys(("x", "x_t", "weight", "bias", "d_weight", "d_bias"))
        if grad_y_t is not None:
            if needs_x:
                raise _second_order_error("layer_norm_jvp", "x")
            if needs_w and ctx.has_x_t:
                raise _second_order_error("layer_norm_jvp", "weight")
            if needs_x_t or needs_d_w or needs_d_b:
                grads["x_t"], grads["d_weight"], grads["d_bias"] = ctx.kernels.backward(
                    grad_y_t, x, weight, mean, rstd, needs_x_t, needs_d_w or needs_d_b
                )
        if grad_y is not None and (needs_x or needs_w or needs_b):
            grads["x"], grads["weight"], grads["bias"] = ctx.kernels.backward(
                grad_y, x, weight, mean, rstd, needs_x, needs_w or needs_b
            )
        return (None, grads["x"], grads["x_t"], grads["weight"], grads["bias"], grads["d_weight"],
                grads["d_bias"], None)  # fmt: skip


def layer_norm_jvp(
    x: Tensor,
    x_t: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    d_weight: Tensor | None = None,
    d_bias: Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Layer norm over the last dimension, primal and tangent in one pass.

    ``weight``/``bias`` are the frozen ``g0``/``b0`` (``None`` for no affine), ``d_weight``/
    ``d_bias`` their trainable offsets. Note the default ``eps`` is timm's ViT value, 1e-6.
    """
    _check_floating("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected at least one feature in the last dimension, got shape {tuple(x.shape)}")
    features = (x.shape[-1],)
    _check_like("x_t", x_t, x, "x")
    for name, param in (("weight", weight), ("bias", bias), ("d_weight", d_weight), ("d_bias", d_bias)):
        _check_like(name, param, x, "x", shape=features)
    if d_weight is not None and weight is None:
        raise ValueError("d_weight: given without a frozen weight; a layer norm without affine has no weight")
    if d_bias is not None and bias is None:
        raise ValueError("d_bias: given without a frozen bias; a layer norm without affine has no bias")

    chosen = backends.select("layer_norm_jvp", backend, x.device, x.dtype)
    if chosen == "triton" and x.shape[-1] > _triton_layer_norm_max_features():
        chosen = _fall_back(
            "layer_norm_jvp", backend, x,
            f"x: the triton layer norm holds a row in registers, up to {_triton_layer_norm_max_features()} "
            f"features; got {x.shape[-1]} (use backend='cpp' or 'reference')",
        )  # fmt: skip
    if chosen != "reference" and backend == "auto" and _primal_requires_grad(x, weight):
        chosen = _fall_back("layer_norm_jvp", backend, x, "")
    if chosen == "reference" or x.numel() == 0:
        return reference.layer_norm_jvp(x, x_t, weight, bias, d_weight, d_bias, eps)
    return _LayerNormJvp.apply(_layer_norm_kernels(chosen), x, x_t, weight, bias, d_weight, d_bias, float(eps))


def _fall_back(op: str, backend: str, like: Tensor, reason: str) -> str:
    """For ``backend="auto"`` switch this call to the reference; an explicit backend raises ``reason``."""
    if backend != "auto":
        raise backends.BackendUnavailableError(reason)
    return backends.select(op, "reference", like.device, like.dtype)


def _triton_layer_norm_max_features() -> int:
    from .triton.layer_norm import MAX_FEATURES

    return MAX_FEATURES
