"""tangent-kernels: fused primal + tangent (JVP) kernels for linearized transformers.

``functional`` holds one entry per op (``layer_norm_jvp``, ``attention_jvp``, ...); ``reference``
the same ops in plain PyTorch; ``modules`` drop-in tangent layers; ``linearize`` turns a timm
Vision Transformer into ``f(x; w0) + J f(x; w0) · dw``; ``checkpoint`` saves only ``dw``;
``patch(model)`` and ``fused_jvp()`` (``patching``) speed up unmodified ``torch.func.jvp`` code;
``taft`` is the TAFT toolkit; ``verify`` checks a linearized model against ``torch.func.jvp`` of
the original.
"""

from . import backends, functional, memory, modules, reference, verify
from .backends import BackendUnavailableError, available_backends, last_backend
from .checkpoint import BaseMismatchError, base_fingerprint, load_offsets, save_offsets
from .linearize import LinearizedViT, linearize
from .modules import UnsupportedModuleError
from .patching import fused_attention, fused_jvp, patch, patched, unpatch

__all__ = [
    "BackendUnavailableError",
    "BaseMismatchError",
    "LinearizedViT",
    "UnsupportedModuleError",
    "available_backends",
    "fused_attention",
    "fused_jvp",
    "backends",
    "base_fingerprint",
    "functional",
    "last_backend",
    "linearize",
    "memory",
    "load_offsets",
    "modules",
    "patch",
    "patched",
    "reference",
    "save_offsets",
    "unpatch",
    "verify",
]
__version__ = "0.1.0"
