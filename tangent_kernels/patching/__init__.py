"""Speed up unmodified forward-AD code: attention through the fused primal + tangent kernel.

Codebases that linearize a stock model with ``jvp(functional_call(model, ...), (params,),
(dparams,))`` (the ``LinearizedModel`` pattern) or differentiate it along its inputs (MeanFlow's
``jvp(u, (z, t, r), (v, 1, 0))``) fail on fused SDPA, or fall back to N×N math attention. Two ways
in, one mechanism (the routing mode of ``mode.py``):

- ``patch(model)`` / ``unpatch(model)`` / ``patched(model)``: swap, reversibly and all or nothing,
  what makes the model's attention modules (timm, ``nn.MultiheadAttention``, Hugging Face
  transformers, diffusers) run in the routing mode; ``list_swaps(model)`` lists them.
- ``fused_jvp()``: a context manager for any code that calls ``F.scaled_dot_product_attention``
  or ``nn.MultiheadAttention`` itself (and for copies of a model made before ``patch``).

``fused_attention`` is the op underneath: attention as an ``autograd.Function`` whose ``jvp``
rule runs the one-pass kernel. Warnings say (once) when a call runs torch's math attention and
why, and when a forward-AD pass reaches no fused call at all (``watch.py``).
"""

# importing the planners registers them with patch()
from . import diffusers_attention, hf_attention, timm_attention, torch_modules  # noqa: F401
from .attention import fused_attention
from .mode import fused_jvp
from .swaps import list_swaps, patch, patched, unpatch
from .timm_attention import has_fused_attn_flag

__all__ = [
    "fused_attention",
    "fused_jvp",
    "has_fused_attn_flag",
    "list_swaps",
    "patch",
    "patched",
    "unpatch",
]
