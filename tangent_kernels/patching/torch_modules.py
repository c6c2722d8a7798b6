"""torch: ``nn.MultiheadAttention`` (open_clip's attention, ``nn.Transformer*`` layers) and
``nn.LayerNorm`` (and its subclasses: timm's, open_clip's). ``patch`` runs their forward in the
routing mode when a tangent is present, which serves their ``F.multi_head_attention_forward`` and
``F.layer_norm`` calls (``mha.py``, ``layer_norm.py``); without tangents it is torch's own forward
(for ``nn.MultiheadAttention``, its fast path included)."""

from __future__ import annotations

from torch import nn

from . import swaps, watch
from .mode import RoutedForward, is_routed


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    if not isinstance(module, (nn.MultiheadAttention, nn.LayerNorm)):
        return []
    return [
        swaps.Swap(
            where,
            module,
            "forward",
            lambda forward: RoutedForward(module, forward, skip_without_tangents=True),
            f"{type(module).__name__}.forward runs in the routing mode under forward AD",
            attention=isinstance(module, nn.MultiheadAttention),
        )
    ]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, nn.MultiheadAttention) and not is_routed(module))
