"""tangent-kernels: fused primal + tangent (JVP) kernels for linearized transformers.

``functional`` holds one entry per op (``layer_norm_jvp``, ...); ``reference`` the same ops in
plain PyTorch; ``backends`` says which backend runs where and which one ran.
"""

from . import backends, functional, reference
from .backends import BackendUnavailableError, available_backends, last_backend

__all__ = ["BackendUnavailableError", "available_backends", "backends", "functional", "last_backend", "reference"]
__version__ = "0.1.0"
