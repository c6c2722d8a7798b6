"""Shards of a dataset, one ``dw`` each, their composition, and exact forgetting.

Because ``f_lin(x; dw)`` is affine in ``dw``, the model whose offsets are the weighted average of
the shards' offsets outputs the weighted average of the shard models' outputs, at the cost of
one model. Removing a shard from the average removes its data's influence exactly; retraining
one shard on its remaining samples forgets single samples without touching the other shards.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import torch
from torch import Tensor, nn

from . import folder as on_disk
from .checks import check_disjoint, check_indices, check_int, check_real
from . import distributed
from .data import Source
from .train import TrainConfig, TrainResult, check_source, train


def split_shards(num_samples: int, num_shards: int, *, seed: int = 0,
                 labels: Tensor | None = None) -> list[Tensor]:  # fmt: skip
    """Sample indices of ``num_shards`` disjoint shards covering ``range(num_samples)``.

    Random (seeded) by default; with ``labels`` (one integer class label per sample), by class:
    each shard gets whole classes.
    """
    num_samples = check_int("num_samples", num_samples, minimum=1)
    num_shards = check_int("num_shards", num_shards, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if num_shards > num_samples:
        raise ValueError(f"num_shards: expected 1..{num_samples} (at most one shard per sample), "
                         f"got {num_shards}")  # fmt: skip
    if labels is None:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        return [chunk.sort().values for chunk in order.chunk(num_shards)]
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a tensor of class labels, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels: expected integer class labels, got dtype {labels.dtype}")
    if labels.shape != (num_samples,):
        raise ValueError(f"labels: expected shape ({num_samples},) (one per sample), "
                         f"got {tuple(labels.shape)}")  # fmt: skip
    labels = labels.cpu()
    classes = labels.unique()
    if len(classes) < num_shards:
        raise ValueError(f"labels: {len(classes)} classes cannot fill {num_shards} shards by class")
    return [torch.nonzero(torch.isin(labels, group)).flatten() for group in classes.chunk(num_shards)]


def average_offsets(offsets: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``Σ w_i dw_i / Σ w_i`` for every offset tensor.

    The dicts must hold the same names, each a floating tensor of one dtype, shape and device in
    all of them; the weights are finite, >= 0, with a positive sum.
    """
    offsets, weights = list(offsets), list(weights)
    if not offsets:
        raise ValueError("offsets: expected at least one dict of offsets, got none")
    if len(weights) != len(offsets):
        raise ValueError(f"weights: expected {len(offsets)} (one per offsets dict), got {len(weights)}")
    weights = [check_real(f"weights[{i}]", w, at_least=0.0) for i, w in enumerate(weights)]
    total = sum(weights)
    if not 0 < total < float("inf"):
        raise ValueError(f"weights: expected a finite positive sum, got {total} from {weights}")
    first = offsets[0]
    for i, entry in enumerate(offsets):
        if not isinstance(entry, dict):
            raise TypeError(f"offsets[{i}]: expected a dict of tensors, got {type(entry).__name__}")
        if set(entry) != set(first):
            missing, unexpected = sorted(set(first) - set(entry)), sorted(set(entry) - set(first))
            raise ValueError(f"offsets[{i}]: expected the names of offsets[0]; missing {missing}, "
                             f"unexpected {unexpected}")  # fmt: skip
        for name, t in entry.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"offsets[{i}][{name!r}]: expected a floating tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")  # fmt: skip
            like = first[name]
            if (t.dtype, t.shape, t.device) != (like.dtype, like.shape, like.device):
                raise ValueError(f"offsets[{i}][{name!r}]: expected {like.dtype} {tuple(like.shape)} on "
                                 f"{like.device} (as offsets[0]), got {t.dtype} {tuple(t.shape)} "
                                 f"on {t.device}")  # fmt: skip
    return {name: sum(w * o[name] for w, o in zip(weights, offsets)) / total for name in first}


def _train_shard(model: nn.Module, data: Source, indices: Tensor, config: TrainConfig, threads: int | None = None,
                 checkpoint: str | None = None, data_parallel: bool = False,
                 progress: bool | str = False) -> tuple[dict[str, Tensor], TrainResult]:  # fmt: skip
    """Train a fresh copy of ``model`` (offsets zeroed) on ``indices``: its offsets and the result.
    The global random streams (dropout's, and Python's that timm's augmentation draws in the main
    process) start from ``config.seed``, so a shard trains alike whichever process trains it and
    whatever trained there before (restored afterwards)."""
    if threads:
        torch.set_num_threads(threads)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    device = next(model.parameters()).device
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        try:
            result = train(model, data.subset(indices), config=config, checkpoint=checkpoint,
                           data_parallel=data_parallel, progress=progress)  # fmt: skip
        finally:
            random.setstate(python_state)
    return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}, result


def _train_shard_job(job):
    return _train_shard(*job)


def _end_with_the_parent() -> None:
    """A shard worker is killed when the process that started it dies (Linux: a killed parent left
    its workers training on, and writing checkpoints, as orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ShardedTAFT:
    """One linearized model (``linearize(...)``), one trained ``dw`` per shard of the data.

    ``shards[i]`` holds the sample indices shard ``i`` was trained on (integers, non-negative,
    unique, and disjoint across shards: a sample's influence lives in one shard), so any sample's
    influence can be removed later (``forget_samples``) without retraining the other shards.

    Forgetting (``forget_shard``, ``forget_samples``) removes the data's influence from this
    object (offsets, training results, shard lists), from ``model`` when it holds the
    composition (``compose``: it is composed again from the remaining shards, or reset to zero
    offsets), and from every folder this object saved to or was loaded from (rewritten: the
    forgotten shards' files are deleted). Copies handed out (``shard_model``) are the caller's.
    Every method checks all its arguments before it changes anything.
    """

    def __init__(self, linearized: nn.Module, shards: Sequence, config: TrainConfig = TrainConfig()):
        if not isinstance(linearized, nn.Module):
            raise TypeError(f"linearized: expected an nn.Module, got {type(linearized).__name__}")
        if not any(p.requires_grad for p in linearized.parameters()):
            raise ValueError("linearized: has no trainable parameters (offsets)")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if isinstance(shards, (Tensor, str, bytes)) or not isinstance(shards, Sequence) or not shards:
            raise TypeError(f"shards: expected a non-empty list of sample-index tensors or lists, "
                            f"got {type(shards).__name__}")  # fmt: skip
        self.model, self.config = linearized, config
        self.shards = list(shards)
        self._check_shards(None)
        self.num_samples: int | None = None  # the size of the dataset the shards index, once known
        self.offsets: dict[int, dict[str, Tensor]] = {}
        self.results: dict[int, TrainResult] = {}
        self._folders: set[str] = set()  # saved to or loaded from: rewritten when data is forgotten
        self._recipe: str | None = None  # the trained shards' TrainConfig.run() (None: not known)
        self._resumed_in: set[str] = set()  # fit(resume=...) folders: their checkpoints saw the data too
        self._composed: str | None = None  # the weighting of the composition ``model`` holds

    def _check_shard_index(self, name: str, index) -> int:
        index = check_int(name, index)
        if not 0 <= index < len(self.shards):
            raise ValueError(f"{name}: expected a shard index in 0..{len(self.shards) - 1}, got {index}")
        return index

    def _check_data(self, inputs, targets) -> Source:
        """The dataset the shards index (tensors, a map-style ``Dataset`` or a ``DataLoader``),
        checked against the model, the shards and, once known, the number of samples the offsets
        were trained with."""
        data, _, _ = check_source(self.model, inputs, targets, self.config)
        if data.iterable:
            raise TypeError("inputs: shards are index sets; expected a map-style Dataset, got an IterableDataset")
        if self.num_samples is not None and len(data) != self.num_samples:
            raise ValueError(f"inputs: expected the {self.num_samples} samples the shards were trained on, "
                             f"got {len(data)}")  # fmt: skip
        self._check_shards(len(data))
        return data

    def _check_shards(self, num_samples: int | None) -> None:
        """The shard lists (a public attribute) are still valid indices of ``num_samples`` samples."""
        self.shards = [check_indices(f"shards[{i}]", s, num_samples) for i, s in enumerate(self.shards)]
        check_disjoint("shards", self.shards)

    def _train(self, data: Source, shards: dict[int, Tensor], workers: int, progress: bool,
               resume: str | None = None,
               data_parallel: bool = False) -> dict[int, tuple[dict[str, Tensor], TrainResult]]:  # fmt: skip
        """Train one fresh offset per entry of ``shards`` (index -> samples); nothing is stored. In a
        process group, each rank trains its share of the shards (or, ``data_parallel``, every rank
        every shard, each on part of every batch) and all get every result."""
        from tqdm.auto import tqdm

        if not self.active():  # no trained shard: this training sets the recipe
            self._recipe = self.config.run()
        elif self._recipe not in (None, self.config.run()):
            raise ValueError(f"config: the trained shards were trained with {self._recipe}, not this object's "
                             f"{self.config.run()}; use that TrainConfig (ShardedTAFT.load(..., config)) to train "
                             "or retrain shards (forgetting retrains as the shard was trained)")  # fmt: skip

        configs = {i: dataclasses.replace(self.config, seed=self.config.seed + i) for i in shards}
        mine = list(shards) if data_parallel else distributed.share(list(shards))
        paths = {i: None if resume is None else on_disk.resume_file(resume, i) for i in mine}
        jobs = [(self.model, data, shards[i], configs[i]) for i in mine]
        bar = dict(desc="shards", unit="shard", disable=not progress)
        if workers > 1 and len(jobs) > 1:
            threads = max(1, torch.get_num_threads() // workers)
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                       initializer=_end_with_the_parent)  # fmt: skip
            outcomes = []
            try:
                running = pool.map(_train_shard_job, [(*j, threads, paths[i]) for i, j in zip(mine, jobs)])
                outcomes.extend(tqdm(running, total=len(jobs), **bar))
            except BrokenProcessPool as error:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(f"shards: a worker process ended abruptly (killed by a signal, e.g. out of "
                                   f"memory) before shards {mine[len(outcomes):]} were done; their per-epoch "
                                   "checkpoints, if any, resume them") from error  # fmt: skip
            except BaseException:  # Ctrl-C, or a shard's error: no queued shard starts, none runs on
                pool.shutdown(wait=False, cancel_futures=True)
                for process in list(getattr(pool, "_processes", {}).values()):
                    process.terminate()
                raise
            pool.shutdown()
        else:
            outcomes = [_train_shard(*job, None, paths[i], data_parallel, progress and f"shard {i}")
                        for i, job in zip(mine, tqdm(jobs, **bar))]  # fmt: skip
        outcomes = dict(zip(mine, outcomes))
        return outcomes if data_parallel else distributed.gather(outcomes)

    def fit(self, inputs, targets: Tensor | None = None, shards: Sequence[int] | None = None, workers: int = 1,
            progress: bool = True, resume: str | os.PathLike | None = None,
            data_parallel: bool = False) -> dict[int, TrainResult]:  # fmt: skip
        """Train the given shards (all by default; empty ones are skipped), in ``workers`` processes
        when more than one. ``inputs`` (with ``targets`` for tensors) is the whole dataset the shards
        index: tensors, a map-style ``Dataset`` or a ``DataLoader`` (see ``train``).

        Under ``torch.distributed`` each rank trains shards ``rank, rank + world, ...`` of them and
        every rank gets every result; ``data_parallel`` trains each shard on all ranks with DDP
        instead. ``resume``: the folder the shards will be saved to; each shard's per-epoch
        checkpoint is kept under it (``resume/shard_<i>.pt``) and resumed from, and ``save``
        deletes those of the shards it writes."""
        todo = range(len(self.shards)) if shards is None else shards
        if isinstance(todo, (Tensor, str, bytes)) or not isinstance(todo, Sequence):
            raise TypeError(f"shards: expected a sequence of shard indices, got {type(shards).__name__}")
        todo = [self._check_shard_index(f"shards[{k}]", i) for k, i in enumerate(todo)]
        if len(set(todo)) != len(todo):
            raise ValueError(f"shards: expected unique shard indices, got {todo}")
        workers = check_int("workers", workers, minimum=1)
        if workers > 1 and data_parallel:
            raise ValueError("workers: data_parallel trains every shard on all ranks of the process group; "
                             "expected workers=1 with it")  # fmt: skip
        data = self._check_data(inputs, targets)
        nonempty = {i: self.shards[i] for i in todo if len(self.shards[i])}
        folder = None if resume is None else os.fspath(resume)
        if folder is not None:
            self._resumed_in.add(os.path.realpath(folder))
        outcomes = self._train(data, nonempty, workers, bool(progress), folder, bool(data_parallel))
        self.num_samples = len(data)
        for i, (offsets, result) in outcomes.items():
            self.offsets[i], self.results[i] = offsets, result
        return {i: self.results[i] for i in outcomes}

    def active(self) -> list[int]:
        """The shards in the composition: trained and not forgotten."""
        return sorted(i for i in self.offsets if len(self.shards[i]))

    def composed_offsets(self, weighting: str = "size", shards: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The average of the active shards' offsets (those among ``shards`` if given: e.g. the tasks
        seen so far), weighted by shard size or uniformly."""
        if weighting not in ("size", "uniform"):
            raise ValueError(f"weighting: expected 'size' or 'uniform', got {weighting!r}")
        wanted = None if shards is None else {self._check_shard_index("shards", i) for i in shards}
        active = [i for i in self.active() if wanted is None or i in wanted]
        if not active:
            raise ValueError("composed_offsets: no trained shard is left" + ("" if wanted is None else " among shards"))
        weights = [float(len(self.shards[i])) if weighting == "size" else 1.0 for i in active]
        return average_offsets([self.offsets[i] for i in active], weights)

    def compose(self, weighting: str = "size") -> nn.Module:
        """Load the composition into the linearized model and return it (one model's cost). After
        a forgetting, the model is composed again the same way."""
        self.model.load_state_dict(self.composed_offsets(weighting))
        self._composed = weighting
        return self.model

    def shard_model(self, index: int) -> nn.Module:
        """A copy of the linearized model carrying shard ``index``'s offsets alone."""
        index = self._check_shard_index("index", index)
        if index not in self.active():
            raise ValueError(f"index: shard {index} is not trained (trained: {self.active()})")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.offsets[index])
        return model

    def _after_forgetting(self, touched: list[int]) -> None:
        """Carry a forgetting over to the composed model and to every folder holding this object
        (whose checkpoints of the ``touched`` shards are deleted: they saw the forgotten data)."""
        if self._composed is not None:
            if self.active():
                self.model.load_state_dict(self.composed_offsets(self._composed))
            else:
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.zero_()
        for folder in sorted(self._folders):
            if os.path.isdir(folder):
                self._write(folder, touched)
            else:
                self._folders.discard(folder)
        for folder in sorted(self._resumed_in - self._folders):
            for i in touched:
                on_disk.remove(on_disk.resume_file(folder, i))

    def forget_shard(self, index: int) -> None:
        """Remove shard ``index`` and its data from the composition, exactly (see the class doc)."""
        index = self._check_shard_index("index", index)
        self.offsets.pop(index, None)
        self.results.pop(index, None)
        self.shards[index] = self.shards[index][:0]
        self._after_forgetting([index])

    def forget_samples(self, samples: Sequence[int] | Tensor, inputs=None, targets: Tensor | None = None,
                       retrain: bool = True) -> list[int]:  # fmt: skip
        """Remove ``samples`` (indices into the dataset) from every shard that saw them; retrain the
        trained ones among those shards on what remains (``inputs``, with ``targets`` for tensors:
        the whole dataset as ``fit`` takes it, needed), or drop them
        from the composition. Returns the shards touched. All checks and the retraining come
        before any change: if one fails, the object is as it was."""
        if not isinstance(retrain, bool):
            raise TypeError(f"retrain: expected a bool, got {type(retrain).__name__}")
        if inputs is None and targets is not None:
            raise ValueError("forget_samples: targets without inputs; expected both, inputs alone or neither")
        samples = check_indices("samples", samples, limit=self.num_samples)
        data = None if inputs is None else self._check_data(inputs, targets)
        if data is not None:
            samples = check_indices("samples", samples, limit=len(data))
        touched = [i for i, s in enumerate(self.shards) if bool(torch.isin(s, samples).any())]
        remaining = {i: self.shards[i][~torch.isin(self.shards[i], samples)] for i in touched}
        todo = {i: remaining[i] for i in touched if retrain and i in self.offsets and len(remaining[i])}
        if todo and inputs is None:
            raise ValueError(f"forget_samples: retrain=True needs inputs and targets to retrain shards "
                             f"{sorted(todo)} (or retrain=False to drop them from the composition)")
        retrained = self._train(data, todo, workers=1, progress=False) if todo else {}
        for i in touched:
            self.shards[i] = remaining[i]
            self.offsets.pop(i, None)
            self.results.pop(i, None)
            if i in retrained:
                self.offsets[i], self.results[i] = retrained[i]
        if touched:
            self._after_forgetting(touched)
        return touched

    def _write(self, folder: str, stale: Sequence[int] = ()) -> None:
        self._check_shards(self.num_samples)
        active = self.active()
        privacy = {i: (r.epsilon, r.delta) for i, r in self.results.items() if i in active and r.epsilon is not None}
        on_disk.write(folder, self.model, self.shards, {i: self.offsets[i] for i in active}, self.num_samples,
                      repr(self.config), self._recipe, stale, privacy)  # fmt: skip

    def privacy_spent(self) -> tuple[float, float] | None:
        """The ``(epsilon, delta)`` of the composition: the largest spent by an active shard, since
        each sample trained one shard only (parallel composition); ``None`` if an active shard was
        trained without privacy (or none is trained)."""
        spent = [self.results.get(i, TrainResult()) for i in self.active()]
        if not spent or any(r.epsilon is None for r in spent):
            return None
        return max(r.epsilon for r in spent), max(r.delta for r in spent)

    def save(self, folder: str | os.PathLike) -> None:
        """One safetensors file of offsets per active shard (with the base fingerprint), and the
        sample indices of every shard, so a composition can be rebuilt or a shard removed later
        (layout: ``taft.folder``). The folder then holds exactly this state (stale
        ``shard_<i>.safetensors`` files are deleted), and it is rewritten whenever this object
        forgets data."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self._write(folder)
        self._folders.add(os.path.realpath(folder))

    @classmethod
    def load(cls, folder: str | os.PathLike, linearized: nn.Module,
             config: TrainConfig = TrainConfig()) -> ShardedTAFT:  # fmt: skip
        """Shards saved by ``save``, onto the same linearized base model (refused otherwise). A
        folder with missing, extra or corrupted files is refused with the file named. The loaded
        object rewrites ``folder`` when it forgets data; it trains or retrains shards only if
        ``config`` is the recipe the saved shards were trained with (what changes learning: not
        the loading settings)."""
        folder = os.fspath(folder)
        saved = on_disk.read(folder, linearized)
        sharded = cls(linearized, saved.shards, config)
        sharded.offsets, sharded.num_samples = saved.offsets, saved.num_samples
        sharded.results = {i: TrainResult(epsilon=e, delta=d) for i, (e, d) in saved.privacy.items()}
        sharded._recipe = saved.recipe
        sharded._folders.add(os.path.realpath(folder))
        return sharded
