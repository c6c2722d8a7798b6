"""A ``ShardedTAFT`` on disk: one folder holding exactly its current state.

- ``shard_<i>.safetensors``: the offsets of each active shard ``i`` (``checkpoint.save_offsets``:
  tied to the base model's fingerprint, with a checksum; for a shard trained privately, the
  ``epsilon`` and ``delta`` it spent in its header), and no other file of that name;
- ``shard_samples.safetensors``: the sample indices of every shard (empty once forgotten);
- ``taft.json``: the layout version, the number of shards and of samples, the trained shards, and
  the recipe they were trained with (``TrainConfig.run()``: forgetting retrains by it);
- ``resume/shard_<i>.pt``: while shard ``i`` trains, its per-epoch checkpoint (``taft.resume``).

``write`` deletes stale shard files first, so after it the folder holds no offsets of an
untrained or forgotten shard, and no checkpoint of a shard that is saved, emptied, or named
stale (it saw forgotten data); ``read`` refuses a folder whose files are missing, left over or
corrupted, naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import NamedTuple

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import read_header, read_offsets, save_offsets
from .checks import check_disjoint, check_indices, check_int

LAYOUT = "tangent_kernels.sharded_taft/1"
SHARD_FILE = re.compile(r"shard_(\d+)\.safetensors")
SAMPLES_FILE, INDEX_FILE, RESUME_FOLDER = "shard_samples.safetensors", "taft.json", "resume"
PRIVACY_KEYS = ("epsilon", "delta")


def _shard_files(folder: str) -> dict[int, str]:
    """The ``shard_<i>.safetensors`` files in ``folder``, by ``i``."""
    matches = (SHARD_FILE.fullmatch(entry) for entry in os.listdir(folder))
    return {int(m.group(1)): os.path.join(folder, m.group(0)) for m in matches if m}


def resume_file(folder: str, shard: int) -> str:
    """Where shard ``shard``'s training checkpoint lives while it trains."""
    return os.path.join(folder, RESUME_FOLDER, f"shard_{shard}.pt")


def holds_training(folder: str) -> bool:
    """``folder`` holds saved shards or a training checkpoint."""
    checkpoints = os.path.join(folder, RESUME_FOLDER)
    return os.path.isfile(os.path.join(folder, INDEX_FILE)) or (os.path.isdir(checkpoints) and bool(os.listdir(checkpoints)))


def remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write(folder: str, model: nn.Module, shards: list[Tensor], offsets: dict[int, dict[str, Tensor]],
          num_samples: int | None, description: str, recipe: str | None, stale: Sequence[int] = (),
          privacy: dict[int, tuple[float, float]] | None = None) -> None:  # fmt: skip
    """Make ``folder`` hold exactly this state: stale shard files and checkpoints (of the shards in
    ``offsets``, the empty ones and ``stale``) deleted first, then the offsets of every entry of
    ``offsets`` (the active shards, with the ``(epsilon, delta)`` of those in ``privacy``), the
    shard lists, and the index."""
    privacy = {} if privacy is None else privacy
    for index, path in _shard_files(folder).items():
        if index not in offsets:
            remove(path)
    for index in {*offsets, *stale, *(i for i, s in enumerate(shards) if not len(s))}:
        remove(resume_file(folder, index))
    for i, state in sorted(offsets.items()):
        spent = dict(zip(PRIVACY_KEYS, map(repr, privacy[i]))) if i in privacy else {}
        save_offsets(model, os.path.join(folder, f"shard_{i}.safetensors"), {"shard": str(i), **spent}, state=state)
    samples = {f"shard_{i}": s.contiguous() for i, s in enumerate(shards)}
    save_file(samples, os.path.join(folder, SAMPLES_FILE))
    index = {"format": LAYOUT, "num_shards": len(shards), "num_samples": num_samples,
             "trained": sorted(offsets), "config": description, "recipe": recipe}  # fmt: skip
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f)


def _read_index(folder: str) -> tuple[int, int | None, list, str | None]:
    """``taft.json``: the number of shards, of samples (``None`` before any training), the trained,
    and their recipe (``None`` in a folder saved before it was recorded)."""
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {INDEX_FILE}; not a folder written by ShardedTAFT.save")
    try:
        with open(path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != LAYOUT:
        raise ValueError(f"{path}: expected format {LAYOUT!r}, got {found!r} (a folder saved by an older "
                         "version: save it again with this one)")  # fmt: skip
    num_shards = check_int(f"{path}: num_shards", index.get("num_shards"), minimum=1)
    num_samples = index.get("num_samples")
    if num_samples is not None:
        num_samples = check_int(f"{path}: num_samples", num_samples, minimum=1)
    trained = index.get("trained")
    if not isinstance(trained, list):
        raise ValueError(f"{path}: trained: expected a list of shard indices, got {trained!r}")
    recipe = index.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise ValueError(f"{path}: recipe: expected the TrainConfig.run() text, got {recipe!r}")
    return num_shards, num_samples, trained, recipe


def _read_samples(folder: str, num_shards: int, num_samples: int | None) -> list[Tensor]:
    path = os.path.join(folder, SAMPLES_FILE)
    try:
        samples = load_file(path)
    except (SafetensorError, FileNotFoundError) as error:
        raise ValueError(f"{path}: missing or unreadable ({error})") from error
    names = [f"shard_{i}" for i in range(num_shards)]
    if set(samples) != set(names):
        raise ValueError(f"{path}: expected the entries {names} (num_shards in {INDEX_FILE}), "
                         f"got {sorted(samples)}")  # fmt: skip
    shards = [check_indices(f"{path}: {name}", samples[name], num_samples) for name in names]
    check_disjoint(path, shards)
    return shards


class Saved(NamedTuple):
    """What ``read`` finds in a folder written by ``write``."""

    shards: list[Tensor]
    offsets: dict[int, dict[str, Tensor]]  # of the trained shards, checked against the model's base
    num_samples: int | None
    privacy: dict[int, tuple[float, float]]  # (epsilon, delta) of the shards trained privately
    recipe: str | None  # TrainConfig.run() of the training (None: not recorded)


def read(folder: str, model: nn.Module) -> Saved:
    """The state saved in ``folder`` by ``write``, checked (see the module docstring)."""
    num_shards, num_samples, trained, recipe = _read_index(folder)
    shards = _read_samples(folder, num_shards, num_samples)
    where = f"{os.path.join(folder, INDEX_FILE)}: trained"
    trained = [check_int(f"{where}[{k}]", i, minimum=0) for k, i in enumerate(trained)]
    files = _shard_files(folder)
    if sorted(files) != sorted(set(trained)) or len(set(trained)) != len(trained):
        raise ValueError(f"{folder}: {INDEX_FILE} lists the trained shards {trained}, but the folder "
                         f"holds offsets files of shards {sorted(files)}; a file is missing or left over "
                         "(the folder was changed outside ShardedTAFT.save)")  # fmt: skip
    offsets, privacy = {}, {}
    for i in trained:
        if i >= num_shards or not len(shards[i]):
            raise ValueError(f"{files[i]}: offsets of shard {i}, which has no samples "
                             f"(of {num_shards} shards)")  # fmt: skip
        header = read_header(files[i])
        if header.get("shard") != str(i):
            raise ValueError(f"{files[i]}: holds the offsets of shard {header.get('shard')!r}, not {i}")
        offsets[i] = read_offsets(model, files[i])
        if any(key in header for key in PRIVACY_KEYS):
            privacy[i] = _privacy_spent(files[i], header)
    return Saved(shards, offsets, num_samples, privacy, recipe)


def _privacy_spent(path: str, header: dict[str, str]) -> tuple[float, float]:
    """The ``(epsilon, delta)`` in an offsets file's header, checked."""
    try:
        epsilon, delta = (float(header[key]) for key in PRIVACY_KEYS)
    except (KeyError, ValueError):
        raise ValueError(f"{path}: expected a number for each of {list(PRIVACY_KEYS)} in its header, got "
                         f"{ {key: header.get(key) for key in PRIVACY_KEYS} }") from None  # fmt: skip
    if not (epsilon >= 0 and 0 <= delta < 1):
        raise ValueError(f"{path}: expected epsilon >= 0 and delta in [0, 1) in its header, got {epsilon}, {delta}")
    return epsilon, delta
