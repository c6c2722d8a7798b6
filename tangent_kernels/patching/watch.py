"""What a forward-AD pass did with its attention, and the one-time messages about it.

A *pass* is the outermost activation of the routing mode (``fused_jvp()`` or a patched
module's forward) in a thread. It counts the attention calls with tangents that the fused kernel
served and the ones it did not: calls it handed to torch's math attention (each reason is said
once, when first seen) and ``softmax`` on tensors with tangents (hand-written attention). A pass
that had such work and no fused call ends with one warning (once per process).

While a model is patched, a global forward pre-hook also says (once) when an attention module of
a kind ``patch()`` routes runs under forward AD unrouted, e.g. in a copy made before ``patch()``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable

from torch import Tensor, nn
from torch.autograd import forward_ad

_local = threading.local()
_warned: set[str] = set()


def has_tangent(t) -> bool:
    """``t`` is a tensor carrying a forward-AD tangent (``torch.func.jvp`` or ``forward_ad``)."""
    return isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time this process sees ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


class Pass:
    """Counts of one pass: attention calls with tangents served fused, and the others by kind."""

    def __init__(self):
        self.fused = 0
        self.unfused: Counter[str] = Counter()


def current() -> Pass | None:
    return getattr(_local, "current", None)


@contextlib.contextmanager
def attention_pass():
    """Start a pass unless one runs in this thread; at its end, warn (once) if it ran attention
    with tangents and none of it reached the fused kernel."""
    if current() is not None:
        yield current()
        return
    this = _local.current = Pass()
    try:
        yield this
    finally:
        _local.current = None
    if this.unfused and not this.fused:
        found = "; ".join(f"{count}× {kind}" for kind, count in sorted(this.unfused.items()))
        warn_once(
            "no-fused-call",
            "tangent_kernels: a forward-AD pass ran attention without reaching the fused "
            f"kernel ({found}); it ran unfused, with N×N scores and tangents",
        )


fused_calls = 0  # attention calls with tangents served by the fused kernel in this process


def served_fused() -> None:
    global fused_calls
    fused_calls += 1
    if (this := current()) is not None:
        this.fused += 1


def served_by_math(reason: str) -> None:
    """A call with tangents handed to torch's math attention; ``reason`` is said once."""
    warn_once(
        reason,
        f"tangent_kernels: {reason}: this attention runs torch's math path (N×N), not the fused kernel",
    )
    if (this := current()) is not None:
        this.unfused["math attention calls"] += 1


def saw_handwritten_attention() -> None:
    """A ``softmax`` over scores with tangents: attention written by hand, out of the kernel's reach."""
    if (this := current()) is not None:
        this.unfused["softmax calls on tensors with tangents (hand-written attention?)"] += 1


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
