"""``fused_jvp()``: the routing mode, for code that calls torch's attention and layer norm itself.

A ``TorchFunctionMode`` serves exactly five kinds of call made inside it, and passes every other
one through untouched:

- ``F.scaled_dot_product_attention`` -> ``sdpa.scaled_dot_product_attention``;
- ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) ->
  ``mha.multi_head_attention_forward``, which calls the SDPA above itself (a mode's handler runs
  with the mode switched off, so nothing inside a passed-through call would be routed);
- ``F.layer_norm`` -> ``layer_norm.layer_norm``;
- ``F.rms_norm`` (and ``torch.rms_norm``) -> ``layer_norm.rms_norm``;
- ``softmax`` on a tensor of 3+ dims with a tangent is counted as hand-written attention (``watch``).

Calls without tangents run torch's own functions, so the mode costs nothing but the dispatch
(about 2 µs per torch call inside it) outside forward AD.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as torch_F
from torch.overrides import TorchFunctionMode

from .. import backends, validation
from . import watch
from .layer_norm import layer_norm, rms_norm
from .mha import multi_head_attention_forward
from .sdpa import scaled_dot_product_attention
from .swaps import Swap

_local = threading.local()


def _count_softmax(func, args, kwargs):
    scores = args[0] if args else kwargs.get("input")
    if isinstance(scores, torch.Tensor) and scores.dim() >= 3 and watch.has_tangent(scores):
        watch.saw_handwritten_attention()
    return func(*args, **kwargs)


class _RoutingMode(TorchFunctionMode):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch_F.scaled_dot_product_attention:
            return scaled_dot_product_attention(*args, **kwargs, backend=self.backend)
        if func is torch_F.multi_head_attention_forward:
            return multi_head_attention_forward(*args, **kwargs, backend=self.backend)
        if func is torch_F.layer_norm:
            return layer_norm(*args, **kwargs, backend=self.backend)
        if func in _RMS_NORM:
            return rms_norm(*args, **kwargs, backend=self.backend)
        if func in _SOFTMAX:
            return _count_softmax(func, args, kwargs)
        return func(*args, **kwargs)


_SOFTMAX = frozenset({torch_F.softmax, torch.softmax, torch.Tensor.softmax})
_RMS_NORM = frozenset({torch_F.rms_norm, torch.rms_norm})


def routing_active() -> bool:
    """The routing mode is on in this thread (an enclosing ``fused_jvp()`` or patched module)."""
    return getattr(_local, "active", False)


@contextlib.contextmanager
def fused_jvp(backend: str = "auto"):
    """``with fused_jvp(): ...``: attention and layer norms inside run their fused JVP kernels
    under forward AD (``torch.func.jvp``, ``torch.autograd.forward_ad``).

    It serves ``F.scaled_dot_product_attention`` calls (every form: a form the kernel cannot serve,
    e.g. a general ``attn_mask`` or dropout, runs torch's math SDPA, exact under forward AD, and a
    warning says so once per reason), ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``),
    and ``F.layer_norm`` and ``F.rms_norm`` over the last dimension. Calls without tangents run torch's own code. If
    a forward-AD pass inside reaches no fused attention call (e.g. attention written by hand:
    ``softmax`` on tensors with tangents), a warning says so once.
    ``backend`` picks the fused kernels' backend (``"auto"``, ``"triton"``, ``"cpp"``,
    ``"reference"``); a nested ``fused_jvp`` keeps the enclosing one's.
    """
    validation.choice("backend", backend, backends.BACKENDS)  # now, not at the first fused call
    if routing_active():
        yield
        return
    _local.active = True
    try:
        with watch.attention_pass(), _RoutingMode(backend):
            yield
    finally:
        _local.active = False


class RoutedForward:
    """A module's forward run inside ``fused_jvp()`` (what ``patch()`` installs as ``module.forward``).

    ``route_if(tensors)``: route only calls for which it holds, given the call's tensor arguments
    and the module's parameters; other calls run the original forward outside the mode, exactly
    the unpatched module (for ``nn.MultiheadAttention``: torch's fast path included, which no
    call inside a mode takes). ``None``: route every call. ``routed(module, *args, **kwargs)``:
    what a routed call runs in the mode instead of the original forward (for modules that compute
    by hand what a torch function the mode serves computes). ``context(module)``: a context
    manager a routed call runs in. Both module-level functions, so that a deep copy of the module
    calls them with the copy.
    """

    def __init__(self, module: torch.nn.Module, forward, route_if=None, routed=None, context=None):
        self.module, self.forward, self.route_if, self.routed = module, forward, route_if, routed
        self.context = context

    def __call__(self, *args, **kwargs):
        if self.route_if is not None:
            tensors = [t for t in (*args, *kwargs.values(), *self.module.parameters()) if isinstance(t, torch.Tensor)]
            if not self.route_if(tensors):
                return self.forward(*args, **kwargs)
        with fused_jvp(), (contextlib.nullcontext() if self.context is None else self.context(self.module)):
            if self.routed is not None:
                return self.routed(self.module, *args, **kwargs)
            return self.forward(*args, **kwargs)


def routed_forward_swap(where: str, module: torch.nn.Module, what: str, route_if=None, routed=None,
                        attention: bool = True, context=None) -> Swap:  # fmt: skip
    """The swap of ``module.forward`` for a ``RoutedForward`` (what every planner routes with)."""
    return Swap(where, module, "forward", lambda forward: RoutedForward(module, forward, route_if, routed, context),
                what, attention=attention)  # fmt: skip


def is_routed(module: torch.nn.Module) -> bool:
    """``module``'s forward is a ``RoutedForward`` (it was patched)."""
    return isinstance(module.__dict__.get("forward"), RoutedForward)
