"""Hugging Face transformers: models that select their attention through ``AttentionInterface``
by ``config._attn_implementation``. ``patch`` registers one implementation, ``"tangent_kernels"``
(transformers' own SDPA attention run in the routing mode, with transformers' SDPA masks) and
selects it in the configs of the model's modules; it refuses models that do not use the
interface or do not support SDPA."""

from __future__ import annotations

import sys

from torch import nn

from . import swaps, watch
from .mode import fused_jvp

IMPLEMENTATION = "tangent_kernels"


def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward`` with its SDPA call routed (``fused_jvp``). It has no
    attention weights to return: a call asking for them is refused (transformers' SDPA attention
    would return none, and a model patched from eager attention had returned them)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("output_attentions"):
        raise ValueError(
            f"output_attentions=True: {type(module).__name__} runs the {IMPLEMENTATION!r} attention of "
            "tk.patch (transformers' SDPA attention, routed), which computes no attention weights; "
            "run the model unpatched (tk.unpatch) for them"
        )

    with fused_jvp():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(
        IMPLEMENTATION, sdpa_mask
    )  # without a mask function, masks would be dropped


def _check(where: str, model: nn.Module) -> None:
    from ..modules import UnsupportedModuleError

    name = type(model).__name__
    if not type(model)._can_set_attn_implementation():
        raise UnsupportedModuleError(
            f"patch: {where}: {name} does not select its attention through transformers' "
            "AttentionInterface, so patch() cannot route it"
        )
    if not model._supports_sdpa:
        raise UnsupportedModuleError(
            f"patch: {where}: {name} does not support SDPA attention, which the "
            f"{IMPLEMENTATION!r} attention is"
        )
    if getattr(model.config, "output_attentions", False):
        raise UnsupportedModuleError(
            f"patch: {where}: {name} has config.output_attentions=True, which needs "
            "transformers' eager attention"
        )


def plan(where: str, module: nn.Module) -> list[swaps.Swap]:
    transformers = sys.modules.get("transformers")
    config = getattr(module, "config", None)
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        return []
    if isinstance(module, transformers.PreTrainedModel):
        _check(where, module)
    _register()
    before = config._attn_implementation
    return [
        swaps.Swap(
            where,
            config,
            "_attn_implementation_internal",
            lambda _: IMPLEMENTATION,
            f"config._attn_implementation {before!r} -> {IMPLEMENTATION!r}",
        )
    ]


def _unrouted(module: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")  # imported before any model exists
    return (
        modeling is not None
        and isinstance(module, modeling.PreTrainedModel)
        and module.config._attn_implementation != IMPLEMENTATION
    )


swaps.planners.append(plan)
watch.recognizers.append(_unrouted)
