"""The paper's class-incremental protocol through the command line, on scikit-learn's digits.

1. Write the digits as PNG image folders (a temporary directory): 0–4 for pre-training, 5–9 in
   train and test splits for the tasks.
2. Pre-train a small timm ViT on 0–4 from its ImageFolder (``taft.train`` takes the dataset).
3. Tasks arrive one by one (digits 5–9 in ``--tasks`` groups of classes; a task of one class
   has no negatives to learn from, so its ``dw`` only raises that class everywhere):
   ``python -m tangent_kernels.taft train --protocol class-incremental`` trains one ``dw`` per
   task and evaluates the composition on the classes seen so far after each task; the baseline
   fine-tunes the same layers (last block, norm, head) task after task.

    python examples/taft_class_incremental.py [--tasks 2] [--epochs 20] [--pretrain-epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from tangent_kernels import taft
from tangent_kernels.taft.cli import RunFolder, open_run

MODEL = "vit_tiny_patch16_224"
MODEL_ARGS = {"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def write_digits(root: Path) -> None:
    """``root/pretrain`` (digits 0–4), ``root/train`` and ``root/test`` (5–9, 70/30), as PNGs."""
    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0)).tolist()
    for rank, i in enumerate(order):
        digit = int(data.target[i])
        split = "pretrain" if digit < 5 else "train" if rank % 10 < 7 else "test"
        folder = root / split / f"digit_{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.tensor(data.images[i]) * 16).clamp(max=255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


def small_vit(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, img_size=8, num_classes=num_classes, **MODEL_ARGS)


def seen(folder: ImageFolder, classes: set[int]) -> Subset:
    return Subset(folder, [i for i, t in enumerate(folder.targets) if t in classes])


def fine_tuning(weights: Path, root: Path, tasks: list[list[int]], epochs: int) -> list[float]:
    """The baseline: fine-tune the last block, norm and head on each task in turn (from the same
    base as TAFT); accuracy on the classes seen so far after each task."""
    model = small_vit(5)
    model.load_state_dict(load_file(str(weights)))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.blocks[-1], model.norm, model.head):
        for p in module.parameters():
            p.requires_grad_(True)
    classes = sorted(os.listdir(root / "train"))
    train = RunFolder(str(root / "train"), classes, taft.data.transform(model))
    test = RunFolder(str(root / "test"), classes, taft.data.transform(model))
    accuracies, so_far = [], set()
    for task in tasks:
        so_far |= set(task)
        config = taft.TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, loss="ce")
        taft.train(model, seen(train, set(task)), config=config)
        accuracies.append(taft.accuracy(model, seen(test, so_far)))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2, help="tasks the digits 5-9 are split into (by class)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per task")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        write_digits(root)
        base = small_vit(5)
        pretrain = ImageFolder(str(root / "pretrain"), transform=taft.data.transform(base))
        taft.train(base, pretrain, config=taft.TrainConfig(epochs=args.pretrain_epochs, lr=2e-3, loss="ce"), progress="pre-train")
        weights = root / "base.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))

        command = [sys.executable, "-m", "tangent_kernels.taft", "train", "--model", MODEL,
                   "--model-args", json.dumps(MODEL_ARGS), "--img-size", "8", "--weights", str(weights),
                   "--data", str(root / "train"), "--test", str(root / "test"), "--out", str(root / "out"),
                   "--protocol", "class-incremental", "--shards", str(args.tasks), "--blocks", "1",
                   "--epochs", str(args.epochs), "--batch-size", "32", "--lr", "5e-3", "--kappa", "5",
                   "--eval-mode", "--dw-penalty", "1e-5"]  # fmt: skip
        print("$", " ".join(command[1:]))
        printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        lines = [line for line in printed.splitlines() if line.startswith("task ")]
        composed = [float(line.split("top-1 ")[1].split()[0]) for line in lines]
        _, sharded, _ = open_run(str(root / "out"), torch.device("cpu"))
        train_targets = torch.as_tensor(ImageFolder(str(root / "train")).targets)
        tasks = [sorted(set(train_targets[s].tolist())) for s in sharded.shards]
        baseline = fine_tuning(weights, root, tasks, args.epochs)

    print(f"\n{'task':<6} {'classes seen':<24} {'TAFT composition':>17} {'fine-tuning':>12}")
    so_far: list[int] = []
    for t, (task, ours, theirs) in enumerate(zip(tasks, composed, baseline), 1):
        so_far += [5 + c for c in task]
        print(f"{t:<6} {str(so_far):<24} {ours:>17.3f} {theirs:>12.3f}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
