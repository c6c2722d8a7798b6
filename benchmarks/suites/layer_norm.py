"""Layer norm and RMSNorm forward + tangent: ours against torch.func.jvp of ``F.layer_norm`` /
``F.rms_norm`` and the plain forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import jvp

import tangent_kernels as tk
from tangent_kernels import functional, reference

from . import Case, relative_error

# (rows, width): ViT-S/16 and ViT-B/16 at 224 px (197 tokens), batch 8 on the CPU, 64/256 on a GPU;
# on a GPU also 8 sequences of 2048 tokens at LLM widths: the widest row held in registers (4096)
# beside rows the kernels walk in tiles (8192).
CPU_SHAPES = [(8 * 197, 384), (8 * 197, 768)]
GPU_SHAPES = [(64 * 197, 768), (256 * 197, 768), (64 * 197, 1024), (256 * 197, 1024), (8 * 2048, 4096),
              (8 * 2048, 8192)]  # fmt: skip
NORMS = ("LayerNorm", "RMSNorm")


def cases(device: torch.device, full: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    return [_case(rows, width, dtype, device, norm) for norm in NORMS for rows, width in shapes]


def _case(rows: int, width: int, dtype: torch.dtype, device: torch.device, norm: str) -> Case:
    """One norm at one shape; both streams from tangents on the input and every parameter."""
    x, x_t = (torch.randn(rows, width, device=device, dtype=dtype) for _ in range(2))
    w, b, dw, db = (torch.randn(width, device=device, dtype=dtype) for _ in range(4))
    if norm == "LayerNorm":
        primals, tangents, op = (x, w, b), (x_t, dw, db), "layer_norm_jvp"

        def plain(x=x, w=w, b=b):
            return F.layer_norm(x, (width,), w, b, eps=1e-6)

        def ours():
            return functional.layer_norm_jvp(x, x_t, w, b, dw, db, eps=1e-6)

        def expected():
            return reference.layer_norm_jvp(*(t.double() for t in (x, x_t, w, b, dw, db)), eps=1e-6)
    else:
        primals, tangents, op = (x, w), (x_t, dw), "rms_norm_jvp"

        def plain(x=x, w=w):
            return F.rms_norm(x, (width,), w, eps=1e-6)

        def ours():
            return functional.rms_norm_jvp(x, x_t, w, dw, eps=1e-6)

        def expected():
            x64, x_t64, w64, dw64 = (t.double() for t in (x, x_t, w, dw))
            return reference.layer_norm_jvp(x64, x_t64, w64, None, dw64, None, eps=1e-6, centered=False)

    def torch_jvp():
        return jvp(plain, primals, tangents)

    def check():
        reference_result = expected()
        return {mode: max(relative_error(a, e) for a, e in zip(fn(), reference_result))
                for mode, fn in (("ours", ours), ("torch.func.jvp", torch_jvp))}  # fmt: skip

    element_bytes = x.element_size()
    ours()
    return Case(
        suite="layer_norm",
        name=f"{norm} rows={rows} width={width} {str(dtype).removeprefix('torch.')}",
        params={"norm": norm, "rows": rows, "width": width, "dtype": str(dtype), "device": device.type,
                "backend": tk.last_backend(op)},  # fmt: skip
        modes={"plain forward": plain, "ours": ours, "torch.func.jvp": torch_jvp},
        # Bytes that must move: read x (and x_t), write y (and y_t); parameters are negligible.
        bytes={"plain forward": 2 * rows * width * element_bytes,
               "ours": 4 * rows * width * element_bytes,
               "torch.func.jvp": 4 * rows * width * element_bytes},  # fmt: skip
        check=check,
        tolerance=2e-2 if dtype == torch.bfloat16 else 1e-5,
        ratios=(("torch.func.jvp", "ours"), ("ours", "plain forward")),
    )
