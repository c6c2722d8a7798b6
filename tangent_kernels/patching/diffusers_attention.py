"""diffusers: ``Attention`` modules (and the ``AttentionModuleMixin`` ones of newer models) run an
attention processor; ``AttnProcessor2_0`` and the dispatcher's native backend call
``F.scaled_dot_product_attention``. ``patch`` runs their forward in the routing mode and
replaces the plain ``AttnProcessor`` (attention by hand) with ``AttnProcessor2_0`` where the two
compute the same function; other processors, including trained ones, are kept."""

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
    if type(getattr(module, "processor", None)) is AttnProcessor and _sdpa_processor_is_the_same(module):
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


def _sdpa_processor_is_the_same(attn: nn.Module) -> bool:
    """``AttnProcessor2_0`` computes what ``AttnProcessor`` does for ``attn``: it scales by SDPA's
    default ``head_dim ** -0.5``, not ``attn.scale`` (1 with ``scale_qk=False``), and applies
    ``norm_q`` / ``norm_k``, which ``AttnProcessor`` skips.
    Otherwise the plain processor stays: exact, attending by hand (a warning says so)."""
    head_dim = attn.inner_dim // attn.heads
    return attn.scale == head_dim**-0.5 and attn.norm_q is None and attn.norm_k is None


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, _attention_types()) and not is_routed(module))
