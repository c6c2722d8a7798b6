"""Check a linearized model against the independent oracle: ``torch.func.jvp`` of the original.

The oracle differentiates the original model's own code (``functional_call``) at ``w0`` along
the offsets ``dw``, with timm's fused SDPA turned off (it has no forward-AD rule), and its
gradients with ``torch.func.grad``. Use it on your own model in float64 to trust the result.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .patching import has_fused_attn_flag


@contextlib.contextmanager
def math_attention(model: nn.Module):
    """timm's modules with ``fused_attn`` off for the block, restored after."""
    flags = {m: m.fused_attn for m in filter(has_fused_attn_flag, model.modules())}
    try:
        for module in flags:
            module.fused_attn = False
        yield model
    finally:
        for module, flag in flags.items():
            module.fused_attn = flag


def jvp_oracle(model: nn.Module, offsets: dict[str, Tensor], images: Tensor,
               grad_out: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``f(x; w0) + J f(x; w0) · dw`` by ``torch.func.jvp`` of ``model``, and with ``grad_out``
    the gradient of ``<output, grad_out>`` with respect to each offset (else ``{}``).

    ``offsets`` maps the model's parameter names to ``dw``; missing names are zero.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    unknown = set(offsets) - set(params)
    if unknown:
        raise ValueError(f"offsets: names the model has no parameter for: {sorted(unknown)}")
    offsets = {k: v.detach() for k, v in offsets.items()}

    def f_lin(offsets):
        tangents = {k: offsets.get(k, torch.zeros_like(v)) for k, v in params.items()}
        y, y_t = jvp(lambda p: functional_call(model, p, (images,)), (params,), (tangents,))
        return y + y_t

    with math_attention(model):
        out = f_lin(offsets)
        if grad_out is None:
            return out, {}
        return out, torch.func.grad(lambda o: (f_lin(o) * grad_out).sum())(offsets)


def linearization_error(model: nn.Module, linearized: nn.Module, images: Tensor, seed: int = 0) -> dict[str, float]:
    """Largest errors of ``linearized`` (its current offsets) against ``jvp_oracle``, relative to
    the oracle's largest magnitude: ``{"output": ..., "gradient": ...}`` (the gradient error is
    the worst over the offsets, of ``<output, g>`` for a random ``g``). Run it in float64."""
    if getattr(linearized, "frozen", None) is not None and getattr(linearized, "cls_token", None) is not None:
        raise ValueError("linearized: a fresh class token (fresh_cls_token=True) has no counterpart in the model")
    out = linearized(images)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    offsets = dict(linearized.named_parameters())
    grads = torch.autograd.grad((out * grad_out).sum(), list(offsets.values()))
    expected, expected_grads = jvp_oracle(model, offsets, images, grad_out)

    def largest(t: Tensor) -> float:
        return t.double().abs().max().item() if t.numel() else 0.0

    def relative(actual: Tensor, wanted: Tensor, floor: float = 1e-300) -> float:
        return largest(actual.double() - wanted.double()) / max(largest(wanted), floor)

    # A gradient that is zero exactly (a key bias under softmax) is measured against 1e-6 of the largest.
    floor = 1e-6 * max((largest(g) for g in expected_grads.values()), default=0.0)
    gradient = max((relative(g, expected_grads[name], floor) for name, g in zip(offsets, grads)), default=0.0)
    return {"output": relative(out.detach(), expected), "gradient": gradient}
