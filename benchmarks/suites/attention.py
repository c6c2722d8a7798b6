"""Attention forward + tangent: ours against torch.func.jvp of math SDPA, flash SDPA, and peers.

GPU (bf16, B=1, H=32, d=64, N = 512 … 16384, as issue 3 asks): ours, ``torch.func.jvp`` through
math SDPA (as users must today), torch's flash SDPA forward alone, ``jvp_flash_attention`` when
installed, and the backward of our tangent stream against torch's flash backward.
CPU (fp32, B=1, H=6, d=64, ViT-S-like, N = 197 … 1024, 2048 and 4096 with ``--full``): the same modes
that run on a CPU.

FLOPs: forward + tangent 12·B·H·N²·d (six N×N×d products), forward 4·B·H·N²·d, backward
10·B·H·N²·d (five products: recomputed S, dV, dP, dQ, dK).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from tangent_kernels import functional, reference

from . import Case, relative_error

GPU_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
CPU_LENGTHS = [197, 512, 1024]  # ViT-B/16 at 224 px; then time and peak memory against N
# 2048 took 23 s of the 2.5-minute default run; torch.func.jvp at 4096 takes 2 s a call and 2 GiB here
CPU_FULL_LENGTHS = [*CPU_LENGTHS, 2048, 4096]
CHECK_ROWS = 1024  # the check compares the first query rows of the first two heads (float64 is N×N)


def cases(device: torch.device, full: bool) -> list[Case]:
    if device.type == "cuda":
        return [_case(1, 32, n, 64, torch.bfloat16, device) for n in GPU_LENGTHS]
    return [_case(1, 6, n, 64, torch.float32, device) for n in (CPU_FULL_LENGTHS if full else CPU_LENGTHS)]


def _case(batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> Case:
    q, k, v, q_t, k_t, v_t = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for _ in range(6))
    tangents = (q_t, k_t, v_t)
    grad_out = torch.randn_like(q)

    def ours():
        return functional.attention_jvp(q, k, v, q_t, k_t, v_t)

    def torch_jvp():
        with sdpa_kernel(SDPBackend.MATH):
            return jvp(F.scaled_dot_product_attention, (q, k, v), tangents)

    def flash_forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    modes = {"ours": ours, "torch.func.jvp (math SDPA)": torch_jvp, "flash SDPA forward": flash_forward}
    ratios = [("torch.func.jvp (math SDPA)", "ours"), ("ours", "flash SDPA forward")]
    if device.type == "cpu":
        modes["reference backend"] = lambda: functional.attention_jvp(q, k, v, q_t, k_t, v_t, backend="reference")
        ratios.append(("reference backend", "ours"))
    flops = {name: 12 * batch * heads * n * n * d for name in modes}
    flops["flash SDPA forward"] = 4 * batch * heads * n * n * d

    peer = _jvp_flash_attention()
    if peer is not None and device.type == "cuda":

        def peer_jvp():
            return jvp(peer, (q, k, v), tangents)

        modes["jvp_flash_attention"] = peer_jvp
        flops["jvp_flash_attention"] = flops["ours"]
        ratios.append(("jvp_flash_attention", "ours"))

    if device.type == "cuda":  # the backward of the tangent stream, against flash attention's backward
        tangents_grad = tuple(t.detach().requires_grad_() for t in tangents)
        o_t = functional.attention_jvp(q, k, v, *tangents_grad)[1]
        primal_grad = tuple(t.detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(*primal_grad)
        modes["ours tangent backward"] = lambda: torch.autograd.grad(o_t, tangents_grad, grad_out, retain_graph=True)
        modes["flash SDPA backward"] = lambda: torch.autograd.grad(o, primal_grad, grad_out, retain_graph=True)
        flops["ours tangent backward"] = flops["flash SDPA backward"] = 10 * batch * heads * n * n * d
        ratios.append(("ours tangent backward", "flash SDPA backward"))

    def check():
        rows = slice(0, CHECK_ROWS)
        sliced = [t[:, :2, rows] if i in (0, 3) else t[:, :2] for i, t in enumerate((q, k, v, q_t, k_t, v_t))]
        expected = reference.attention_jvp(*(t.double() for t in sliced))
        errors = {}
        for mode in ("ours", "torch.func.jvp (math SDPA)", "jvp_flash_attention"):
            if mode in modes:
                try:
                    outputs = modes[mode]()
                except Exception:  # a mode that cannot run is reported by the timing, not here
                    continue
                errors[mode] = max(relative_error(a[:, :2, rows], e) for a, e in zip(outputs, expected))
        return errors

    ours()
    return Case(
        suite="attention",
        name=f"B={batch} H={heads} N={n} d={d} {str(dtype).removeprefix('torch.')}",
        params={"batch": batch, "heads": heads, "n": n, "head_dim": d, "dtype": str(dtype),
                "device": device.type, "backend": tk.last_backend("attention_jvp")},  # fmt: skip
        modes=modes,
        flops=flops,
        check=check,
        tolerance=2e-2 if dtype != torch.float32 else 1e-4,
        ratios=tuple(ratios),
    )


def _jvp_flash_attention():
    """The peer kernel's attention function, or ``None`` when the package is not installed."""
    if importlib.util.find_spec("jvp_flash_attention") is None:
        return None
    from jvp_flash_attention.jvp_attention import attention

    return attention
