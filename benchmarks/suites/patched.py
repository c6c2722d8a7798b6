"""Third-party models under ``tk.patch``: unmodified ``torch.func.jvp`` training steps, patched
(attention through our fused kernel) against unpatched (torch's math attention, the only SDPA
with a forward-AD rule), time and peak memory side by side.

- ``MeanFlow step``: a diffusers ``DiTTransformer2DModel`` as ``u(z, t)``; ``u, du/dt`` by
  ``torch.func.jvp`` along ``(v, 1)``, the target ``v − t · du/dt`` detached, and the backward of
  the squared error to the weights (the MeanFlow training step);
- ``LinearizedModel step``: ``f(x; w0) + J f · dw`` by ``torch.func.jvp`` of ``functional_call``
  (task arithmetic's ``LinearizedModel``), a squared error, the backward to ``dw``: on
  open_clip's vision tower with ``batch_first`` True and False (older open_clip releases, and the
  task-arithmetic code, run sequence-first), and on Hugging Face's ``CLIPVisionModel``.

A library that is not installed (they are test-only dependencies) drops its cases.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk

from . import Case, relative_error

# (width, layers, heads, image size, patch, batch): the CPU default, the CPU/GPU full sizes (ViT-B/16,
# 197 tokens; with fewer, e.g. B/32's 50, the router hands CPU attention to torch's math SDPA).
CLIP_SMALL = (256, 4, 4, 224, 16, 2)
CLIP_B16 = (768, 12, 12, 224, 16, 8)
# (hidden, layers, heads, latent size, batch): DiT-S/2 on 32×32 latents at full size.
DIT_SMALL = (192, 4, 3, 32, 2)
DIT_S2 = (384, 12, 6, 32, 8)
# Patched and unpatched steps are within a few percent of each other where attention is a small
# share of the step (the CPU default): their ratio is measured side by side over this many rounds.
INTERLEAVED_ROUNDS = 11


def cases(device: torch.device, full: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clip, dit = (CLIP_B16, DIT_S2) if full else (CLIP_SMALL, DIT_SMALL)
    found = []
    if importlib.util.find_spec("diffusers"):
        found.append(_meanflow_case(dit, dtype, device))
    if importlib.util.find_spec("open_clip"):
        found += [_open_clip_case(clip, batch_first, dtype, device) for batch_first in (True, False)]
    if importlib.util.find_spec("transformers"):
        found.append(_hf_clip_case(clip, dtype, device))
    return found


def _math(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with torch's math SDPA (the fused SDPA kernels have no forward-AD rule); the warning
    that an unpatched model ran while its patched copy exists is this comparison's intent."""

    def run():
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="tangent_kernels: an unpatched")
            return fn()

    return run


def _patched_against_math(suite: str, name: str, params: dict, step, model, check) -> Case:
    """A case timing ``step(model)`` on the unpatched model (math SDPA) and on a patched copy."""
    patched = tk.patch(copy.deepcopy(model))
    return Case(
        suite=suite,
        name=name,
        params=params,
        modes={"unpatched (math attention)": _math(lambda: step(model)), "patched": lambda: step(patched)},
        check=lambda: check(model, patched),
        tolerance=5e-2 if params["dtype"] != str(torch.float32) else 1e-3,
        ratios=(("unpatched (math attention)", "patched"),),
        interleaved_rounds=INTERLEAVED_ROUNDS,
    )


def _meanflow_case(sizes, dtype, device) -> Case:
    from diffusers import DiTTransformer2DModel

    hidden, layers, heads, latent, batch = sizes
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                  out_channels=4, num_layers=layers, sample_size=latent, patch_size=2,
                                  num_embeds_ada_norm=1000).to(device, dtype).eval()  # fmt: skip
    # eval: in training diffusers drops class labels at random, so two runs would differ
    z = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    v = torch.randn_like(z)
    t = torch.rand(batch, device=device, dtype=dtype)
    labels = torch.arange(batch, device=device) % 1000

    def u_and_dudt(net):
        return jvp(lambda z, t: net(z, timestep=t, class_labels=labels).sample, (z, t), (v, torch.ones_like(t)))

    def step(net):
        u, dudt = u_and_dudt(net)
        target = (v - t[:, None, None, None] * dudt).detach()
        return torch.autograd.grad((u.float() - target.float()).square().mean(), list(net.parameters()))

    def check(plain, patched):
        expected = _math(lambda: u_and_dudt(plain))()[1].double()
        return {"patched": relative_error(u_and_dudt(patched)[1], expected)}

    params = {"model": "diffusers DiT", "hidden": hidden, "layers": layers, "tokens": (latent // 2) ** 2,
              "batch": batch, "dtype": str(dtype), "device": device.type}  # fmt: skip
    return _patched_against_math("meanflow", f"DiT h={hidden} L={layers} batch={batch} MeanFlow step", params, step,
                                 model, check)  # fmt: skip


def _linearized_model_step(net, images):
    """Task arithmetic's LinearizedModel step: jvp of functional_call along dw, a loss, grads of dw."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    offsets = {n: (1e-3 * torch.randn_like(p)).requires_grad_() for n, p in params.items()}

    def outputs(net):
        def forward(p):
            out = functional_call(net, p, (images,))
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        y, y_t = jvp(forward, (params,), (offsets,))
        return y.float() + y_t.float()

    def step(net):
        return torch.autograd.grad(outputs(net).square().mean(), list(offsets.values()))

    def check(plain, patched):
        with torch.no_grad():
            expected = _math(lambda: outputs(plain))().double()
            return {"patched": relative_error(outputs(patched), expected)}

    return step, check


def _open_clip_case(sizes, batch_first: bool, dtype, device) -> Case:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    width, layers, heads, image, patch, batch = sizes
    torch.manual_seed(0)
    cfg = CLIPVisionCfg(width=width, layers=layers, head_width=width // heads, image_size=image, patch_size=patch)
    visual = _build_vision_tower(512, cfg).to(device, dtype).train()
    if not batch_first:  # the sequence-first layout of open_clip before 2.20 (task arithmetic's code)
        visual.transformer.batch_first = False
        for block in visual.transformer.resblocks:
            block.attn.batch_first = False
    images = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    step, check = _linearized_model_step(visual, images)
    params = {"model": "open_clip ViT", "width": width, "layers": layers, "tokens": (image // patch) ** 2 + 1,
              "batch": batch, "batch_first": batch_first, "dtype": str(dtype), "device": device.type}  # fmt: skip
    name = f"open_clip w={width} L={layers} batch={batch} batch_first={batch_first} LinearizedModel step"
    return _patched_against_math("open_clip", name, params, step, visual, check)


def _hf_clip_case(sizes, dtype, device) -> Case:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    width, layers, heads, image, patch, batch = sizes
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image, patch_size=patch)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = CLIPVisionModel(config).to(device, dtype).train()
    images = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    step, check = _linearized_model_step(model, images)
    params = {"model": "HF CLIPVisionModel (sdpa)", "width": width, "layers": layers,
              "tokens": (image // patch) ** 2 + 1, "batch": batch, "dtype": str(dtype), "device": device.type}  # fmt: skip
    name = f"HF CLIP w={width} L={layers} batch={batch} LinearizedModel step"
    return _patched_against_math("hf_clip", name, params, step, model, check)
