"""Hand-written RMSNorms, which the routing mode cannot see (``x · rsqrt(mean(x²) + eps) · weight``
in element-wise ops): timm's ``RmsNorm`` and diffusers' ``RMSNorm`` (the q/k norms of SD3- and
Flux-style DiTs). ``patch`` makes a call with a tangent, whose input and parameters share one
dtype, run ``F.rms_norm`` with the module's settings in the routing mode: the fused kernel, the
same function (computed in float32 for 16-bit inputs and rounded once, as torch's ``rms_norm``
does); other calls run the module's own forward."""

from __future__ import annotations

import sys

import torch.nn.functional as torch_F
from torch import Tensor, nn

from . import swaps
from .mode import routed_forward_swap
from .torch_modules import _any_tangent


def _timm_rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    return torch_F.rms_norm(x, module.normalized_shape, module.weight, module.eps)


def _diffusers_rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    y = torch_F.rms_norm(x, x.shape[-1:], module.weight, module.eps)  # it normalizes the last dim
    return y if module.bias is None else y + module.bias


# (module that defines the class, class name) -> the module's forward as an F.rms_norm call
_HAND_WRITTEN = {
    ("timm.layers.norm", "RmsNorm"): _timm_rms_norm,
    ("diffusers.models.normalization", "RMSNorm"): _diffusers_rms_norm,
}


def _as_rms_norm(module: nn.Module):
    """``module``'s forward as an ``F.rms_norm`` call, if it is one of the hand-written kinds."""
    for (defined_in, name), forward in _HAND_WRITTEN.items():
        library = sys.modules.get(defined_in)  # such a module exists only once its library is imported
        if library is not None and type(module) is getattr(library, name, None):
            return forward
    return None


def _route_if(tensors: list[Tensor]) -> bool:
    """A tangent is present and the input and parameters share a dtype (the modules' own dtype
    handling differs from ``F.rms_norm``'s for mixed dtypes)."""
    return _any_tangent(tensors) and all(t.dtype == tensors[0].dtype for t in tensors)


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    forward = _as_rms_norm(module)
    if forward is None:
        return []
    what = f"{type(module).__name__}.forward runs F.rms_norm in the routing mode under forward AD"
    return [routed_forward_swap(where, module, what, _route_if, routed=forward, attention=False)]


swaps.planners.append(plan)
