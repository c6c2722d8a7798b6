"""torch: ``nn.MultiheadAttention`` (open_clip's attention, ``nn.Transformer*`` layers),
``nn.TransformerEncoder`` and its layers, ``nn.LayerNorm`` (and its subclasses: timm's,
open_clip's) and ``nn.RMSNorm``. ``patch`` runs their forward in the routing mode when a tangent is
present (and, for attention and layer norms, when a gradient is needed: their backward must stay
differentiable for the double-backward form of a JVP, which torch's flash SDPA's is not, and
``layer_norm.py``), which serves their ``F.multi_head_attention_forward``, ``F.layer_norm`` and
``F.rms_norm`` calls (``mha.py``, ``layer_norm.py``); otherwise it is torch's own forward (for
``nn.MultiheadAttention`` and the encoder, their fast paths included). The encoder and its layers
are routed whole because their fast paths (a fused encoder-layer op, nested tensors), taken in
eval() when no parameter requires grad (as under ``functional_call`` in a parameter jvp), have no
forward-AD rule; no call inside the routing mode takes them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import swaps, watch
from .mode import is_routed, routed_forward_swap


def _any_tangent(tensors: list[Tensor]) -> bool:
    return any(watch.has_tangent(t) for t in tensors)


def _tangent_or_gradient(tensors: list[Tensor]) -> bool:
    return _any_tangent(tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


_ROUTE_IF = {nn.MultiheadAttention: _tangent_or_gradient, nn.TransformerEncoder: _any_tangent,
             nn.TransformerEncoderLayer: _any_tangent, nn.LayerNorm: _tangent_or_gradient, nn.RMSNorm: _any_tangent}


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    kind = next((kind for kind in _ROUTE_IF if isinstance(module, kind)), None)
    if kind is None:
        return []
    what = f"{type(module).__name__}.forward runs in the routing mode under forward AD" + (
        " and when it needs a gradient" if _ROUTE_IF[kind] is _tangent_or_gradient else ""
    )
    return [routed_forward_swap(where, module, what, _ROUTE_IF[kind], attention=kind is nn.MultiheadAttention)]


swaps.planners.append(plan)
watch.recognizers.append(lambda module: isinstance(module, nn.MultiheadAttention) and not is_routed(module))
