"""``python -m tangent_kernels.taft`` (console script ``tangent-taft``): TAFT on an image folder.

    tangent-taft train --model vit_small_patch16_224 --pretrained --data DIR/train --out OUT --shards 4
    tangent-taft eval --out OUT --data DIR/val [--per-shard]
    tangent-taft forget --out OUT --samples 3,17,42     (or a file of indices or image paths; or --shard 2)
    torchrun --nproc_per_node 8 -m tangent_kernels.taft train ...    (shards dealt to the ranks)

``DIR`` is a torchvision ``ImageFolder`` (one sub-folder per class). ``OUT`` holds the run
(``run.json``: model, classes, data fingerprint and training settings, so ``eval`` and
``forget`` rebuild the same base) and the shards (``ShardedTAFT.save``: offsets, sample indices,
and per-epoch checkpoints while a shard trains: run ``train`` again to resume). Sample ids are
indices into the training ``ImageFolder`` (sorted paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import warnings

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .. import linearize
from . import distributed
from .data import transform
from . import folder as on_disk
from .privacy import PrivacyConfig
from .shards import ShardedTAFT, split_shards
from .train import LOADING, TrainConfig, accuracy, training_autocast

RUN_FILE, FORMAT = "run.json", "tangent_kernels.taft_cli/1"
DELTA = 1e-5  # --privacy's δ unless --delta is given
PROTOCOLS = ("shards", "class-incremental", "data-incremental")


class RunFolder(ImageFolder):
    """An ``ImageFolder`` whose class indices are the run's (``classes``), so a folder holding
    some of the classes (a test split, the classes seen so far) is labelled as in training."""

    def __init__(self, root: str, classes: list[str], transform=None):
        self.run_classes = classes
        super().__init__(root, transform=transform)

    def find_classes(self, directory):
        found = visible_classes(directory)
        unknown = sorted(set(found) - set(self.run_classes))
        if unknown:
            raise ValueError(f"--data: {directory} has classes {unknown} the run was not trained on "
                             f"(its classes: {self.run_classes})")  # fmt: skip
        return found, {c: self.run_classes.index(c) for c in found}


def visible_classes(directory: str) -> list[str]:
    """torchvision's classes of ``directory`` (its sub-folders, sorted) but hidden ones (a notebook's
    ``.ipynb_checkpoints``, a Mac's ``.DS_Store`` folders), which torchvision counts as classes."""
    try:
        return [name for name in find_classes(directory)[0] if not name.startswith(".")]
    except FileNotFoundError as error:  # (torchvision's words: no class folder)
        raise ValueError(f"--data: {str(error).rstrip('.')}; expected one sub-folder of images per class") from None


def fingerprint(folder: ImageFolder) -> str:
    """SHA-256 of the sample list (relative paths and classes): sample ids index this list."""
    digest = hashlib.sha256()
    for path, target in folder.samples:
        digest.update(f"{os.path.relpath(path, folder.root)}\t{target}\n".encode())
    return digest.hexdigest()


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_base(run: dict) -> torch.nn.Module:
    """The timm model the run linearizes around, the same in every process (seeded)."""
    import timm

    torch.manual_seed(run["seed"])
    size = {} if run["img_size"] is None else {"img_size": run["img_size"]}
    source, _ = timm.models.parse_model_name(run["model"])
    if source is None and not timm.is_model(run["model"]):  # (hub names, "hf-hub:...", are timm's to resolve)
        raise ValueError(f"--model: {run['model']!r} is not a timm model (timm.list_models('vit_*') lists the ViTs)")
    model = timm.create_model(run["model"], pretrained=run["pretrained"], num_classes=len(run["classes"]),
                              **size, **run["model_args"])  # fmt: skip
    if run["weights"] is not None:
        _load_weights(model, run["weights"], run["weights_sha256"])
    elif not run["pretrained"]:
        warnings.warn(f"{run['model']}: no --weights or --pretrained, so the base model is randomly initialized "
                      "(seeded); TAFT around random weights learns little", stacklevel=2)  # fmt: skip
    if run["reinit"]:  # the paper's recipe: fresh final norm and head (blocks: linearize(reinit=True))
        torch.manual_seed(run["seed"] + 1)
        for module in (model.norm, model.fc_norm, model.head):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model.eval()


def _load_weights(model: torch.nn.Module, path: str, sha256: str) -> None:
    """Load a state dict (safetensors or torch) into ``model``; a head of another shape stays new."""
    if not os.path.isfile(path) or file_digest(path) != sha256:
        raise ValueError(f"--weights: {path} is missing or changed since the run began (SHA-256 differs)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    other_head = [k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape]
    if other_head:
        warnings.warn(f"--weights: {other_head} have another number of classes; the head is new", stacklevel=3)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in other_head}, strict=False)
    missing = [k for k in missing if k not in other_head]
    if missing or unexpected:
        raise ValueError(f"--weights: {path} does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip


def config_from(settings: dict, **loading) -> TrainConfig:
    """The ``TrainConfig`` saved in ``run.json`` (with ``loading`` settings, which are not saved)."""
    settings = dict(settings, **loading)
    settings["lr_milestones"] = tuple(settings["lr_milestones"])
    if settings["privacy"] is not None:
        settings["privacy"] = PrivacyConfig(**settings["privacy"])
    return TrainConfig(**settings)


def read_run(out: str) -> dict:
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--out: {out} holds no {RUN_FILE}; not a folder written by `train`")
    with open(path) as f:
        run = json.load(f)
    if run.get("format") != FORMAT:
        raise ValueError(f"--out: {path}: expected format {FORMAT!r}, got {run.get('format')!r}")
    return run


def open_run(out: str, device: torch.device, data: str | None = None, training: bool = False, with_data: bool = True):
    """The run saved in ``out``: its settings, shards (on ``device``), and the ``ImageFolder`` at
    ``data`` (the run's training data by default) with the model's preprocessing, for evaluation
    or (``training``: to retrain) as the run trained, with its augmentation (``None`` without
    ``with_data``: forgetting a shard needs no data, which may be gone)."""
    run = read_run(out)
    base = build_base(run)
    lin = linearize(base, run["blocks"], reinit=run["reinit"]).to(device)
    augment = training and run["augment"]
    loading = {"num_workers": run.get("augment_num_workers") or 0} if augment else {}  # as the run drew them
    sharded = ShardedTAFT.load(out, lin, config_from(run["config"], **loading))
    folder = RunFolder(data or run["data"], run["classes"], transform(base, augment)) if with_data else None
    return run, sharded, folder


def _seen(folder: ImageFolder, classes: set[int]) -> torch.utils.data.Subset:
    return torch.utils.data.Subset(folder, [i for i, t in enumerate(folder.targets) if t in classes])


def train_command(args) -> None:
    device = distributed.init_from_env()
    rank = distributed.rank_and_world()[0]
    for flag, value in (("--shards", args.shards), ("--img-size", args.img_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    if args.blocks != "all" and not args.blocks.isdigit():
        raise ValueError(f"--blocks: expected N (the last N blocks) or 'all', got {args.blocks!r}")
    if args.delta is not None and args.privacy is None:
        raise ValueError("--delta: the δ of (ε, δ)-DP applies to a --privacy run; expected --privacy with it")
    if args.protocol != "shards" and args.test is None:
        raise ValueError(f"--test: the {args.protocol} protocol evaluates after each task; expected a test folder")
    if args.protocol == "shards" and args.test is not None:
        raise ValueError("--test: the shards protocol evaluates nothing while it trains; expected --test with "
                         "--protocol class-incremental or data-incremental (or `tangent-taft eval --data`)")  # fmt: skip
    for flag, path, kind in (("--data", args.data, "folder"), ("--test", args.test, "folder"),
                             ("--weights", args.weights, "file")):  # fmt: skip
        if path is not None and not (os.path.isdir if kind == "folder" else os.path.isfile)(path):
            raise FileNotFoundError(f"{flag}: {path} is not a {kind}")
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-args: expected a JSON object of timm.create_model arguments, got "
                         f"{args.model_args!r} ({error})") from None  # fmt: skip
    if not isinstance(model_args, dict):
        raise ValueError(f"--model-args: expected a JSON object of timm.create_model arguments, got {args.model_args!r}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         loss=args.loss, kappa=args.kappa, seed=args.seed, dw_penalty=args.dw_penalty,
                         lr_milestones=tuple(args.lr_milestones), eval_mode=args.eval_mode, precision=args.precision,
                         privacy=args.privacy and PrivacyConfig(*args.privacy, delta=DELTA if args.delta is None else args.delta))  # fmt: skip
    classes = visible_classes(args.data)
    weights = None if args.weights is None else os.path.abspath(args.weights)
    run = {"format": FORMAT, "model": args.model, "model_args": model_args,
           "img_size": args.img_size, "pretrained": args.pretrained, "weights": weights,
           "weights_sha256": None if weights is None else file_digest(weights), "seed": args.seed,
           "blocks": args.blocks if args.blocks == "all" else int(args.blocks), "reinit": args.reinit,
           "classes": classes, "data": os.path.abspath(args.data), "shards": args.shards,
           "protocol": args.protocol, "split": "class" if args.protocol == "class-incremental" else args.split,
           "augment": args.augment,  # and augmentation draws depend on the DataLoader workers:
           "augment_num_workers": args.num_workers if args.augment else None,
           "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in LOADING}}  # fmt: skip
    base = build_base(run)
    folder = RunFolder(args.data, classes, transform(base, args.augment))
    run = json.loads(json.dumps({**run, "data_fingerprint": fingerprint(folder)}))  # as run.json holds it
    path = os.path.join(args.out, RUN_FILE)
    distributed.barrier()  # every rank reads OUT before rank 0 writes there
    # (a run.json alone is of a command that failed before any shard saved an epoch, e.g. its loss
    # diverged or opacus is missing: a corrected command may take its place)
    started = os.path.isfile(path) and on_disk.holds_training(args.out)
    if started and read_run(args.out) != run:
        raise ValueError(f"--out: {args.out} holds another run (its {RUN_FILE} differs: model, data or "
                         "settings); choose another --out, or run the same command to resume")  # fmt: skip
    distributed.barrier()
    # every setting checked before run.json is written (a refused command leaves OUT as it was)
    lin = linearize(base, run["blocks"], reinit=args.reinit).to(device)
    config = config_from(run["config"], num_workers=args.num_workers, pin_memory=device.type == "cuda")
    training_autocast(config, device)  # refuses bf16/fp16 off CUDA
    if os.path.isfile(os.path.join(args.out, on_disk.INDEX_FILE)):
        sharded = ShardedTAFT.load(args.out, lin, config)
    else:
        labels = torch.as_tensor(folder.targets) if run["split"] == "class" else None
        sharded = ShardedTAFT(lin, split_shards(len(folder), args.shards, seed=args.seed, labels=labels), config)
    if not started and rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            json.dump(run, f, indent=1)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    todo = [i for i in range(len(sharded.shards)) if i not in sharded.active() and len(sharded.shards[i])]
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.protocol == "shards":
        sharded.fit(folder, shards=todo, progress=rank == 0, resume=args.out, data_parallel=args.data_parallel)
        if rank == 0:
            sharded.save(args.out)
    else:  # tasks one by one, one dw each; the composition evaluated after each
        test = RunFolder(args.test, classes, transform(base))
        seen: set[int] = set()
        for task, samples in enumerate(sharded.shards):
            if task in todo:
                sharded.fit(folder, shards=[task], progress=rank == 0, resume=args.out,
                            data_parallel=args.data_parallel)  # fmt: skip
                if rank == 0:
                    sharded.save(args.out)
            seen |= set(torch.as_tensor(folder.targets)[samples].tolist())
            data = _seen(test, seen) if args.protocol == "class-incremental" else test
            sharded.model.load_state_dict(sharded.composed_offsets(shards=range(task + 1)))  # not later tasks (a rerun has them)
            top1 = accuracy(sharded.model, data, batch_size=args.batch_size)
            say(f"task {task + 1}/{len(sharded.shards)}: {len(samples)} samples, classes "
                f"{sorted(classes[c] for c in seen)}; composition top-1 {top1:.4f} on {len(data)} test images")
    distributed.barrier()
    for i in todo:
        result = sharded.results.get(i)
        if result is not None:
            say(f"shard {i} (rank {result.rank}): {len(sharded.shards[i])} samples, "
                f"final loss {result.losses[-1]:.4f}, "
                f"{result.seconds:.1f} s, {result.samples_per_second:.1f} images/s "
                f"({result.loading_seconds / max(result.seconds, 1e-9):.0%} waiting for data)"
                + ("" if result.epsilon is None else f", ({result.epsilon:.3g}, {config.privacy.delta:g})-DP"))
    say(f"saved {len(sharded.active())} shard(s) to {args.out}")


def eval_command(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    device = distributed.init_from_env()
    _, sharded, folder = open_run(args.out, device, args.data)
    spent = sharded.privacy_spent()
    print(f"composition of {len(sharded.active())} shard(s): top-1 "
          f"{accuracy(sharded.compose(), folder, batch_size=args.batch_size):.4f} on {len(folder)} images"
          + ("" if spent is None else f", ({spent[0]:.3g}, {spent[1]:g})-DP"))
    if args.per_shard:
        for i in sharded.active():
            result = sharded.results.get(i)
            print(f"shard {i} ({len(sharded.shards[i])} samples): top-1 "
                  f"{accuracy(sharded.shard_model(i), folder, batch_size=args.batch_size):.4f}"
                  + ("" if result is None or result.epsilon is None else f", ({result.epsilon:.3g}, {result.delta:g})-DP"))


def sample_ids(text: str, folder: ImageFolder) -> list[int]:
    """``3,17,42``, an image of ``folder``, or a file with one sample id or image path (absolute or
    under the data folder) per line, as indices into ``folder``."""
    where = {os.path.realpath(path): i for i, (path, _) in enumerate(folder.samples)}
    if os.path.realpath(text) in where:
        return [where[os.path.realpath(text)]]
    if not os.path.isfile(text):
        try:
            ids = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            ids = []
        if not ids:
            raise ValueError(f"--samples: expected comma-separated sample ids, an image or a file, got {text!r}")
        return ids
    ids = []
    with open(text) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.lstrip("-").isdigit():
                ids.append(int(line))
                continue
            path = os.path.realpath(line if os.path.isabs(line) else os.path.join(folder.root, line))
            if path not in where:
                raise ValueError(f"--samples: {text}:{number}: {line!r} is no image of {folder.root}")
            ids.append(where[path])
    if not ids:
        raise ValueError(f"--samples: {text} lists no sample id or image")
    return ids


def forget_command(args) -> None:
    device = distributed.init_from_env()
    run, sharded, folder = open_run(args.out, device, args.data, training=True, with_data=args.shard is None)
    if args.shard is not None:
        if not 0 <= args.shard < len(sharded.shards):
            raise ValueError(f"--shard: expected a shard in 0..{len(sharded.shards) - 1}, got {args.shard}")
        sharded.forget_shard(args.shard)
        print(f"forgot shard {args.shard}; {len(sharded.active())} shard(s) left in {args.out}")
        return
    if fingerprint(folder) != run["data_fingerprint"]:
        raise ValueError(f"--data: {folder.root} is not the data the run was trained on (its files or classes "
                         "changed); sample ids index that data, and retraining needs it")  # fmt: skip
    touched = sharded.forget_samples(sample_ids(args.samples, folder), folder)
    print(f"forgot {args.samples!r}: retrained shard(s) {touched}; {args.out} rewritten")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="tangent-taft", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = main.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one dw per shard (or task) of an image folder")
    train.add_argument("--model", required=True, help="a timm ViT name, e.g. vit_small_patch16_224")
    train.add_argument("--model-args", default="{}", help="JSON of extra timm.create_model arguments")
    train.add_argument("--data", required=True, help="an ImageFolder (one sub-folder per class)")
    train.add_argument("--out", required=True)
    train.add_argument("--shards", type=int, default=1)
    train.add_argument("--split", choices=("random", "class"), default="random", help="how shards are drawn")
    train.add_argument("--protocol", choices=PROTOCOLS, default="shards",
                       help="shards: all at once; *-incremental: tasks one by one, evaluated on --test after each")
    train.add_argument("--test", help="test ImageFolder for the incremental protocols")
    train.add_argument("--blocks", default="1", help="N (the last N blocks, TAFT-N) or 'all'")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    train.add_argument("--loss", choices=("rsl", "ce"), default="rsl")
    train.add_argument("--kappa", type=float, default=15.0, help="RSL target scale")
    train.add_argument("--img-size", type=int, help="input size given to timm.create_model")
    weights = train.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="a state dict (safetensors or torch) for the base model")
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    train.add_argument("--privacy", type=float, nargs=2, metavar=("NOISE_MULTIPLIER", "MAX_GRAD_NORM"),
                       help="DP-SGD with this noise multiplier and clipping norm")
    train.add_argument("--delta", type=float, help=f"the δ of (ε, δ)-DP (default {DELTA:g})")
    train.add_argument("--dw-penalty", type=float, default=0.0, help="adds this × ‖dw‖ (the paper's code: 1e-5)")
    train.add_argument("--lr-milestones", type=int, nargs="*", default=[], help="epochs where the lr is × 0.1")
    train.add_argument("--eval-mode", action="store_true", help="train with dropout off, as the paper's code")
    train.add_argument("--reinit", action="store_true", help="re-initialize the linearized blocks, norm and head")
    train.add_argument("--augment", action="store_true", help="timm's training augmentation")
    train.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="CUDA autocast")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--data-parallel", action="store_true",
                       help="under torchrun: each shard trained by all ranks (DDP) instead of shards dealt to ranks")
    train.add_argument("--seed", type=int, default=0)
    evaluate = commands.add_parser("eval", help="top-1 accuracy of the composition (and of each shard)")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--data", required=True, help="an ImageFolder with (some of) the run's classes")
    evaluate.add_argument("--per-shard", action="store_true")
    evaluate.add_argument("--batch-size", type=int, default=256)
    forget = commands.add_parser("forget", help="remove samples or a shard exactly and rewrite OUT")
    forget.add_argument("--out", required=True)
    what = forget.add_mutually_exclusive_group(required=True)
    what.add_argument("--samples", help="comma-separated sample ids, or a file of ids or image paths")
    what.add_argument("--shard", type=int)
    forget.add_argument("--data", help="the training ImageFolder (default: the run's)")
    return main


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = {"train": train_command, "eval": eval_command, "forget": forget_command}[args.command]
    try:
        command(args)
    # (OSError: a file that is not an image, a full disk; FloatingPointError: a diverging loss;
    # ImportError: opacus missing for --privacy)
    except (ValueError, TypeError, OSError, ArithmeticError, ImportError) as error:
        print(f"tangent-taft {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
