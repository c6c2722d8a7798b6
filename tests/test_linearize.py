"""linearize(model) on random-init timm ViTs against torch.func.jvp(functional_call(model, ...)).

The oracle runs timm's own model with its fused attention off (math attention, as users must
for ``torch.func.jvp``), and differentiates ``jvp`` with ``torch.func.grad`` for the gradients.
"""

import pytest
import timm
import torch
from timm.layers import Attention, GluMlp, RmsNorm, SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer
from torch.func import functional_call, jvp

import tangent_kernels as tk
from tangent_kernels.verify import jvp_oracle
from helpers import max_relative_error

class GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate on (a subclass that changes only the constructor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


class ScaledAttention(Attention):
    """A subclass with its own forward: linearized by forward AD of that forward, not as Attention."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask, is_causal) * 2


# Small variants built with timm's own constructor arguments (img size 32-64, patch 8 or 16).
VARIANTS = {
    "base": dict(img_size=32, patch_size=8),
    "no_qkv_bias": dict(img_size=32, patch_size=8, qkv_bias=False),
    "qk_norm": dict(img_size=48, patch_size=16, qk_norm=True),
    "layer_scale": dict(img_size=32, patch_size=8, init_values=0.1),
    "avg_pool": dict(img_size=32, patch_size=8, class_token=False, global_pool="avg", fc_norm=True),
    "registers": dict(img_size=64, patch_size=16, reg_tokens=2, no_embed_class=True),
    "tanh_gelu": dict(img_size=32, patch_size=8, act_layer=lambda: torch.nn.GELU(approximate="tanh")),
    # Parts without a fused op run by forward AD of their own code (TangentForwardAD).
    "clip_style": dict(pre_norm=True, act_layer="quick_gelu", patch_size=16, img_size=48),
    "rms_norm_max_pool": dict(norm_layer=RmsNorm, class_token=False, global_pool="max"),
    "swiglu_avgmax": dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, global_pool="avgmax", reg_tokens=1),
    "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True, proj_bias=False, final_norm=False,
                        global_pool="avg"),
    "swiglu_split": dict(mlp_layer=SwiGLU, act_layer=torch.nn.SiLU),
    "glu_gate_last": dict(mlp_layer=GluMlp),
    "gated_attention": dict(attn_layer=GatedAttention, qkv_bias=False),
    "map_pool": dict(class_token=False, reg_tokens=1, global_pool="map", pool_include_prefix=True),
    "prr_pool": dict(global_pool="prr"),
    "parallel_scaling_block": dict(block_fn=ParallelScalingBlock, qk_norm=True),
    "res_post_block": dict(block_fn=ResPostBlock, init_values=0.1),
    "own_forward_attention": dict(attn_layer=ScaledAttention),
    "dropout_eval": dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1,
                         attn_drop_rate=0.1),
}


def small_vit(dtype=torch.float64, **kwargs):
    kwargs = {"img_size": 32, "patch_size": 8, **kwargs}
    model = VisionTransformer(embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=7, **kwargs)
    return model.to(dtype).eval()


def randomize_offsets(lin, scale=0.05):
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0.0, scale)


def oracle(model, lin, images, grad_out):
    """``(y + y_t, {offset name: gradient of <y + y_t, grad_out>})`` by torch.func.jvp/grad."""
    assert lin.frozen is None or lin.cls_token is None, "the oracle does not model fresh_cls_token"
    return jvp_oracle(model, dict(lin.named_parameters()), images, grad_out)


def assert_grads_close(lin, expected_grads, rel_bound, vanishing=1e-6):
    """Each offset's gradient within ``rel_bound`` of its largest entry, or of ``vanishing`` times
    the largest gradient overall for gradients that are zero exactly (a key bias under softmax)."""
    assert set(expected_grads) == {n for n, _ in lin.named_parameters()}
    overall = max(g.abs().max().item() for g in expected_grads.values())
    for name, p in lin.named_parameters():
        expected = expected_grads[name]
        scale = max(expected.abs().max().item(), vanishing * overall)
        error = (p.grad.double() - expected.double()).abs().max().item() / scale
        assert error < rel_bound, f"grad {name}: relative error {error:.2e}"


def check(model, lin, images, rel_bound):
    """Output and offset gradients against the oracle; offsets named and shaped as the model's weights."""
    model_state = model.state_dict()
    for name, offset in lin.state_dict().items():
        assert name in model_state and offset.shape == model_state[name].shape, name
    randomize_offsets(lin)
    out = lin(images)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    expected, expected_grads = oracle(model, lin, images, grad_out)
    assert max_relative_error(out, expected) < rel_bound
    assert_grads_close(lin, expected_grads, rel_bound)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("blocks", ["all", 1])
def test_matches_jvp_float64(variant, blocks):
    model = small_vit(**VARIANTS[variant])
    lin = tk.linearize(model, blocks, backend="reference")
    images = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    check(model, lin, images, 1e-9)


def test_linearization_error_tells_right_from_wrong():
    model = small_vit(**VARIANTS["registers"])
    lin = tk.linearize(model, 2, backend="reference")
    randomize_offsets(lin)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    errors = tk.verify.linearization_error(model, lin, images)
    assert errors["output"] < 1e-12 and errors["gradient"] < 1e-9, errors
    lin.blocks["2"].mlp.fc2.weight0 = lin.blocks["2"].mlp.fc2.weight0 * 1.01  # a wrong w0 in one layer
    errors = tk.verify.linearization_error(model, lin, images)
    assert errors["output"] > 1e-4 and errors["gradient"] > 1e-4, errors


def test_vit_tiny_patch16_224_float64():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).double().eval()
    lin = tk.linearize(model, 2, backend="reference")
    check(model, lin, torch.randn(1, 3, 224, 224, dtype=torch.float64), 1e-9)


# timm's registered test models (dynamic image size, register tokens, MAP pooling, RMSNorm) and
# two with other block / attention types (parallel scaling block, differential attention).
REGISTERED = ["test_vit", "test_vit2", "test_vit3", "test_vit4", "vit_pwee_patch16_reg1_gap_256",
              "vit_dlittle_patch16_reg1_gap_256"]  # fmt: skip


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_timm_models_float64(name):
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=5).double().eval()
    lin = tk.linearize(model, "all", backend="reference")
    check(model, lin, torch.randn(1, 3, *model.patch_embed.img_size, dtype=torch.float64), 1e-9)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("blocks", ["all", 2])
@pytest.mark.parametrize("variant", ["qk_norm", "forward_ad_with_fused_attention"])
def test_fused_backends_float32(backend, blocks, variant, device):
    """The fused backends, and forward-AD parts whose SDPA calls run the fused attention."""
    if backend == "cpp" and not tk.cpp.AVAILABLE:
        pytest.skip(tk.cpp.UNAVAILABLE_REASON)
    run_on = device if backend == "triton" else torch.device("cpu")
    kwargs = {**VARIANTS["qk_norm"]}
    if variant != "qk_norm":
        kwargs.update(block_fn=ParallelScalingBlock, class_token=False, global_pool="map")
    model = small_vit(torch.float32, **kwargs).to(run_on)
    lin = tk.linearize(model, blocks, backend=backend)
    images = torch.randn(2, 3, 48, 48, device=run_on)
    randomize_offsets(lin)
    vars(tk.backends._last_backend).clear()  # this thread's record
    out = lin(images)
    assert tk.last_backend("layer_norm_jvp") == backend and tk.last_backend("attention_jvp") == backend
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    model64, images64 = model.double(), images.double()
    lin64 = tk.linearize(model64, blocks, backend="reference")
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    expected, expected_grads = oracle(model64, lin64, images64, grad_out.double())
    assert max_relative_error(out, expected) < 1e-4
    assert_grads_close(lin, expected_grads, 1e-3, vanishing=1e-3)


@pytest.mark.parametrize("blocks", ["all", 1])
def test_zero_offsets_give_the_original_output(blocks):
    model = small_vit(torch.float32, **VARIANTS["registers"])  # timm's fused attention stays on
    images = torch.randn(3, 3, 64, 64)
    lin = tk.linearize(model, blocks)
    torch.testing.assert_close(lin(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", ["all", 2])
@pytest.mark.parametrize("pad, size", [(False, (40, 24)), (True, (37, 29))])
def test_dynamic_img_size(blocks, pad, size):
    """A model built with dynamic_img_size (and dynamic_img_pad) takes other image sizes; the
    position embedding is resampled to the patch grid on both streams."""
    model = small_vit(dynamic_img_size=True, dynamic_img_pad=pad, reg_tokens=1)
    lin = tk.linearize(model, blocks, backend="reference")
    check(model, lin, torch.randn(2, 3, *size, dtype=torch.float64), 1e-9)


def test_dynamic_img_size_with_an_empty_batch():
    """An empty batch gives an empty batch of logits (the patch grid was flattened by
    ``reshape(batch, -1, channels)``, ambiguous for 0 elements; timm's own forward still raises so)."""
    model = small_vit(dynamic_img_size=True, reg_tokens=1)
    lin = tk.linearize(model, "all", backend="reference")
    assert lin(torch.randn(0, 3, 40, 24, dtype=torch.float64)).shape == (0, model.num_classes)


@pytest.mark.parametrize("training", [True, False])
def test_keeps_the_models_training_mode(training):
    model = small_vit(drop_rate=0.5).train(training)
    lin = tk.linearize(model, 1)
    assert lin.training == training and all(m.training == training for m in lin.modules())


def test_forward_ad_fallback_keeps_the_modules_parameter_names():
    module = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.SiLU(), torch.nn.Linear(10, 6))
    tangent = tk.modules.tangent_module(module)
    assert isinstance(tangent, tk.modules.TangentForwardAD)
    assert tangent.state_dict().keys() == module.state_dict().keys()
    assert all(torch.count_nonzero(p) == 0 for p in tangent.parameters())
    x = torch.randn(2, 5, 6)
    y, y_t = tangent(x)
    torch.testing.assert_close(y, module(x))
    assert torch.count_nonzero(y_t) == 0


def test_parameters_are_exactly_the_offsets():
    model = small_vit(**VARIANTS["layer_scale"])
    lin = tk.linearize(model, "all")
    model_state = model.state_dict()
    offsets = dict(lin.named_parameters())
    assert offsets.keys() == model_state.keys() == lin.state_dict().keys()
    for name, p in offsets.items():
        assert p.requires_grad and p.shape == model_state[name].shape and torch.count_nonzero(p) == 0
    assert all(p.requires_grad for p in model.parameters()), "the original model was modified"


def test_last_k_blocks_keep_original_names():
    model = small_vit()
    lin = tk.linearize(model, 1, fresh_cls_token=True)
    names = set(dict(lin.named_parameters()))
    assert "blocks.2.attn.qkv.weight" in names and "head.weight" in names and "norm.weight" in names
    assert "blocks.1.attn.qkv.weight" not in names and "pos_embed" not in names
    assert "cls_token" in names  # the fresh class token's tangent
    assert names - {"cls_token"} <= set(model.state_dict())


def test_fresh_cls_token_adds_a_tangent_at_the_class_position():
    model = small_vit()
    lin = tk.linearize(model, 1, fresh_cls_token=True)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        lin.cls_token.normal_()
    y, y_t = lin.forward_dual(images)
    assert torch.count_nonzero(y_t) > 0
    (y_t.sum()).backward()
    assert lin.cls_token.grad is not None and torch.count_nonzero(lin.cls_token.grad) > 0


def test_reinit_changes_only_the_linearized_blocks():
    torch.manual_seed(0)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lin = tk.linearize(model, 1, reinit=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original was modified"
    assert not torch.equal(lin.blocks["2"].attn.qkv.weight0, model.blocks[2].attn.qkv.weight)
    assert torch.equal(lin.head.weight0, model.head.weight)


def test_save_and_load_offsets(tmp_path):
    model = small_vit()
    lin = tk.linearize(model, 2)
    randomize_offsets(lin)
    path = tmp_path / "dw.safetensors"
    tk.save_offsets(lin, path)
    restored = tk.linearize(model, 2)
    tk.load_offsets(restored, path)
    for (name, a), (_, b) in zip(lin.named_parameters(), restored.named_parameters()):
        assert torch.equal(a, b), name
    other = tk.linearize(small_vit(), 2)  # another random base
    with pytest.raises(tk.BaseMismatchError, match="fingerprint"):
        tk.load_offsets(other, path)


def test_autocast_bfloat16_sums_in_float32():
    model = small_vit(torch.float32)
    lin = tk.linearize(model, "all")
    randomize_offsets(lin)
    images = torch.randn(2, 3, 32, 32)
    expected = lin(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(images)
        y, y_t = lin.forward_dual(images)
    assert out.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert max_relative_error(out, expected) < 5e-2
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lin.parameters())


def test_modules_and_functional_ops_under_autocast_give_torchs_dtypes():
    """Under CPU autocast the tangent norms returned float32 (CUDA's rule) where torch's keep a bf16
    input's dtype, and ``functional.linear_jvp`` / ``mlp_jvp`` with float32 parameters raised (the
    bias reached the bf16 GELU op uncast): each op now computes in the dtype torch's layer does."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 6)
    x, x_t = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for module, tangent_module in ((norm, tk.modules.TangentLayerNorm(norm)),
                                       (linear, tk.modules.TangentLinear(linear))):  # fmt: skip
            y, y_t = tangent_module(x, x_t)
            expected, expected_t = torch.func.jvp(module, (x,), (x_t,))
            assert y.dtype == y_t.dtype == expected.dtype == torch.bfloat16
            assert max_relative_error(y, expected) < 2e-2 and max_relative_error(y_t, expected_t) < 2e-2
        w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
        h, h_t = tk.functional.linear_jvp(x.float(), x_t.float(), w1, b1, activation="gelu")
        y, y_t = tk.functional.mlp_jvp(x.float(), x_t.float(), w1, b1, w2, b2)
        expected = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    assert h.dtype == h_t.dtype == y.dtype == y_t.dtype == torch.bfloat16
    assert max_relative_error(y, expected) < 2e-2


def test_drop_path_uses_one_mask_for_both_streams():
    """In training, a block with DropPath equals the jvp of timm's block under the same seed."""
    model = small_vit(drop_path_rate=0.5).train()
    block = model.blocks[2]
    tangent_block = tk.modules.TangentBlock(block, backend="reference").train()
    randomize_offsets(tangent_block, 0.1)
    x, x_t = torch.randn(4, 17, 48, dtype=torch.float64), torch.randn(4, 17, 48, dtype=torch.float64)
    torch.manual_seed(3)
    y, y_t = tangent_block(x, x_t)
    params = dict(block.named_parameters())
    offsets = {k: v.detach() for k, v in tangent_block.named_parameters()}
    block.attn.fused_attn = False
    torch.manual_seed(3)
    y_ref, y_t_ref = jvp(lambda x, p: functional_call(block, p, (x,)), (x, params), (x_t, offsets))
    assert max_relative_error(y, y_ref) < 1e-12 and max_relative_error(y_t, y_t_ref) < 1e-12


def seeded_outputs(model, lin, images, seed):
    """``lin(images)`` and the oracle's output under one RNG seed, so dropout draws the same masks."""
    torch.manual_seed(seed)
    out = lin(images)
    torch.manual_seed(seed)
    expected, _ = jvp_oracle(model, dict(lin.named_parameters()), images)
    return out, expected


def assert_random_masks_match_the_oracle(model, lin, images, seed):
    """Under one seed ``lin`` equals the oracle (same random masks on both streams); another seed
    draws other masks."""
    out, expected = seeded_outputs(model, lin, images, seed)
    assert max_relative_error(out, expected) < 1e-12
    torch.manual_seed(seed + 1)
    assert max_relative_error(lin(images), out) > 1e-3, "the random masks did not change with the seed"


def test_patch_dropout_keeps_one_token_subset_for_both_streams():
    """In training, patch dropout on linearized embeddings equals the jvp of timm's model under one seed."""
    model = small_vit(patch_drop_rate=0.5, reg_tokens=1).train()
    lin = tk.linearize(model, "all", backend="reference")
    randomize_offsets(lin)
    assert_random_masks_match_the_oracle(model, lin, torch.randn(3, 3, 32, 32, dtype=torch.float64), seed=5)


def test_attention_dropout_uses_one_mask_for_both_streams():
    """In training, attention dropout equals the jvp of timm's model under one seed."""
    model = small_vit(attn_drop_rate=0.3).train()
    lin = tk.linearize(model, 2, backend="reference")
    randomize_offsets(lin)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, expected = seeded_outputs(model, lin, images, seed=7)
    assert max_relative_error(out, expected) < 1e-12
    out.sum().backward()
    assert all(p.grad is not None for p in lin.parameters())
    lin.eval()
    assert max_relative_error(lin(images), out) > 1e-3, "dropout was not applied in training"


def test_no_position_dropout_without_a_position_embedding():
    """timm applies ``pos_drop`` only after adding a position embedding (none with pos_embed='none')."""
    model = small_vit(pos_embed="none", pos_drop_rate=0.5).train()
    lin = tk.linearize(model, "all", backend="reference")
    randomize_offsets(lin)
    out, expected = seeded_outputs(model, lin, torch.randn(2, 3, 32, 32, dtype=torch.float64), seed=9)
    assert max_relative_error(out, expected) < 1e-12


def test_dropout_uses_one_mask_for_both_streams():
    y, y_t = tk.modules.dropout_pair(torch.ones(1000), torch.ones(1000), 0.5, training=True)
    assert torch.equal(y == 0, y_t == 0) and 0 < int((y == 0).sum()) < 1000


def test_dropout_of_probability_one_gives_torchs_zeros():
    x = torch.tensor([1.0, -2.0, float("inf")])
    y, y_t = tk.modules.dropout_pair(x, x, 1.0, training=True)
    expected = torch.nn.functional.dropout(x, 1.0, training=True)  # 0 · x: NaN where x is inf
    torch.testing.assert_close((y, y_t), (expected, expected), rtol=0, atol=0, equal_nan=True)
    model = small_vit(drop_rate=1.0).train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(tk.linearize(model)(images), model(images))  # the head sees zeros: its bias


@pytest.mark.parametrize("blocks", ["all", 1])
def test_no_images_give_no_logits(blocks):
    model = small_vit()
    lin = tk.linearize(model, blocks)
    images = torch.randn(0, 3, 32, 32, dtype=torch.float64)
    y, y_t = lin.forward_dual(images)
    assert lin(images).shape == y_t.shape == model(images).shape == (0, model.num_classes)


@pytest.mark.parametrize("variant", ["base", "map_pool"])  # map_pool: a TangentForwardAD part
def test_torch_func_gradients_and_functional_call(variant):
    """``torch.func.grad``/``vmap(grad)`` (per-sample gradients) over ``functional_call`` of a
    linearized ViT give plain autograd's gradients: the fused ops' backward cannot run under
    torch.func's grad transform ("must override the setup_context staticmethod"), so ``"auto"``
    runs the reference there; and a part linearized by forward AD read its offsets as registered
    Parameters ("'latent' is not an nn.Parameter" under functional_call)."""
    torch.manual_seed(0)
    lin = tk.linearize(small_vit(**VARIANTS[variant]), "all")
    randomize_offsets(lin)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    offsets = {name: p.detach().clone() for name, p in lin.named_parameters()}

    def loss(offsets, images):
        return functional_call(lin, offsets, (images,)).sin().sum()

    grads = torch.func.grad(loss)(offsets, images)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(offsets, images[:, None])
    for i in range(3):
        lin.zero_grad()
        lin(images[i : i + 1]).sin().sum().backward()
        for name, p in lin.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
    lin.zero_grad()
    lin(images).sin().sum().backward()
    for name, p in lin.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(tk.BackendUnavailableError, match="torch.func.grad, vjp or jacrev"):  # explicit: refused
        torch.func.grad(lambda w: tk.functional.layer_norm_jvp(x, None, w, None, backend="cpp")[0].sum())(w)


def test_compiles_with_dynamic_shapes():
    """``torch.compile(fullgraph=True, dynamic=True)``: the scale is a symbol there, and checking it
    with ``math.isfinite`` broke the graph (fullgraph refused it)."""
    torch.manual_seed(0)
    lin = tk.linearize(small_vit(torch.float32), 1)
    randomize_offsets(lin)
    compiled = torch.compile(lin, backend="eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(compiled(images), lin(images))


@pytest.mark.parametrize("call, error, message", [
    (lambda lin, x: lin(x.float()), TypeError, r"images: expected dtype torch.float64 \(as the model's weights\)"),
    (lambda lin, x: lin(x[:, :1]), ValueError, r"images: expected 3 channels"),
    (lambda lin, x: lin(x[0]), ValueError, r"images: expected \(batch, channels, height, width\)"),
    (lambda lin, x: lin(x.tolist()), TypeError, "images: expected a torch.Tensor"),
    (lambda lin, x: lin(x.to("meta")), ValueError, "images: expected device cpu"),
    (lambda lin, x: lin.blocks["2"].attn(torch.randn(5, 48, dtype=x.dtype)), ValueError,
     r"x: expected \(batch, tokens, 48\)"),
    (lambda lin, x: tk.linearize(small_vit(), 1, reinit="yes"), TypeError, "reinit: expected True or False"),
    (lambda lin, x: tk.linearize(small_vit(), 1, fresh_cls_token=1), TypeError, "fresh_cls_token: expected"),
    (lambda lin, x: tk.modules.TangentForwardAD("x"), TypeError, "module: expected an nn.Module"),
])  # fmt: skip
def test_bad_inputs_are_refused_naming_them(call, error, message):
    """Images or tokens the linearized model cannot take, and bad settings, raise naming them (they
    raised torch's conv error, an unpacking error, or were accepted)."""
    lin = tk.linearize(small_vit(), 1)
    with pytest.raises(error, match=message):
        call(lin, torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("dynamic_img_size", [False, True])
def test_hybrid_vit(dynamic_img_size):
    """A hybrid ViT (a CNN stem before the patch projection): its projection takes the stem's
    features (64 channels here), not the image's (the image check refused every image), and with
    every block linearized the stem is linearized by forward AD (it raised AttributeError: no
    'norm')."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, depth=2, num_classes=5,
                              dynamic_img_size=dynamic_img_size).double().eval()  # fmt: skip
    images = torch.randn(2, 3, 96 if dynamic_img_size else 64, 64, dtype=torch.float64)
    torch.testing.assert_close(tk.linearize(model, 1)(images), model(images))
    check(model, tk.linearize(model, "all"), images, 1e-12)


class TestUnsupported:
    def test_not_a_vit(self):
        with pytest.raises(tk.UnsupportedModuleError, match="expected a timm VisionTransformer, got Sequential"):
            tk.linearize(torch.nn.Sequential(torch.nn.Linear(3, 3)))

    def test_subclass_that_changes_the_forward(self):
        from timm.models.deit import VisionTransformerDistilled

        class FirstTokenOnly(VisionTransformerDistilled):
            def forward_head(self, x, pre_logits=False):
                return self.head(x[:, 0])

        model = FirstTokenOnly(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
        with pytest.raises(tk.UnsupportedModuleError, match="FirstTokenOnly overrides VisionTransformerDistilled.forward_head"):
            tk.linearize(model, 1)

    def test_distilled_training(self):
        from timm.models.deit import VisionTransformerDistilled

        model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
        model.set_distilled_training(True)
        with pytest.raises(tk.UnsupportedModuleError, match="distilled_training on"):
            tk.linearize(model, 1)

    def test_subclass_that_overrides_forward(self):
        from timm.models.vision_transformer import VisionTransformer

        class Doubled(VisionTransformer):
            def forward(self, x):
                return 2 * super().forward(x)

        model = Doubled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
        with pytest.raises(tk.UnsupportedModuleError, match="Doubled overrides VisionTransformer.forward"):
            tk.linearize(model)

    @pytest.mark.parametrize("blocks", [4, 0, True, 1.0, "last"])
    def test_blocks_argument(self, blocks):
        with pytest.raises(ValueError, match="blocks: expected 'all' or an int from 1 to 3"):
            tk.linearize(small_vit(), blocks)

    def test_backend_argument(self):
        with pytest.raises(ValueError, match="backend: expected one of .*got 'refernce'"):
            tk.linearize(small_vit(), backend="refernce")

    @pytest.mark.parametrize("blocks", ["all", 1])  # 1: timm's frozen prefix, whose own check is an assert
    @pytest.mark.parametrize("size, expected", [((16, 16), "expected images of size \\(32, 32\\), got \\(16, 16\\)"),
                                                ((36, 32), "expected images of size")])  # fmt: skip
    def test_wrong_image_size(self, blocks, size, expected):
        with pytest.raises(ValueError, match=f"^x: {expected}"):
            tk.linearize(small_vit(), blocks)(torch.randn(1, 3, *size, dtype=torch.float64))

    def test_fresh_cls_token_without_class_token(self):
        with pytest.raises(ValueError, match="fresh_cls_token: the model has no class token"):
            tk.linearize(small_vit(class_token=False, global_pool="avg"), 1, fresh_cls_token=True)


@pytest.mark.parametrize("blocks", ["all", 1])
def test_deit_distilled_float64(blocks):
    """DeiT's distilled model: a distillation token after the class token, and the average of two heads."""
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    lin = tk.linearize(model.double().eval(), blocks, backend="reference")
    assert {"head_dist.weight", "head_dist.bias"} <= dict(lin.named_parameters()).keys()
    assert ("dist_token" in dict(lin.named_parameters())) == (blocks == "all")
    check(model, lin, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-9)


def test_deit_distilled_head_dropout_in_training():
    """Each head's token gets its own dropout mask, as in timm, shared by both streams."""
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                                       drop_rate=0.5).double().train()  # fmt: skip
    lin = tk.linearize(model, 1, backend="reference")
    randomize_offsets(lin)
    assert_random_masks_match_the_oracle(model, lin, torch.randn(3, 3, 32, 32, dtype=torch.float64), seed=3)


def test_any_model_by_forward_ad():
    """The escape hatch for models linearize refuses: forward AD of the whole model, fused attention inside."""
    from timm.models.eva import Eva

    model = Eva(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, use_rot_pos_emb=True)
    with pytest.raises(tk.UnsupportedModuleError, match="expected a timm VisionTransformer, got Eva"):
        tk.linearize(model)
    model = model.double().eval()
    tangent = tk.modules.TangentForwardAD(model, backend="cpp")
    randomize_offsets(tangent)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vars(tk.backends._last_backend).clear()  # this thread's record
    y, y_t = tangent(images)
    assert tk.last_backend("attention_jvp") == "cpp"
    expected, _ = jvp_oracle(model, dict(tangent.named_parameters()), images)
    assert max_relative_error(y + y_t, expected) < 1e-12


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("blocks", ["all", 1])
def test_taft_saves_no_more_than_fine_tuning(backend, blocks, device):
    """Bytes saved for the backward of a TAFT step at most those of fine-tuning the same layers."""
    if backend == "cpp" and not tk.cpp.AVAILABLE:
        pytest.skip(tk.cpp.UNAVAILABLE_REASON)
    run_on = device if backend == "triton" else torch.device("cpu")
    model = small_vit(torch.float32, img_size=64, patch_size=8).to(run_on)
    lin = tk.linearize(model, blocks, backend=backend)
    images = torch.randn(2, 3, 64, 64, device=run_on)
    weights = [*model.parameters(), *model.buffers(), *lin.parameters(), *lin.buffers()]
    ours, _ = tk.memory.saved_tensor_bytes(lambda: lin(images), weights)
    trainable = set(dict(lin.named_parameters()))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    fine_tuning, _ = tk.memory.saved_tensor_bytes(lambda: model(images), weights)
    assert 0 < ours <= fine_tuning, f"TAFT saves {ours} bytes, fine-tuning {fine_tuning}"


def test_tangent_block_takes_timm_blocks_arguments():
    """timm's ``Block.forward(x, attn_mask=None, is_causal=False)``: the tangent block took no
    ``attn_mask`` (a bare TypeError) and read a third positional argument as ``is_causal``."""
    block = small_vit(torch.float64).blocks[0]
    tangent_block = tk.modules.TangentBlock(block, backend="reference")
    x, x_t = torch.randn(2, 5, 48, dtype=torch.float64), torch.randn(2, 5, 48, dtype=torch.float64)
    y, _ = tangent_block(x, x_t, None, True)
    assert max_relative_error(y, block(x, is_causal=True)) < 1e-12
    with pytest.raises(NotImplementedError, match="TangentAttention: attn_mask is not supported"):
        tangent_block(x, x_t, attn_mask=torch.ones(5, 5, dtype=torch.bool))
