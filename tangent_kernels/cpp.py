"""The C++ backend: loads the extension ``tangent_kernels._C`` and adapts its ops.

The adapters give the C++ ops the same Python interface as the Triton launchers (absent results
are ``None``), so one ``autograd.Function`` per op serves both backends. Importing this module
never fails: without the extension, ``AVAILABLE`` is false and ``UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

import torch

from . import validation

try:
    from . import _C  # noqa: F401  (registers torch.ops.tangent_kernels.*)
except ImportError as error:
    AVAILABLE = False
    UNAVAILABLE_REASON = (
        f"the C++ extension tangent_kernels._C is not built or failed to load ({error}); build it with "
        "`pip install -e . --no-build-isolation` (without TANGENT_KERNELS_SKIP_EXT=1)"
    )
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stats(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Row statistics as the C++ ops make them: fp64 for fp64 inputs, else fp32."""
    return like.new_empty(shape, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, so torch.compile and opcheck can trace them."""
    lib = "tangent_kernels::"

    @torch.library.register_fake(lib + "layer_norm_jvp_forward")
    def _(x, x_t, weight, bias, d_weight, d_bias, eps, centered):
        validation.one_device(x=x, x_t=x_t, weight=weight, bias=bias, d_weight=d_weight, d_bias=d_bias)
        has_tangent = x_t is not None or d_weight is not None or d_bias is not None
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows = x.numel() // x.shape[-1]
        return y, (torch.empty_like(y) if has_tangent else x.new_empty(0)), _stats(x, rows), _stats(x, rows)

    @torch.library.register_fake(lib + "layer_norm_backward")
    def _(grad, x, weight, mean, rstd, centered, input_grad, param_grads):
        validation.one_device(x=x, grad=grad, weight=weight, mean=mean, rstd=rstd)
        param_dtype = x.dtype if weight is None else weight.dtype
        param = x.new_empty(x.shape[-1], dtype=param_dtype) if param_grads else x.new_empty(0)
        g_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if input_grad else x.new_empty(0)
        return g_x, param, param.clone()

    @torch.library.register_fake(lib + "attention_jvp_forward")
    def _(q, k, v, q_t, k_t, v_t, key_padding_mask, scale, causal):
        validation.one_device(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t, key_padding_mask=key_padding_mask)
        batch, heads, tokens, head_dim = q.shape

        def bnhd():
            return q.new_empty((batch, tokens, heads, head_dim)).transpose(1, 2)

        has_tangent = q_t is not None or k_t is not None or v_t is not None
        return bnhd(), (bnhd() if has_tangent else q.new_empty(0)), _stats(q, batch, heads, tokens)

    @torch.library.register_fake(lib + "attention_backward")
    def _(grad_out, q, k, v, o, lse, key_padding_mask, scale, causal, need_dq, need_dkv):
        validation.one_device(q=q, k=k, v=v, grad_out=grad_out, o=o, lse=lse, key_padding_mask=key_padding_mask)

        def new(t, wanted):
            return torch.empty(t.shape, dtype=t.dtype, device=t.device) if wanted else q.new_empty(0)

        return new(q, need_dq), new(k, need_dkv), new(v, need_dkv)

    @torch.library.register_fake(lib + "gelu_jvp_forward")
    def _(h, h_t, bias, d_bias, approximate):
        validation.one_device(h=h, h_t=h_t, bias=bias, d_bias=d_bias)
        a = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        has_tangent = h_t is not None or d_bias is not None
        return a, (torch.empty_like(a) if has_tangent else h.new_empty(0)), torch.empty_like(a)


if AVAILABLE:
    _register_fakes()


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str:
    """Why the C++ backend cannot run on this device and dtype; empty when it can."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if device.type != "cpu":
        return f"it runs on CPU tensors only, got device {device.type!r}"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (expected float16, bfloat16, float32 or float64)"
    return ""


class layer_norm:  # noqa: N801  (a namespace with the launcher interface of triton.layer_norm)
    @staticmethod
    def forward(x, x_t, weight, bias, d_weight, d_bias, eps, centered):
        y, y_t, mean, rstd = torch.ops.tangent_kernels.layer_norm_jvp_forward(
            x, x_t, weight, bias, d_weight, d_bias, eps, centered
        )
        has_tangent = x_t is not None or d_weight is not None or d_bias is not None
        return y, (y_t if has_tangent else None), mean, rstd

    @staticmethod
    def backward(grad, x, weight, mean, rstd, centered, input_grad, param_grads):
        g_x, g_w, g_b = torch.ops.tangent_kernels.layer_norm_backward(
            grad, x, weight, mean, rstd, centered, input_grad, param_grads
        )
        return (g_x if input_grad else None), (g_w if param_grads else None), (g_b if param_grads else None)


class attention:  # noqa: N801  (the launcher interface of triton.attention)
    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale, causal, key_padding_mask):
        o, o_t, lse = torch.ops.tangent_kernels.attention_jvp_forward(
            q, k, v, q_t, k_t, v_t, key_padding_mask, scale, causal
        )
        has_tangent = q_t is not None or k_t is not None or v_t is not None
        return o, (o_t if has_tangent else None), lse

    @staticmethod
    def backward(grad_out, q, k, v, o, lse, scale, causal, key_padding_mask, need_dq, need_dkv):
        dq, dk, dv = torch.ops.tangent_kernels.attention_backward(
            grad_out, q, k, v, o, lse, key_padding_mask, scale, causal, need_dq, need_dkv
        )
        return (dq if need_dq else None), (dk if need_dkv else None), (dv if need_dkv else None)


class gelu:  # noqa: N801  (the launcher interface of triton.gelu)
    @staticmethod
    def forward(h, h_t, bias, d_bias, approximate):
        a, a_t, derivative = torch.ops.tangent_kernels.gelu_jvp_forward(h, h_t, bias, d_bias, approximate)
        return a, (a_t if h_t is not None or d_bias is not None else None), derivative
