"""Differentially private training of the offsets ``dw``: per-sample clipping and Gaussian noise.

DP-SGD (Abadi et al. 2016) with Poisson subsampling: each sample joins a step's batch with
probability ``q``; each sample's gradient is clipped to ``max_grad_norm``; Gaussian noise of
standard deviation ``noise_multiplier · max_grad_norm`` is added to the sum, which is divided by
the expected batch size. The privacy spent is computed by opacus's RDP accountant (``epsilon``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import check_int, check_real, floats_as_declared

# The accountant's domain. Its fractional-order series never ends once the noise is so small that
# its square underflows (about 1e-154), overflows for noise above about 1e154, and takes seconds
# near sample rate 1/2 as the noise grows (3 s at 1e4, 6 s at 1e6). ε only grows as the noise
# shrinks, so outside the domain a valid bound is reported instead: ε = inf below
# MIN_ACCOUNTED_NOISE (where ε > 1e11 already), the ε of noise MAX_ACCOUNTED_NOISE above it (where
# ε sits at the floor the accountant's orders allow, about 0.1 at delta = 1e-5, for any practical
# number of steps). Zero steps spend ε = 0; the number of steps only scales the RDP, at no cost.
MIN_ACCOUNTED_NOISE = 1e-6
MAX_ACCOUNTED_NOISE = 1e4


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings: noise standard deviation is ``noise_multiplier · max_grad_norm``.

    ``noise_multiplier``: finite, >= 0 (0 clips without noise: ε = inf); ``max_grad_norm``: finite,
    > 0, with a finite product (the noise's standard deviation); ``delta``: finite, in (0, 1).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self):
        check_real("PrivacyConfig.noise_multiplier", self.noise_multiplier, at_least=0.0)
        check_real("PrivacyConfig.max_grad_norm", self.max_grad_norm, above=0.0)
        check_real("PrivacyConfig.delta", self.delta, above=0.0, below=1.0)
        if not math.isfinite(float(self.noise_multiplier) * float(self.max_grad_norm)):
            raise ValueError(f"PrivacyConfig.noise_multiplier: expected a finite noise standard deviation "
                             f"noise_multiplier · max_grad_norm, "
                             f"got {self.noise_multiplier} · {self.max_grad_norm}")  # fmt: skip
        floats_as_declared(self)


def require_accountant() -> None:
    """Refuse a private training before it starts when opacus (the accountant) is not installed:
    it would fail once every epoch had run."""
    if importlib.util.find_spec("opacus") is None:
        raise ModuleNotFoundError("privacy: the privacy accountant needs opacus, which is not installed; "
                                  "pip install 'tangent-kernels[taft]' (or opacus)")  # fmt: skip


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate``, at ``delta``: opacus's
    RDP accountant at its default orders, held to its domain (see ``MIN_ACCOUNTED_NOISE``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    noise_multiplier = check_real("noise_multiplier", noise_multiplier, at_least=0.0)
    sample_rate = check_real("sample_rate", sample_rate, above=0.0)
    if sample_rate > 1.0:
        raise ValueError(f"sample_rate: expected a number in (0, 1], got {sample_rate!r}")
    steps = check_int("steps", steps, minimum=0)
    delta = check_real("delta", delta, above=0.0, below=1.0)
    if steps == 0:
        return 0.0
    if noise_multiplier < MIN_ACCOUNTED_NOISE or steps > 1e300:
        return math.inf
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=min(noise_multiplier, MAX_ACCOUNTED_NOISE), steps=steps,
                      orders=orders)  # fmt: skip
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def clipped_gradient_sum(model: nn.Module, params: list[Tensor], loss_fn, inputs: Tensor, targets: Tensor,
                         max_grad_norm: float) -> tuple[list[Tensor], Tensor]:  # fmt: skip
    """Sum over samples of each per-sample gradient clipped to ``max_grad_norm``, and the norms
    before clipping. Per-sample gradients come one sample at a time, so any backend serves."""
    check_real("max_grad_norm", max_grad_norm, above=0.0)
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
    if not isinstance(config, PrivacyConfig):
        raise TypeError(f"config: expected a PrivacyConfig, got {type(config).__name__}")
    if isinstance(summed, Tensor) or not all(isinstance(s, Tensor) for s in summed):
        raise TypeError("summed: expected a list of gradient tensors (one per parameter), got "
                        f"{type(summed).__name__}")  # fmt: skip
    check_real("expected_batch_size", expected_batch_size, above=0.0)
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
