"""Speed up unmodified forward-AD code: attention and layer norms through the fused JVP kernels.

Codebases that linearize a stock model with ``jvp(functional_call(model, ...), (params,),
(dparams,))`` (the ``LinearizedModel`` pattern) or differentiate it along its inputs (MeanFlow's
``jvp(u, (z, t, r), (v, 1, 0))``) fail on fused SDPA, or fall back to N×N math attention. Two ways
in, one mechanism (the routing mode of ``mode.py``):

- ``patch(model)`` / ``unpatch(model)`` / ``patched(model)``: swap, reversibly and all or nothing,
  what makes the model's attention modules (timm, ``nn.MultiheadAttention``, Hugging Face
  transformers, diffusers) and norms (``nn.LayerNorm``, ``nn.RMSNorm``, timm's and diffusers'
  RMSNorms) run in the routing mode; ``list_swaps(model)`` lists the swaps.
- ``fused_jvp()``: a context manager for any code that calls ``F.scaled_dot_product_attention``,
  ``nn.MultiheadAttention``, ``F.layer_norm`` or ``F.rms_norm`` itself (and for copies of a model
  made before ``patch``).

``fused_attention`` is the op underneath: under forward AD it runs the one-pass kernel once for
both streams (differentiable), otherwise the flash forward with a backward that has a backward. Warnings say (once) when a call runs torch's math attention and
why, when attention written by hand meets tangents, and when an unpatched copy of a patched
model runs under forward AD (``watch.py``).
"""

# importing the planners registers them with patch()
from . import diffusers_attention, flagged_attention, hf_attention, rms_norms, torch_modules  # noqa: F401
from .attention import fused_attention
from .flagged_attention import has_fused_attn_flag
from .mode import fused_jvp
from .swaps import list_swaps, patch, patched, unpatch

__all__ = [
    "fused_attention",
    "fused_jvp",
    "has_fused_attn_flag",
    "list_swaps",
    "patch",
    "patched",
    "unpatch",
]
