"""How many bytes autograd keeps for the backward of a computation (activation memory)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """``(bytes, fn())``: the bytes of the distinct storages that autograd saves while ``fn`` runs.

    Storages of the tensors in ``exclude`` (typically the model's weights, which exist whether
    or not anything is saved) are not counted; a storage saved twice is counted once.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result
