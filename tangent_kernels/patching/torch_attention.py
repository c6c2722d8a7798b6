"""torch: ``nn.MultiheadAttention`` (open_clip's attention, ``nn.Transformer*`` layers). ``patch``
runs its forward in the routing mode when a tangent is present, which serves its
``F.multi_head_attention_forward`` call (``mha.py``); without tangents it is torch's own forward."""

from __future__ import annotations

from torch import nn

from . import swaps, watch
from .mode import RoutedForward, is_routed


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    if not isinstance(module, nn.MultiheadAttention):
        return []
    return [
        swaps.Swap(
            where,
            module,
            "forward",
            lambda forward: RoutedForward(module, forward, skip_without_tangents=True),
            "MultiheadAttention.forward runs in the routing mode under forward AD",
        )
    ]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, nn.MultiheadAttention) and not is_routed(module))
