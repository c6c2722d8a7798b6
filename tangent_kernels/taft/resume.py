"""Per-epoch training checkpoints: a killed run restarts from its last epoch and ends as an
uninterrupted one would (trained tensors, optimizer, learning-rate schedule, gradient scaler and
the random states: the generators of the batches and of the DP noise, torch's own, for dropout,
and Python's, which timm's augmentation draws in the main process; not those of DataLoader worker
processes).

A checkpoint names the run it belongs to (configuration, data, parameter shapes, the base model's
fingerprint); resuming another run from it is refused. Written atomically (a temporary file of
this process, then ``os.replace``).
"""

from __future__ import annotations

import os
import random

import torch

FORMAT = "tangent_kernels.taft_resume/1"


def save(path: str, epoch: int, run: str, params: dict[str, torch.Tensor], optimizer, scheduler, scaler,
         generators: dict[str, torch.Generator], losses: list[float], device: torch.device) -> None:  # fmt: skip
    """State after ``epoch`` (0-based) is complete."""
    state = {
        "format": FORMAT, "run": run, "epochs_done": epoch + 1, "losses": list(losses),
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "generators": {name: g.get_state() for name, g in generators.items()}, "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python_rng": random.getstate(),
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # (two processes writing one path never share it)
    torch.save(state, temporary)
    os.replace(temporary, path)


def restore(path: str | None, run: str, params: dict[str, torch.Tensor], optimizer, scheduler, scaler,
            generators: dict[str, torch.Generator], device: torch.device) -> tuple[int, list[float]]:  # fmt: skip
    """Load the checkpoint at ``path`` if there is one: the number of epochs done and their losses
    (``0, []`` without a checkpoint)."""
    if path is None or not os.path.exists(path):
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: name it rather than resume from it
        raise ValueError(f"checkpoint: {path} is not a readable training checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a training checkpoint of format {FORMAT!r}")
    if state["run"] != run:
        raise ValueError(f"checkpoint: {path} belongs to another run (configuration, data or model differ: "
                         f"{state['run']!r} vs {run!r}); delete it or choose another path")  # fmt: skip
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    random.setstate(state["python_rng"])
    return int(state["epochs_done"]), list(state["losses"])
