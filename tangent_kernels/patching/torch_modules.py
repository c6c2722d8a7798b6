"""torch: ``nn.MultiheadAttention`` (open_clip's attention, ``nn.Transformer*`` layers) and
``nn.LayerNorm`` (and its subclasses: timm's, open_clip's). ``patch`` runs their forward in the
routing mode when a tangent is present (and, for layer norms, when a gradient is needed: its
backward must stay differentiable, ``layer_norm.py``), which serves their
``F.multi_head_attention_forward`` and ``F.layer_norm`` calls (``mha.py``, ``layer_norm.py``);
otherwise it is torch's own forward (for ``nn.MultiheadAttention``, its fast path included)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import swaps, watch
from .mode import RoutedForward, is_routed


def _any_tangent(tensors: list[Tensor]) -> bool:
    return any(watch.has_tangent(t) for t in tensors)


def _layer_norm_route_if(tensors: list[Tensor]) -> bool:
    return _any_tangent(tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    if not isinstance(module, (nn.MultiheadAttention, nn.LayerNorm)):
        return []
    norm = isinstance(module, nn.LayerNorm)
    return [
        swaps.Swap(
            where,
            module,
            "forward",
            lambda forward: RoutedForward(module, forward, _layer_norm_route_if if norm else _any_tangent),
            f"{type(module).__name__}.forward runs in the routing mode under forward AD"
            + (" and when it needs a gradient" if norm else ""),
            attention=isinstance(module, nn.MultiheadAttention),
        )
    ]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, nn.MultiheadAttention) and not is_routed(module))
