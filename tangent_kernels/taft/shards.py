"""Shards of a dataset, one ``dw`` each, their composition, and exact forgetting.

Because ``f_lin(x; dw)`` is affine in ``dw``, the model whose offsets are the weighted average of
the shards' offsets outputs the weighted average of the shard models' outputs, at the cost of
one model. Removing a shard from the average removes its data's influence exactly; retraining
one shard on its remaining samples forgets single samples without touching the other shards.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import read_offsets, save_offsets
from .train import TrainConfig, TrainResult, train


def split_shards(num_samples: int, num_shards: int, *, seed: int = 0, labels: Tensor | None = None) -> list[Tensor]:
    """Sample indices of ``num_shards`` disjoint shards covering ``range(num_samples)``.

    Random (seeded) by default; with ``labels``, by class: each shard gets whole classes.
    """
    if not 1 <= num_shards <= num_samples:
        raise ValueError(f"num_shards: expected 1..{num_samples}, got {num_shards}")
    if labels is None:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        return [chunk.sort().values for chunk in order.chunk(num_shards)]
    classes = labels.unique()
    if len(classes) < num_shards:
        raise ValueError(f"labels: {len(classes)} classes cannot fill {num_shards} shards by class")
    return [torch.nonzero(torch.isin(labels, group)).flatten() for group in classes.chunk(num_shards)]


def average_offsets(offsets: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``Σ w_i dw_i / Σ w_i`` for every offset tensor."""
    if not offsets or len(offsets) != len(weights) or sum(weights) <= 0:
        raise ValueError(f"average_offsets: expected as many positive-sum weights as offsets, got {list(weights)}")
    total = float(sum(weights))
    return {name: sum(w * o[name] for w, o in zip(weights, offsets)) / total for name in offsets[0]}


def _train_shard(model: nn.Module, inputs: Tensor, targets: Tensor, indices: Tensor, config: TrainConfig,
                 threads: int | None = None) -> tuple[dict[str, Tensor], TrainResult]:  # fmt: skip
    """Train a fresh copy of ``model`` (offsets zeroed) on ``indices``: its offsets and the result."""
    if threads:
        torch.set_num_threads(threads)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = train(model, inputs[indices], targets[indices], config)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}, result


def _train_shard_job(job):
    return _train_shard(*job)


class ShardedTAFT:
    """One linearized model (``linearize(...)``), one trained ``dw`` per shard of the data.

    ``shards[i]`` holds the sample indices shard ``i`` was trained on, so any sample's influence
    can be removed later (``forget_samples``) without retraining the other shards.
    """

    def __init__(self, linearized: nn.Module, shards: Sequence[Tensor], config: TrainConfig = TrainConfig()):
        self.model, self.config = linearized, config
        self.shards = [torch.as_tensor(s, dtype=torch.long).clone() for s in shards]
        self.offsets: dict[int, dict[str, Tensor]] = {}
        self.results: dict[int, TrainResult] = {}

    def fit(self, inputs: Tensor, targets: Tensor, shards: Sequence[int] | None = None, workers: int = 1,
            progress: bool = True) -> dict[int, TrainResult]:  # fmt: skip
        """Train the given shards (all by default), in ``workers`` processes when more than one."""
        from tqdm.auto import tqdm

        todo = [i for i in (range(len(self.shards)) if shards is None else shards) if len(self.shards[i])]
        seeds = [TrainConfig(**{**self.config.__dict__, "seed": self.config.seed + i}) for i in todo]
        jobs = [(self.model, inputs, targets, self.shards[i], cfg) for i, cfg in zip(todo, seeds)]
        if workers > 1 and len(jobs) > 1:
            threads = max(1, torch.get_num_threads() // workers)
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                outcomes = list(tqdm(pool.map(_train_shard_job, [(*j, threads) for j in jobs]), total=len(jobs),
                                     desc="shards", unit="shard", disable=not progress))  # fmt: skip
        else:
            outcomes = [_train_shard(*job) for job in tqdm(jobs, desc="shards", unit="shard", disable=not progress)]
        for i, (offsets, result) in zip(todo, outcomes):
            self.offsets[i], self.results[i] = offsets, result
        return {i: self.results[i] for i in todo}

    def active(self) -> list[int]:
        """The shards in the composition: trained and not forgotten."""
        return sorted(i for i in self.offsets if len(self.shards[i]))

    def composed_offsets(self, weighting: str = "size") -> dict[str, Tensor]:
        """The average of the active shards' offsets, weighted by shard size or uniformly."""
        if weighting not in ("size", "uniform"):
            raise ValueError(f"weighting: expected 'size' or 'uniform', got {weighting!r}")
        active = self.active()
        if not active:
            raise ValueError("composed_offsets: no trained shard is left")
        weights = [float(len(self.shards[i])) if weighting == "size" else 1.0 for i in active]
        return average_offsets([self.offsets[i] for i in active], weights)

    def compose(self, weighting: str = "size") -> nn.Module:
        """Load the composition into the linearized model and return it (one model's cost)."""
        self.model.load_state_dict(self.composed_offsets(weighting))
        return self.model

    def shard_model(self, index: int) -> nn.Module:
        """A copy of the linearized model carrying shard ``index``'s offsets alone."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.offsets[index])
        return model

    def forget_shard(self, index: int) -> None:
        """Remove shard ``index`` and its data from the composition, exactly."""
        self.offsets.pop(index, None)
        self.results.pop(index, None)
        self.shards[index] = self.shards[index][:0]

    def forget_samples(self, samples: Sequence[int], inputs: Tensor | None = None, targets: Tensor | None = None,
                       retrain: bool = True) -> list[int]:  # fmt: skip
        """Remove ``samples`` from every shard that saw them; retrain those shards on what remains
        (``inputs``/``targets`` needed), or drop them from the composition. Returns the shards touched."""
        samples = torch.as_tensor(samples, dtype=torch.long)
        touched = [i for i, s in enumerate(self.shards) if torch.isin(s, samples).any()]
        for i in touched:
            self.shards[i] = self.shards[i][~torch.isin(self.shards[i], samples)]
            self.offsets.pop(i, None)
        if retrain and touched:
            if inputs is None or targets is None:
                raise ValueError("forget_samples: retrain=True needs inputs and targets")
            self.fit(inputs, targets, shards=touched, progress=False)
        return touched

    def save(self, folder: str | os.PathLike) -> None:
        """One safetensors file of offsets per trained shard (with the base fingerprint), and the
        sample indices of every shard, so a composition can be rebuilt or a shard removed later."""
        os.makedirs(folder, exist_ok=True)
        for i, offsets in self.offsets.items():
            save_offsets(self.model, os.path.join(folder, f"shard_{i}.safetensors"), {"shard": str(i)}, state=offsets)
        save_file({f"shard_{i}": s.contiguous() for i, s in enumerate(self.shards)},
                  os.path.join(folder, "shard_samples.safetensors"))  # fmt: skip
        with open(os.path.join(folder, "taft.json"), "w") as f:
            json.dump({"num_shards": len(self.shards), "trained": sorted(self.offsets), "config": repr(self.config)}, f)

    @classmethod
    def load(cls, folder: str | os.PathLike, linearized: nn.Module, config: TrainConfig = TrainConfig()) -> ShardedTAFT:
        """Shards saved by ``save``, onto the same linearized base model (refused otherwise)."""
        with open(os.path.join(folder, "taft.json")) as f:
            header = json.load(f)
        samples = load_file(os.path.join(folder, "shard_samples.safetensors"))
        sharded = cls(linearized, [samples[f"shard_{i}"] for i in range(header["num_shards"])], config)
        for i in header["trained"]:
            sharded.offsets[i] = read_offsets(linearized, os.path.join(folder, f"shard_{i}.safetensors"))
        return sharded
