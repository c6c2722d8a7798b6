"""Data for TAFT: tensors, datasets or DataLoaders, read in batches by ``torch.utils.data.DataLoader``.

Training draws its own batches (a seeded permutation per epoch, or Poisson batches for DP-SGD)
and hands them to a ``DataLoader`` as its ``batch_sampler``, so runs are reproducible and
resumable whatever the source, and workers, pinned memory and prefetch are the ``DataLoader``'s.
A shard is a ``Subset`` (an index set) of the dataset, never a copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset, default_collate

from .privacy import poisson_batches

# DataLoader settings that say how to load, not what is learned: taken from a DataLoader given as data.
LOADER_SETTINGS = ("num_workers", "pin_memory", "prefetch_factor", "collate_fn", "worker_init_fn",
                   "multiprocessing_context", "persistent_workers", "timeout")  # fmt: skip


@dataclass
class Source:
    """Checked training or evaluation data: the dataset and how to load it."""

    dataset: Dataset
    loader: dict  # DataLoader keyword arguments (LOADER_SETTINGS)
    batch_size: int | None = None  # a given DataLoader's, which training must agree with

    @property
    def iterable(self) -> bool:
        return isinstance(self.dataset, IterableDataset)

    def __len__(self) -> int:
        if self.iterable:
            raise TypeError("inputs: an IterableDataset has no length (give a map-style Dataset)")
        return len(self.dataset)

    def subset(self, indices: Tensor) -> Source:
        """The samples at ``indices`` (an index set over this dataset, no copy)."""
        return Source(Subset(self.dataset, indices.tolist()), self.loader, self.batch_size)


def source(inputs, targets, num_workers: int = 0, pin_memory: bool = False,
           prefetch_factor: int | None = None) -> Source:  # fmt: skip
    """``(inputs, targets)`` tensors, a ``Dataset`` of ``(input, target)`` samples, or a
    ``DataLoader`` (its dataset and loading settings) as a ``Source``. ``targets`` goes with
    tensors only."""
    settings = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                    prefetch_factor=prefetch_factor if num_workers else None)  # fmt: skip
    if isinstance(inputs, Tensor):
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets: expected a torch.Tensor with tensor inputs, got {type(targets).__name__}")
        return Source(TensorDataset(inputs, targets), settings)
    if targets is not None:
        raise TypeError(f"targets: expected None with a {type(inputs).__name__} (its samples carry their "
                        f"targets), got {type(targets).__name__}")  # fmt: skip
    if isinstance(inputs, DataLoader):
        return Source(inputs.dataset, {name: getattr(inputs, name) for name in LOADER_SETTINGS}, inputs.batch_size)
    if isinstance(inputs, Dataset):
        return Source(inputs, settings)
    raise TypeError(f"inputs: expected a tensor, a torch.utils.data.Dataset or a DataLoader, "
                    f"got {type(inputs).__name__}")  # fmt: skip


def known_targets(dataset: Dataset) -> Tensor | None:
    """Every target of ``dataset`` without loading a sample, where it keeps them (``TensorDataset``,
    torchvision's ``ImageFolder``/``DatasetFolder``, a ``Subset`` of these); else ``None``."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = known_targets(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, (list, Tensor)) and not isinstance(dataset, IterableDataset):
        return torch.as_tensor(targets)
    return None


def identity(dataset: Dataset) -> str:
    """A short digest of which samples ``dataset`` is, so a checkpoint is resumed only on the data it
    was trained on: its length, a ``Subset``'s indices, and what can be read without loading every
    sample: a ``TensorDataset``'s tensors, an ``ImageFolder``'s file list and labels, or else the
    labels where the dataset holds them (``known_targets``)."""
    digest = hashlib.sha256(type(dataset).__qualname__.encode())
    if not isinstance(dataset, IterableDataset):
        digest.update(str(len(dataset)).encode())
    if isinstance(dataset, Subset):
        digest.update(torch.as_tensor(dataset.indices, dtype=torch.long).numpy().tobytes())
        digest.update(identity(dataset.dataset).encode())
    elif isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(getattr(dataset, "samples", None), list):
        digest.update(repr(dataset.samples).encode())
    elif not isinstance(dataset, IterableDataset) and known_targets(dataset) is not None:
        digest.update(known_targets(dataset).numpy().tobytes())
    return digest.hexdigest()[:16]


class EpochBatches(Sampler):
    """The batches of one epoch, drawn from ``generator``: a permutation cut into ``batch_size``
    pieces, or (``sample_rate``) ``steps`` Poisson batches; with ``part = (rank, world)``, this
    process's share ``batch[rank::world]`` of each (data-parallel training)."""

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator,
                 sample_rate: float | None = None, part: tuple[int, int] = (0, 1)):  # fmt: skip
        self.num_samples, self.batch_size, self.generator = num_samples, batch_size, generator
        self.sample_rate, self.part = sample_rate, part

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        if self.sample_rate is not None:
            batches = poisson_batches(self.num_samples, self.sample_rate, len(self), self.generator)
        else:
            batches = torch.randperm(self.num_samples, generator=self.generator).split(self.batch_size)
        rank, world = self.part
        for batch in batches:
            yield batch[rank::world].tolist()


class CollateOrNone:
    """``collate`` that gives ``None`` for an empty batch (a Poisson batch may be empty); a class,
    so worker processes started by spawn can pickle it."""

    def __init__(self, collate=None):
        self.collate = collate or default_collate

    def __call__(self, samples):
        return self.collate(samples) if len(samples) else None


def batches(data: Source, sampler: EpochBatches | None, batch_size: int,
            generator: torch.Generator | None = None) -> DataLoader:  # fmt: skip
    """A ``DataLoader`` over ``data``: ``sampler``'s batches (map-style), or ``batch_size`` samples
    in stream order (iterable, or ``sampler=None`` for evaluation in order)."""
    settings = dict(data.loader)
    settings["collate_fn"] = CollateOrNone(settings.get("collate_fn"))
    if sampler is None:
        return DataLoader(data.dataset, batch_size=batch_size, shuffle=False, generator=generator, **settings)
    return DataLoader(data.dataset, batch_sampler=sampler, generator=generator, **settings)


def transform(model, augment: bool = False):
    """The preprocessing ``model`` expects (timm's ``resolve_data_config`` / ``create_transform``:
    resize, crop, normalization), at the model's own input size; ``augment`` adds timm's training
    augmentation (random resized crop, flip, colour jitter)."""
    from timm.data import create_transform, resolve_data_config

    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    args = {"input_size": (channels, *size)} if size is not None and channels is not None else {}
    config = resolve_data_config(args, model=model)
    return create_transform(**config, is_training=augment)
