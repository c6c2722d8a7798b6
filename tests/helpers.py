"""Helpers the kernel tests share: tolerances, float64 oracles, and target compile checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

# atol per dtype for values of order one; the flash-attention rule below scales with the baseline.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def composite_layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Layer norm over the last dim in element-wise ops: autograd differentiates it exactly to every
    order, where torch's native layer norm drops terms (forward AD: pytorch/pytorch#196700; its
    double backward differentiated again: #175754). The oracle for second- and third-order terms."""
    centered = x - x.mean(-1, keepdim=True)
    y = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + (0 if bias is None else bias)


class CompositeLayerNorm(torch.nn.Module):
    """``nn.LayerNorm`` without affine, by ``composite_layer_norm``."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return composite_layer_norm(x, eps=self.eps)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN where either side is NaN."""
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected``."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return max_error(actual, expected) / max(scale, 1e-300)


def assert_close(actual, expected, baseline=None, *, dtype=None, name="output", factor=2.0):
    """``actual`` is within tolerance of the float64 ``expected``.

    With ``baseline`` (the same computation by plain PyTorch in the kernel's dtype), the rule of
    flash-attention's tests: ``err(actual) <= factor · err(baseline) + atol[dtype]``. Without it,
    ``err(actual) <= atol[dtype] · max(1, |expected|)``. NaN anywhere fails.
    """
    assert actual is not None, f"{name}: got None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = dtype or actual.dtype
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result (an element left unwritten?)"
    error = max_error(actual, expected)
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    if baseline is None:
        bound = ATOL[dtype] * scale
    else:
        bound = factor * max_error(baseline, expected) + ATOL[dtype] * scale
    assert error <= bound, f"{name} ({dtype}): max error {error:.3e} > bound {bound:.3e}"


def backend_device(backend: str, device: torch.device) -> torch.device:
    """Where a backend's test runs: Triton on the test device (GPU or interpreter), others on the CPU."""
    return device if backend == "triton" else torch.device("cpu")


def walk_norm_rows(monkeypatch, tile: int = 16) -> None:
    """Make the Triton layer norms walk every row wider than ``tile`` features in tiles of
    ``tile``: the kernels that serve rows wider than ``ROW_TILE`` (4096), at widths the interpreter runs."""
    from tangent_kernels.triton import layer_norm

    monkeypatch.setattr(layer_norm, "ROW_TILE", tile)
    monkeypatch.setattr(layer_norm, "WALK_TILE", tile)


def float64(*tensors):
    """Detached float64 copies (``None`` stays ``None``), keeping ``requires_grad``."""
    return tuple(
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors
    )


def grads(output, inputs, grad_output):
    """``d <output, grad_output> / d input`` for each input that requires grad (else ``None``)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


def compile_for_gpu_targets(module: str, *options: str) -> list[dict]:
    """Compile the kernel specs of ``module`` for GPU targets in a subprocess.

    It runs without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled); returns one
    result per (spec, target, specialization), as printed by ``tangent_kernels.triton.compile_check``
    with ``options`` (which choose the targets, specializations and specs).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.run(
        [sys.executable, "-m", "tangent_kernels.triton.compile_check", *options, module],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert results, f"no compile results for {module}: {process.stderr[-4000:]}"
    return results
