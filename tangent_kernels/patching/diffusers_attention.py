"""diffusers: ``Attention`` modules (and the ``AttentionModuleMixin`` ones of newer models) run an
attention processor; ``AttnProcessor2_0`` and the dispatcher's native backend call
``F.scaled_dot_product_attention``. ``patch`` runs their forward in the routing mode and
replaces the plain ``AttnProcessor`` (attention by hand) with ``AttnProcessor2_0``; other
processors, including trained ones, are kept."""

from __future__ import annotations

import sys

from torch import nn

from . import swaps, watch
from .mode import is_routed, routed_forward_swap

_types: tuple[type, ...] = ()


def _attention_types() -> tuple[type, ...]:
    """diffusers' attention module types, once diffusers is imported (no model has them before)."""
    global _types
    if not _types and "diffusers" in sys.modules:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        _types = (Attention, AttentionModuleMixin)
    return _types


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    types = _attention_types()
    if not types or not isinstance(module, types):
        return []
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    planned = [routed_forward_swap(where, module, f"{type(module).__name__}.forward runs in the routing mode")]
    if type(getattr(module, "processor", None)) is AttnProcessor:
        planned.append(
            swaps.Swap(
                where,
                module,
                "processor",
                lambda _: AttnProcessor2_0(),
                "processor AttnProcessor -> AttnProcessor2_0",
            )
        )
    return planned


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, _attention_types()) and not is_routed(module))
