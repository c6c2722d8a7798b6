"""The rescaled square loss (RSL) of TAFT (Hui & Belkin's rescaled square loss, as in the paper's code)."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_real


def rsl_loss(logits: Tensor, target: Tensor, kappa: float = 15.0, alpha: float = 1.0) -> Tensor:
    """``(alpha · (f_y − kappa)² + Σ_{i≠y} f_i²) / K``, averaged over the batch.

    ``logits``: ``(batch, K)``; ``target``: ``(batch,)`` class indices. A square loss keeps the
    linearized model's objective convex in ``dw``.
    """
    check_real("kappa", kappa, above=0.0)
    check_real("alpha", alpha, above=0.0)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (batch, classes), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target: expected ({logits.shape[0]},) class indices, "
                         f"got {tuple(target.shape)} {target.dtype}")  # fmt: skip
    classes = logits.shape[1]
    one_hot = torch.nn.functional.one_hot(target.long(), classes).to(logits.dtype)
    error = logits - kappa * one_hot
    weight = 1.0 + (alpha - 1.0) * one_hot
    return (weight * error * error).sum(dim=1).div(classes).mean()
