"""Attention modules with a flag that picks ``F.scaled_dot_product_attention`` over attending by
hand: timm's ``fused_attn`` (``Attention``, attention pooling, parallel blocks, ...; MeanFlow ports
turn it off "because flash attention cannot be used with jvp") and open_clip's ``use_fsdpa`` (its
own ``Attention``: qk-norm and custom blocks). ``patch`` sets the flag on and runs their forward
in the routing mode."""

from __future__ import annotations

from torch import nn

from . import swaps, watch
from .mode import is_routed, routed_forward_swap

SDPA_FLAGS = ("fused_attn", "use_fsdpa")  # timm's, open_clip's


def sdpa_flag(module: nn.Module) -> str | None:
    """The name of ``module``'s SDPA flag (the libraries set it in ``__init__``), or ``None``."""
    return next((flag for flag in SDPA_FLAGS if isinstance(vars(module).get(flag), bool)), None)


def has_fused_attn_flag(module: nn.Module) -> bool:
    """``module`` is a timm attention module (a ``fused_attn`` flag)."""
    return sdpa_flag(module) == "fused_attn"


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    flag = sdpa_flag(module)
    if flag is None:
        return []
    return [
        swaps.Swap(where, module, flag, lambda _: True, f"{flag} {getattr(module, flag)} -> True"),
        routed_forward_swap(where, module, f"{type(module).__name__}.forward runs in the routing mode"),
    ]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: sdpa_flag(module) is not None and not is_routed(module))
