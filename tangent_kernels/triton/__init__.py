"""The one module that imports Triton and knows how its kernels run.

Kernels are compiled for CUDA tensors, or run by Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before this package is imported (Triton reads it when a kernel is
defined, so later changes have no effect). Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError as error:  # the package works without Triton, on the other backends
    triton = None
    UNAVAILABLE_REASON = f"triton is not importable ({error})"
else:
    UNAVAILABLE_REASON = ""

AVAILABLE = triton is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TUNING = AVAILABLE and not INTERPRETING and os.environ.get("TANGENT_KERNELS_AUTOTUNE", "1") != "0"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Triton's names of the dtypes the kernels ship (for signatures in compile_specs()).
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 tiles multiply in full fp32 unless torch allows TF32 for
    matmuls, as torch itself does; 16-bit tiles ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tile_class(element_size: int, precision: str) -> str:
    """Which config list serves a launch with ``tl.dot``: 16-bit tiles, or fp32 tiles multiplied as
    TF32 on the tensor cores, or exactly (IEEE) on the FMA units, where every thread holds far more
    of each tile (the sizes that suit TF32 compile into heavy register spills there)."""
    if element_size == 2:
        return "16-bit"
    return "tf32" if precision == "tf32" else "ieee"


def compiled_variants():
    """``(dtype, dot precision, label)`` for each way a kernel with ``tl.dot`` can be launched:
    16-bit tiles (precision unused) and fp32 tiles both ways, since ``dot_precision`` follows a
    runtime flag; the compile checks cover every one."""
    return [(torch.float16, "tf32", "fp16"), (torch.bfloat16, "tf32", "bf16"),
            (torch.float32, "ieee", "fp32-ieee"), (torch.float32, "tf32", "fp32-tf32")]  # fmt: skip


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last dim]`` with unit column stride (a copy only if needed)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` read with unit stride along its last dimension (a copy only if it is not so)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def check_served(name: str, t: torch.Tensor) -> None:
    """The raw ops (``torch.ops.tangent_kernels.*`` with ``backend="triton"``) reach the launchers
    without ``functional``'s backend choice: refuse what the kernels cannot run (float64 would
    run in float32 precision under the interpreter and fail to compile on a GPU)."""
    reason = unsupported_reason(t.device, t.dtype)
    if reason:
        error = TypeError if t.dtype not in DTYPES else ValueError
        raise error(f"{name}: the triton backend cannot run it: {reason}")


def dense_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D parameter (bias, norm weight) as the kernels index it, ``P + cols``: unit stride (a
    copy only if it is a strided or expanded view)."""
    return None if t is None else t.contiguous()


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str:
    """Why the Triton backend cannot run on this device and dtype; empty when it can."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if device.type == "cpu" and not INTERPRETING:
        return "CPU tensors need TRITON_INTERPRET=1 set before tangent_kernels is imported"
    if device.type not in ("cuda", "cpu"):
        return f"device {device.type!r} is not supported (expected cuda, or cpu under TRITON_INTERPRET=1)"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (expected one of float16, bfloat16, float32)"
    return ""


def autotune(configs, key, prune):
    """``triton.autotune`` over the configs that ``prune(configs, named_args, **kwargs)`` keeps.

    With tuning off (the interpreter, or ``TANGENT_KERNELS_AUTOTUNE=0`` as the tests set) only the
    first kept config runs, so a test exercises exactly one config and never benchmarks.
    """

    def first_only(configs_, named_args, **kwargs):
        return prune(configs_, named_args, **kwargs)[:1]

    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune if TUNING else first_only},
    )


# Opt-in dynamic shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
