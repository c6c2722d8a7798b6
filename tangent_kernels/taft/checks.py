"""Argument checks of the TAFT toolkit: each error names the argument, what was expected and what came."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (a bool is not one), at least ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, above: float | None = None, at_least: float | None = None,
               below: float | None = None) -> float:  # fmt: skip
    """``value`` as a finite ``float`` (a bool is not a number), within the given bounds."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    bounds = [f"> {above}" if above is not None else None, f">= {at_least}" if at_least is not None else None,
              f"< {below}" if below is not None else None]  # fmt: skip
    inside = ((above is None or number > above) and (at_least is None or number >= at_least)
              and (below is None or number < below))  # fmt: skip
    if not (math.isfinite(number) and inside):
        expected = " ".join(["a finite number", " and ".join(b for b in bounds if b)]).strip()
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_indices(name: str, value, limit: int | None = None) -> Tensor:
    """Sample indices as a new 1-D ``int64`` CPU tensor: integers (not a boolean mask, not floats),
    non-negative (``-1`` would name the last sample, which another shard may hold), unique, and
    below ``limit`` (the number of samples) when it is known."""
    if isinstance(value, Tensor) or hasattr(value, "__array__") and hasattr(value, "dtype"):
        indices = torch.as_tensor(value)
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{name}: expected integer sample indices, got dtype {indices.dtype} "
                            "(a boolean mask or float values are not indices)")  # fmt: skip
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        wrong = [v for v in value if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
        if wrong:
            raise TypeError(f"{name}: expected integer sample indices, got {wrong[0]!r} "
                            f"({type(wrong[0]).__name__})")  # fmt: skip
        if any(not 0 <= v < 2**63 for v in value):
            raise ValueError(f"{name}: expected non-negative int64 sample indices, "
                             f"got {min(value)}..{max(value)}")  # fmt: skip
        indices = torch.tensor([int(v) for v in value], dtype=torch.long)
    else:
        raise TypeError(f"{name}: expected a sequence or tensor of sample indices, "
                        f"got {type(value).__name__}")  # fmt: skip
    if indices.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D collection of sample indices, "
                         f"got shape {tuple(indices.shape)}")  # fmt: skip
    indices = indices.detach().to("cpu", torch.long).clone()
    if len(indices) and int(indices.min()) < 0:
        raise ValueError(f"{name}: expected non-negative sample indices, got {int(indices.min())}")
    if limit is not None and len(indices) and int(indices.max()) >= limit:
        raise ValueError(f"{name}: expected sample indices below {limit} (the number of samples), "
                         f"got {int(indices.max())}")  # fmt: skip
    unique, counts = indices.unique(return_counts=True)
    if len(unique) != len(indices):
        raise ValueError(f"{name}: expected unique sample indices, "
                         f"got repeated {unique[counts > 1][:5].tolist()}")  # fmt: skip
    return indices


def check_disjoint(name: str, groups: Sequence[Tensor]) -> None:
    """No sample index in two of ``groups`` (each already unique)."""
    indices = torch.cat(list(groups)) if groups else torch.zeros(0, dtype=torch.long)
    unique, counts = indices.unique(return_counts=True)
    if (counts > 1).any():
        index = int(unique[counts > 1][0])
        holders = [i for i, group in enumerate(groups) if bool((group == index).any())]
        raise ValueError(f"{name}: expected disjoint shards, got sample {index} in shards {holders}")


def floats_as_declared(config) -> None:
    """A frozen dataclass's ``float`` fields given as ints made floats (``lr=1`` is ``lr=1.0``:
    one setting, one text in a recipe); called after the checks, which refuse bools."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, f.name, float(value))
