"""TAFT-1 training steps fed by a DataLoader over an ImageFolder, against ordinary fine-tuning.

Modes, on one model, batch and folder of PNG files (written at set-up, decoded and preprocessed
by timm's transform for the model on every call):
- ``data loading (one batch)``: the next batch from the DataLoader alone;
- ``TAFT step from a DataLoader (last block)``: next batch, linearized forward, RSL loss,
  backward to ``dw``, Adam step;
- ``fine-tuning step from a DataLoader (last block)``: the same with the last block, final norm
  and head of the plain model trainable.
Rows carry ``images_per_s``; the ratio ``data loading / step`` is the data-loading share of a step.
On a GPU: bf16 autocast, 8 workers, pinned memory.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import tangent_kernels as tk
from tangent_kernels import taft

from . import Case

CPU_MODELS = [("vit_small_patch16_224", 8)]
GPU_MODELS = [("vit_base_patch16_224", 64)]
NUM_CLASSES, IMAGES, SOURCE_SIZE = 10, 128, 256


def write_folder(root: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for i in range(IMAGES):
        folder = root / f"class_{i % NUM_CLASSES}"
        folder.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (SOURCE_SIZE, SOURCE_SIZE, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def forever(loader: DataLoader):
    """The loader's batches, epoch after epoch, each one loaded (``itertools.cycle`` would replay
    the first epoch's from memory)."""
    while True:
        yield from loader


def cases(device: torch.device, full: bool) -> list[Case]:
    return [_case(name, batch, device) for name, batch in (GPU_MODELS if device.type == "cuda" else CPU_MODELS)]


def _case(name: str, batch: int, device: torch.device) -> Case:
    torch.manual_seed(0)
    folder = tempfile.TemporaryDirectory(prefix="taft-bench-")
    write_folder(Path(folder.name))
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(device).eval()
    lin = tk.linearize(model, 1)
    cuda = device.type == "cuda"
    dataset = ImageFolder(folder.name, transform=taft.data.transform(model))
    dataset.temporary = folder  # the files live as long as the dataset
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=8 if cuda else 0,
                        pin_memory=cuda, persistent_workers=cuda)  # fmt: skip
    stream = None  # started on first use (on a GPU, the workers then start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    last = {n for n, _ in lin.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in last)
    tuned = [p for p in model.parameters() if p.requires_grad]
    optimizers = {"taft": torch.optim.Adam(lin.parameters(), lr=1e-5), "fine": torch.optim.Adam(tuned, lr=1e-5)}

    def next_batch():
        nonlocal stream
        if stream is None:
            stream = forever(loader)
        x, y = next(stream)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def step(net, optimizer):
        def run():
            x, y = next_batch()
            with autocast:
                loss = taft.rsl_loss(net(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return run

    return Case(
        suite="taft_data",
        name=f"{name} batch={batch} {'bf16 autocast' if cuda else 'float32'}",
        params={"model": name, "batch": batch, "images": IMAGES, "device": device.type,
                "num_workers": loader.num_workers, "backend": "auto"},  # fmt: skip
        modes={
            "data loading (one batch)": next_batch,
            "TAFT step from a DataLoader (last block)": step(lin, optimizers["taft"]),
            "fine-tuning step from a DataLoader (last block)": step(model, optimizers["fine"]),
        },
        ratios=(
            ("TAFT step from a DataLoader (last block)", "fine-tuning step from a DataLoader (last block)"),
            ("data loading (one batch)", "TAFT step from a DataLoader (last block)"),
            ("data loading (one batch)", "fine-tuning step from a DataLoader (last block)"),
        ),
    )
