"""Training the offsets of a linearized model: plain or differentially private, with progress."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_choice, check_int, check_real
from .loss import rsl_loss
from .privacy import PrivacyConfig, add_noise, clipped_gradient_sum, epsilon, poisson_batches

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("rsl", "ce")


@dataclass(frozen=True)
class TrainConfig:
    """How to train ``dw``: ``loss`` is ``"rsl"`` (with ``kappa``, ``alpha``) or ``"ce"``.

    Checked when made: ``epochs``, ``batch_size`` ints >= 1, ``seed`` an int >= 0 (a bool is not
    an int); ``lr``, ``kappa``, ``alpha`` finite and > 0, ``weight_decay`` finite and >= 0;
    ``optimizer`` one of ``OPTIMIZERS``, ``loss`` one of ``LOSSES``; ``privacy`` a
    ``PrivacyConfig`` or ``None``.
    """

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

    def __post_init__(self):
        check_int("TrainConfig.epochs", self.epochs, minimum=1)
        check_int("TrainConfig.batch_size", self.batch_size, minimum=1)
        check_int("TrainConfig.seed", self.seed, minimum=0)
        for name in ("lr", "kappa", "alpha"):
            check_real(f"TrainConfig.{name}", getattr(self, name), above=0.0)
        check_real("TrainConfig.weight_decay", self.weight_decay, at_least=0.0)
        check_choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("TrainConfig.loss", self.loss, LOSSES)
        if self.privacy is not None and not isinstance(self.privacy, PrivacyConfig):
            raise TypeError(f"TrainConfig.privacy: expected a PrivacyConfig or None, "
                            f"got {type(self.privacy).__name__}")  # fmt: skip

    def loss_fn(self):
        if self.loss == "rsl":
            return lambda logits, target: rsl_loss(logits, target, self.kappa, self.alpha)
        return torch.nn.functional.cross_entropy


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0
    epsilon: float | None = None  # privacy spent, (epsilon, delta)-DP, when trained privately
    delta: float | None = None


def _optimizer(config: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def check_dataset(model: nn.Module, inputs: Tensor, targets: Tensor, config: TrainConfig) -> Tensor:
    """Check ``(inputs, targets)`` against ``model`` and ``config`` before training; the targets,
    class indices as int64. One sample's forward gives the number of classes.

    ``inputs``: at least one sample, finite when floating. ``targets``: one per input, class
    indices in ``[0, classes)`` (any integer dtype but bool), or, for ``loss="ce"``, class
    probabilities ``(samples, classes)`` as ``cross_entropy`` takes them.
    """
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name}: expected one entry per sample along dimension 0, got a 0-d tensor")
    if len(inputs) == 0:
        raise ValueError("inputs: expected at least one sample, got 0")
    if len(targets) != len(inputs):
        raise ValueError(f"targets: expected {len(inputs)} targets (one per input), got {len(targets)}")
    if (inputs.is_floating_point() or inputs.is_complex()) and not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs: expected finite values, got NaN or infinity")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(inputs[:1].to(params[0].device))  # eval: no dropout draws from the global RNG
    model.train(was_training)
    if logits.dim() != 2:
        raise ValueError(f"model: expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    classes = logits.shape[1]
    if targets.is_floating_point() and config.loss == "ce":
        if targets.shape != (len(inputs), classes) or not bool(torch.isfinite(targets).all()):
            raise ValueError(f"targets: expected finite class probabilities of shape "
                             f"({len(inputs)}, {classes}), got {tuple(targets.shape)}")  # fmt: skip
        return targets
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        also = " or (for loss='ce') class probabilities" if config.loss == "ce" else ""
        raise TypeError(f"targets: expected class indices{also}, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets: expected ({len(inputs)},) class indices, "
                         f"got shape {tuple(targets.shape)}")  # fmt: skip
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise ValueError(f"targets: expected class indices in [0, {classes}) (the model's classes), "
                         f"got {low}..{high}")  # fmt: skip
    return targets.long()


def train(model: nn.Module, inputs: Tensor, targets: Tensor, config: TrainConfig, *,
          progress: bool | str = False) -> TrainResult:  # fmt: skip
    """Train ``model``'s trainable parameters (a linearized model's ``dw``) in place.

    With ``config.privacy`` it runs DP-SGD (Poisson batches of expected size ``batch_size``,
    per-sample clipping, Gaussian noise) and reports the ε spent at ``privacy.delta``. The data are
    checked first (``check_dataset``); a loss that turns NaN or infinite stops training with
    ``FloatingPointError`` rather than return broken offsets.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(progress, (bool, str)):
        raise TypeError(f"progress: expected a bool or a str (the bar's label), "
                        f"got {type(progress).__name__}")  # fmt: skip
    targets = check_dataset(model, inputs, targets, config)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    loss_fn, optimizer = config.loss_fn(), _optimizer(config, params)
    generator = torch.Generator().manual_seed(config.seed)
    num_samples = inputs.shape[0]
    steps = math.ceil(num_samples / config.batch_size)
    privacy = config.privacy
    sample_rate = min(1.0, config.batch_size / num_samples)
    result, start = TrainResult(), time.perf_counter()
    epochs = range(config.epochs)
    if progress:
        label = progress if isinstance(progress, str) else "train"
        epochs = tqdm(epochs, desc=label, unit="epoch", leave=False)
    model.train()
    for epoch in epochs:
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
        if not math.isfinite(result.losses[-1]):
            model.eval()
            raise FloatingPointError(f"train: the loss became {result.losses[-1]} in epoch {epoch}; the "
                                     "offsets diverged (try a smaller lr)")  # fmt: skip
    model.eval()
    result.seconds = time.perf_counter() - start
    if privacy:
        result.epsilon = epsilon(privacy.noise_multiplier, sample_rate, config.epochs * steps, privacy.delta)
        result.delta = privacy.delta
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
