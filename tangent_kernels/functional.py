"""One public entry per primal + tangent op: validate, pick the backend, call the op.

Every op returns ``(y, y_t)``; a tangent argument of ``None`` is zero, and ``y_t`` is ``None``
when every tangent input and parameter offset is ``None``. ``backend`` is one of ``"auto"``,
``"triton"``, ``"cpp"``, ``"reference"``; ``last_backend(op)`` tells which one ran.

The fused backends run the ``torch.library`` ops of ``ops.py``, whose gradients follow DESIGN.md
§2: the gradient that reaches the tangent inputs and the parameter offsets is the transpose of
the tangent map, computed by the ordinary backward of the primal layer. The gradient of ``y_t``
with respect to a primal input (a second-order term) is implemented for attention
(``attention_second_order.py``) and layer norm (recomputed from the saved inputs), differentiable
again, so double backward works too; the linear and GELU ops raise ``NotImplementedError`` for it,
and ``"auto"`` runs their reference (which has it) when a primal input requires grad. The ops have
no forward-AD rule: where an input carries a tangent of an enclosing ``torch.func.jvp`` or
``forward_ad`` level, or inside a ``torch.func`` gradient transform (``grad``, ``vjp``, ``jacrev``),
``"auto"`` runs the reference and an explicit fused backend raises.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import autocasting, backends, forward_mode, ops, reference, validation
from .backends import last_backend  # noqa: F401  (part of the public API)

__all__ = ["attention_jvp", "gelu_jvp", "last_backend", "layer_norm_jvp", "linear_jvp", "mlp_jvp", "rms_norm_jvp"]


def _primal_requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _none_if(flag: bool, t: Tensor) -> Tensor | None:
    """The ops return an empty tensor for an absent result; ``None`` is the public spelling."""
    return None if flag else t


# ----------------------------------------------------------------------------------------------
# layer norm


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
    if _autocast_on(x):
        dtype = autocasting.norm_dtype("layer_norm", x, weight, bias)
        x, x_t, weight, bias, d_weight, d_bias = autocasting.cast(dtype, x, x_t, weight, bias, d_weight, d_bias)
    eps = validation.layer_norm(x, x_t, weight, bias, d_weight, d_bias, eps, no_features_ok=True)
    return _norm_jvp("layer_norm_jvp", x, x_t, weight, bias, d_weight, d_bias, eps, True, backend)


def rms_norm_jvp(
    x: Tensor,
    x_t: Tensor | None,
    weight: Tensor | None,
    d_weight: Tensor | None = None,
    eps: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """RMSNorm over the last dimension (``torch.nn.functional.rms_norm``), primal and tangent in
    one pass: ``y = g0 · x · rstd`` with ``rstd = (mean(x²) + eps)^-½`` and
    ``y_t = g0 · (x_t − x̂ · mean(x̂ · x_t)) · rstd + dg · x̂``. ``eps=None`` is torch's default, the
    machine epsilon of the computation's dtype (float32's for 16-bit and float32 inputs).
    """
    if _autocast_on(x):
        x, x_t, weight, d_weight = autocasting.cast(autocasting.norm_dtype("rms_norm", x, weight), x, x_t, weight,
                                                    d_weight)  # fmt: skip
    if eps is None:
        validation.tensor("x", x)
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    eps = validation.layer_norm(x, x_t, weight, None, d_weight, None, eps, no_features_ok=True)
    return _norm_jvp("rms_norm_jvp", x, x_t, weight, None, d_weight, None, eps, False, backend)


def _autocast_on(x) -> bool:
    """Autocast is on for tensor ``x``'s device: a norm's tensors (input, tangent, parameters and
    offsets) then go in the dtype torch's own norm computes in there (float32 on CUDA, the input's
    on the CPU)."""
    return isinstance(x, Tensor) and autocasting.autocast_on(x.device)


def _norm_jvp(op, x, x_t, weight, bias, d_weight, d_bias, eps: float, centered: bool, backend: str):
    """Layer norm (``centered``) or RMSNorm on the chosen backend, after validation."""
    chosen = backends.select(op, backend, x.device, x.dtype)
    chosen = _reference_where_unservable(op, chosen, backend, x, x=x, x_t=x_t, weight=weight, bias=bias,
                                         d_weight=d_weight, d_bias=d_bias)  # fmt: skip
    if chosen == "reference" or x.numel() == 0:
        return reference.layer_norm_jvp(x, x_t, weight, bias, d_weight, d_bias, eps, centered)
    y, y_t, _, _ = ops.layer_norm_jvp(x, x_t, weight, bias, d_weight, d_bias, eps, centered, chosen)
    return y, _none_if(x_t is None and d_weight is None and d_bias is None, y_t)


def _reference_where_unservable(op: str, chosen: str, backend: str, like: Tensor, **tensors: Tensor | None) -> str:
    """The reference where an input carries a forward-AD tangent of an enclosing ``torch.func.jvp``
    or ``forward_ad`` level (torch differentiates its plain ops, where it would silently drop the
    tangent through the fused ops: a zero tangent), or inside a ``torch.func`` gradient transform,
    which cannot run the fused ops' backward; an explicit fused backend raises."""
    if chosen == "reference":
        return chosen
    name = forward_mode.tangent_carrier(**tensors)
    if name is not None:
        reason = (f"{name}: carries a forward-AD tangent (torch.func.jvp or forward_ad around this call), which "
                  f"the fused ops cannot differentiate; use backend='auto' or 'reference'")  # fmt: skip
    elif forward_mode.under_grad_transform():
        reason = ("torch.func.grad, vjp or jacrev around this call cannot differentiate the fused ops (plain "
                  "autograd can); use backend='auto' or 'reference'")  # fmt: skip
    else:
        return chosen
    return _fall_back(op, backend, like, reason)


def _fall_back(op: str, backend: str, like: Tensor, reason: str) -> str:
    """For ``backend="auto"`` switch this call to the reference; an explicit backend raises ``reason``."""
    if backend != "auto":
        raise backends.BackendUnavailableError(reason)
    return backends.select(op, "reference", like.device, like.dtype)


# ----------------------------------------------------------------------------------------------
# attention


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_t: Tensor | None = None,
    k_t: Tensor | None = None,
    v_t: Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention and its tangent in one pass, on ``(B, H, N, D)`` tensors.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention) and another length.
    Tensors laid out as ``(B, N, H, D)`` in memory are passed as ``x.transpose(1, 2)`` views and
    read in place. ``scale`` defaults to ``head_dim ** -0.5``; ``causal`` is aligned top-left as in
    torch's SDPA; ``key_padding_mask`` is ``(B, Lk)``, boolean with True marking padding, or
    floating and added to the scores. A query row with every key masked gives zeros.
    """
    q, k, v, q_t, k_t, v_t, key_padding_mask = autocasting.lower_precision_inputs(q, k, v, q_t, k_t, v_t,
                                                                                  key_padding_mask)  # fmt: skip
    key_padding_mask = validation.attention(q, k, v, q_t, k_t, v_t, key_padding_mask)
    scale, causal = validation.attention_scale(scale, q.shape[-1]), validation.flag("causal", causal)
    chosen = backends.select("attention_jvp", backend, q.device, q.dtype)
    chosen = _reference_where_unservable("attention_jvp", chosen, backend, q, q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t,
                                         key_padding_mask=key_padding_mask)  # fmt: skip
    if chosen == "triton":
        from .triton.attention import MAX_HEAD_DIM

        if q.shape[-1] > MAX_HEAD_DIM:
            chosen = _fall_back("attention_jvp", backend, q,
                                f"q: the triton attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")  # fmt: skip
    if chosen != "reference" and not -math.inf < scale < math.inf:  # (not math.isfinite: a symbol under dynamic compile)
        # torch adds a masked key's -inf to a ±inf score (NaN); the kernels skip masked keys
        reason = f"scale: the fused kernels need a finite scale, got {scale}"
        chosen = _fall_back("attention_jvp", backend, q, reason)
    if chosen == "reference" or q.numel() == 0 or k.shape[2] == 0:
        return reference.attention_jvp(q, k, v, q_t, k_t, v_t, scale=scale, causal=causal,
                                       key_padding_mask=key_padding_mask)  # fmt: skip
    o, o_t, _ = ops.attention_jvp(q, k, v, q_t, k_t, v_t, key_padding_mask, scale, causal, chosen)
    return o, _none_if(q_t is None and k_t is None and v_t is None, o_t)


# ----------------------------------------------------------------------------------------------
# linear, GELU, MLP


ACTIVATIONS = (None, "gelu", "gelu_tanh")
APPROXIMATIONS = ("none", "tanh")


def linear_jvp(
    x: Tensor,
    x_t: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    d_weight: Tensor | None = None,
    d_bias: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``h = x W0ᵀ + b0``, ``h_t = x_t W0ᵀ + x dWᵀ + db``; with ``activation`` (``"gelu"`` or
    ``"gelu_tanh"``) it returns ``gelu(h)`` and ``gelu'(h) · h_t`` instead.

    On Triton it runs the fused GEMM (``triton/linear.py``) where that was measured faster for
    the weight's shape on this GPU, else cuBLAS GEMMs plus one fused bias/GELU kernel; on the
    CPU, BLAS GEMMs plus the C++ bias/GELU op. ``TANGENT_KERNELS_LINEAR_PATH=fused|composite``
    overrides the choice. Under ``torch.autocast`` it computes in the autocast dtype, as ``F.linear``.
    """
    x, x_t, weight, bias, d_weight, d_bias = autocasting.lower_precision_inputs(x, x_t, weight, bias, d_weight, d_bias)
    validation.features(x, x_t)
    validation.linear("", x, x.shape[-1], weight, bias, d_weight, d_bias)
    validation.choice("activation", activation, ACTIVATIONS)
    chosen = backends.select("linear_jvp", backend, x.device, x.dtype)
    chosen = _reference_where_unservable("linear_jvp", chosen, backend, x, x=x, x_t=x_t, weight=weight, bias=bias,
                                         d_weight=d_weight, d_bias=d_bias)  # fmt: skip
    if chosen != "reference" and backend == "auto" and _primal_requires_grad(x, weight, bias):
        chosen = _fall_back("linear_jvp", backend, x, "")
    if chosen == "reference" or x.numel() == 0 or weight.shape[0] == 0:  # (an empty output: no kernel)
        h, h_t = reference.linear_jvp(x, x_t, weight, bias, d_weight, d_bias)
        return (h, h_t) if activation is None else reference.gelu_jvp(h, h_t, _APPROXIMATE[activation])
    no_tangent = x_t is None and d_weight is None and d_bias is None
    if chosen == "triton" and _fused_linear_path(weight, x.dtype, x.device):
        y, y_t, _ = ops.linear_jvp(x, x_t, weight, bias, d_weight, d_bias, activation or "none", chosen)
        return y, _none_if(no_tangent, y_t)
    return _linear_composite(x, x_t, weight, bias, d_weight, d_bias, activation, chosen)


_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def _fused_linear_path(weight: Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused Triton GEMM serves this linear layer (see ``linear_jvp``)."""
    path = os.environ.get("TANGENT_KERNELS_LINEAR_PATH", "measured")
    if path not in ("measured", "fused", "composite"):
        raise ValueError(f"TANGENT_KERNELS_LINEAR_PATH: expected 'fused', 'composite' or 'measured', got {path!r}")
    if path != "measured":
        return path == "fused"
    from .triton.linear import fused_measured_faster

    return fused_measured_faster(tuple(weight.shape), dtype, device)


def _linear_composite(x, x_t, weight, bias, d_weight, d_bias, activation, backend):
    """ATen GEMMs (cuBLAS / BLAS) for both streams, then the biases, or one fused bias + GELU op."""
    features = x.shape[-1]
    x2 = x.reshape(-1, features)
    h = x2 @ weight.t()
    h_t = None if x_t is None else x_t.reshape(-1, features) @ weight.t()
    if d_weight is not None:
        h_t = x2 @ d_weight.t() if h_t is None else torch.addmm(h_t, x2, d_weight.t())
    shape = (*x.shape[:-1], weight.shape[0])
    if activation is not None:
        a, a_t, _ = ops.gelu_jvp(h, h_t, bias, d_bias, _APPROXIMATE[activation], backend)
        return a.view(shape), _none_if(h_t is None and d_bias is None, a_t.view(shape) if a_t.numel() else a_t)
    if bias is not None:
        h = h + bias
    if d_bias is not None:
        h_t = d_bias.expand_as(h).clone() if h_t is None else h_t + d_bias
    return h.view(shape), None if h_t is None else h_t.view(shape)


def gelu_jvp(x: Tensor, x_t: Tensor | None, approximate: str = "none", backend: str = "auto"):
    """``y = gelu(x)``, ``y_t = gelu'(x) · x_t`` (``approximate`` is ``"none"`` (erf) or ``"tanh"``)."""
    validation.tensor("x", x)
    validation.like("x_t", x_t, x, "x")
    validation.choice("approximate", approximate, APPROXIMATIONS)
    chosen = backends.select("gelu_jvp", backend, x.device, x.dtype)
    chosen = _reference_where_unservable("gelu_jvp", chosen, backend, x, x=x, x_t=x_t)
    if chosen != "reference" and backend == "auto" and _primal_requires_grad(x):
        chosen = _fall_back("gelu_jvp", backend, x, "")
    if chosen == "reference" or x.numel() == 0 or x_t is None:
        return reference.gelu_jvp(x, x_t, approximate)
    if x.dim() == 0:  # the fused op works on rows of features
        y, y_t, _ = ops.gelu_jvp(x.reshape(1), x_t.reshape(1), None, None, approximate, chosen)
        return y.view(()), y_t.view(())
    y, y_t, _ = ops.gelu_jvp(x, x_t, None, None, approximate, chosen)
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """timm's ``Mlp``: ``fc2(gelu(fc1(x)))`` and its tangent: two ``linear_jvp`` calls, the first
    with the GELU epilogue (fused GEMMs on Triton where measured faster, else ATen GEMMs around one
    fused bias + GELU op). Autograd saves the input, ``gelu(u)`` and ``gelu'(u)``, as ordinary
    fine-tuning saves the input, ``u`` and ``gelu(u)``."""
    x, x_t, fc1_weight, fc1_bias, fc2_weight, fc2_bias, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias = (
        autocasting.lower_precision_inputs(x, x_t, fc1_weight, fc1_bias, fc2_weight, fc2_bias, d_fc1_weight,
                                           d_fc1_bias, d_fc2_weight, d_fc2_bias)
    )  # fmt: skip
    validation.features(x, x_t)
    validation.linear("fc1_", x, x.shape[-1], fc1_weight, fc1_bias, d_fc1_weight, d_fc1_bias)
    validation.linear("fc2_", x, fc1_weight.shape[0], fc2_weight, fc2_bias, d_fc2_weight, d_fc2_bias)
    validation.choice("approximate", approximate, APPROXIMATIONS)
    chosen = backends.select("mlp_jvp", backend, x.device, x.dtype)
    chosen = _reference_where_unservable("mlp_jvp", chosen, backend, x, x=x, x_t=x_t, fc1_weight=fc1_weight,
                                         fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                                         d_fc1_weight=d_fc1_weight, d_fc1_bias=d_fc1_bias, d_fc2_weight=d_fc2_weight,
                                         d_fc2_bias=d_fc2_bias)  # fmt: skip
    primal = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if chosen != "reference" and backend == "auto" and _primal_requires_grad(*primal):
        chosen = _fall_back("mlp_jvp", backend, x, "")
    args = (x, x_t, fc1_weight, fc1_bias, fc2_weight, fc2_bias, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias)
    if chosen == "reference" or x.numel() == 0:
        return reference.mlp_jvp(*args, approximate)
    activation = "gelu" if approximate == "none" else "gelu_tanh"
    a, a_t = linear_jvp(x, x_t, fc1_weight, fc1_bias, d_fc1_weight, d_fc1_bias, activation, backend=chosen)
    return linear_jvp(a, a_t, fc2_weight, fc2_bias, d_fc2_weight, d_fc2_bias, backend=chosen)
