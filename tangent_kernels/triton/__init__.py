"""The one module that imports Triton and knows how its kernels run.

Kernels are compiled for CUDA tensors, or run by Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before this package is imported (Triton reads it when a kernel is
defined, so later changes have no effect). Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import functools
import os
import threading

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
    if dtype == torch.float32 and not matmuls_allow_tf32():
        return "ieee"
    return "tf32"


def matmuls_allow_tf32() -> bool:
    """torch's TF32 setting for CUDA matmuls, read through the ``fp32_precision`` API, which also
    reflects the legacy setters (``allow_tf32``, ``set_float32_matmul_precision``); reading
    ``allow_tf32`` raises once the new API has set it. ``"none"`` defers to the global setting."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


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


# Launches from several threads at once (``nn.DataParallel`` runs a replica per GPU in threads)
# take turns: Triton's autotuner keeps the running launch's arguments on itself (``nargs``, reset
# to ``None`` when a launch ends), so concurrent launches read each other's or crash on ``None``,
# and the interpreter swaps ``triton.language`` globally while a kernel runs. Only the host-side
# launch is held: the kernels run asynchronously on each device's stream.
_LAUNCH_LOCK = threading.RLock()


def launcher(launch):
    """A launch entry point, run on the CUDA device of its first argument (a tensor): Triton compiles
    and launches for the current device and its stream, whatever device the tensors live on (a model
    on ``cuda:1`` while ``cuda:0`` is current read another GPU's memory, or raced its stream); one
    thread at a time (``_LAUNCH_LOCK``)."""

    @functools.wraps(launch)
    def on_the_tensors_device(first, *args, **kwargs):
        with _LAUNCH_LOCK:
            if first.device.type != "cuda":
                return launch(first, *args, **kwargs)
            with torch.cuda.device(first.device):
                return launch(first, *args, **kwargs)

    return on_the_tensors_device


# The attention kernels offset a row of a (B, H, N, D) tensor by ``row × row stride`` in 32-bit
# integers (batch and head offsets are 64-bit): past this, the offset would wrap.
MAX_ROW_OFFSET = 2**31 - 1


def check_row_offsets(**tensors: torch.Tensor | None) -> None:
    """Refuse ``(B, H, N, D)`` tensors whose last row starts past ``MAX_ROW_OFFSET`` elements from its
    (batch, head) start (e.g. N = 524288 tokens of 32 heads × 128 in the (B, N, H, D) layout)."""
    for name, t in tensors.items():
        if t is not None and t.shape[2] and (t.shape[2] - 1) * t.stride(2) + t.shape[3] > MAX_ROW_OFFSET:
            raise ValueError(f"{name}: {t.shape[2]} rows {t.stride(2)} elements apart reach past 2**31 - 1 "
                             "elements, beyond the Triton attention kernels' 32-bit row offsets")  # fmt: skip


def dense_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D parameter (bias, norm weight) as the kernels index it, ``P + cols``: unit stride (a
    copy only if it is a strided or expanded view)."""
    return None if t is None else t.contiguous()


# The oldest GPUs the kernels are compiled and checked for (Ampere, sm_80): the tile lists assume
# bf16 tensor cores and 99 KB or more of shared memory (Turing's T4 has 64 KB; Volta has no bf16).
MIN_CAPABILITY = (8, 0)


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
    if device.type == "cuda" and not INTERPRETING and not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if device.type == "cuda" and not INTERPRETING and (device.index or 0) >= torch.cuda.device_count():
        return f"device {device} does not exist ({torch.cuda.device_count()} CUDA GPUs)"
    if device.type == "cuda" and not INTERPRETING and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        found = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"{torch.cuda.get_device_name(device)} has compute capability {found}; the kernels need 8.0 or newer"
    return ""


def length_bucket(length: int) -> int:
    """The power of two at or above ``length``: autotuning keys hold it, not the length itself, so
    variable-length inputs (text, image sizes) tune once per bucket, not once per length."""
    return 1 << max(int(length) - 1, 0).bit_length()


class _BucketedCache(dict):
    """An autotuner's cache of the best config per key, with the key's entries at ``positions``
    (sequence lengths) replaced by their ``length_bucket``, and the launch device's compute
    capability added (a config tuned on one GPU may not fit another's shared memory)."""

    def __init__(self, positions):
        super().__init__()
        self.positions = positions

    def bucketed(self, key: tuple) -> tuple:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_initialized() else None
        return (*(length_bucket(v) if i in self.positions else v for i, v in enumerate(key)), capability)

    def __contains__(self, key):
        return super().__contains__(self.bucketed(key))

    def __getitem__(self, key):
        return super().__getitem__(self.bucketed(key))

    def __setitem__(self, key, value):
        super().__setitem__(self.bucketed(key), value)

    def get(self, key, default=None):
        return super().get(self.bucketed(key), default)


def shared_memory_limit(device: torch.device) -> int | None:
    """Opt-in shared memory per block of ``device``; ``None`` off CUDA and in the interpreter (no limit)."""
    if device.type != "cuda" or INTERPRETING:
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def fitting_configs(kernel, configs, args: dict, wanted: int | None = None) -> list:
    """The first ``wanted`` (all if ``None``) of ``configs`` whose compile for a launch of ``kernel``
    with ``args`` fits the launch device's shared memory, in order (Triton's ``warmup`` compiles
    without launching; the autotuner would compile each config anyway). A config that does not
    compile there (ptxas, resources) is dropped, as Triton's autotuner drops it when benchmarking.
    Off CUDA all fit; if none fits, Triton's ``OutOfResources`` (callers fall back on it), or the
    first config's compile error."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    # the kernel's own arguments: the autotuner's keyword arguments hold the launch's grid and flags too
    args = {name: value for name, value in args.items() if name in kernel.arg_names}
    device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
    limit = shared_memory_limit(device)
    if limit is None:
        return configs[:wanted]
    kept, too_big, failed = [], [], []
    for config in configs:
        if wanted is not None and len(kept) == wanted:
            break
        try:
            shared = kernel.warmup(grid=(1,), **args, **config.all_kwargs()).metadata.shared
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError) as error:
            failed.append(error)
            continue
        (kept if shared <= limit else too_big).append(config if shared <= limit else shared)
    if not kept and too_big:
        raise OutOfResources(min(too_big), limit, "shared memory")
    if not kept:
        raise failed[0]
    return kept


def autotune(configs, key, prune, lengths=()):
    """``triton.autotune`` over the configs that ``prune(configs, named_args, **kwargs)`` keeps and
    that fit the launch device's shared memory (``fitting_configs``), keyed on ``key`` with the
    arguments named in ``lengths`` bucketed (``length_bucket``).

    With tuning off (the interpreter, or ``TANGENT_KERNELS_AUTOTUNE=0`` as the tests set) only the
    first kept config runs, so a test exercises exactly one config and never benchmarks.
    """
    unknown = set(lengths) - set(key)
    if unknown:
        raise ValueError(f"lengths: {sorted(unknown)} are not in key {key}")

    def decorate(kernel):
        def early_config_prune(configs_, named_args, **kwargs):
            args = {**named_args, **kwargs}
            return fitting_configs(kernel, prune(configs_, named_args, **kwargs), args, None if TUNING else 1)

        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_config_prune})
        tuner = tuner(kernel)
        # The tuner's key lists ``key`` in order (every name is an argument of each launch).
        tuner.cache = _BucketedCache({i for i, name in enumerate(key) if name in lengths})
        return tuner

    return decorate


# Opt-in shared memory per block by compute capability (CUDA programming guide, the table of
# technical specifications: 163 KB on 8.0, 99 KB on 8.6, 8.9 and 12.x, 227 KB on 9.0 and 10.0).
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
