"""What a forward-AD pass did with its attention, and the one-time messages about it.

A *pass* is the outermost activation of the routing mode (``fused_jvp()`` or a patched
module's forward) in a thread. Every attention call with tangents is either served by the fused
kernel, or handed to torch's math attention (each reason is said once, when first seen), or out
of sight: attention written by hand, seen as ``softmax`` on scores with tangents. A pass that saw
hand-written attention and no fused call ends with one warning (once per process).

While a model is patched, a global forward pre-hook also says (once) when an attention module of
a kind ``patch()`` routes runs under forward AD unrouted, e.g. in a copy made before ``patch()``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch import Tensor, nn

from ..forward_mode import has_tangent  # noqa: F401  (the routed calls read their tangents by it)
from ..forward_mode import legacy_vmapped

_local = threading.local()
_warned: set[str] = set()
fused_calls = 0  # attention calls with tangents served by the fused kernel in this process


def requires_grad_at_any_level(t: Tensor) -> bool:
    """``t``, or a tensor it wraps (``torch.func`` transforms wrap tensors one level each, and a
    wrapper inside ``torch.func.jvp`` says ``requires_grad=False`` for a base that requires grad),
    requires grad."""
    while not t.requires_grad:
        if not torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        t = torch._C._functorch.get_unwrapped(t)
    return True


def fused_ops_serve_transforms(*tensors: Tensor | None) -> bool:
    """The ``torch.func`` transforms around this call are none or a single ``jvp``: the stacks the
    fused ops serve. Under any other (``jvp`` of ``jvp``, ``grad`` of ``jvp``, ``jvp`` of
    ``grad``, ``hessian``, ``vmap``), or where one of ``tensors`` is batched by the legacy vmap of
    ``torch.autograd.functional``'s vectorized jacobians, the routed calls run plain torch ops (the
    reference) and torch differentiates them: the fused ops have no forward-AD rule of their own, so
    an outer level's tangent would be silently dropped, ``torch.func`` refuses their registered
    backward, and they have no batching rule."""
    kinds = [i.key() for i in retrieve_all_functorch_interpreters()]
    if kinds in ([], [TransformType.Jvp]) and not any(legacy_vmapped(t) for t in tensors):
        return True
    names = [k.name for k in kinds] or ["torch.autograd.functional's legacy vmap"]
    warn_once(
        "transforms " + " ".join(names),
        f"tangent_kernels: under the transforms {names} (outermost first) attention and layer norms run "
        "plain torch ops (exact, N×N attention memory): the fused kernels serve plain autograd and a single jvp",
    )
    return False


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time this process sees ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


class Pass:
    """One pass: attention calls with tangents served fused, and softmax calls seen with tangents."""

    def __init__(self):
        self.fused = 0
        self.handwritten = 0


def current() -> Pass | None:
    return getattr(_local, "current", None)


@contextlib.contextmanager
def attention_pass():
    """Start a pass unless one runs in this thread; at its end, warn (once) if it saw attention
    written by hand and no call reached the fused kernel."""
    if current() is not None:
        yield current()
        return
    this = _local.current = Pass()
    try:
        yield this
    finally:
        _local.current = None
    if this.handwritten and not this.fused:
        warn_once(
            "no-fused-call",
            f"tangent_kernels: a forward-AD pass ran {this.handwritten} softmax calls on scores with "
            "tangents and no attention call reached the fused kernel: attention written by hand runs "
            "unfused, with N×N scores and tangents (call F.scaled_dot_product_attention instead)",
        )


def served_fused() -> None:
    global fused_calls
    fused_calls += 1
    if (this := current()) is not None:
        this.fused += 1


def served_small() -> None:
    """A call with tangents the router gave torch's math SDPA because it is faster there (small)."""
    if (this := current()) is not None:
        this.fused += 1  # reached the router: not attention written by hand


def served_by_math(reason: str) -> None:
    """A call with tangents handed to torch's math attention; ``reason`` is said once."""
    warn_once(
        reason,
        f"tangent_kernels: {reason}: this attention runs torch's math path (N×N), not the fused kernel",
    )


def saw_handwritten_attention() -> None:
    """A ``softmax`` over scores with tangents: attention written by hand, out of the kernel's reach."""
    if (this := current()) is not None:
        this.handwritten += 1


# ----------------------------------------------------------------------------------------------
# unrouted attention modules while a model is patched

recognizers: list[
    Callable[[nn.Module], bool]
] = []  # each: "module is attention patch() routes, unrouted now"
_live_patches = 0
_hook = None


def _pre_hook(module: nn.Module, args) -> None:
    if current() is not None or not any(unrouted(module) for unrouted in recognizers):
        return
    if any(has_tangent(a) for a in args) or any(has_tangent(p) for p in module.parameters()):
        warn_once(
            "unrouted-module",
            f"tangent_kernels: an unpatched {type(module).__name__} ran under forward AD "
            "while patch() is active: was the model copied before patch() (a LinearizedModel deep-copies "
            "it)? Patch the model that runs, or run the code inside `with tangent_kernels.fused_jvp():`",
        )


def patches_changed(delta: int) -> None:
    """Keep the pre-hook installed while at least one model is patched."""
    global _live_patches, _hook
    _live_patches += delta
    if _live_patches > 0 and _hook is None:
        _hook = nn.modules.module.register_module_forward_pre_hook(_pre_hook)
    elif _live_patches == 0 and _hook is not None:
        _hook.remove()
        _hook = None
