"""Training the offsets of a linearized model: plain or differentially private, with progress."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .loss import rsl_loss
from .privacy import PrivacyConfig, add_noise, clipped_gradient_sum, poisson_batches


@dataclass(frozen=True)
class TrainConfig:
    """How to train ``dw``: ``loss`` is ``"rsl"`` (with ``kappa``, ``alpha``) or ``"ce"``."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    loss: str = "rsl"
    kappa: float = 15.0
    alpha: float = 1.0
    seed: int = 0
    privacy: PrivacyConfig | None = None

    def loss_fn(self):
        if self.loss == "rsl":
            return lambda logits, target: rsl_loss(logits, target, self.kappa, self.alpha)
        if self.loss == "ce":
            return torch.nn.functional.cross_entropy
        raise ValueError(f"loss: expected 'rsl' or 'ce', got {self.loss!r}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0
    epsilon: float | None = None  # privacy spent, (epsilon, delta)-DP, when trained privately
    delta: float | None = None


def _optimizer(config: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {config.optimizer!r}")


def train(model: nn.Module, inputs: Tensor, targets: Tensor, config: TrainConfig, *, progress: bool | str = False) -> TrainResult:
    """Train ``model``'s trainable parameters (a linearized model's ``dw``) in place.

    With ``config.privacy`` it runs DP-SGD (Poisson batches of expected size ``batch_size``,
    per-sample clipping, Gaussian noise) and reports the ε spent at ``privacy.delta``.
    """
    from opacus.accountants import RDPAccountant

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    device = params[0].device
    loss_fn, optimizer = config.loss_fn(), _optimizer(config, params)
    generator = torch.Generator().manual_seed(config.seed)
    num_samples = inputs.shape[0]
    steps = math.ceil(num_samples / config.batch_size)
    privacy = config.privacy
    accountant = RDPAccountant() if privacy else None
    sample_rate = min(1.0, config.batch_size / num_samples)
    result, start = TrainResult(), time.perf_counter()
    epochs = range(config.epochs)
    if progress:
        epochs = tqdm(epochs, desc=progress if isinstance(progress, str) else "train", unit="epoch", leave=False)
    model.train()
    for _ in epochs:
        if privacy:
            batches = poisson_batches(num_samples, sample_rate, steps, generator)
        else:
            batches = torch.randperm(num_samples, generator=generator).split(config.batch_size)
        epoch_loss, seen = 0.0, 0
        for index in batches:
            x, y = inputs[index].to(device), targets[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            if privacy:
                summed, _ = clipped_gradient_sum(model, params, loss_fn, x, y, privacy.max_grad_norm)
                for p, g in zip(params, add_noise(summed, privacy, sample_rate * num_samples, generator)):
                    p.grad = g
                accountant.step(noise_multiplier=privacy.noise_multiplier, sample_rate=sample_rate)
                if len(index):
                    with torch.no_grad():
                        epoch_loss += float(loss_fn(model(x), y)) * len(index)
            else:
                loss = loss_fn(model(x), y)
                loss.backward()
                epoch_loss += float(loss.detach()) * len(index)
            seen += len(index)
            optimizer.step()
        result.losses.append(epoch_loss / max(seen, 1))
    model.eval()
    result.seconds = time.perf_counter() - start
    if privacy:
        result.epsilon, result.delta = accountant.get_epsilon(privacy.delta), privacy.delta
    return result


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, targets)``."""
    model.eval()
    device = next(iter(model.buffers()), next(iter(model.parameters()))).device
    correct = 0
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
    return correct / max(len(targets), 1)
