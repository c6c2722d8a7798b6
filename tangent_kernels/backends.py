"""Which backend runs an op: availability, the ``"auto"`` choice, and a record of what ran.

Backends (DESIGN.md §3): ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"cpp"`` (the C++ extension, CPU tensors), ``"reference"`` (plain PyTorch, anywhere).
``"auto"`` prefers Triton on CUDA and C++ on the CPU, and falls back to the reference where the
fast backend cannot run the op (with a one-time warning when the fallback is due to something
missing, such as an unbuilt extension). An explicitly requested backend that cannot run raises
``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import threading
import warnings

import torch

from . import cpp
from . import triton as triton_backend

BACKENDS = ("auto", "triton", "cpp", "reference")

# Which backends implement each op; the reference implements all of them.
IMPLEMENTED = {
    "attention_jvp": ("triton", "cpp", "reference"),
    "gelu_jvp": ("triton", "cpp", "reference"),
    "layer_norm_jvp": ("triton", "cpp", "reference"),
    "linear_jvp": ("triton", "cpp", "reference"),
    "mlp_jvp": ("triton", "cpp", "reference"),
    "rms_norm_jvp": ("triton", "cpp", "reference"),
}

_last_backend = threading.local()  # per thread: concurrent calls each see their own choice
_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on these inputs."""


def unavailable_reason(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why ``backend`` cannot run ``op`` on this device and dtype; empty when it can."""
    if backend not in IMPLEMENTED[op]:
        return f"{op} has no {backend} implementation yet (it has: {', '.join(IMPLEMENTED[op])})"
    if backend == "triton":
        return triton_backend.unsupported_reason(device, dtype)
    if backend == "cpp":
        return cpp.unsupported_reason(device, dtype)
    return ""


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``backend`` for ``op`` on tensors of this device and dtype, and record the choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and device.type == "meta":
        chosen = "reference"  # shapes only: no kernel runs on the meta device
    elif backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp"
        reason = unavailable_reason(preferred, op, device, dtype)
        chosen = "reference" if reason else preferred
        if reason and preferred in IMPLEMENTED[op]:
            warn_once((op, preferred), f"tangent_kernels: {op} falls back to the reference backend: {reason}")
    else:
        reason = unavailable_reason(backend, op, device, dtype)
        if reason:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device.type}/{dtype}: {reason}")
        chosen = backend
    setattr(_last_backend, op, chosen)
    return chosen


def warn_once(key, message: str) -> None:
    """``warnings.warn(message)`` the first time this process sees ``key`` (a fallback's reason)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def last_backend(op: str) -> str | None:
    """The backend that ran the latest call of ``op`` in this thread (``None`` before the first)."""
    if op not in IMPLEMENTED:
        raise ValueError(f"op: expected one of {sorted(IMPLEMENTED)}, got {op!r}")
    return getattr(_last_backend, op, None)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """For each backend, ``""`` if it can run on this device and dtype, else the reason it cannot."""
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype (e.g. torch.float32), got {dtype!r}")
    return {
        "triton": triton_backend.unsupported_reason(device, dtype),
        "cpp": cpp.unsupported_reason(device, dtype),
        "reference": "",
    }
