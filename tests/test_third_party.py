"""patch() and fused_jvp() on real third-party model code, built small with random weights.

Hugging Face transformers (CLIP, ViT), open_clip (CLIP: both towers, the text tower's causal
mask), diffusers (DiT) and a MeanFlow-style DiT from timm parts. Each is differentiated as the
codebases that linearize or distil it do: ``jvp`` w.r.t. the parameters (``LinearizedModel``)
and w.r.t. the inputs (MeanFlow's ``jvp(u, (z, t, r), (v, 1, 0))``), then the gradients of a
loss on both outputs. The oracle is the same code unpatched with torch's math attention, in
float64; each test also checks that the fused kernel served the attention.
"""

import copy
import warnings

import pytest
import torch
from helpers import CompositeLayerNorm, max_error
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from tangent_kernels.patching import fused_jvp, patched, watch

F64 = torch.float64
TOLERANCE = 1e-11


@pytest.fixture(autouse=True)
def math_outside_the_patch(monkeypatch):
    """Unpatched code runs torch's math attention (the fused SDPA kernels have no forward-AD rule)."""
    monkeypatch.setattr(watch, "_warned", set())  # the once-per-process warnings, afresh
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning may appear
        warnings.filterwarnings("ignore", message=".*(deprecated|bos_token|eos_token).*")
        yield
    torch.backends.mha.set_fastpath_enabled(previous)


def assert_all_close(actual, expected):
    """Each tensor within ``TOLERANCE`` of its largest magnitude (or absolutely, below 1: some
    gradients are zero in exact arithmetic)."""
    for a, e in zip(actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE * max(1.0, e.abs().max().item())


def offsets_of(model):
    torch.manual_seed(5)
    return {n: (0.05 * torch.randn_like(p)).requires_grad_() for n, p in model.named_parameters()}


def linearized(model, inputs, offsets):
    """LinearizedModel: ``f(x; w0) + J f(x; w0) dw``, and d(loss on y and y_t)/d dw."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(7)  # one draw for whatever the model draws (diffusers' label dropout in training)
    y, y_t = jvp(lambda p: functional_call(model, p, inputs), (params,), (offsets,))
    loss = y.square().sum() + (y_t * torch.linspace(-1, 1, y_t.shape[-1], dtype=y_t.dtype)).sum()
    grads = torch.autograd.grad(loss, list(offsets.values()), allow_unused=True)
    return y, y_t, *(g for g in grads if g is not None)


def along_inputs(model, inputs, tangents, second_order=False):
    """``jvp`` w.r.t. the inputs, then the gradients w.r.t. the parameters of a loss on ``y`` and on
    ``y_t`` detached (MeanFlow's loss: its target is a stop-gradient), or with ``second_order``
    on ``y_t`` itself (the tangent differentiated w.r.t. the primal activations)."""
    torch.manual_seed(7)
    y, y_t = jvp(model, inputs, tangents)
    y_t = y_t if second_order else y_t.detach()
    loss = y.square().sum() + (y * y_t * torch.linspace(-1, 1, y_t.shape[-1], dtype=y_t.dtype)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return y, y_t, *(g for g in grads if g is not None)


def check_patched(model, inputs, tangents):
    """Both patterns, patched against unpatched; and that a no-grad ``jvp`` reaches the fused kernel."""
    offsets = offsets_of(model)
    expected = linearized(model, inputs, offsets), along_inputs(model, inputs, tangents)
    with patched(model):
        assert_all_close(linearized(model, inputs, offsets), expected[0])
        assert_all_close(along_inputs(model, inputs, tangents), expected[1])
        before = watch.fused_calls
        with torch.no_grad():
            jvp(model, inputs, tangents)
        assert watch.fused_calls > before and tk.last_backend("attention_jvp") == "cpp"


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers


class Output(nn.Module):
    """One output of a transformers / diffusers model as a tensor (``jvp`` needs tensors); the input
    is passed as ``name=`` (keyword), the other arguments are fixed."""

    def __init__(self, model, field="last_hidden_state", name="pixel_values", **kwargs):
        super().__init__()
        self.model, self.field, self.name, self.kwargs = model, field, name, kwargs

    def forward(self, x):
        return getattr(self.model(**{self.name: x}, **self.kwargs), self.field)


@pytest.mark.parametrize("name", ["CLIPVision", "ViT"])
def test_transformers_vision_models(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 8,
        "attn_implementation": "sdpa",
    }
    config = getattr(transformers, f"{name}Config")(**sizes)
    model = Output(getattr(transformers, f"{name}Model")(config)).double()
    images = torch.randn(2, 3, 16, 16, dtype=F64)
    check_patched(model, (images,), (torch.randn_like(images),))
    assert model.model.config._attn_implementation == "sdpa"


def test_transformers_clip_both_towers_with_padding():
    """Text with padding: transformers hands SDPA its causal mask intersected with the padding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=64, max_position_embeddings=12),
        vision_config=dict(tower, image_size=16, patch_size=8),
        projection_dim=16,
        attn_implementation="sdpa",
    )
    clip = transformers.CLIPModel(config).double()
    tokens = torch.randint(0, 64, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, 6:] = 0
    model = Output(clip, "logits_per_image", input_ids=tokens, attention_mask=padding)
    images = torch.randn(2, 3, 16, 16, dtype=F64)
    check_patched(model, (images,), (torch.randn_like(images),))


# ----------------------------------------------------------------------------------------------
# open_clip


def tiny_open_clip(**vision_options):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vision = {"layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "image_size": 16, "mlp_ratio": 2,
              **vision_options}  # fmt: skip
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2}
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).double()


class Logits(nn.Module):
    """CLIP's image-text logits; ``open_clip``'s towers run ``nn.MultiheadAttention``."""

    def __init__(self, clip, text):
        super().__init__()
        self.clip, self.text = clip, text

    def forward(self, images):
        return (
            self.clip.encode_image(images, normalize=True)
            @ self.clip.encode_text(self.text, normalize=True).T
        )


def test_open_clip_both_towers():
    clip = tiny_open_clip()
    images = torch.randn(2, 3, 16, 16, dtype=F64)
    check_patched(Logits(clip, torch.randint(0, 64, (3, 8))), (images,), (torch.randn_like(images),))


@pytest.mark.parametrize("options", [{"qk_norm": True}, {"block_type": "custom"}])
def test_open_clip_own_attention(options):
    """open_clip's own ``Attention`` (qk-norm and custom blocks), which picks SDPA by ``use_fsdpa``:
    patch had neither routed nor refused it, and the jvp raised inside torch's flash SDPA."""
    clip = tiny_open_clip(**options)
    assert any(type(m).__name__ == "Attention" for m in clip.visual.modules())
    images = torch.randn(2, 3, 16, 16, dtype=F64)
    check_patched(Logits(clip, torch.randint(0, 64, (3, 8))), (images,), (torch.randn_like(images),))


def test_open_clip_visual_through_tangent_forward_ad():
    """The routing mode serves the nn.MultiheadAttention calls inside ``TangentForwardAD``."""
    visual = tiny_open_clip().visual
    images, tangent = torch.randn(2, 3, 16, 16, dtype=F64), torch.randn(2, 3, 16, 16, dtype=F64)
    expected = jvp(visual, (images,), (tangent,))
    before = watch.fused_calls
    assert_all_close(tk.modules.TangentForwardAD(visual)(images, tangent), expected)
    assert watch.fused_calls > before and tk.last_backend("attention_jvp") == "cpp"


def test_open_clip_copied_before_patch_is_served_by_fused_jvp():
    """A LinearizedModel deep-copies the model; patching the original misses the copy, fused_jvp does not."""
    clip = tiny_open_clip()
    linearized = copy.deepcopy(clip.visual)
    images = torch.randn(2, 3, 16, 16, dtype=F64)
    expected = jvp(linearized, (images,), (images,))
    with patched(clip), pytest.warns(UserWarning, match="was the model copied before patch"):
        jvp(linearized, (images,), (images,))
    before = watch.fused_calls
    with fused_jvp():
        assert_all_close(jvp(linearized, (images,), (images,)), expected)
    assert watch.fused_calls > before and tk.last_backend("attention_jvp") == "cpp"


# ----------------------------------------------------------------------------------------------
# diffusers


def test_diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    ).double()
    model = Output(
        dit, "sample", "hidden_states", timestep=torch.tensor([3, 7]), class_labels=torch.tensor([1, 2])
    )
    latents = torch.randn(2, 4, 8, 8, dtype=F64)
    check_patched(model, (latents,), (torch.randn_like(latents),))


def test_diffusers_plain_attention_processor_is_swapped_and_restored():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8, processor=AttnProcessor()).double()
    x = torch.randn(2, 7, 32, dtype=F64)
    expected = jvp(attention, (x,), (x,))
    with patched(attention):
        assert type(attention.processor) is AttnProcessor2_0
        assert_all_close(jvp(attention, (x,), (x,)), expected)
    assert type(attention.processor) is AttnProcessor


@pytest.mark.parametrize("options", [{"scale_qk": False}, {"qk_norm": "rms_norm"}])
def test_diffusers_plain_attention_processor_is_kept_where_sdpas_differs(options):
    """``AttnProcessor2_0`` scales by ``head_dim ** -0.5`` whatever ``attn.scale`` is and applies the
    q/k norms the plain processor skips: the swap had changed the model's output (0.76 relative
    with ``scale_qk=False``, 1.2 with an RMS q/k norm), so there the plain processor stays."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8, processor=AttnProcessor(), **options).double()
    for norm in (attention.norm_q, attention.norm_k):
        if norm is not None:
            nn.init.uniform_(norm.weight, 0.5, 2.0)
    x = torch.randn(2, 7, 32, dtype=F64)
    expected = attention(x), *jvp(attention, (x,), (x,))
    with patched(attention), pytest.warns(UserWarning, match="by hand"):
        assert type(attention.processor) is AttnProcessor
        assert_all_close((attention(x), *jvp(attention, (x,), (x,))), expected)


# ----------------------------------------------------------------------------------------------
# MeanFlow: a DiT from timm parts, with fused_attn off as MeanFlow ports set it


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block of timm's Attention and Mlp (as MeanFlow's ports write it)."""

    def __init__(self, dim, heads):
        super().__init__()
        from timm.layers import Attention, Mlp

        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.attn.fused_attn = False  # "flash attention cannot be used with jvp"
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 2 * dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyMeanFlowDiT(nn.Module):
    """``u(z, t, r)``: the average velocity field of MeanFlow on 8×8 latents."""

    def __init__(self, dim=32, heads=4, depth=2, channels=4, size=8, patch=2):
        super().__init__()
        from timm.layers import PatchEmbed

        self.patch, self.channels, self.grid = patch, channels, size // patch
        self.embed = PatchEmbed(size, patch, channels, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, self.grid**2, dim))
        self.times = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, z, t, r):
        x = self.embed(z) + self.position
        c = self.times(torch.stack([t, t - r], dim=-1))
        for block in self.blocks:
            x = block(x, c)
        x = self.out(x).view(z.shape[0], self.grid, self.grid, self.patch, self.patch, self.channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(z.shape)


def meanflow_loss_grads(model, z, t, r, v):
    """MeanFlow's training loss: ``u_tgt = v - (t - r) du/dt`` by ``jvp(u, (z, t, r), (v, 1, 0))``."""
    u, dudt = jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    target = (v - (t - r)[:, None, None, None] * dudt).detach()
    return u, dudt, *torch.autograd.grad((u - target).square().mean(), list(model.parameters()))


def meanflow_inputs():
    z, v = torch.randn(2, 4, 8, 8, dtype=F64), torch.randn(2, 4, 8, 8, dtype=F64)
    return z, torch.tensor([0.9, 0.6], dtype=F64), torch.tensor([0.2, 0.6], dtype=F64), v


def test_meanflow_dit_from_timm_parts():
    torch.manual_seed(0)
    model = TinyMeanFlowDiT().double()
    z, t, r, v = meanflow_inputs()
    expected = meanflow_loss_grads(model, z, t, r, v)
    with patched(model):
        assert_all_close(meanflow_loss_grads(model, z, t, r, v), expected)
    check_patched(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


def test_meanflow_dit_second_order():
    """A loss on ``du/dt`` itself needs the gradient of the tangent w.r.t. the primal activations."""
    torch.manual_seed(0)
    model = TinyMeanFlowDiT().double()
    z, t, r, v = meanflow_inputs()
    inputs, tangents = (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
    oracle = copy.deepcopy(model)
    for block in oracle.blocks:
        block.norm1, block.norm2 = CompositeLayerNorm(block.norm1.eps), CompositeLayerNorm(block.norm2.eps)
    expected = along_inputs(oracle, inputs, tangents, second_order=True)
    with patched(model):
        assert_all_close(along_inputs(model, inputs, tangents, second_order=True), expected)
