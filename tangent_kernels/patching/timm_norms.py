"""timm: ``RmsNorm`` computes RMSNorm by hand (``x · rsqrt(mean(x²) + eps) · weight``), which the
routing mode cannot see. ``patch`` makes a call with a tangent run ``F.rms_norm`` with the module's
settings in the routing mode (the fused kernel: the same function, computed in float32 for 16-bit
inputs, as torch's ``rms_norm`` does); other calls run timm's own forward."""

from __future__ import annotations

import sys

import torch.nn.functional as torch_F
from torch import nn

from . import swaps
from .mode import RoutedForward
from .torch_modules import _any_tangent


def _timm_rms_norm(module: nn.Module) -> bool:
    norm = sys.modules.get("timm.layers.norm")  # a timm module exists only once timm is imported
    return norm is not None and type(module) is getattr(norm, "RmsNorm", None)


def _rms_norm(module: nn.Module, x):
    return torch_F.rms_norm(x, module.normalized_shape, module.weight, module.eps)


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    if not _timm_rms_norm(module):
        return []
    return [
        swaps.Swap(
            where,
            module,
            "forward",
            lambda forward: RoutedForward(module, forward, _any_tangent, routed=_rms_norm),
            "RmsNorm.forward runs F.rms_norm in the routing mode under forward AD",
            attention=False,
        )
    ]


swaps.planners.append(plan)
