"""Save and load only the offsets ``dw`` of a linearized model (safetensors), tied to its base.

Beside the offsets the file stores a fingerprint of the frozen weights ``w0`` (a SHA-256 over
every frozen tensor's name, dtype, shape and bytes). Loading onto a model whose base differs is
refused: offsets are only meaningful around the weights they were trained at.
"""

from __future__ import annotations

import hashlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "tangent_kernels.offsets/1"


class BaseMismatchError(ValueError):
    """Offsets trained around one base model were loaded onto another."""


def base_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of the frozen weights ``w0``: every buffer of ``module``, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_buffers(remove_duplicate=False), key=lambda item: item[0]):
        if tensor is None:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_offsets(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Write ``module``'s offsets (its ``state_dict``, or ``state`` in its place) and its base
    fingerprint to ``path``."""
    state = module.state_dict() if state is None else state
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    header = {"format": FORMAT, "base_fingerprint": base_fingerprint(module), **(metadata or {})}
    save_file(tensors, os.fspath(path), metadata=header)


def read_offsets(module: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The offsets saved in ``path``, after checking they were trained around ``module``'s base."""
    with safe_open(os.fspath(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a tangent_kernels offsets file (format {header.get('format')!r})")
        expected, actual = header.get("base_fingerprint"), base_fingerprint(module)
        if expected != actual:
            raise BaseMismatchError(
                f"{path}: these offsets were trained around a base model with fingerprint {expected[:16]}…, "
                f"but this model's frozen weights have fingerprint {actual[:16]}…; load them onto the same "
                "pre-trained model, linearized the same way"
            )
        return {name: f.get_tensor(name) for name in f.keys()}


def load_offsets(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load offsets saved by ``save_offsets`` into ``module``; refuse a different base model."""
    module.load_state_dict(read_offsets(module, path), strict=strict)
