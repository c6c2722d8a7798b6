"""patch(model): unmodified torch.func.jvp code through timm ViTs and nn.MultiheadAttention.

The oracle is the same code through the unpatched model with math attention, in float64.
"""

import copy

import pytest
import torch
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch.autograd import forward_ad
from torch.func import functional_call, jvp

import tangent_kernels as tk
from helpers import max_relative_error
from tangent_kernels.patching import fused_attention, patch, patched, unpatch


def small_vit(**kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, **kwargs}
    return VisionTransformer(embed_dim=48, depth=2, num_heads=3, num_classes=7, **kwargs).double().eval()


def math_copy(model):
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return reference


def linearized_outputs(model, images, params, offsets):
    """The LinearizedModel pattern: y + y_t by torch.func.jvp of functional_call."""
    y, y_t = jvp(lambda p: functional_call(model, p, (images,)), (params,), (offsets,))
    return y + y_t


def jvp_and_grads(model, images, offsets):
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = linearized_outputs(model, images, params, offsets)
    return out, torch.autograd.grad(out.square().sum(), list(offsets.values()))


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"class_token": False, "global_pool": "avg"},
                                     {"block_fn": ParallelScalingBlock, "global_pool": "map"}])
def test_jvp_through_patched_vit_matches_math_attention(variant):
    model = small_vit(**variant)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    offsets = {n: (0.05 * torch.randn_like(p)).requires_grad_() for n, p in model.named_parameters()}
    expected, expected_grads = jvp_and_grads(math_copy(model), images, offsets)
    with patched(model):
        out, grads = jvp_and_grads(model, images, offsets)
        assert tk.last_backend("attention_jvp") == "cpp"
    assert max_relative_error(out, expected) < 1e-10
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max().item())


def test_forward_ad_through_patched_vit():
    model = small_vit()
    images, tangent = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = jvp(math_copy(model), (images,), (tangent,))[1]
    with patched(model), forward_ad.dual_level():
        out = model(forward_ad.make_dual(images, tangent))
        tangent_out = forward_ad.unpack_dual(out).tangent
    assert max_relative_error(tangent_out, expected) < 1e-10


class SelfAttention(torch.nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(24, 4, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x, key_padding_mask=None):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_jvp_through_patched_multihead_attention(batch_first, masked):
    torch.manual_seed(0)
    model = SelfAttention(batch_first).double().train()  # train mode: no fast path (it has no forward AD); dropout is 0
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    mask = torch.zeros(3, 11, dtype=torch.bool)
    if masked:
        mask[:, -3:] = True
    mask = mask if masked else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    offsets = {n: (0.05 * torch.randn_like(p)).requires_grad_() for n, p in params.items()}

    def run():
        y, y_t = jvp(lambda p: functional_call(model, p, (x, mask)), (params,), (offsets,))
        out = y + y_t
        return out, torch.autograd.grad(out.square().sum(), list(offsets.values()))

    expected, expected_grads = run()  # unpatched: need_weights=True runs math attention
    with patched(model):
        out, grads = run()
    assert max_relative_error(out, expected) < 1e-10
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max().item())


def test_unpatch_restores_the_model_exactly():
    model = small_vit()
    mha = SelfAttention(True)
    before = {id(m): (dict(m.__dict__), getattr(m, "fused_attn", None)) for m in model.modules()}
    patch(model)
    patch(mha)
    assert "forward" in model.blocks[0].attn.__dict__
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model)
    unpatch(model)
    unpatch(mha)
    for m in model.modules():
        assert m.__dict__.keys() == before[id(m)][0].keys()
        assert getattr(m, "fused_attn", None) == before[id(m)][1]
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch(model)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_jvp_keeps_the_fused_tangent(fullgraph):
    """torch.compile drops custom jvp rules (pytorch/pytorch#192985); the result must still be right."""
    model = small_vit()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    offsets = {n: 0.05 * torch.randn_like(p) for n, p in params.items()}
    expected = linearized_outputs(math_copy(model), images, params, offsets)
    with patched(model):
        compiled = torch.compile(lambda p, d: linearized_outputs(model, images, p, d), fullgraph=fullgraph)
        out = compiled(params, offsets)
    assert max_relative_error(out, expected) < 1e-10


def test_fused_attention_jvp_on_triton(device):
    q, k, v, q_t, k_t, v_t = (torch.randn(1, 2, 9, 16, device=device) for _ in range(6))
    expected = tk.reference.attention_jvp(*(t.double() for t in (q, k, v, q_t, k_t, v_t)))[1]
    _, out_t = jvp(lambda q, k, v: fused_attention(q, k, v, backend="triton"), (q, k, v), (q_t, k_t, v_t))
    assert max_relative_error(out_t, expected) < 1e-5
