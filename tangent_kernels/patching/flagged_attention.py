"""Attention modules with a flag that picks ``F.scaled_dot_product_attention`` over attending by
hand: timm's ``fused_attn`` (``Attention``, attention pooling, parallel blocks, ...; MeanFlow ports
turn it off "because flash attention cannot be used with jvp") and open_clip's ``use_fsdpa`` (its
own ``Attention``: qk-norm and custom blocks). ``patch`` sets the flag on and runs their forward
in the routing mode."""

from __future__ import annotations

from torch import nn

from . import sdpa, swaps, watch
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
    by_hand = getattr(module, flag) is False and isinstance(vars(module).get("scale"), float)
    return [
        swaps.Swap(where, module, flag, lambda _: True, f"{flag} {getattr(module, flag)} -> True"),
        routed_forward_swap(where, module, f"{type(module).__name__}.forward runs in the routing mode",
                            context=_own_scale if by_hand else _sdpa_scale),  # fmt: skip
    ]


def _own_scale(module: nn.Module):
    """The module attended by hand with ``module.scale`` (a port may set another than 1/√head dim,
    e.g. old timm's ``qk_scale``), which its SDPA branch does not pass: its SDPA calls use it."""
    return sdpa.scale_when_unset(module.scale)


def _sdpa_scale(module: nn.Module):
    """The module's SDPA branch ran before ``patch``: its calls keep SDPA's own scale."""
    return sdpa.scale_when_unset(None)


swaps.planners.append(plan)
watch.recognizers.append(lambda module: sdpa_flag(module) is not None and not is_routed(module))
