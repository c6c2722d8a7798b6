"""timm: attention modules with a ``fused_attn`` flag (``Attention``, attention pooling, parallel
blocks, ...) call ``F.scaled_dot_product_attention`` when it is on, and attend by hand when it is
off (as MeanFlow ports set it, "because flash attention cannot be used with jvp"). ``patch`` sets
the flag on and runs their forward in the routing mode."""

from __future__ import annotations

from torch import nn

from . import swaps, watch
from .mode import is_routed, routed_forward_swap


def has_fused_attn_flag(module: nn.Module) -> bool:
    return isinstance(vars(module).get("fused_attn"), bool)  # timm sets it in __init__


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    if not has_fused_attn_flag(module):
        return []
    return [
        swaps.Swap(where, module, "fused_attn", lambda _: True, f"fused_attn {module.fused_attn} -> True"),
        routed_forward_swap(where, module, f"{type(module).__name__}.forward runs in the routing mode"),
    ]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: has_fused_attn_flag(module) and not is_routed(module))
