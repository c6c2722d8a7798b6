"""The ViT MLP (fc1 → GELU → fc2) forward + tangent: ours against torch.func.jvp of timm's Mlp.

Shapes of ViT-B/16 (768 → 3072) and ViT-L/16 (1024 → 4096) at 197 tokens; batch 64 and 256 in
bf16 on a GPU, batch 8 in fp32 on the CPU. FLOPs: the plain forward is 4·M·C·H (two GEMMs);
forward + tangent with every input and offset present 12·M·C·H (six GEMMs).
"""

from __future__ import annotations

import functools
import os

import torch
from timm.layers import Mlp
from torch.func import functional_call, jvp

import tangent_kernels as tk
from tangent_kernels import functional, reference

from . import Case, relative_error

WIDTHS = {"ViT-B/16": (768, 3072), "ViT-L/16": (1024, 4096)}
GPU_BATCHES = [64, 256]
CPU_BATCHES = [8]
TOKENS = 197


def cases(device: torch.device, full: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = GPU_BATCHES if device.type == "cuda" else CPU_BATCHES
    widths = WIDTHS if (device.type == "cuda" or full) else {"ViT-B/16": WIDTHS["ViT-B/16"]}
    return [_case(model, c, h, b, dtype, device) for model, (c, h) in widths.items() for b in batches]


def _case(model: str, features: int, hidden: int, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    torch.manual_seed(0)
    mlp = Mlp(features, hidden).to(device, dtype)
    params = {n: p.detach() for n, p in mlp.named_parameters()}
    offsets = {n: 1e-2 * torch.randn_like(p) for n, p in params.items()}
    x, x_t = (torch.randn(batch, TOKENS, features, device=device, dtype=dtype) for _ in range(2))
    args = (x, x_t, params["fc1.weight"], params["fc1.bias"], params["fc2.weight"], params["fc2.bias"],
            offsets["fc1.weight"], offsets["fc1.bias"], offsets["fc2.weight"], offsets["fc2.bias"])  # fmt: skip

    def ours():
        return functional.mlp_jvp(*args)

    def torch_jvp():
        return jvp(lambda x, p: functional_call(mlp, p, (x,)), (x, params), (x_t, offsets))

    modes = {"plain forward": lambda: mlp(x), "ours": ours, "torch.func.jvp": torch_jvp}
    ratios = [("torch.func.jvp", "ours"), ("ours", "plain forward")]
    if device.type == "cuda":  # both Triton paths, for benchmarks.linear_paths to record the winner
        for mode, path in (("ours fused GEMM", "fused"), ("ours composite", "composite")):
            modes[mode] = functools.partial(_on_linear_path, path, ours)
        ratios.append(("ours composite", "ours fused GEMM"))
    m = batch * TOKENS
    flops = {mode: 12 * m * features * hidden for mode in modes}
    flops["plain forward"] = 4 * m * features * hidden

    def check():
        expected = reference.mlp_jvp(*(t.double() for t in args))
        return {mode: max(relative_error(a, e) for a, e in zip(modes[mode](), expected))
                for mode in ("ours", "torch.func.jvp")}  # fmt: skip

    with torch.no_grad():
        ours()
    return Case(
        suite="mlp",
        name=f"{model} batch={batch} {str(dtype).removeprefix('torch.')}",
        params={"features": features, "hidden": hidden, "batch": batch, "tokens": TOKENS, "dtype": str(dtype),
                "device": device.type, "backend": tk.last_backend("mlp_jvp")},  # fmt: skip
        modes={name: torch.no_grad()(fn) for name, fn in modes.items()},
        flops=flops,
        check=check,
        tolerance=2e-2 if dtype != torch.float32 else 1e-4,
        ratios=tuple(ratios),
    )


def _on_linear_path(path: str, fn):
    """``fn()`` with linear layers forced onto the fused GEMM or the composite path."""
    previous = os.environ.get("TANGENT_KERNELS_LINEAR_PATH")
    os.environ["TANGENT_KERNELS_LINEAR_PATH"] = path
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["TANGENT_KERNELS_LINEAR_PATH"]
        else:
            os.environ["TANGENT_KERNELS_LINEAR_PATH"] = previous
