"""Which timm Vision Transformers ``linearize`` serves, checked against ``torch.func.jvp``.

    python -m benchmarks.timm_coverage [--modules vision_transformer deit] [--max-params 60e6]
                                       [--out benchmarks/results/timm-coverage.md]

Builds every model registered in ``timm.models.vision_transformer`` and ``timm.models.deit``
(random weights, depth 2, one per distinct architecture), linearizes it (all blocks, and the
last block only) on the reference backend in float64 with random offsets, and records the
largest relative error of the output and of the offsets' gradients against
``verify.jvp_oracle``, or the error a model is refused with; and the error of ``torch.func.jvp``
through ``patch(model)`` (fused attention, default backend). Writes a markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

import torch
from tqdm import tqdm

import tangent_kernels as tk
from tangent_kernels.patching import layer_norm as patched_layer_norm
from tangent_kernels.patching import sdpa


def architecture(model: torch.nn.Module) -> str:
    """A signature that tells apart the configurations ``linearize`` can treat differently."""
    kinds = sorted({type(m).__name__ for m in model.modules()})
    flags = [getattr(model, n, None) for n in ("global_pool", "no_embed_class", "num_prefix_tokens", "dynamic_img_size")]
    return f"{kinds}{flags}"


def check(model: torch.nn.Module, blocks) -> str:
    try:
        lin = tk.linearize(model, blocks, backend="reference")
    except tk.UnsupportedModuleError as error:
        return f"refused: {error}"
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0.0, 0.01)
    images = torch.randn(1, 3, *model.patch_embed.img_size, dtype=torch.float64)
    errors = tk.verify.linearization_error(model, lin, images)
    return f"output {errors['output']:.1e}, gradient {errors['gradient']:.1e}"


def check_patched(model: torch.nn.Module) -> str:
    """Unmodified ``torch.func.jvp`` code through ``patch(model)`` against the same code unpatched."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    offsets = {k: 0.01 * torch.randn_like(v) for k, v in params.items()}
    images = torch.randn(1, 3, *model.patch_embed.img_size, dtype=torch.float64)
    expected, _ = tk.verify.jvp_oracle(model, offsets, images)
    with tk.patched(model):
        y, y_t = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (images,)), (params,), (offsets,))
    return f"output {((y + y_t) - expected).abs().max().item() / expected.abs().max().item():.1e}"


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=["vision_transformer", "deit"], help="timm model modules")
    parser.add_argument("--max-params", type=float, default=60e6, help="skip models larger than this at depth 2")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "timm-coverage.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    sdpa.CPU_FUSED_MIN_SCORES = 0  # the models' few tokens would run math SDPA: check the fused kernel
    patched_layer_norm.CPU_FUSED_MIN_ELEMENTS = 0  # and torch's layer norm
    torch.manual_seed(0)
    seen, rows = set(), []
    names = [name for module in args.modules for name in timm.list_models(module=module)]
    for name in tqdm(names, desc="timm ViTs"):
        model = timm.create_model(name, pretrained=False, depth=2, num_classes=5)
        signature = architecture(model)
        if signature in seen or sum(p.numel() for p in model.parameters()) > args.max_params:
            continue
        seen.add(signature)
        model = model.double().eval()
        rows.append((name, check(model, "all"), check(model, 1), check_patched(model)))
    lines = [f"timm {timm.__version__}, torch {torch.__version__}, float64, depth 2; linearize on the reference "
             "backend, patch on the default one; largest error relative to torch.func.jvp's largest magnitude", "",
             "| model | linearize, blocks='all' | linearize, blocks=1 | patch(model) + torch.func.jvp |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {' | '.join(row)} |" for row in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
