"""Training the offsets of a linearized model: plain or differentially private, from tensors, a
dataset or a DataLoader, on the CPU or CUDA (with bf16/fp16 autocast), resumable, with progress."""

from __future__ import annotations

import bisect
import contextlib
import math
import time
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..checkpoint import base_fingerprint
from . import distributed, resume
from .checks import check_choice, check_int, check_real, floats_as_declared
from .data import EpochBatches, Source, batches, identity, known_targets, source
from .loss import rsl_loss
from .privacy import PrivacyConfig, add_noise, clipped_gradient_sum, epsilon, require_accountant

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("rsl", "ce")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# How data are read: no effect on the result, except that a dataset drawing random augmentation
# draws it in each DataLoader worker's stream (so with another number of workers, other draws).
LOADING = ("num_workers", "pin_memory", "prefetch_factor")
NOISE_STREAM, WORKERS_STREAM = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019  # seeds config.seed + these (mod 2^64)


@dataclass(frozen=True)
class TrainConfig:
    """How to train ``dw``: ``loss`` is ``"rsl"`` (with ``kappa``, ``alpha``) or ``"ce"``.

    The paper's recipe: ``dw_penalty`` adds ``dw_penalty · ‖dw‖`` (the norm, not squared, as the
    paper's code with 1e-5); the learning rate is multiplied by ``lr_decay`` at each epoch of
    ``lr_milestones``; ``eval_mode`` trains with the model in eval mode (dropout off).
    ``precision``: ``"fp32"``, or CUDA autocast in ``"bf16"`` or ``"fp16"`` (with a gradient
    scaler). ``num_workers``, ``pin_memory``, ``prefetch_factor``: the ``DataLoader``'s.

    Checked when made: ``epochs``, ``batch_size`` ints >= 1, ``seed`` an int >= 0 (a bool is not
    an int); ``lr``, ``kappa``, ``alpha`` finite and > 0, ``weight_decay`` and ``dw_penalty``
    finite and >= 0, ``lr_decay`` in (0, 1], ``lr_milestones`` increasing ints in 1..epochs-1;
    ``optimizer`` one of ``OPTIMIZERS``, ``loss`` one of ``LOSSES``, ``precision`` one of
    ``PRECISIONS``; ``privacy`` a ``PrivacyConfig`` or ``None`` (not with fp16).
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
    dw_penalty: float = 0.0
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    eval_mode: bool = False
    precision: str = "fp32"
    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int | None = None

    def __post_init__(self):
        check_int("TrainConfig.epochs", self.epochs, minimum=1)
        check_int("TrainConfig.batch_size", self.batch_size, minimum=1)
        check_int("TrainConfig.seed", self.seed, minimum=0)
        check_int("TrainConfig.num_workers", self.num_workers, minimum=0)
        if self.prefetch_factor is not None:
            check_int("TrainConfig.prefetch_factor", self.prefetch_factor, minimum=1)
            if self.num_workers == 0:  # (torch's DataLoader refuses it too, but only when it is built)
                raise ValueError("TrainConfig.prefetch_factor: applies to DataLoader worker processes; expected "
                                 "num_workers > 0 with it, or prefetch_factor=None")  # fmt: skip
        for name in ("lr", "kappa", "alpha"):
            check_real(f"TrainConfig.{name}", getattr(self, name), above=0.0)
        for name in ("weight_decay", "dw_penalty"):
            check_real(f"TrainConfig.{name}", getattr(self, name), at_least=0.0)
        if check_real("TrainConfig.lr_decay", self.lr_decay, above=0.0) > 1.0:
            raise ValueError(f"TrainConfig.lr_decay: expected a factor in (0, 1], got {self.lr_decay!r}")
        milestones = self.lr_milestones
        ints = isinstance(milestones, tuple) and all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
        if not ints or list(milestones) != sorted(set(milestones)) or not all(0 < m < self.epochs for m in milestones):
            raise ValueError(f"TrainConfig.lr_milestones: expected a tuple of increasing epochs in "
                             f"1..{self.epochs - 1}, got {milestones!r}")  # fmt: skip
        for name in ("eval_mode", "pin_memory"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        check_choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("TrainConfig.loss", self.loss, LOSSES)
        check_choice("TrainConfig.precision", self.precision, PRECISIONS)
        if self.privacy is not None and not isinstance(self.privacy, PrivacyConfig):
            raise TypeError(f"TrainConfig.privacy: expected a PrivacyConfig or None, "
                            f"got {type(self.privacy).__name__}")  # fmt: skip
        if self.privacy is not None and self.precision == "fp16":
            raise ValueError("TrainConfig.precision: 'fp16' scales the loss, which per-sample clipping of DP-SGD "
                             "(privacy) does not undo; expected 'fp32' or 'bf16' with privacy")  # fmt: skip
        floats_as_declared(self)

    def loss_fn(self):
        if self.loss == "rsl":
            return lambda logits, target: rsl_loss(logits, target, self.kappa, self.alpha)
        return torch.nn.functional.cross_entropy

    def run(self) -> str:
        """The settings that change what is learned (loading settings left out)."""
        return repr({f.name: getattr(self, f.name) for f in fields(self) if f.name not in LOADING})


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0  # this call's training time
    epsilon: float | None = None  # privacy spent, (epsilon, delta)-DP, when trained privately
    delta: float | None = None
    samples: int = 0  # samples this process trained on in this call
    loading_seconds: float = 0.0  # of ``seconds``, spent waiting for the next batch
    rank: int = 0  # the torch.distributed rank that trained

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def _optimizer(config: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def _schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Step decay: ``lr · lr_decay^k`` after the ``k``-th milestone epoch."""
    milestones, decay = config.lr_milestones, config.lr_decay
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: decay ** bisect.bisect_right(milestones, epoch))


def training_autocast(config: TrainConfig, device: torch.device):
    """CUDA autocast at ``config.precision`` (nothing for fp32); refused off CUDA."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"TrainConfig.precision: {config.precision!r} is CUDA autocast; the model is on "
                         f"{device}, expected 'fp32' there")  # fmt: skip
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[config.precision])


def model_classes(model: nn.Module, sample: Tensor) -> int:
    """The number of classes ``model`` outputs, from one sample (in eval mode: no dropout draws
    from the global RNG)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(sample.to(params[0].device))
    model.train(was_training)
    if logits.dim() != 2:
        raise ValueError(f"model: expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    return logits.shape[1]


def check_inputs(inputs: Tensor) -> None:
    if (inputs.is_floating_point() or inputs.is_complex()) and not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs: expected finite values, got NaN or infinity")


def check_targets(targets: Tensor, classes: int, config: TrainConfig) -> Tensor:
    """Targets as the loss takes them: class indices in ``[0, classes)`` (any integer dtype but
    bool) as int64, or, for ``loss="ce"``, class probabilities ``(samples, classes)``."""
    if targets.is_floating_point() and config.loss == "ce":
        if targets.shape != (len(targets), classes) or not bool(torch.isfinite(targets).all()):
            raise ValueError(f"targets: expected finite class probabilities of shape "
                             f"({len(targets)}, {classes}), got {tuple(targets.shape)}")  # fmt: skip
        return targets
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        also = " or (for loss='ce') class probabilities" if config.loss == "ce" else ""
        raise TypeError(f"targets: expected class indices{also}, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets: expected ({len(targets)},) class indices, "
                         f"got shape {tuple(targets.shape)}")  # fmt: skip
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise ValueError(f"targets: expected class indices in [0, {classes}) (the model's classes), "
                         f"got {low}..{high}")  # fmt: skip
    return targets.long()


def check_dataset(model: nn.Module, inputs: Tensor, targets: Tensor, config: TrainConfig) -> Tensor:
    """Check ``(inputs, targets)`` tensors against ``model`` and ``config`` before training; the
    targets, class indices as int64. One sample's forward gives the number of classes.

    ``inputs``: at least one sample, finite when floating. ``targets``: one per input, see
    ``check_targets``.
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
    check_inputs(inputs)
    return check_targets(targets, model_classes(model, inputs[:1]), config)


def check_source(model: nn.Module, inputs, targets, config: TrainConfig) -> tuple[Source, int, bool]:
    """Check training data up front as far as it can be without reading every sample: tensors
    wholly (``check_dataset``); a dataset's length, its first sample's form, and every target where
    the dataset keeps them (``data.known_targets``). The data as a ``Source``, the number of
    classes, and whether batches still need checking as they come."""
    if isinstance(inputs, Source):
        data = inputs
    else:
        if isinstance(inputs, Tensor):
            targets = check_dataset(model, inputs, targets, config)
        data = source(inputs, targets, config.num_workers, config.pin_memory, config.prefetch_factor)
        if isinstance(inputs, Tensor):
            return data, model_classes(model, inputs[:1]), False
    dataset = data.dataset
    if not data.iterable and len(dataset) == 0:
        raise ValueError("inputs: expected at least one sample, got an empty dataset")
    sample = next(iter(dataset), None) if data.iterable else dataset[0]
    if data.iterable and sample is None:
        raise ValueError("inputs: expected at least one sample, got an iterable dataset that yields none")
    batch, cause = None, None
    try:  # one sample as a batch, through the loader's collate_fn (which may build (inputs, targets))
        batch = (data.loader.get("collate_fn") or default_collate)([sample])
    except (TypeError, RuntimeError) as error:
        cause = error
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        form = type(sample[0]).__name__ if isinstance(sample, (tuple, list)) and sample else type(sample).__name__
        raise TypeError(f"inputs: expected samples (input tensor, target), got {form}; give an image dataset "
                        "the model's transform (taft.data.transform(model)), or a DataLoader a collate_fn "
                        "that makes (inputs, targets) batches") from cause  # fmt: skip
    classes = model_classes(model, batch[0])
    known = known_targets(dataset)
    if known is not None:
        check_targets(known, classes, config)
    return data, classes, True


def _penalty(config: TrainConfig, params: list[Tensor]) -> Tensor | float:
    """``dw_penalty · ‖dw‖`` (its gradient is 0 at dw = 0, where the norm has none)."""
    if not config.dw_penalty:
        return 0.0
    return config.dw_penalty * torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in params]))


def _private_gradients(model: nn.Module, params: list[Tensor], config: TrainConfig, loss_fn, x: Tensor | None,
                       y: Tensor | None, expected_batch: float, generator: torch.Generator) -> float:  # fmt: skip
    """Set ``p.grad`` to DP-SGD's gradient of one Poisson batch (``None`` when empty): per-sample
    clipped, summed, noised, over the expected batch size, plus the penalty's (data-free)
    gradient. Returns the batch's summed loss."""
    privacy = config.privacy
    if y is None:
        summed = [torch.zeros_like(p) for p in params]
    else:
        summed, _ = clipped_gradient_sum(model, params, loss_fn, x, y, privacy.max_grad_norm)
    noisy = add_noise(summed, privacy, expected_batch, generator)
    if config.dw_penalty:
        noisy = [g + h for g, h in zip(noisy, torch.autograd.grad(_penalty(config, params), params))]
    for p, g in zip(params, noisy):
        p.grad = g
    if y is None:
        return 0.0
    with torch.no_grad():
        return float(loss_fn(model(x).float(), y)) * len(y)


def train(model: nn.Module, inputs, targets: Tensor | None = None, config: TrainConfig = TrainConfig(), *,
          progress: bool | str = False, checkpoint: str | None = None, on_epoch=None,
          data_parallel: bool = False) -> TrainResult:  # fmt: skip
    """Train ``model``'s trainable parameters (a linearized model's ``dw``) in place.

    Data: ``inputs``/``targets`` tensors, or ``inputs`` a ``Dataset`` of ``(input, target)``
    samples (map-style, or iterable: read in stream order), or a ``DataLoader`` (its dataset and
    loading settings; TAFT draws the batches: ``config.batch_size``, seeded). The data are checked
    first (``check_source``), and batches of a dataset as they come.

    With ``config.privacy`` it runs DP-SGD (Poisson batches of expected size ``batch_size``,
    per-sample clipping, Gaussian noise) and reports the ε spent at ``privacy.delta``. A loss that
    turns NaN or infinite stops training with ``FloatingPointError`` rather than return broken
    offsets. ``checkpoint``: a file written after every epoch and resumed from when present (see
    ``taft.resume``). ``on_epoch(epoch, result)`` is called after each epoch's checkpoint.
    ``data_parallel``: train on this rank's part of every batch under ``DistributedDataParallel``
    (every rank of the process group calls ``train`` alike; the result is the same as one
    process's, on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if config.privacy is not None:
        require_accountant()
    if not isinstance(progress, (bool, str)):
        raise TypeError(f"progress: expected a bool or a str (the bar's label), "
                        f"got {type(progress).__name__}")  # fmt: skip
    data, classes, check_batches = check_source(model, inputs, targets, config)
    if data.batch_size not in (None, config.batch_size):
        raise ValueError(f"inputs: a DataLoader with batch_size {data.batch_size}, but "
                         f"config.batch_size is {config.batch_size} (TAFT draws the batches itself)")  # fmt: skip
    privacy = config.privacy
    if (privacy or data_parallel) and data.iterable:
        raise TypeError("inputs: DP-SGD and data-parallel training draw batches by sample index; expected a "
                        "map-style Dataset, got an IterableDataset")  # fmt: skip
    if privacy and data_parallel:
        raise ValueError("data_parallel: DP-SGD under DDP is not supported (its accountant would need the "
                         "global Poisson batch); train private shards one per process instead "
                         "(data_parallel=False)")  # fmt: skip
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    device = params[0].device
    autocast = training_autocast(config, device)
    net, part = distributed.data_parallel(model, device) if data_parallel else (model, (0, 1))
    num_samples = None if data.iterable else len(data)
    if data_parallel and (config.batch_size < part[1] or 0 < num_samples % config.batch_size < part[1]):
        raise ValueError(f"TrainConfig.batch_size: every batch must give each of the {part[1]} ranks a sample; "
                         f"{num_samples} samples in batches of {config.batch_size} do not")  # fmt: skip
    loss_fn, optimizer = config.loss_fn(), _optimizer(config, params)
    scheduler = _schedule(config, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
    # batches, the workers' seeds and DP noise from separate streams, so that none depends on how
    # far ahead the DataLoader's workers draw batches
    generators = {name: torch.Generator().manual_seed((config.seed + offset) % 2**64)
                  for name, offset in (("batches", 0), ("workers", WORKERS_STREAM), ("noise", NOISE_STREAM))}
    steps = None if data.iterable else math.ceil(num_samples / config.batch_size)
    sample_rate = None if data.iterable else min(1.0, config.batch_size / num_samples)
    run = None
    if checkpoint is not None:  # (the base's fingerprint hashes its weights: only where it is checked)
        shapes = [(n, tuple(p.shape)) for n, p in named.items()]
        run = f"{config.run()}|{identity(data.dataset)}|{shapes}|{base_fingerprint(model)}"
    state = (named, optimizer, scheduler, scaler, generators)
    done, losses = resume.restore(checkpoint, run, *state, device)
    result = TrainResult(losses=losses, rank=distributed.rank_and_world()[0])
    start = time.perf_counter()
    label = progress if isinstance(progress, str) else "train"
    sampler = None if data.iterable else EpochBatches(num_samples, config.batch_size, generators["batches"],
                                                      sample_rate if privacy else None, part)  # fmt: skip
    loader = batches(data, sampler, config.batch_size, generators["workers"])  # new batches each epoch
    for epoch in range(done, config.epochs):
        model.train(not config.eval_mode)
        bar = tqdm(total=num_samples, desc=f"{label} {epoch + 1}/{config.epochs}", unit="img", unit_scale=True,
                   leave=False, disable=not progress)  # fmt: skip
        epoch_loss = seen = 0.0
        waited = time.perf_counter()
        for batch in loader:
            result.loading_seconds += time.perf_counter() - waited
            x, y = (None, None) if batch is None else batch
            if y is not None:
                if check_batches:
                    check_inputs(x)
                    y = check_targets(y, classes, config)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            count = 0 if y is None else len(y)
            optimizer.zero_grad(set_to_none=True)
            if privacy:
                with autocast:
                    epoch_loss += _private_gradients(model, params, config, loss_fn, x, y, sample_rate * num_samples,
                                                     generators["noise"])  # fmt: skip
            else:
                share = count / distributed.all_sum([count], device)[0] * part[1] if data_parallel else 1.0
                with autocast:
                    loss = loss_fn(net(x).float(), y)
                scaler.scale(loss * share + _penalty(config, params)).backward()
                epoch_loss += float(loss.detach()) * count
            seen += count
            scaler.step(optimizer)
            scaler.update()
            bar.update(count)
            result.samples += count
            waited = time.perf_counter()
        bar.close()
        scheduler.step()
        epoch_loss, seen = distributed.all_sum([epoch_loss, seen], device) if data_parallel else (epoch_loss, seen)
        result.losses.append(epoch_loss / max(seen, 1))
        if not math.isfinite(result.losses[-1]):
            model.eval()
            raise FloatingPointError(f"train: the loss became {result.losses[-1]} in epoch {epoch}; the "
                                     "offsets diverged (try a smaller lr)")  # fmt: skip
        if checkpoint is not None and part[0] == 0:
            resume.save(checkpoint, epoch, run, *state, result.losses, device)
        if on_epoch is not None:
            on_epoch(epoch, result)
    model.eval()
    result.seconds = time.perf_counter() - start
    if privacy:
        result.epsilon = epsilon(privacy.noise_multiplier, sample_rate, config.epochs * steps, privacy.delta)
        result.delta = privacy.delta
    return result


@torch.no_grad()
def accuracy(model: nn.Module, inputs, targets: Tensor | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, targets)`` tensors, a ``Dataset`` of
    ``(input, class)`` samples, or a ``DataLoader`` (its batches as they come); NaN for no samples."""
    model.eval()
    device = next(iter(model.buffers()), next(iter(model.parameters()))).device
    if isinstance(inputs, torch.utils.data.DataLoader):
        loader = inputs
    else:
        loader = batches(source(inputs, targets), None, check_int("batch_size", batch_size, minimum=1))
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
        total += len(y)
    return correct / total if total else math.nan  # (no samples: undefined, not 0)
