"""Save and load only the offsets ``dw`` of a linearized model (safetensors), tied to its base.

Offsets are only meaningful around the function they were trained at, so beside them the file
stores a fingerprint of the base model, and loading onto another base is refused
(``BaseMismatchError``). The fingerprint (SHA-256) covers

- the architecture: every submodule's name and type (qualified name) and its configuration,
  the public attributes of simple types (numbers, strings, enums, dtypes, functions and
  ``functools.partial`` with their arguments, and containers of these): ``num_heads``, ``eps``,
  ``scale``, ``approximate``, pooling, dropout rates, ...;
- the frozen weights ``w0``: every buffer, by name, dtype, shape and bytes.

Left out, because they do not change the function: the trainable offsets, runtime choices
(``RUNTIME_ATTRIBUTES``: training mode, backend, timm's fused-attention and gradient-checkpointing
switches, in-place activations), provenance metadata (``METADATA_ATTRIBUTES``: timm's pretrained
configuration, feature info, initialisation recipe), private attributes (``_name``) and the
device. Other objects count by their type alone (a ``repr`` could carry a memory address). The
result is the same in every process; a library upgrade that renames a class or adds a setting
changes it (loading is then refused: re-save the offsets).

The file also stores a SHA-256 of the offsets themselves, so a corrupted file is refused too.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import numbers
import os
import re
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

FORMAT = "tangent_kernels.offsets/2"
OLD_FORMATS = ("tangent_kernels.offsets/1",)
FINGERPRINT_KEYS = ("base_fingerprint", "architecture_fingerprint", "offsets_fingerprint")
RESERVED_KEYS = ("format", *FINGERPRINT_KEYS)
RUNTIME_ATTRIBUTES = frozenset({"training", "backend", "fused_attn", "grad_checkpointing", "inplace"})
METADATA_ATTRIBUTES = frozenset(
    {"pretrained_cfg", "default_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "feature_info",
     "weight_init_mode", "fix_init"}
)  # fmt: skip
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_DEPTH = 8  # nesting of containers described; deeper values count by their type


class BaseMismatchError(ValueError):
    """Offsets trained around one base model were loaded onto another."""


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def describe(value, depth: int = 0) -> str:
    """A deterministic text for a configuration value: exact for simple types, the type otherwise."""
    if depth > _MAX_DEPTH:
        return f"<{_qualified(type(value))}>"
    if isinstance(value, enum.Enum):  # before str and int: enums may derive from them
        return f"{_qualified(type(value))}.{value.name}"
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, functools.partial):
        args = [describe(a, depth + 1) for a in value.args]
        keywords = [f"{k}={describe(v, depth + 1)}" for k, v in sorted(value.keywords.items())]
        return f"partial({describe(value.func, depth + 1)}, {', '.join(args + keywords)})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(describe(v, depth + 1) for v in value)) + "}"
    if isinstance(value, dict):
        items = sorted((describe(k, depth + 1), describe(v, depth + 1)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return _qualified(value)  # classes, functions, methods: by qualified name
    return f"<{_qualified(type(value))}>"


def architecture(module: nn.Module) -> list[str]:
    """One line per submodule (name and type) and per configuration attribute; see the module doc."""
    lines = []
    for name, sub in module.named_modules(remove_duplicate=False):
        lines.append(f"{name or '<root>'}: {_qualified(type(sub))}")
        for attr, value in sorted(vars(sub).items()):
            if attr.startswith("_") or attr in RUNTIME_ATTRIBUTES or attr in METADATA_ATTRIBUTES:
                continue
            lines.append(f"{name or '<root>'}.{attr} = {describe(value)}")
    return lines


def _tensors_digest(named: Iterable[tuple[str, torch.Tensor | None]]) -> str:
    """SHA-256 over name, dtype, shape and bytes of each tensor, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if tensor is None:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of ``architecture(module)``."""
    return hashlib.sha256("\n".join(architecture(module)).encode()).hexdigest()


def base_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of the base function: the architecture and the frozen weights ``w0`` (every
    buffer of ``module``, by name)."""
    weights = _tensors_digest(module.named_buffers(remove_duplicate=False))
    return hashlib.sha256(f"{architecture_fingerprint(module)}|{weights}".encode()).hexdigest()


def _check_offsets(module: nn.Module, offsets: dict[str, torch.Tensor], source: str, strict: bool) -> None:
    """Every offset has the dtype and shape of ``module``'s entry of that name; with ``strict``,
    the names are exactly ``module.state_dict()``'s."""
    expected = module.state_dict()
    if strict and set(offsets) != set(expected):
        missing, unexpected = sorted(set(expected) - set(offsets)), sorted(set(offsets) - set(expected))
        raise ValueError(f"{source}: expected the keys of the model's state_dict; missing {missing}, "
                         f"unexpected {unexpected}")  # fmt: skip
    for name, tensor in offsets.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{source}: {name}: expected a tensor, got {type(tensor).__name__}")
        like = expected.get(name, tensor)
        if (tensor.dtype, tensor.shape) != (like.dtype, like.shape):
            raise ValueError(f"{source}: {name}: expected dtype {like.dtype} and shape {tuple(like.shape)} "
                             f"(the model's), got {tensor.dtype} {tuple(tensor.shape)}")  # fmt: skip


def save_offsets(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Write ``module``'s offsets (its ``state_dict``, or ``state`` in its place: same keys, dtypes
    and shapes) and its base fingerprint to ``path``. ``metadata``: extra ``str -> str`` header
    entries; the keys ``RESERVED_KEYS`` are the library's."""
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(x, str) for kv in metadata.items() for x in kv):
        raise TypeError(f"metadata: expected a dict of str to str, got {metadata!r}")
    reserved = sorted(set(metadata) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"metadata: the keys {reserved} are reserved (the library writes "
                         f"{list(RESERVED_KEYS)})")  # fmt: skip
    state = module.state_dict() if state is None else state
    _check_offsets(module, state, "state", strict=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    header = {**metadata, "format": FORMAT, "base_fingerprint": base_fingerprint(module),
              "architecture_fingerprint": architecture_fingerprint(module),
              "offsets_fingerprint": _tensors_digest(tensors.items())}  # fmt: skip
    save_file(tensors, os.fspath(path), metadata=header)


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The header of an offsets file, checked: current format and well-formed fingerprints."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = dict(f.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    found = header.get("format")
    if found in OLD_FORMATS:
        raise ValueError(f"{path}: offsets file of format {found!r}, whose fingerprint covers the weights "
                         f"but not the architecture; this version reads {FORMAT!r}. If the model is the one "
                         "they were trained on, load the tensors with safetensors.torch.load_file and "
                         "model.load_state_dict, then save them again with save_offsets")  # fmt: skip
    if found != FORMAT:
        raise ValueError(f"{path}: not a tangent_kernels offsets file: header format expected {FORMAT!r}, "
                         f"got {found!r}")  # fmt: skip
    for key in FINGERPRINT_KEYS:
        if not _HEX_DIGEST.fullmatch(header.get(key) or ""):
            raise ValueError(f"{path}: malformed header: {key} expected 64 hex digits, "
                             f"got {header.get(key)!r}")  # fmt: skip
    return header


def read_offsets(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, torch.Tensor]:
    """The offsets saved in ``path``, after checking they were trained around ``module``'s base, are
    intact, and match ``module``'s dtypes and shapes (with ``strict``, its keys too)."""
    header = read_header(path)
    saved, actual = header["base_fingerprint"], base_fingerprint(module)
    if saved != actual:
        what = "frozen weights"
        if header["architecture_fingerprint"] != architecture_fingerprint(module):
            what = ("architecture (submodule types or settings such as num_heads, eps, activation; compare "
                    "tangent_kernels.checkpoint.architecture(model))")  # fmt: skip
        raise BaseMismatchError(
            f"{path}: these offsets were trained around a base model with fingerprint {saved[:16]}…, but "
            f"this model's fingerprint is {actual[:16]}… (its {what} differ); load them onto the same "
            "pre-trained model, linearized the same way"
        )
    with safe_open(os.fspath(path), framework="pt") as f:
        offsets = {name: f.get_tensor(name) for name in f.keys()}
    if _tensors_digest(offsets.items()) != header["offsets_fingerprint"]:
        raise ValueError(f"{path}: corrupted: the offsets do not match the checksum saved with them")
    _check_offsets(module, offsets, os.fspath(path), strict)
    return offsets


def load_offsets(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> _IncompatibleKeys:
    """Load offsets saved by ``save_offsets`` into ``module``; refuse a different base model or a
    dtype or shape other than the module's. Returns ``load_state_dict``'s missing and unexpected
    keys (with ``strict``, any of them raise, as in ``load_state_dict``)."""
    return module.load_state_dict(read_offsets(module, path, strict=False), strict=strict)
