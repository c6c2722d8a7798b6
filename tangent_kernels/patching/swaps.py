"""``patch`` / ``unpatch``: a transactional, reference-counted set of attribute swaps.

``patch(model)`` asks each ecosystem's planner (timm, torch, transformers, diffusers) what to
swap in every submodule; a planner raises ``modules.UnsupportedModuleError`` for a module it recognizes
but cannot serve, and then nothing is changed. Only after the whole model is planned are the
swaps applied. Each swapped attribute (a module's ``forward``, timm's ``fused_attn``, a config's
attention implementation, ...) is held by a ``Hold`` with a count: a second ``patch`` over the
same attribute (``patch(model)`` then ``patch(model.blocks[0])``) shares it, and the attribute
is restored when the last holder is unpatched, in any order. The holds live in the patched
model's ``__dict__``, so a deep copy of a patched model is patched the same way, on its own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from . import watch

_RECORD = "_tangent_kernels_patch"


class _Missing:
    """The original value of an attribute the target did not have (restored by deleting it)."""

    def __reduce__(self):
        return "MISSING"  # copies and pickles are this one object


MISSING = _Missing()


@dataclass
class Swap:
    """One planned change: ``target.attribute = make(current value)``, described by ``what``."""

    where: str
    target: object
    attribute: str
    make: Callable[[object], object]
    what: str
    attention: bool = True  # False for the other layers routed (layer norms)


class Hold:
    """A swapped attribute, its original value and how many patches hold it."""

    def __init__(self, swap: Swap):
        self.target, self.attribute, self.what = swap.target, swap.attribute, swap.what
        self.where = swap.where
        self.original = vars(swap.target).get(swap.attribute, MISSING)
        self.count = 1
        setattr(swap.target, swap.attribute, swap.make(getattr(swap.target, swap.attribute, None)))
        _register(self)

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            _holds.pop((id(self.target), self.attribute), None)
            if self.original is MISSING:
                delattr(self.target, self.attribute)
            else:
                setattr(self.target, self.attribute, self.original)

    def __setstate__(self, state):  # a deep copy (or unpickled copy) of a patched model holds its own copies
        self.__dict__.update(state)
        _register(self)


_holds: weakref.WeakValueDictionary[tuple[int, str], Hold] = weakref.WeakValueDictionary()


def _register(hold: Hold) -> None:
    _holds[(id(hold.target), hold.attribute)] = hold


def _take(swap: Swap) -> Hold:
    """The hold of ``swap``'s attribute: the existing one (one more holder) or a new one (swapped now)."""
    hold = _holds.get((id(swap.target), swap.attribute))
    if hold is not None and hold.target is swap.target:
        hold.count += 1
        return hold
    return Hold(swap)


class _Record:
    """The holds one ``patch`` call took, in the order taken. While it lives (in its model's
    ``__dict__``) it counts as one patched model for ``watch``: until ``unpatch``, or until the
    model is garbage-collected (a patched model dropped without ``unpatch``)."""

    def __init__(self):
        self.holds: list[Hold] = []
        self._count()

    def __setstate__(self, state):  # a copy of a patched model counts as one more patched model
        self.__dict__.update(state)
        self._count()

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "release"}

    def _count(self) -> None:
        watch.patches_changed(+1)
        self.release = weakref.finalize(self, watch.patches_changed, -1)  # runs once: here or at unpatch


planners: list[Callable[[str, nn.Module], list[Swap]]] = []


def plan(model: nn.Module) -> list[Swap]:
    """Every swap ``patch(model)`` would make, one per attribute; raises before any change."""
    swaps: dict[tuple[int, str], Swap] = {}
    for where, module in model.named_modules():
        for planner in planners:
            for swap in planner(where or type(model).__name__, module):
                swaps.setdefault((id(swap.target), swap.attribute), swap)
    return list(swaps.values())


def patch(model: nn.Module) -> nn.Module:
    """Route ``model``'s attention through the fused kernels under forward AD (in place; returns ``model``).

    It recognizes timm attention modules (those with a ``fused_attn`` flag: the flag is set on and
    their forward runs in the routing mode), ``nn.MultiheadAttention``, ``nn.LayerNorm``,
    ``nn.RMSNorm`` and timm's and diffusers' RMSNorms (their forward runs in the routing mode when a tangent is
    present), Hugging Face transformers models that use its
    ``AttentionInterface`` (their configs select the ``"tangent_kernels"`` attention, HF's SDPA
    attention in the routing mode) and diffusers attention modules (their forward runs in the
    routing mode; the plain ``AttnProcessor`` becomes ``AttnProcessor2_0``). ``list_swaps(model)``
    lists what was changed; ``unpatch`` restores it. All or nothing: a module it recognizes but
    cannot serve raises ``tangent_kernels.UnsupportedModuleError`` before anything changes.

    Patch the model that runs: a copy made before ``patch()`` (e.g. by a ``LinearizedModel``) is
    not patched (a warning says so when it runs under forward AD); a copy of a patched model is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if _RECORD in vars(model):
        raise RuntimeError("patch: this model is already patched (call unpatch first)")
    planned = plan(model)
    if not any(swap.attention for swap in planned):
        watch.warn_once(
            f"nothing-to-patch-{type(model).__qualname__}",
            f"tangent_kernels.patch: found no attention module to route in {type(model).__name__}; "
            "for code that calls F.scaled_dot_product_attention itself, use "
            "`with tangent_kernels.fused_jvp():`; attention written by hand (softmax of q·kᵀ) runs "
            "as written, unfused (call F.scaled_dot_product_attention there to have it fused)",
        )
    record = _Record()
    try:
        for swap in planned:
            record.holds.append(_take(swap))
    except BaseException:
        for hold in reversed(record.holds):
            hold.release()
        record.release()
        raise
    vars(model)[_RECORD] = record
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch(model)``: each attribute it swapped is restored once no other patch holds it."""
    record = vars(model).pop(_RECORD, None)
    if record is None:
        raise RuntimeError("unpatch: this model is not patched")
    for hold in reversed(record.holds):
        hold.release()
    record.release()
    return model


def list_swaps(model: nn.Module) -> list[str]:
    """What ``patch(model)`` swapped, one line per attribute: ``"<module path>: <change>"``."""
    record = vars(model).get(_RECORD)
    if record is None:
        raise RuntimeError("list_swaps: this model is not patched")
    return [f"{hold.where}: {hold.what}" for hold in record.holds]


@contextlib.contextmanager
def patched(model: nn.Module):
    """``with patched(model): ...`` patches for the block and restores the model after."""
    patch(model)
    try:
        yield model
    finally:
        unpatch(model)
