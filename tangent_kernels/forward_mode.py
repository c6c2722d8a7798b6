"""Whether tensors carry a forward-mode tangent (``torch.func.jvp`` or ``torch.autograd.forward_ad``).

The ``torch.library`` ops of ``ops.py`` have no forward-AD rule, and torch drops an input's tangent
through them without an error (under ``torch.func.jvp`` the result's tangent is zero), so the
entries that run them look here first, and the patching layer reads the tangents it routes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad


def active() -> bool:
    """Forward AD is on at some level: a ``forward_ad.dual_level`` (``torch.func.jvp`` enters one)
    or a ``torch.func`` transform (a cheap test before reading tensors). While ``torch.compile``
    traces, functorch's interpreter stack is never empty, so there only the dual level counts."""
    if forward_ad._current_level >= 0:
        return True
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def forward_ad_api() -> bool:
    """Forward AD by ``torch.autograd.forward_ad`` (a dual level) outside every ``torch.func``
    transform (``torch.func.jvp`` enters a dual level too, inside its own transform)."""
    return forward_ad._current_level >= 0 and torch._C._functorch.peek_interpreter_stack() is None


def has_tangent(t) -> bool:
    """``t`` is a tensor carrying a forward-AD tangent; under ``vmap`` inside ``jvp`` the tangent is
    on the tensor a batched one wraps (``unpack_dual`` has no batching rule). A tensor batched by
    the legacy vmap of ``torch.autograd.functional.jacobian(strategy="forward-mode",
    vectorize=True)`` is a batch of tangents, not readable: it counts as carrying one, so the fused
    ops, which have no legacy batching rule, hand it to the reference."""
    if not isinstance(t, Tensor):
        return False
    if _legacy_batched(t):
        return True
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return forward_ad.unpack_dual(t).tangent is not None


def vmapped(t: Tensor) -> bool:
    """``t`` is batched by a ``torch.func.vmap`` at some level, under any other wrapping: its values
    differ per example, so they cannot be read as one (``bool(t.all())`` raises there)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def legacy_vmapped(t) -> bool:
    """``t``, or its forward-AD tangent, is batched by torch's legacy vmap (``torch.autograd.functional``'s
    vectorized jacobians), for which the fused ops have no batching rule."""
    if not isinstance(t, Tensor):
        return False
    if _legacy_batched(t):
        return True
    tangent = forward_ad.unpack_dual(t).tangent if forward_ad._current_level >= 0 else None
    return tangent is not None and _legacy_batched(tangent)


def _legacy_batched(t: Tensor) -> bool:
    """``t`` is a legacy-vmap batched tensor (never while ``torch.compile`` traces, which cannot
    trace the test and runs no legacy vmap)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_legacy_batchedtensor(t)


def tangent_carrier(**tensors: Tensor | None) -> str | None:
    """The name of the first of ``tensors`` that carries a forward-AD tangent, or ``None``."""
    if not active():
        return None
    return next((name for name, t in tensors.items() if has_tangent(t)), None)


def under_grad_transform() -> bool:
    """A ``torch.func`` gradient transform (``grad``, ``vjp``, ``jacrev``, per-sample ``vmap(grad)``)
    is active: it refuses the fused ops' registered backward ("must override setup_context")."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())
