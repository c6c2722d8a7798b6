"""Whole timm ViTs: the linearized forward and the TAFT training step against torch.func.jvp.

Modes, side by side on one model and batch:
- ``plain forward``: the timm model (its fused SDPA), no grad;
- ``ours (all blocks)`` / ``torch.func.jvp (all blocks)``: ``f(x; w0) + J dw`` for every weight
  (``torch.func.jvp`` of ``functional_call`` with timm's fused attention off, as users must);
- ``ours (last block)``: TAFT-1 (last block, final norm and head linearized);
- ``TAFT step (last block)``, ``torch.func.jvp TAFT step (last block)`` (the ``LinearizedModel``
  pattern), the same code through ``patch(model)``, and ``fine-tuning step (last block)``:
  forward, a squared-error loss and the backward to the trainable weights, with the bytes autograd
  saves for the backward (weights not counted).
"""

from __future__ import annotations

import copy

import timm
import torch
from torch.func import functional_call, jvp

import tangent_kernels as tk
from tangent_kernels.memory import saved_tensor_bytes

from . import Case, relative_error

CPU_MODELS = [("vit_small_patch16_224", 224, 2)]
CPU_FULL_MODELS = [("vit_small_patch16_224", 224, 8), ("vit_base_patch16_224", 224, 4)]
GPU_MODELS = [
    ("vit_small_patch16_224", 224, 64),
    ("vit_base_patch16_224", 224, 64),
    ("vit_large_patch16_224", 224, 32),
    ("vit_base_patch16_384", 384, 16),
]
NUM_CLASSES = 100


def cases(device: torch.device, full: bool) -> list[Case]:
    if device.type == "cuda":
        models = GPU_MODELS
    else:
        models = CPU_FULL_MODELS if full else CPU_MODELS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [_case(name, size, batch, dtype, device) for name, size, batch in models]


def _case(name: str, size: int, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(device, dtype).eval()
    math_model = copy.deepcopy(model)  # torch.func.jvp cannot go through fused SDPA
    for block in math_model.blocks:
        block.attn.fused_attn = False
    patched_model = tk.patch(copy.deepcopy(model))  # the same jvp code, attention through our kernels
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    target = torch.randn(batch, NUM_CLASSES, device=device, dtype=torch.float32)
    lin_all, lin_last = tk.linearize(model, "all"), tk.linearize(model, 1)
    for lin in (lin_all, lin_last):
        with torch.no_grad():
            for p in lin.parameters():
                p.normal_(0.0, 1e-3)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def jvp_tangents(lin, requires_grad):
        offsets = dict(lin.named_parameters())
        return {n: (offsets[n] if requires_grad else offsets[n].detach()) if n in offsets else torch.zeros_like(p)
                for n, p in params.items()}  # fmt: skip

    def torch_jvp(tangents, through=math_model):
        y, y_t = jvp(lambda p: functional_call(through, p, (images,)), (params,), (tangents,))
        return y.float() + y_t.float()

    def loss(out):
        return (out.float() - target).square().mean()

    last_block = {n for n, _ in lin_last.named_parameters()}
    fine_tuned = [p for n, p in model.named_parameters() if n in last_block]

    def fine_tuning_step():
        for n, p in model.named_parameters():
            p.requires_grad_(n in last_block)
        try:
            grads = torch.autograd.grad(loss(model(images)), fine_tuned)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
        return grads

    def taft_step():
        return torch.autograd.grad(loss(lin_last(images)), list(lin_last.parameters()))

    def jvp_taft_step(through=math_model):
        tangents = jvp_tangents(lin_last, requires_grad=True)
        return torch.autograd.grad(loss(torch_jvp(tangents, through)), list(lin_last.parameters()))

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    modes = {
        "plain forward": no_grad(lambda: model(images)),
        "ours (all blocks)": no_grad(lambda: lin_all(images)),
        "torch.func.jvp (all blocks)": no_grad(lambda: torch_jvp(jvp_tangents(lin_all, False))),
        "ours (last block)": no_grad(lambda: lin_last(images)),
        "TAFT step (last block)": taft_step,
        "torch.func.jvp TAFT step (last block)": jvp_taft_step,
        "patched torch.func.jvp TAFT step (last block)": lambda: jvp_taft_step(patched_model),
        "fine-tuning step (last block)": fine_tuning_step,
    }
    weights = [*model.parameters(), *math_model.parameters(), *lin_all.parameters(), *lin_last.parameters(),
               *lin_all.buffers(), *lin_last.buffers()]  # fmt: skip

    def saved_bytes(forward):
        return lambda: {"saved_bytes": saved_tensor_bytes(forward, weights)[0]}

    def fine_tuning_forward():
        for n, p in model.named_parameters():
            p.requires_grad_(n in last_block)
        try:
            return model(images)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)

    extras = {
        "TAFT step (last block)": saved_bytes(lambda: lin_last(images)),
        "torch.func.jvp TAFT step (last block)": saved_bytes(lambda: torch_jvp(jvp_tangents(lin_last, True))),
        "patched torch.func.jvp TAFT step (last block)": saved_bytes(
            lambda: torch_jvp(jvp_tangents(lin_last, True), patched_model)
        ),
        "fine-tuning step (last block)": saved_bytes(fine_tuning_forward),
    }

    def check():
        with torch.no_grad():
            expected = torch_jvp(jvp_tangents(lin_all, False)).double()
            return {"ours (all blocks)": relative_error(lin_all(images), expected)}

    lin_all(images)
    return Case(
        suite="vit",
        name=f"{name} batch={batch} {str(dtype).removeprefix('torch.')}",
        params={"model": name, "image_size": size, "batch": batch, "dtype": str(dtype), "device": device.type,
                "backend": tk.last_backend("attention_jvp")},  # fmt: skip
        modes=modes,
        extras=extras,
        check=check,
        tolerance=5e-2 if dtype != torch.float32 else 1e-3,
        ratios=(
            ("torch.func.jvp (all blocks)", "ours (all blocks)"),
            ("ours (last block)", "plain forward"),
            ("ours (all blocks)", "plain forward"),
            ("TAFT step (last block)", "fine-tuning step (last block)"),
            ("torch.func.jvp TAFT step (last block)", "TAFT step (last block)"),
            ("torch.func.jvp TAFT step (last block)", "patched torch.func.jvp TAFT step (last block)"),
        ),
    )
