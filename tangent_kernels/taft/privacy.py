"""Differentially private training of the offsets ``dw``: per-sample clipping and Gaussian noise.

DP-SGD (Abadi et al. 2016) with Poisson subsampling: each sample joins a step's batch with
probability ``q``; each sample's gradient is clipped to ``max_grad_norm``; Gaussian noise of
standard deviation ``noise_multiplier · max_grad_norm`` is added to the sum, which is divided by
the expected batch size. The privacy spent is tracked by opacus's RDP accountant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings: noise standard deviation is ``noise_multiplier · max_grad_norm``."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self):
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError(f"PrivacyConfig: expected noise_multiplier >= 0, max_grad_norm > 0, 0 < delta < 1; got {self}")


def clipped_gradient_sum(model: nn.Module, params: list[Tensor], loss_fn, inputs: Tensor, targets: Tensor,
                         max_grad_norm: float) -> tuple[list[Tensor], Tensor]:  # fmt: skip
    """Sum over samples of each per-sample gradient clipped to ``max_grad_norm``, and the norms
    before clipping. Per-sample gradients come one sample at a time, so any backend serves."""
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(inputs.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]), params)
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        factor = (max_grad_norm / (norm + 1e-12)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t.add_(g, alpha=float(factor))
        norms.append(norm)
    return total, torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)


def add_noise(summed: list[Tensor], config: PrivacyConfig, expected_batch_size: float,
              generator: torch.Generator | None = None) -> list[Tensor]:  # fmt: skip
    """``(sum + N(0, (noise_multiplier · max_grad_norm)²)) / expected_batch_size`` per tensor."""
    std = config.noise_multiplier * config.max_grad_norm
    noisy = []
    for s in summed:
        noise = torch.randn(s.shape, generator=generator, dtype=s.dtype, device="cpu").to(s.device) * std
        noisy.append((s + noise) / expected_batch_size)
    return noisy


def poisson_batches(num_samples: int, sample_rate: float, steps: int, generator: torch.Generator):
    """``steps`` batches, each holding every sample independently with probability ``sample_rate``."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_samples, generator=generator) < sample_rate).flatten()
