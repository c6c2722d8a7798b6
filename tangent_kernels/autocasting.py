"""What ``torch.autocast`` makes of an op's inputs: a lower-precision op's (linear, attention), and
the dtype torch computes a norm in.

Autocast's op lists differ by device (CUDA runs layer norms in float32, the CPU leaves them to
their inputs) and by torch version, and a norm over inputs of mixed dtypes returns the input's
dtype: rather than restate those rules, each is read from torch itself, once per op, device type,
input dtypes and autocast dtype, on one-element tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as torch_F
from torch import Tensor

_PROBES = {
    "layer_norm": lambda x, weight, bias: torch_F.layer_norm(x, (1,), weight, bias),
    "rms_norm": lambda x, weight: torch_F.rms_norm(x, (1,), weight),
}
_found: dict[tuple, torch.dtype] = {}


def autocast_on(device: torch.device) -> bool:
    """``torch.autocast`` is enabled for ``device``'s type."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_off(device: torch.device):
    """A context with autocast off for ``device``'s type (a null context where it is off)."""
    if not autocast_on(device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def norm_dtype(op: str, x: Tensor, *params: Tensor | None) -> torch.dtype:
    """The dtype of torch's ``op`` (``"layer_norm"`` or ``"rms_norm"``) on ``x`` with ``params``,
    as called now (inside or outside autocast)."""
    autocast_dtype = torch.get_autocast_dtype(x.device.type) if autocast_on(x.device) else None
    dtypes = tuple(None if t is None else t.dtype for t in (x, *params))
    key = (op, x.device.type, dtypes, autocast_dtype)
    if key not in _found:
        probes = [None if dtype is None else torch.ones(1, dtype=dtype, device=x.device) for dtype in dtypes]
        with torch.no_grad():
            _found[key] = _PROBES[op](*probes).dtype
    return _found[key]


def cast(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` in ``dtype`` (``None`` stays)."""
    return [None if t is None else t.to(dtype) for t in tensors]


def lower_precision_inputs(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors as autocast hands them to one of its lower-precision ops on CPU and CUDA
    (``linear``, ``scaled_dot_product_attention``): floating tensors other than float64 in the
    autocast dtype, when autocast is on for their device."""
    device = next((t.device for t in tensors if isinstance(t, Tensor)), None)
    if device is None or not autocast_on(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device.type)
    return [
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]
