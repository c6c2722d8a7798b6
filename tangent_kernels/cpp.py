"""The C++ backend: loads the extension ``tangent_kernels._C`` and adapts its ops.

The adapters give the C++ ops the same Python interface as the Triton launchers (absent results
are ``None``), so one ``autograd.Function`` per op serves both backends. Importing this module
never fails: without the extension, ``AVAILABLE`` is false and ``UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

import torch

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
    def forward(x, x_t, weight, bias, d_weight, d_bias, eps):
        y, y_t, mean, rstd = torch.ops.tangent_kernels.layer_norm_jvp_forward(
            x, x_t, weight, bias, d_weight, d_bias, eps
        )
        has_tangent = x_t is not None or d_weight is not None or d_bias is not None
        return y, (y_t if has_tangent else None), mean, rstd

    @staticmethod
    def backward(grad, x, weight, mean, rstd, input_grad, param_grads):
        g_x, g_w, g_b = torch.ops.tangent_kernels.layer_norm_backward(
            grad, x, weight, mean, rstd, input_grad, param_grads
        )
        return (g_x if input_grad else None), (g_w if param_grads else None), (g_b if param_grads else None)
