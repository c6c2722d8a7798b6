"""The input checks every public entry shares, so no kernel ever sees an input it cannot serve.

``functional.*``, ``fused_attention``, the modules and the ``torch.library`` ops in ``ops.py``
(reachable as ``torch.ops.tangent_kernels.*``) all pass through here. A failed check raises
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, device or value),
with a message that names the argument, what was expected and what came.

Semantics follow torch where torch accepts an input: empty dimensions give empty results, a
floating key-padding mask is added to the scores in the inputs' dtype (as ``nn.MultiheadAttention``
converts its masks), a boolean one marks padding with ``True``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, *, dtypes: Sequence[torch.dtype] = FLOATING) -> Tensor:
    """``t`` is a dense (strided) tensor of one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}"
                        + (" (nested)" if t.is_nested else ""))  # fmt: skip
    if t.dtype not in dtypes:
        expected = "a floating-point tensor" if tuple(dtypes) == FLOATING else "dtype " + " or ".join(map(str, dtypes))
        raise TypeError(f"{name}: expected {expected}, got dtype {t.dtype}")
    return t


def like(name: str, t: Tensor | None, ref: Tensor, ref_name: str, shape: Sequence[int] | None = None) -> None:
    """``t`` (when given) is a floating tensor on ``ref``'s device, of its dtype and of ``shape``
    (``ref``'s shape by default)."""
    if t is None:
        return
    tensor(name, t)
    same_device(name, t, ref, ref_name)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")
    expected = ref.shape if shape is None else torch.Size(shape)
    if t.shape != expected:
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def one_device(**tensors: Tensor | None) -> None:
    """Every given tensor on the first one's device (a mix would run the shape-only kernel)."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in present[1:]:
        same_device(name, t, present[0][1], present[0][0])


def env_count(variable: str, default: int) -> int:
    """The non-negative integer in environment variable ``variable`` (``default`` if unset)."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{variable}: expected a non-negative integer, got {text!r}")
    return value


def number(name: str, value) -> float:
    """A real number (``bool`` is not one), as a Python float; NaN and inf pass (torch's answer
    for them is NaN or inf in the result)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value, options: Sequence) -> None:
    if not any(value is option or (isinstance(value, str) and value == option) for option in options):
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# attention


def attention(q, k, v, q_t=None, k_t=None, v_t=None, key_padding_mask=None) -> Tensor | None:
    """``(B, Hq, Lq, D)`` queries against ``(B, Hkv, Lk, D)`` keys and values, ``Hkv`` dividing
    ``Hq``; tangents shaped as their primals. Returns the mask as a ``(B, Lk)`` tensor, boolean
    or in the inputs' dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D (batch, heads, tokens, head_dim) tensor, got shape {tuple(t.shape)}")
    batch, q_heads, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape ({batch}, heads, tokens, {head_dim}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")  # fmt: skip
    kv_heads = k.shape[1]
    if kv_heads == 0 and q_heads != 0 or kv_heads and q_heads % kv_heads:
        raise ValueError(f"k: its {kv_heads} heads must divide the {q_heads} heads of q (grouped-query attention)")
    like("k", k, q, "q", shape=k.shape)
    like("v", v, q, "q", shape=k.shape)
    like("q_t", q_t, q, "q")
    like("k_t", k_t, k, "k")
    like("v_t", v_t, v, "v")
    return key_padding(key_padding_mask, q, k.shape[2])


def key_padding(mask, q: Tensor, k_len: int) -> Tensor | None:
    """A ``(B, Lk)`` or ``(1, Lk)`` key-padding mask, boolean (True = padding) or floating
    (added to the scores), as ``(B, Lk)``: boolean, or cast to ``q``'s dtype."""
    if mask is None:
        return None
    if isinstance(mask, Tensor) and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError("key_padding_mask: expected dtype torch.bool (True = padding) or a floating dtype (added "
                        f"to the scores), got {mask.dtype}")  # fmt: skip
    tensor("key_padding_mask", mask, dtypes=(torch.bool, *FLOATING))
    same_device("key_padding_mask", mask, q, "q")
    batch = q.shape[0]
    if mask.dim() != 2 or mask.shape[1] != k_len or mask.shape[0] not in (1, batch):
        raise ValueError(f"key_padding_mask: expected shape ({batch}, {k_len}) (batch, key tokens), "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    if mask.dtype not in (torch.bool, q.dtype):
        mask = mask.to(q.dtype)
    return mask.expand(batch, k_len)


def attention_scale(scale, head_dim: int) -> float:
    """``scale``, or ``head_dim ** -0.5`` by default (a head dim of 0 has no scores to scale)."""
    if scale is None:
        return head_dim**-0.5 if head_dim else 1.0
    return number("scale", scale)


def nonempty(name: str, t: Tensor) -> None:
    """The kernels launch one program per tile: empty inputs are served before them (by
    ``functional``, which gives torch's empty or zero results)."""
    if t.numel() == 0:
        raise ValueError(f"{name}: the fused kernels need a non-empty tensor, got shape {tuple(t.shape)} "
                         "(the functional entries serve empty inputs)")  # fmt: skip


def attention_kernel_inputs(q, k, v, q_t, k_t, v_t, key_padding_mask) -> None:
    """What the fused attention kernels need: ``attention``'s checks on non-empty inputs, with the
    mask already ``(B, Lk)`` and of the inputs' dtype (or boolean)."""
    mask = attention(q, k, v, q_t, k_t, v_t, key_padding_mask)
    nonempty("q", q)
    nonempty("k", k)
    if key_padding_mask is not None and (key_padding_mask.shape != mask.shape or key_padding_mask.dtype != mask.dtype):
        raise ValueError(f"key_padding_mask: expected a ({q.shape[0]}, {k.shape[2]}) tensor of dtype bool or "
                         f"{q.dtype}, got {tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")  # fmt: skip


def attention_backward_inputs(grad_out, q, k, v, o, lse, key_padding_mask, grad_name: str = "grad_out") -> None:
    """The attention VJP's inputs: ``grad_out`` and ``o`` shaped as ``q``, ``lse`` one float32 or
    float64 value per query row."""
    attention_kernel_inputs(q, k, v, None, None, None, key_padding_mask)
    like(grad_name, grad_out, q, "q")
    like("o", o, q, "q")
    tensor("lse", lse, dtypes=(torch.float32, torch.float64))
    same_device("lse", lse, q, "q")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse: expected shape {tuple(q.shape[:3])} (one value per query row), got {tuple(lse.shape)}")


def attention_second_order_inputs(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, o, lse, key_padding_mask) -> None:
    """The second-order attention kernels' inputs: the VJP's, tangents shaped as their primals,
    upstream gradients of ``o`` (optional) and ``o_t`` shaped as ``q``."""
    attention_backward_inputs(grad_o_t, q, k, v, o, lse, key_padding_mask, grad_name="grad_o_t")
    attention(q, k, v, q_t, k_t, v_t, key_padding_mask)
    like("grad_o", grad_o, q, "q")


# ----------------------------------------------------------------------------------------------
# layer norm, linear, GELU


def layer_norm(x, x_t, weight, bias, d_weight, d_bias, eps, *, no_features_ok: bool = False) -> float:
    """Layer norm over the last dimension: parameters of shape ``(features,)``. Returns ``eps``.
    ``no_features_ok``: a last dimension of 0 passes (torch gives an empty result; the functional
    entry serves it without a kernel)."""
    tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0 and not no_features_ok:
        raise ValueError(f"x: expected at least one feature in the last dimension, got shape {tuple(x.shape)}")
    like("x_t", x_t, x, "x")
    for name, param in (("weight", weight), ("bias", bias), ("d_weight", d_weight), ("d_bias", d_bias)):
        like(name, param, x, "x", shape=x.shape[-1:])
    if d_weight is not None and weight is None:
        raise ValueError("d_weight: given without a frozen weight; a layer norm without affine has no weight")
    if d_bias is not None and bias is None:
        raise ValueError("d_bias: given without a frozen bias; a layer norm without affine has no bias")
    return number("eps", eps)


def linear(prefix: str, x: Tensor, in_features: int, weight, bias, d_weight, d_bias) -> None:
    """A linear layer's frozen ``(out, in_features)`` weight and ``(out,)`` bias, and their offsets."""
    tensor(f"{prefix}weight", weight)
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{prefix}weight: expected shape (out_features, {in_features}), got {tuple(weight.shape)}")
    like(f"{prefix}weight", weight, x, "x", shape=weight.shape)
    like(f"d_{prefix}weight", d_weight, weight, f"{prefix}weight")
    for name, t in ((f"{prefix}bias", bias), (f"d_{prefix}bias", d_bias)):
        like(name, t, x, "x", shape=weight.shape[:1])


def features(x, x_t, name: str = "x") -> None:
    """An input with a last (feature) dimension, and its tangent ``<name>_t``."""
    tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least one dimension (..., features), got a 0-d tensor")
    like(f"{name}_t", x_t, x, name)



def layer_norm_backward_inputs(grad, x, weight, mean, rstd) -> None:
    """The layer-norm backward's inputs: ``grad`` shaped as a non-empty ``x``, one float32 or
    float64 ``mean`` and ``rstd`` per row."""
    layer_norm(x, None, weight, None, None, None, 0.0)
    nonempty("x", x)
    like("grad", grad, x, "x")
    rows = x.numel() // x.shape[-1]
    for name, stat in (("mean", mean), ("rstd", rstd)):
        tensor(name, stat, dtypes=(torch.float32, torch.float64))
        same_device(name, stat, x, "x")
        if stat.numel() != rows:
            raise ValueError(f"{name}: expected {rows} values (one per row of x), got shape {tuple(stat.shape)}")


def bias_activation(h, h_t, bias, d_bias, approximate) -> None:
    """GELU of ``h + bias`` and its tangent: a non-empty ``h``, ``(features,)`` biases."""
    features(h, h_t, "h")
    nonempty("h", h)
    for name, t in (("bias", bias), ("d_bias", d_bias)):
        like(name, t, h, "h", shape=h.shape[-1:])
    choice("approximate", approximate, ("none", "tanh"))


def linear_layer(x, x_t, weight, bias, d_weight, d_bias, activation) -> None:
    """The fused linear op: a non-empty ``x``, its layer, ``activation`` ``"none"``/``"gelu"``/``"gelu_tanh"``."""
    features(x, x_t)
    nonempty("x", x)
    linear("", x, x.shape[-1], weight, bias, d_weight, d_bias)
    choice("activation", activation, ("none", "gelu", "gelu_tanh"))
