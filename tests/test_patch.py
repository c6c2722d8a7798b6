"""patching: unmodified forward-AD code through the fused attention (``patch``, ``fused_jvp``).

The oracle is the same code through torch's math attention (SDPA's math backend, the MHA slow
path), in float64: forward AD there is exact, so results must agree to rounding.
"""

import contextlib
import copy
import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, composite_layer_norm, max_relative_error
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch.autograd import forward_ad
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from tangent_kernels.patching import fused_attention, fused_jvp, list_swaps, patch, patched, unpatch, watch
from tangent_kernels.patching.mode import is_routed

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(watch, "_warned", set())


@contextlib.contextmanager
def math_attention():
    """torch's own math attention: SDPA's math backend and the MHA slow path (forward AD has rules there)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@pytest.fixture
def math_oracle():
    """The test runs in ``math_attention()``."""
    with math_attention():
        yield


def caught(fn, routed=False):
    """``fn()`` (inside ``fused_jvp()`` if ``routed``) and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        if routed:
            with fused_jvp():
                result = fn()
        else:
            result = fn()
    return result, [str(w.message) for w in found if "tangent_kernels" in str(w.message)]


class FusedCalls:
    """``with FusedCalls() as calls:`` counts the attention calls with tangents the fused kernel
    served inside; ``calls.on_cpp`` tells they did and ran the C++ kernels."""

    def __enter__(self):
        self.start = watch.fused_calls
        return self

    def __exit__(self, *exc):
        self.count = watch.fused_calls - self.start

    @property
    def on_cpp(self):
        return self.count > 0 and tk.last_backend("attention_jvp") == "cpp"


def close(actual, expected, tol=1e-12):
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) < tol


# ----------------------------------------------------------------------------------------------
# timm ViTs through patch()


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


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"qk_norm": True},
        {"class_token": False, "global_pool": "avg"},
        {"block_fn": ParallelScalingBlock, "global_pool": "map"},
    ],
)
def test_jvp_through_patched_vit_matches_math_attention(variant):
    model = small_vit(**variant)
    images = torch.randn(2, 3, 32, 32, dtype=F64)
    offsets = {n: (0.05 * torch.randn_like(p)).requires_grad_() for n, p in model.named_parameters()}
    expected, expected_grads = jvp_and_grads(math_copy(model), images, offsets)
    with patched(model), FusedCalls() as calls:
        out, grads = jvp_and_grads(model, images, offsets)
    assert calls.on_cpp
    assert max_relative_error(out, expected) < 1e-10
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max().item())


def test_patch_turns_timm_fused_attn_on_and_restores_it():
    """MeanFlow ports set fused_attn=False (hand-written attention): patch routes it anyway."""
    model = small_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    images, tangent = torch.randn(2, 3, 32, 32, dtype=F64), torch.randn(2, 3, 32, 32, dtype=F64)
    expected = jvp(model, (images,), (tangent,))
    with patched(model), FusedCalls() as calls:
        assert all(block.attn.fused_attn for block in model.blocks)
        out = jvp(model, (images,), (tangent,))
    assert calls.on_cpp
    close(out, expected)
    assert not any(block.attn.fused_attn for block in model.blocks)


@pytest.mark.parametrize("fused_attn", [False, True])
def test_patch_keeps_a_timm_attention_scale_of_its_own(fused_attn):
    """A port that sets ``attn.scale`` (old timm's ``qk_scale``) and attends by hand: timm's SDPA branch,
    which ``patch`` turns on, passes no scale, so the patched model computed another function (0.22
    off with no tangent). Its SDPA calls now use the module's scale; a module already on its SDPA
    branch (which ignores ``scale``) keeps SDPA's own."""
    model = small_vit()
    for block in model.blocks:
        block.attn.fused_attn, block.attn.scale = fused_attn, 0.5  # 1/√16 = 0.25 by default
    images, tangent = torch.randn(2, 3, 32, 32, dtype=F64), torch.randn(2, 3, 32, 32, dtype=F64)
    with math_attention():
        expected = model(images), *jvp(model, (images,), (tangent,))
    with patched(model), FusedCalls() as calls:
        out = model(images), *jvp(model, (images,), (tangent,))
    assert calls.on_cpp
    close(out, expected)


def test_forward_ad_through_patched_vit():
    model = small_vit()
    images, tangent = torch.randn(2, 3, 32, 32, dtype=F64), torch.randn(2, 3, 32, 32, dtype=F64)
    expected = jvp(math_copy(model), (images,), (tangent,))[1]
    with patched(model), forward_ad.dual_level():
        out = model(forward_ad.make_dual(images, tangent))
        tangent_out = forward_ad.unpack_dual(out).tangent
    assert max_relative_error(tangent_out, expected) < 1e-10


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_jvp_keeps_the_fused_tangent(fullgraph):
    """torch.compile drops custom jvp rules (pytorch/pytorch#192985); the result must still be right."""
    model = small_vit()
    images = torch.randn(2, 3, 32, 32, dtype=F64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    offsets = {n: 0.05 * torch.randn_like(p) for n, p in params.items()}
    expected = linearized_outputs(math_copy(model), images, params, offsets)
    with patched(model):
        compiled = torch.compile(lambda p, d: linearized_outputs(model, images, p, d), fullgraph=fullgraph)
        out = compiled(params, offsets)
    assert max_relative_error(out, expected) < 1e-10


# ----------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention under fused_jvp(): every call form

B, H, L, S, D = 2, 4, 7, 9, 16  # odd lengths, Lq != Lk


def sdpa_inputs(q_shape=(B, H, L, D), k_shape=(B, H, S, D), v_shape=None):
    q, k = torch.randn(q_shape, dtype=F64), torch.randn(k_shape, dtype=F64)
    return q, k, torch.randn(v_shape or k_shape, dtype=F64)


def sdpa_jvp_and_grads(q, k, v, **kwargs):
    """(o, o_t) by jvp of SDPA, and the gradients of a loss on both w.r.t. the tangents."""
    tangents = [torch.randn_like(t).requires_grad_() for t in (q, k, v)]
    weights = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    o, o_t = jvp(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v), tuple(tangents)
    )
    return o, o_t, *torch.autograd.grad((o_t * weights).sum() + o.square().sum(), tangents)


def compare_with_math_sdpa(inputs, **kwargs):
    """The messages warned, and the fused calls, of the routed SDPA call that matched math SDPA."""
    torch.manual_seed(1)
    with sdpa_kernel(SDPBackend.MATH):
        expected = sdpa_jvp_and_grads(*inputs, **kwargs)
    torch.manual_seed(1)
    with FusedCalls() as calls:
        out, messages = caught(lambda: sdpa_jvp_and_grads(*inputs, **kwargs), routed=True)
    close(out, expected)
    return messages, calls


causal_mask = torch.ones(L, S, dtype=torch.bool).tril()
padding = torch.rand(B, S) > 0.3  # SDPA's bool: True = attend
padding[:, 0] = True  # no query without a key (torch's math SDPA has NaN gradients there; ours are zero)
FUSED_FORMS = {
    "no mask": ({}, {}),
    "is_causal": ({}, {"is_causal": True}),
    "scale": ({}, {"scale": 0.3}),
    "bool key padding (B, 1, 1, S)": ({}, {"attn_mask": padding[:, None, None, :]}),
    "bool key padding (S,)": ({}, {"attn_mask": padding[0]}),
    "bool key padding expanded (B, 1, L, S)": (
        {},
        {"attn_mask": padding[:, None, None, :].expand(B, 1, L, S)},
    ),
    "float key padding": ({}, {"attn_mask": torch.randn(B, 1, 1, S, dtype=F64)}),
    "float32 key padding": ({}, {"attn_mask": torch.randn(B, 1, 1, S)}),
    "causal mask as bool attn_mask": ({}, {"attn_mask": causal_mask}),
    "causal mask as float attn_mask": (
        {},
        {"attn_mask": torch.zeros(L, S, dtype=F64).masked_fill(~causal_mask, -torch.inf)},
    ),
    "causal and key padding (B, 1, L, S)": ({}, {"attn_mask": causal_mask & padding[:, None, None, :]}),
    # key padding written out for every query, as Hugging Face's BERT builds it (read by value)
    "bool key padding materialized (B, 1, L, S)": (
        {},
        {"attn_mask": padding[:, None, None, :].expand(B, 1, L, S).clone()},
    ),
    "float key padding materialized (B, 1, L, S)": (
        {},
        {"attn_mask": torch.randn(B, 1, 1, S, dtype=F64).expand(B, 1, L, S).clone()},
    ),
    # repeated over the heads, as diffusers' prepare_attention_mask does (PixArt; read by value)
    "float key padding repeated over heads (B, H, 1, S)": (
        {},
        {"attn_mask": torch.randn(B, 1, 1, S, dtype=F64).repeat_interleave(H, dim=1)},
    ),
    "bool causal and key padding repeated over heads (B, H, L, S)": (
        {},
        {"attn_mask": (causal_mask & padding[:, None, None, :]).repeat_interleave(H, dim=1)},
    ),
    "3-D inputs": ({"q_shape": (H, L, D), "k_shape": (H, S, D)}, {}),
    "2-D inputs": ({"q_shape": (L, D), "k_shape": (S, D)}, {"is_causal": True}),
    "5-D inputs": ({"q_shape": (2, B, H, L, D), "k_shape": (2, B, H, S, D)}, {}),
    "enable_gqa": ({"k_shape": (B, 2, S, D)}, {"enable_gqa": True, "attn_mask": padding[:, None, None, :]}),
}


@pytest.mark.parametrize("form", list(FUSED_FORMS))
def test_sdpa_forms_the_kernel_serves(form):
    shapes, kwargs = FUSED_FORMS[form]
    messages, calls = compare_with_math_sdpa(sdpa_inputs(**shapes), **kwargs)
    assert calls.on_cpp
    assert messages == []


MATH_FORMS = {
    "dropout_p > 0": ({}, {"dropout_p": 0.3}),  # one dropout mask for both streams: equal under one seed
    "mask that varies over heads and queries": ({}, {"attn_mask": torch.rand(B, H, L, S) > 0.3}),
    "value head dim": ({"v_shape": (B, H, S, 8)}, {}),
    "batch dims that": ({"q_shape": (1, H, L, D)}, {}),
}


@pytest.mark.parametrize("form", list(MATH_FORMS))
def test_sdpa_forms_the_kernel_cannot_serve_run_math_sdpa_and_say_so_once(form):
    shapes, kwargs = MATH_FORMS[form]
    inputs = sdpa_inputs(**shapes)
    messages, calls = compare_with_math_sdpa(inputs, **kwargs)
    assert calls.count == 0
    assert len(messages) == 1 and "math path" in messages[0]
    assert compare_with_math_sdpa(inputs, **kwargs)[0] == []  # said once


def test_sdpa_mask_with_a_tangent_runs_math_sdpa():
    q, k, v = sdpa_inputs()
    mask, mask_t = torch.randn(B, 1, 1, S, dtype=F64), torch.randn(B, 1, 1, S, dtype=F64)

    def attend(q, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(attend, (q, mask), (torch.ones_like(q), mask_t))
    out, messages = caught(lambda: jvp(attend, (q, mask), (torch.ones_like(q), mask_t)), routed=True)
    close(out, expected)
    assert "attn_mask that has a tangent" in messages[0]


@pytest.mark.parametrize("case", ["is_causal with attn_mask", "int64 mask", "heads without enable_gqa"])
def test_sdpa_forms_torch_refuses_raise_as_torch(case):
    q, k, v = sdpa_inputs(k_shape=(B, 2, S, D) if "heads" in case else (B, H, S, D))
    kwargs = {
        "is_causal with attn_mask": {"is_causal": True, "attn_mask": padding[:, None, None, :]},
        "int64 mask": {"attn_mask": padding[:, None, None, :].long()},
        "heads without enable_gqa": {},
    }[case]
    with pytest.raises(RuntimeError) as torch_error:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    with fused_jvp(), pytest.raises(RuntimeError) as ours:
        jvp(lambda q: F.scaled_dot_product_attention(q, k, v, **kwargs), (q,), (q,))
    assert str(ours.value) == str(torch_error.value)


def test_sdpa_without_tangents_is_torch_sdpa():
    q, k, v = sdpa_inputs()
    with fused_jvp(), FusedCalls() as calls:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert calls.count == 0


def test_small_cpu_attention_runs_math_sdpa_quietly(monkeypatch):
    """Below CPU_FUSED_MIN_SCORES scores in a call, math SDPA is faster on the CPU: it serves the
    call, exactly, with no fallback warning and no hand-written-attention warning."""
    from tangent_kernels.patching import sdpa

    q, k, v = sdpa_inputs()
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(F.scaled_dot_product_attention, (q, k, v), tangents)
    scores = q.numel() // q.shape[-1] * k.shape[-2]  # batch × heads × L × S
    monkeypatch.setattr(sdpa, "CPU_FUSED_MIN_SCORES", scores + 1)
    with fused_jvp(), FusedCalls() as calls, warnings.catch_warnings():
        warnings.simplefilter("error")
        close(jvp(F.scaled_dot_product_attention, (q, k, v), tangents), expected)
    assert calls.count == 0
    monkeypatch.setattr(sdpa, "CPU_FUSED_MIN_SCORES", scores)
    with fused_jvp(), FusedCalls() as calls:
        close(jvp(F.scaled_dot_product_attention, (q, k, v), tangents), expected)
    assert calls.on_cpp


def test_float_mask_without_a_tangent_under_func_jvp():
    """The absent tangent of a constant float mask arrives materialized as zeros: it is ignored."""
    q, k, v = sdpa_inputs()
    mask = torch.zeros(B, 1, 1, S, dtype=F64).masked_fill(~padding[:, None, None, :], -1e9)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(attend, (q, k, v), tangents)
    with fused_jvp():
        close(jvp(attend, (q, k, v), tangents), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["biases", "float32 min on a whole row", "0 and -inf"])
def test_float32_mask_with_16_bit_inputs_keeps_its_precision(dtype, mask, monkeypatch):
    """torch adds a float32 mask to 16-bit inputs' scores at float32 precision; the kernels add a
    mask in the inputs' dtype, which rounded it (a bias 1000 + 0.3·j: 0.16-0.4 off where torch is
    2.7e-4-2.2e-3 off; a row of float32's minimum became -inf: zeros where torch averages the values).
    Such masks run math SDPA; masks the dtype holds exactly still run fused."""
    monkeypatch.setattr(tk.patching.sdpa, "CPU_FUSED_MIN_SCORES", 0)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 8, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    masks = {
        "biases": 1000 + 0.3 * torch.arange(3.0).expand(2, 1, 1, 3),
        "float32 min on a whole row": torch.zeros(2, 1, 1, 3).index_fill_(0, torch.tensor([1]), torch.finfo().min),
        "0 and -inf": torch.zeros(2, 1, 1, 3).index_fill_(3, torch.tensor([2]), -math.inf),
    }

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[mask])

    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(attend, (q, k, v), tangents)
    with fused_jvp(), FusedCalls() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-reason note that math SDPA runs
        out = jvp(attend, (q, k, v), tangents)
    close(out, expected, tol=1e-2)
    assert calls.count == (mask == "0 and -inf")


def test_sdpa_call_forms_torch_accepts(monkeypatch):
    """A mask with more (unit) leading dims than the scores (the output keeps q's shape, as torch's),
    a 0-d tensor or a bool as ``scale``, a scale that is not finite (NaN, as torch's math)."""
    monkeypatch.setattr(tk.patching.sdpa, "CPU_FUSED_MIN_SCORES", 0)
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    calls = [
        {"attn_mask": torch.rand(1, 1, 3, 5) > 0.3},
        {"scale": torch.tensor(0.5, dtype=F64)},
        {"scale": True},
        {"scale": math.inf},
    ]
    for call in calls:
        def attend(q, k):
            return F.scaled_dot_product_attention(q, k, k, **call)

        with sdpa_kernel(SDPBackend.MATH):
            expected = jvp(attend, (q, k), (q, k))
        with fused_jvp(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = jvp(attend, (q, k), (q, k))
        for o, e in zip(out, expected):
            assert o.shape == e.shape
            torch.testing.assert_close(o, e, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_sdpa_under_autocast_casts_as_torch():
    """An fp32 norm hands SDPA fp32 q, k and bf16 v; autocast casts all three to bf16."""
    q, k, v = (t.float() for t in sdpa_inputs())
    v = v.bfloat16()
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    expected = tk.reference.attention_jvp(*(t.double() for t in (q, k, v, *tangents)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.MATH):
            baseline = jvp(attend, (q, k, v), tangents)
        with fused_jvp():
            out = jvp(attend, (q, k, v), tangents)
    for name, actual, base, exact in zip(("o", "o_t"), out, baseline, expected):
        assert actual.dtype == base.dtype == torch.bfloat16
        assert_close(actual, exact, base, name=name)


# ----------------------------------------------------------------------------------------------
# fused_attention validates what the kernels will be given


@pytest.mark.parametrize(
    "case",
    ["int64 mask", "v with fewer keys", "head dims", "batch", "heads do not divide", "dtypes", "meta k"],
)
def test_fused_attention_validates_its_inputs(case):
    q, k, v = sdpa_inputs(k_shape=(B, H, L, D))
    kwargs = {}
    if case == "int64 mask":
        kwargs["key_padding_mask"] = torch.zeros(B, L, dtype=torch.int64)
    elif case == "v with fewer keys":
        v = v[:, :, :-2]
    elif case == "head dims":
        k = k[..., :-1]
    elif case == "batch":
        k = k[:1]
    elif case == "heads do not divide":
        k, v = k[:, :3], v[:, :3]
    elif case == "dtypes":
        v = v.float()
    else:
        k = k.to("meta")
    with pytest.raises((TypeError, ValueError)):
        fused_attention(q, k, v, **kwargs)


def test_fused_attention_casts_under_autocast():
    q, k, v = (t.float() for t in sdpa_inputs(k_shape=(B, H, L, D)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attention(q, k, v.bfloat16())
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention through patch()

E = 24


class CallMHA(torch.nn.Module):
    """Calls its ``nn.MultiheadAttention`` with fixed keyword arguments; returns the output (and
    the weights, when asked, folded in so that they are compared too)."""

    def __init__(self, mha, **call):
        super().__init__()
        self.mha, self.call = mha, call

    def forward(self, query, key, value):
        out, weights = self.mha(query, key, value, **self.call)
        return out if weights is None else (out, weights)


def linearized_and_grads(model, *inputs):
    """The LinearizedModel pattern, and the gradients of a loss on both outputs."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(5)
    offsets = {n: (0.05 * torch.randn_like(p)).requires_grad_() for n, p in params.items()}
    torch.manual_seed(6)  # one dropout draw for the oracle and the patched model
    out, out_t = jvp(lambda p: functional_call(model, p, inputs), (params,), (offsets,))
    out, out_t = (out, out_t) if isinstance(out, tuple) else ((out,), (out_t,))
    loss = sum((y + y_t).square().sum() for y, y_t in zip(out, out_t))
    return *out, *out_t, *torch.autograd.grad(loss, list(offsets.values()))


def bsl(batch_first, length=L, width=E):
    x = torch.randn(B, length, width, dtype=F64)
    return x if batch_first else x.transpose(0, 1).contiguous()


float_causal = torch.zeros(L, L, dtype=F64).masked_fill(
    ~torch.ones(L, L, dtype=torch.bool).tril(), -torch.inf
)
key_padding = torch.zeros(B, L, dtype=torch.bool)
key_padding[:, -2:] = True  # nn.MultiheadAttention's bool: True = padding
MHA_FORMS = {
    "self-attention": ({}, {}),
    "eval mode": ({"train": False}, {}),
    "bool key_padding_mask": ({}, {"key_padding_mask": key_padding}),
    "float key_padding_mask": (
        {},
        {"key_padding_mask": torch.zeros(B, L, dtype=F64).masked_fill(key_padding, -1e9)},
    ),
    "causal 2-D attn_mask (CLIP text)": ({}, {"attn_mask": float_causal}),
    "causal attn_mask with is_causal": ({}, {"attn_mask": float_causal, "is_causal": True}),
    "causal bool attn_mask and key padding": (
        {},
        {"attn_mask": float_causal != 0, "key_padding_mask": key_padding},
    ),
    "cross-attention, key is value": ({"kv": "same"}, {}),
    "cross-attention": ({"kv": "different"}, {}),
    "kdim and vdim": ({"kv": "different", "kdim": 10, "vdim": 6}, {}),
    "add_bias_kv": ({"add_bias_kv": True}, {"key_padding_mask": key_padding}),
    "no bias": ({"bias": False}, {}),
}
MHA_MATH_FORMS = {
    "3-D bool attn_mask": ({}, {"attn_mask": torch.rand(B * 4, L, L) > 0.7}),
    "add_zero_attn with a 2-D attn_mask": (
        {"add_zero_attn": True},
        {"attn_mask": float_causal + torch.randn(L, L)},
    ),
    "dropout in training": ({"dropout": 0.3}, {}),
    "need_weights=True": ({}, {"need_weights": True, "average_attn_weights": False}),
}


def compare_patched_mha(batch_first, setup, call, math_oracle):
    setup = dict(setup)
    train, kv = setup.pop("train", True), setup.pop("kv", None)
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, 4, batch_first=batch_first, **setup).double().train(train)
    model = CallMHA(mha, **{"need_weights": False, **call})
    query = bsl(batch_first)
    key = bsl(batch_first, S, setup.get("kdim", E)) if kv else query
    value = key if kv in (None, "same") else bsl(batch_first, S, setup.get("vdim", E))
    expected = linearized_and_grads(model, query, key, value)  # under math_oracle
    with patched(model), FusedCalls() as calls:
        out, messages = caught(lambda: linearized_and_grads(model, query, key, value))
    close(out, expected)
    return messages, calls


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("form", list(MHA_FORMS))
def test_patched_multihead_attention_forms_the_kernel_serves(form, batch_first, math_oracle):
    messages, calls = compare_patched_mha(batch_first, *MHA_FORMS[form], math_oracle)
    assert calls.on_cpp
    assert messages == []


@pytest.mark.parametrize("form", list(MHA_MATH_FORMS))
def test_patched_multihead_attention_other_forms_run_math_and_say_so(form, math_oracle):
    messages, calls = compare_patched_mha(True, *MHA_MATH_FORMS[form], math_oracle)
    assert calls.count == 0
    assert messages and "math path" in messages[0]


def test_patched_multihead_attention_unbatched(math_oracle):
    torch.manual_seed(0)
    model = CallMHA(torch.nn.MultiheadAttention(E, 4).double(), need_weights=False)
    x = torch.randn(L, E, dtype=F64)
    expected = linearized_and_grads(model, x, x, x)
    with patched(model):
        close(linearized_and_grads(model, x, x, x), expected)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("empty", ["batch", "sequence"])
def test_patched_multihead_attention_with_an_empty_batch_or_sequence(empty, batch_first, math_oracle):
    """Empty dims give empty results, as torch's (splitting the heads by ``view(..., -1)`` raised:
    ambiguous for 0 elements)."""
    torch.manual_seed(0)
    model = CallMHA(torch.nn.MultiheadAttention(E, 4, batch_first=batch_first).double(), need_weights=False)
    batch, length = (0, L) if empty == "batch" else (B, 0)
    x = torch.randn((batch, length, E) if batch_first else (length, batch, E), dtype=F64)
    expected = linearized_and_grads(model, x, x, x)
    with patched(model):
        close(linearized_and_grads(model, x, x, x), expected)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_patched_transformer_encoder_in_eval(batch_first, nested):
    """``nn.TransformerEncoder`` in eval(): under ``functional_call`` in a parameter jvp no parameter
    requires grad, so its fast paths (the fused encoder-layer op, nested tensors for the padding)
    were taken and raised for want of a forward-AD rule, as unpatched."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, 4, 2 * E, dropout=0.0, batch_first=batch_first)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested and batch_first).double().eval()
    x, padding = bsl(batch_first), torch.zeros(B, L, dtype=torch.bool)
    padding[0, 4:] = True
    with math_attention():
        expected = linearized_and_grads(encoder, x, None, padding)  # (src, mask, src_key_padding_mask)
    with patched(encoder):
        close(linearized_and_grads(encoder, x, None, padding), expected)


def test_patched_multihead_attention_refuses_is_causal_without_a_mask_as_torch():
    model = CallMHA(
        torch.nn.MultiheadAttention(E, 4, batch_first=True).double(), need_weights=False, is_causal=True
    )
    x = bsl(True)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint") as torch_error:
        model(x, x, x)
    with patched(model), pytest.raises(RuntimeError) as ours:
        jvp(model, (x, x, x), (x, x, x))
    assert str(ours.value) == str(torch_error.value)


def test_patched_multihead_attention_without_tangents_is_torch_forward():
    """No tangent: torch's own forward, fast path included (eval, no grad)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, 4, batch_first=True).eval()
    x = torch.randn(B, L, E)
    with torch.no_grad():
        expected = mha(x, x, x, key_padding_mask=key_padding)
        with patched(mha):
            out = mha(x, x, x, key_padding_mask=key_padding)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_patched_multihead_attention_in_the_double_backward_form_of_a_jvp():
    """``torch.autograd.functional.jvp(create_graph=True)`` (MeanFlow ports) carries no tangent: the
    patched MHA ran torch's own forward, whose flash SDPA backward has no derivative, and a loss on
    the tangent raised. A call that needs a gradient is now computed by the routed forward."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, 4, batch_first=True).double()
    x, v = torch.randn(B, L, E, dtype=F64), torch.randn(B, L, E, dtype=F64)

    def tangent_loss_grads():
        mha.zero_grad()
        _, y_t = torch.autograd.functional.jvp(lambda x: mha(x, x, x, need_weights=False)[0], (x,), (v,),
                                               create_graph=True)  # fmt: skip
        y_t.square().sum().backward()
        return y_t.detach(), *(p.grad.clone() for p in mha.parameters() if p.grad is not None)

    with math_attention():
        expected = tangent_loss_grads()
    with patched(mha), FusedCalls() as calls:
        close(tangent_loss_grads(), expected)
    assert calls.count == 1  # the fused op, whose backward is differentiable


class SpyLinearInputs(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.dims = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.dims.append(args[0].dim())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_first", [True, False])
def test_patched_multihead_attention_projects_on_2d_views(batch_first):
    """2-D projections make each weight gradient one GEMM (3-D ones are per-token batched products)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, 4, batch_first=batch_first).double()
    x = bsl(batch_first)
    spy = SpyLinearInputs()
    with patched(mha), spy:
        jvp(lambda x: mha(x, x, x, need_weights=False)[0], (x,), (x,))
    assert spy.dims == [2, 2]  # in-projection, out-projection


# ----------------------------------------------------------------------------------------------
# layer norms: torch's forward-AD rule is ~100x the fused kernel on the CPU


@pytest.fixture
def layer_norm_kernel_calls(monkeypatch):
    """Counts the calls of ``functional.layer_norm_jvp`` and ``rms_norm_jvp`` (the fused norm tangents)."""
    calls = []

    def counted(original):
        def count(*args, **kwargs):
            calls.append(kwargs.get("backend"))
            return original(*args, **kwargs)

        return count

    for name in ("layer_norm_jvp", "rms_norm_jvp"):
        monkeypatch.setattr(tk.functional, name, counted(getattr(tk.functional, name)))
    return calls


def norm_model(**norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 24), torch.nn.LayerNorm(24, **norm), torch.nn.Linear(24, 5)
    ).double()


@pytest.mark.parametrize("norm", [{}, {"bias": False}, {"elementwise_affine": False}])
def test_layer_norm_jvp_runs_the_fused_kernel(norm, layer_norm_kernel_calls):
    model = norm_model(**norm)
    x = torch.randn(3, 7, 8, dtype=F64)
    expected = linearized_and_grads(model, x)
    with pytest.warns(UserWarning, match="found no attention module"), patched(model):
        close(linearized_and_grads(model, x), expected)
    assert layer_norm_kernel_calls
    layer_norm_kernel_calls.clear()
    expected = jvp(model, (x,), (torch.ones_like(x),))
    with fused_jvp():
        close(jvp(model, (x,), (torch.ones_like(x),)), expected)
    assert layer_norm_kernel_calls


def test_layer_norm_without_a_tangent_runs_torch(layer_norm_kernel_calls):
    x, shape = torch.randn(3, 7, 8), (8,)
    with fused_jvp():
        out = F.layer_norm(x, shape, torch.ones(shape), torch.zeros(shape))
    assert torch.equal(out, F.layer_norm(x, shape, torch.ones(shape), torch.zeros(shape)))
    assert layer_norm_kernel_calls == []


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("form", ["torch.func.jvp", "double backward"])
def test_norms_over_several_trailing_dims_are_exact_to_second_order(norm, form, layer_norm_kernel_calls):
    """A norm over several trailing dims (``LayerNorm([C, H, W])``, ``F.layer_norm(x, x.shape[-2:])``)
    ran torch's own layer-norm rule, whose second derivative is wrong (the gradient of the
    tangent's loss 1.03-1.05 off); it runs the fused norm over the dims flattened into one."""
    torch.manual_seed(0)
    shape = (3, 5, 4)
    x, x_t = torch.randn(2, *shape, dtype=F64), torch.randn(2, *shape, dtype=F64)
    w, b = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    x.requires_grad_(), w.requires_grad_()

    def rms_norm(x, w):
        return x * torch.rsqrt(x.square().mean((-3, -2, -1), keepdim=True) + 1e-6) * w

    def over_last_dim(x, w, b):  # the oracle, exact to every order
        flat = x.flatten(-3)
        if norm == "rms_norm":
            return rms_norm(x, w)
        return composite_layer_norm(flat, w.flatten(), b.flatten()).unflatten(-1, shape)

    def routed(x, w, b):
        return F.rms_norm(x, shape, w, 1e-6) if norm == "rms_norm" else F.layer_norm(x, shape, w, b)

    def gradients_of_the_tangent(f):
        if form == "torch.func.jvp":
            _, y_t = jvp(f, (x, w, b), (x_t, torch.zeros_like(w), torch.zeros_like(b)))
        else:
            _, y_t = torch.autograd.functional.jvp(lambda x: f(x, w, b), x, x_t, create_graph=True)
        return torch.autograd.grad((y_t * torch.arange(y_t.numel(), dtype=F64).view_as(y_t)).square().sum(), (x, w))

    expected = gradients_of_the_tangent(over_last_dim)
    with fused_jvp():
        close(gradients_of_the_tangent(routed), expected)
        close(jvp(routed, (x, w, b), (x_t, w, b)), jvp(over_last_dim, (x, w, b), (x_t, w, b)))
    assert layer_norm_kernel_calls or form == "double backward"  # (which runs torch's op, exact backward)


def test_layer_norm_of_mixed_dtypes_in_the_double_backward_form():
    """A bf16 input with float32 parameters (a LayerNorm after a Linear under CPU autocast) that needs
    a gradient and carries no tangent (``autograd.functional.jvp(create_graph=True)``) ran torch's
    own layer norm, whose second derivative is wrong: 0.84 off. It runs torch's op with an exact
    backward now (values bit-identical to torch's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 16))
    x, x_t = torch.randn(4, 8, 16), torch.randn(4, 8, 16)

    def tangent_loss_grad(norm_forward):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, y_t = torch.autograd.functional.jvp(lambda x: model[2](norm_forward(model[0](x))), (x,), (x_t,),
                                                   create_graph=True)  # fmt: skip
        (y_t.float() ** 2).mean().backward()
        return model[0].weight.grad.clone()

    def composite(h):
        return composite_layer_norm(h, model[1].weight.to(h.dtype), model[1].bias.to(h.dtype))

    expected = tangent_loss_grad(composite)
    with fused_jvp():
        out = tangent_loss_grad(model[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model[0](x)
            assert torch.equal(model[1](h), torch.nn.functional.layer_norm(h, (32,), model[1].weight, model[1].bias))
    assert max_relative_error(out, expected) < 0.05  # bf16 rounding (torch's own: 0.84)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norms_under_autocast_run_fused_in_torchs_dtype(norm, monkeypatch, layer_norm_kernel_calls):
    """Under autocast (CPU bf16: a linear's bf16 output into a norm with float32 parameters) norms
    ran torch's own rule, whose layer-norm second derivative is wrong: the gradient of a loss on the
    tangent was 0.64 off (MeanFlow's stop_gradient=False step under autocast). They now run fused,
    in the dtype torch's norm returns there (bf16 on the CPU; float32 under CUDA's autocast)."""
    monkeypatch.setattr(tk.patching.layer_norm, "CPU_FUSED_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(32) if norm == "layer_norm" else torch.nn.RMSNorm(32)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), layer, torch.nn.Linear(32, 16))
    x, x_t = torch.randn(4, 8, 16), torch.randn(4, 8, 16)

    def tangent_loss_grad(norm_forward):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_t = jvp(lambda x: model[2](norm_forward(model[0](x))), (x,), (x_t,))
        (y_t.float() ** 2).mean().backward()
        return model[0].weight.grad.clone(), norm_forward(model[0](x).bfloat16()).dtype

    def composite(h):
        w = model[1].weight.to(h.dtype)
        if norm == "rms_norm":
            return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * w
        return composite_layer_norm(h, w, model[1].bias.to(h.dtype))

    expected, expected_dtype = tangent_loss_grad(composite)
    with fused_jvp():
        out, dtype = tangent_loss_grad(model[1])
    assert layer_norm_kernel_calls and dtype == expected_dtype == torch.bfloat16
    assert max_relative_error(out, expected) < 0.05  # bf16 rounding (torch's own layer norm: 0.64)


def test_small_cpu_layer_norm_runs_torch_only_without_a_second_order_term(monkeypatch, layer_norm_kernel_calls):
    """Below CPU_FUSED_MIN_ELEMENTS torch's own rule serves a layer norm whose primal inputs do not
    require grad (exact at first order); one whose input requires grad keeps the fused kernel, as
    torch's second derivative is wrong (pytorch/pytorch#196700)."""
    from tangent_kernels.patching import layer_norm as patched_layer_norm

    monkeypatch.setattr(patched_layer_norm, "CPU_FUSED_MIN_ELEMENTS", 3 * 7 * 8 + 1)
    x, x_t, w, b = torch.randn(3, 7, 8, dtype=F64), torch.randn(3, 7, 8, dtype=F64), torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)

    def norm(x):
        return F.layer_norm(x, (8,), w, b)

    expected = jvp(norm, (x,), (x_t,))
    with fused_jvp():
        close(jvp(norm, (x,), (x_t,)), expected)
    assert layer_norm_kernel_calls == []
    x.requires_grad_()
    with fused_jvp():
        close(jvp(norm, (x,), (x_t,)), expected)
    assert layer_norm_kernel_calls


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7), (7,)], ids=["3-d", "1-d"])  # 1-d: the parameter grads came out 0-d
def test_layer_norm_tangent_by_double_backward_has_exact_gradients(affine, shape):
    """The double-backward form of a JVP (``autograd.functional.jvp(create_graph=True)``) through
    a routed layer norm: its tangent's gradients (third order through the layer norm) match the
    composite oracle, where torch's double backward treats mean and rstd as constants
    (pytorch/pytorch#175754); first order is torch's own."""
    torch.manual_seed(0)
    x, v = torch.randn(shape, dtype=F64, requires_grad=True), torch.randn(shape, dtype=F64)
    w, b = (torch.randn(7, dtype=F64, requires_grad=True) if affine else None for _ in range(2))
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def tangent(norm):
        def f(x, *wb):
            return torch.autograd.functional.jvp(lambda x: norm(x, *wb), x, v, create_graph=True)[1]

        return f

    def routed(x, w=None, b=None):
        with fused_jvp():
            return F.layer_norm(x, (7,), w, b)

    assert torch.autograd.gradcheck(tangent(routed), inputs)
    close(tangent(routed)(*inputs), tangent(composite_layer_norm)(*inputs))
    g = torch.randn(shape, dtype=F64)
    ours = torch.autograd.grad(routed(*inputs), inputs, g)
    close(ours, torch.autograd.grad(F.layer_norm(x, (7,), w, b), inputs, g))
    assert torch.autograd.gradgradcheck(routed, inputs)


@pytest.mark.parametrize("form", ["torch.func.jvp", "forward_ad"])
def test_layer_norm_tangent_by_forward_ad_has_exact_gradients(form):
    """The fused tangent of a routed layer norm is differentiable with respect to every primal and
    tangent input (gradcheck in float64), where torch's own rule drops terms (pytorch/pytorch#196700)."""
    torch.manual_seed(0)
    primals = (torch.randn(3, 5, 7, dtype=F64), torch.randn(7, dtype=F64), torch.randn(7, dtype=F64))
    tangents = tuple(torch.randn_like(t) for t in primals)

    def routed(x, w, b):
        with fused_jvp():
            return F.layer_norm(x, (7,), w, b)

    def tangent(*inputs):
        x, w, b, x_t, w_t, b_t = inputs
        if form == "torch.func.jvp":
            return jvp(routed, (x, w, b), (x_t, w_t, b_t))[1]
        with forward_ad.dual_level():
            duals = (forward_ad.make_dual(p, t) for p, t in ((x, x_t), (w, w_t), (b, b_t)))
            return forward_ad.unpack_dual(routed(*duals)).tangent

    inputs = tuple(t.requires_grad_() for t in (*primals, *tangents))
    assert torch.autograd.gradcheck(tangent, inputs)
    composite = jvp(composite_layer_norm, primals, tangents)[1]
    close(tangent(*inputs), composite)


TRANSFORMS = {
    "jvp of jvp": lambda f, x, t: jvp(lambda *x: jvp(f, x, t)[1], x, t)[1],
    "grad of jvp": lambda f, x, t: torch.func.grad(lambda q: jvp(f, (q, *x[1:]), t)[1].square().sum())(x[0]),
    "jvp of grad": lambda f, x, t: jvp(torch.func.grad(lambda q: f(q, *x[1:]).square().sum()), x[:1], t[:1])[1],
    "hessian": lambda f, x, t: torch.func.hessian(lambda q: f(q, *x[1:]).square().sum())(x[0]),
    "jacfwd": lambda f, x, t: torch.func.jacfwd(lambda q: f(q, *x[1:]))(x[0]),
    "vmap of jvp": lambda f, x, t: torch.func.vmap(lambda a: jvp(f, x, (a, *t[1:]))[1])(torch.stack([t[0], x[0]])),
    # per-sample outputs inside a parameter-space jvp: unpack_dual has no batching rule, and every
    # routed call raised on the batched tensors
    "jvp of vmap": lambda f, x, t: jvp(torch.func.vmap(f), tuple(torch.stack([a, -2 * a]) for a in x),
                                       tuple(torch.stack([a, a.flip(-1)]) for a in t))[1],  # fmt: skip
    # forward AD under torch's legacy vmap, which the fused ops have no batching rule for (it raised)
    "autograd.functional forward-mode jacobian": lambda f, x, t: torch.autograd.functional.jacobian(
        lambda q: f(q, *x[1:]), x[0], strategy="forward-mode", vectorize=True),
}


@pytest.mark.parametrize("op", ["attention", "layer norm", "rms norm"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_routed_calls_under_composed_torch_func_transforms(op, transform):
    """Nested forward AD and the other torch.func stacks the fused ops do not serve run plain
    torch ops: exact (before, ``jvp`` of ``jvp`` silently gave zeros: the fused op has no
    forward-AD rule, so the outer tangent was dropped)."""
    torch.manual_seed(0)
    x = tuple(torch.randn(1, 2, 5, 4, dtype=F64) for _ in range(3))
    t = tuple(torch.randn_like(a) for a in x)
    if op == "attention":
        plain = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v  # noqa: E731
        routed_op = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif op == "layer norm":
        plain = lambda q, k, v: composite_layer_norm(q) * k + v  # noqa: E731
        routed_op = lambda q, k, v: F.layer_norm(q, (4,)) * k + v  # noqa: E731
    else:
        plain = lambda q, k, v: q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6) * k + v  # noqa: E731
        routed_op = lambda q, k, v: F.rms_norm(q, (4,), eps=1e-6) * k + v  # noqa: E731

    def routed(*inputs):
        with fused_jvp():
            return routed_op(*inputs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process note that plain ops run
        close(TRANSFORMS[transform](routed, x, t), TRANSFORMS[transform](plain, x, t))


@pytest.mark.parametrize("op", ["attention", "layer norm"])
def test_batched_hessian_vector_products_through_routed_calls(op):
    """``autograd.grad(..., is_grads_batched=True)`` of a gradient (batched Hessian-vector
    products; ``autograd.functional.hessian(vectorize=True)``) runs torch's legacy vmap through the
    fused op's second-order backward, which raised on views it has no rule for (unflatten, flatten,
    a whole-range slice)."""
    torch.manual_seed(0)
    x0, w = torch.randn(1, 5, 8, dtype=F64), torch.randn(8, dtype=F64)

    def f(x):
        if op == "layer norm":
            return F.layer_norm(x, (8,), w)
        q = x.reshape(1, 5, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q.sin(), q.cos())

    def batched_hvps(function):
        x = x0.clone().requires_grad_()
        gx = torch.autograd.grad(function(x).sin().sum(), x, create_graph=True)[0]
        return torch.autograd.grad(gx, x, torch.randn(3, 1, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(1)),
                                   is_grads_batched=True)[0]  # fmt: skip

    expected = batched_hvps(lambda x: composite_layer_norm(x, w)) if op == "layer norm" else None
    with sdpa_kernel(SDPBackend.MATH):
        expected = expected if op == "layer norm" else batched_hvps(f)
    with fused_jvp():
        close(batched_hvps(f), expected)


def test_a_float32_tangent_on_a_float64_layer_norm_input_is_computed_as_torch():
    """Forward AD lets a float32 tangent ride on a float64 primal: torch's rule gives a float64
    tangent; the routed layer norm raised (x_t: expected dtype torch.float64)."""
    torch.manual_seed(0)
    x, x_t, w = torch.randn(3, 8, dtype=F64), torch.randn(3, 8), torch.randn(8, dtype=F64)
    with forward_ad.dual_level():
        # (the float32 tangent's values, exact in float64: torch's element-wise rules round some
        # steps to float32, 6e-8 off)
        expected = forward_ad.unpack_dual(composite_layer_norm(forward_ad.make_dual(x, x_t.double())) * w).tangent
        with fused_jvp():
            out = forward_ad.unpack_dual(F.layer_norm(forward_ad.make_dual(x, x_t), (8,), w)).tangent
    assert out.dtype == F64
    close(out, expected)


def test_double_backward_form_through_a_mask_the_kernel_does_not_serve_under_math_sdpa():
    """A mask the fused kernel does not serve keeps torch's SDPA when the call carries no tangent
    (as unpatched, its double backward then fails on the CPU's flash SDPA); inside
    ``sdpa_kernel(SDPBackend.MATH)``, as the README says, the double-backward form of a JVP works."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=F64, requires_grad=True) for _ in range(3))
    mask = (torch.rand(2, 1, 5, 5) > 0.3) | torch.eye(5, dtype=torch.bool)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def gradients_of_the_tangent():
        f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        _, out_t = torch.autograd.functional.jvp(f, (q, k, v), tangents, create_graph=True)
        return torch.autograd.grad(out_t.square().sum(), (q, k, v))

    with sdpa_kernel(SDPBackend.MATH):
        expected = gradients_of_the_tangent()
        with fused_jvp():
            close(gradients_of_the_tangent(), expected)


def test_layer_norm_second_order_route_keeps_16_bit_statistics_in_float32():
    x = torch.randn(4, 33, dtype=torch.bfloat16, requires_grad=True)
    with fused_jvp():
        y = F.layer_norm(x, (33,))
    g = torch.randn(4, 33)
    (grad,) = torch.autograd.grad((y.float() * g).sum(), x, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad((composite_layer_norm(x64) * g.double()).sum(), x64)
    assert grad.dtype == torch.bfloat16 and max_relative_error(grad, expected) < 2e-2


# ----------------------------------------------------------------------------------------------
# patch(): transactional, reversible, nested


class Mixed(torch.nn.Module):
    """timm attention (fused_attn off, as MeanFlow ports set it), nn.MultiheadAttention and,
    optionally, a module patch() refuses."""

    def __init__(self, refused=None):
        super().__init__()
        from timm.layers import Attention

        self.attn = Attention(E, num_heads=4)
        self.attn.fused_attn = False
        self.mha = torch.nn.MultiheadAttention(E, 4, batch_first=True)
        self.refused = refused


def state_of(model):
    """What patch() may touch: instance forwards, timm flags, HF configs' attention."""
    return [
        (
            name,
            m.__dict__.get("forward"),
            getattr(m, "fused_attn", None),
            getattr(getattr(m, "config", None), "_attn_implementation", None),
        )
        for name, m in model.named_modules()
    ]


def test_patch_that_refuses_a_module_leaves_the_model_untouched():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=E,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        attn_implementation="eager",
        output_attentions=True,
    )
    model = Mixed(refused=transformers.CLIPVisionModel(config))
    before = state_of(model)
    with pytest.raises(tk.UnsupportedModuleError, match="output_attentions"):
        patch(model)
    assert state_of(model) == before and model.attn.fused_attn is False
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch(model)


def test_a_patched_hugging_face_model_refuses_output_attentions_at_call_time():
    """Asked for at call time (patch refuses it in the config), the weights the routed SDPA
    attention does not compute are refused, not silently dropped (an eager model had returned them)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=E, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                    image_size=16, patch_size=8, attn_implementation="eager")  # fmt: skip
    model = transformers.ViTModel(config).eval()
    images = torch.randn(1, 3, 16, 16)
    assert len(model(pixel_values=images, output_attentions=True).attentions) == 1
    with patched(model), pytest.raises(ValueError, match=r"^output_attentions=True: .*\(tk\.unpatch\)"):
        model(pixel_values=images, output_attentions=True)
    assert len(model(pixel_values=images, output_attentions=True).attentions) == 1


def test_unpatch_restores_the_model_exactly():
    model = Mixed()
    before = state_of(model)
    patch(model)
    assert [line.split(": ")[0] for line in list_swaps(model)] == ["attn", "attn", "mha"]
    assert is_routed(model.attn) and model.attn.fused_attn and is_routed(model.mha)
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model)
    unpatch(model)
    assert state_of(model) == before
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch(model)


@pytest.mark.parametrize("inner_first", [False, True])
def test_nested_patches_in_any_order(inner_first):
    model = Mixed()
    before = state_of(model)
    first, second = (model.attn, model) if inner_first else (model, model.attn)
    patch(first)
    patch(second)
    unpatch(model.attn)  # the other patch still holds the timm module
    assert is_routed(model.attn) and model.attn.fused_attn and is_routed(model.mha)
    unpatch(model)
    assert state_of(model) == before


def test_a_copy_of_a_patched_model_is_patched_on_its_own():
    model = Mixed().double()
    patch(model)
    twin = copy.deepcopy(model)
    assert twin.attn.forward.module is twin.attn and twin.attn.forward.forward.__self__ is twin.attn
    x = bsl(True)
    with FusedCalls() as calls:
        jvp(twin.attn, (x,), (x,))
    assert calls.on_cpp
    unpatch(twin)
    assert not is_routed(twin.attn) and not twin.attn.fused_attn
    assert is_routed(model.attn) and model.attn.fused_attn
    unpatch(model)


def test_a_patched_model_dropped_without_unpatch_stops_counting():
    """A patched model (or a copy of one) that is garbage-collected without ``unpatch`` no longer
    counts as patched: an unpatched model run afterwards under forward AD is not warned about."""
    before = watch._live_patches
    model = patch(Mixed().double())
    twin = copy.deepcopy(model)
    assert watch._live_patches == before + 2
    del model, twin
    gc.collect()
    assert watch._live_patches == before
    plain, x = Mixed().double(), bsl(True)
    if before == 0:
        _, messages = caught(lambda: jvp(plain.attn, (x,), (x,)))
        assert not any("was the model copied before patch()" in m for m in messages)


def test_a_copy_made_before_patch_says_so_under_forward_ad():
    model = Mixed().double()
    linearized = copy.deepcopy(model)  # what a LinearizedModel does
    x = bsl(True)
    with patched(model):
        _, messages = caught(lambda: jvp(linearized.attn, (x,), (x,)))
        assert any("was the model copied before patch()" in m for m in messages)
        with FusedCalls() as calls:  # the context manager serves the copy
            _, messages = caught(
                lambda: jvp(lambda x: linearized.mha(x, x, x, need_weights=False)[0], (x,), (x,)), True
            )
        assert messages == [] and calls.on_cpp


def test_patch_on_a_model_without_attention_says_so():
    model = torch.nn.Linear(3, 3)
    _, messages = caught(lambda: patch(model))
    assert "found no attention module" in messages[0]
    assert list_swaps(unpatch(model) and patch(model)) == [] and unpatch(model)


def test_hand_written_attention_under_fused_jvp_says_so_once():
    model = Mixed().double()  # timm attention with fused_attn off, not patched
    x = bsl(True)
    _, messages = caught(lambda: jvp(model.attn, (x,), (x,)), routed=True)
    assert "softmax calls on scores with tangents" in messages[0]
    _, messages = caught(lambda: jvp(model.attn, (x,), (x,)), routed=True)
    assert messages == []


def test_fused_attention_jvp_on_triton(device):
    q, k, v, q_t, k_t, v_t = (torch.randn(1, 2, 9, 16, device=device) for _ in range(6))
    expected = tk.reference.attention_jvp(*(t.double() for t in (q, k, v, q_t, k_t, v_t)))[1]
    _, out_t = jvp(lambda q, k, v: fused_attention(q, k, v, backend="triton"), (q, k, v), (q_t, k_t, v_t))
    assert max_relative_error(out_t, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bool, F64])
@pytest.mark.parametrize("transform", ["jvp of vmap", "vmap of jvp"])
def test_a_vmapped_mask_written_out_per_query(transform, dtype):
    """A per-example padding mask written out for every query, vmapped with the inputs: its values
    differ per example, so it runs math SDPA (reading it by value raised vmap's data-dependent
    control-flow error)."""
    torch.manual_seed(0)
    x = tuple(torch.randn(3, 2, 5, 4, dtype=F64) for _ in range(3))
    t = tuple(torch.randn_like(a) for a in x)
    attend = torch.ones(3, 5, dtype=torch.bool)
    attend[0, 3:], attend[1, 1:] = False, False
    mask = attend[:, None, None, :].expand(3, 1, 5, 5).clone()
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, -math.inf)
    sdpa = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731

    def run():
        if transform == "jvp of vmap":
            return jvp(lambda *x: torch.func.vmap(sdpa)(*x, mask), x, t)
        return torch.func.vmap(lambda *a: jvp(lambda *x: sdpa(*x, a[3]), a[:3], a[4:]))(*x, mask, *t)

    with sdpa_kernel(SDPBackend.MATH):
        expected = run()
    with fused_jvp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-reason note that math SDPA runs
        close(run(), expected)


def _left_padded_masks():
    """Bool (True = attend) masks ``(B, 1, L, L)`` under which some query rows see no key."""
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[0, :3] = False  # left padding: under a causal mask the first 3 queries of row 0 see nothing
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    window = causal & ~torch.ones(L, L, dtype=torch.bool).tril(-3)  # a sliding window of 3 keys
    empty_row = torch.ones(B, L, dtype=torch.bool)
    empty_row[1] = False
    return {
        "a batch row all padding": empty_row[:, None, None, :].expand(B, 1, L, L),
        "causal over left padding": causal & padding[:, None, None, :],
        "sliding window over left padding": window & padding[:, None, None, :],  # math SDPA: not served
    }


@pytest.mark.parametrize("dtype", [torch.bool, F64])
@pytest.mark.parametrize("form", list(_left_padded_masks()))
def test_query_rows_that_see_no_key(form, dtype, monkeypatch):
    """Their outputs are zeros with zero gradients, as torch's default SDPA and the fused kernel give,
    also where math SDPA runs (a small call, or a mask the kernel does not serve): its gradients under
    forward AD are NaN there, and a left-padded batch through a patched causal LM (or an empty text
    in a BERT batch) made every parameter gradient NaN. The other rows are math SDPA's."""
    monkeypatch.setattr(tk.patching.sdpa, "CPU_FUSED_MIN_SCORES", 6 * 256 * 256)  # the shipped threshold
    torch.manual_seed(0)
    q, k, v = sdpa_inputs(k_shape=(B, H, L, D))
    attend = _left_padded_masks()[form]
    mask = attend if dtype == torch.bool else torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, -math.inf)
    sees = attend.any(-1)[..., None].expand(B, H, L, 1)
    assert not sees.all()
    q_tangent, weights = torch.randn_like(q), torch.randn(B, H, L, D, dtype=F64)

    def run():
        q_t = q_tangent.clone().requires_grad_()
        o, o_t = jvp(lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q,), (q_t,))
        return o, o_t, torch.autograd.grad((o_t * weights).sum() + o.square().sum(), q_t)[0]

    with fused_jvp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-reason note that math SDPA runs
        out = run()
    with sdpa_kernel(SDPBackend.MATH):
        expected = run()  # NaN gradients in the rows that see nothing, torch's on the others
    for ours, torch_s in zip(out, expected):
        assert torch.isfinite(ours).all() and not ours.masked_select(~sees).any()
        close([ours.masked_select(sees)], [torch_s.masked_select(sees)])


@pytest.mark.parametrize(
    "dtype, call",
    [
        (F64, {"is_causal": True}),  # 5 queries, 7 keys: top-left
        (F64, {"enable_gqa": True}),
        (F64, {"attn_mask": "bool", "scale": 0.3}),
        (torch.float32, {"attn_mask": "float"}),
        (torch.bfloat16, {"is_causal": True}),
        (F64, {"scale": -0.4}),  # (raised: the square root of the scale)
        (F64, {"keys": 0}),  # no keys: torch's zeros (raised: the maximum of no scores)
    ],
)
def test_forward_ad_math_gives_torchs_math(dtype, call):
    """The math that serves ``forward_ad`` calls (below) gives torch's math SDPA's values (16-bit
    inputs computed in float32, as torch does) and refuses what torch refuses, in its words."""
    torch.manual_seed(0)
    keys = call.pop("keys", 7)
    q, q_t = torch.randn(2, 4, 5, 8, dtype=dtype), torch.randn(2, 4, 5, 8, dtype=dtype)
    k, v = (torch.randn(2, 2 if call.get("enable_gqa") else 4, keys, 8, dtype=dtype) for _ in range(2))
    masks = {"bool": torch.rand(5, 7) > 0.2, "float": torch.randn(2, 1, 5, 7)}
    call = dict(call, attn_mask=masks.get(call.get("attn_mask")))
    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(lambda q: F.scaled_dot_product_attention(q, k, v, **call), (q,), (q_t,))
    call = {"dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False, **call}
    with forward_ad.dual_level():
        dual = tk.patching.sdpa._composite_sdpa(forward_ad.make_dual(q, q_t), k, v, **call)
        out = forward_ad.unpack_dual(dual)
    close(out, expected, tol=1e-6 if dtype == torch.float32 else 1e-12)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        tk.patching.sdpa._composite_sdpa(q, k, v, masks["bool"], 0.0, True, None, False)


def test_forward_ad_math_under_autocast_returns_torchs_dtype(monkeypatch):
    """Under CPU bf16 autocast a ``forward_ad`` call that math serves returned float32 (the dtype
    before autocast's cast) where torch returns bf16; it returns torch's dtype and values."""
    monkeypatch.setattr(tk.patching.sdpa, "CPU_FUSED_MIN_SCORES", 6 * 256 * 256)  # math serves this small call
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    q_t = torch.randn_like(q)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16), forward_ad.dual_level():
            return forward_ad.unpack_dual(F.scaled_dot_product_attention(forward_ad.make_dual(q, q_t), k, v))

    with sdpa_kernel(SDPBackend.MATH):
        expected = run()
    with fused_jvp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note that math serves a small call
        out = run()
    assert out.primal.dtype == out.tangent.dtype == torch.bfloat16
    close(out, expected, tol=1e-2)  # bf16 rounding of the same math (float32's result: 6e-3 off)


def test_enable_gqa_without_a_head_dim_is_refused_as_torch_refuses_it():
    q, k, v = (torch.randn(5, 8, dtype=F64) for _ in range(3))
    with pytest.raises(IndexError), sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with fused_jvp(), pytest.raises(IndexError):
        jvp(lambda q: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q,), (q,))


@pytest.mark.parametrize("form", ["small call", "dropout", "mask per head"])
@pytest.mark.parametrize("loss_on", ["primal", "tangent"])
def test_forward_ad_trains_through_attention_math_serves(form, loss_on, monkeypatch):
    """Under ``forward_ad`` outside ``torch.func``, torch's math SDPA (its softmax) builds a tangent
    graph whose backward raises (an output of its exp is modified in place): no loss on the tangent
    trained through it, and a fused layer norm after it tied even a primal loss to it (MeanFlow's
    ``forward_ad`` step on a patched DiT raised). Calls the kernel does not serve (or, small on the
    CPU, math serves faster) run the same math in ops whose tangent graph differentiates: torch's
    values, its dropout draw, and gradients equal to ``torch.func.jvp``'s (float64, composite norm)."""
    monkeypatch.setattr(tk.patching.sdpa, "CPU_FUSED_MIN_SCORES", 6 * 256 * 256)  # the shipped threshold
    monkeypatch.setattr(tk.patching.layer_norm, "CPU_FUSED_MIN_ELEMENTS", 0)  # the fused layer norm after it
    torch.manual_seed(0)
    x, x_t = torch.randn(2, L, E, dtype=F64, requires_grad=True), torch.randn(2, L, E, dtype=F64)
    weight = (torch.randn(3 * E, E, dtype=F64) / 6).requires_grad_()
    mask = torch.randn(2, 4, L, L, dtype=F64) if form == "mask per head" else None
    probe = torch.randn(2, L, E, dtype=F64)  # (a sum of squares after a norm is constant)
    dropout = 0.3 if form == "dropout" else 0.0

    def block(x, norm=lambda t: F.layer_norm(t, (E,))):
        q, k, v = (x @ weight.T).view(2, L, 3, 4, E // 4).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return norm(o.transpose(1, 2).reshape(2, L, E) + x)

    def grads(streams):
        torch.manual_seed(1)  # the same dropout draw
        y, y_t = streams()
        loss = ((y if loss_on == "primal" else y_t) * probe).sum()
        return y, y_t, *torch.autograd.grad(loss, (x, weight))

    def by_forward_ad():
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(block(forward_ad.make_dual(x, x_t)))

    with sdpa_kernel(SDPBackend.MATH):  # torch's own norm has a wrong second derivative
        expected = grads(lambda: jvp(lambda x: block(x, composite_layer_norm), (x,), (x_t,)))
    with fused_jvp(), FusedCalls() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-reason note that math SDPA runs
        close(grads(by_forward_ad), expected, tol=1e-12)
    assert calls.count == 0


def test_patch_and_fused_jvp_check_their_arguments_at_once():
    with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):  # (vars() argument ...)
        tk.patch("model")
    with pytest.raises(ValueError, match="backend: expected one of"), fused_jvp(backend="fused"):
        pass  # (was checked only at the first fused call: small CPU calls never checked it)


def test_size_thresholds_from_the_environment_are_checked(monkeypatch):
    """``TANGENT_KERNELS_CPU_FUSED_MIN_*`` set to text failed the import with int()'s bare message."""
    monkeypatch.setenv("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES", "12")
    assert tk.validation.env_count("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES", 5) == 12
    monkeypatch.delenv("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES")
    assert tk.validation.env_count("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES", 5) == 5
    for text in ("", "1e5", "-1"):
        monkeypatch.setenv("TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS", text)
        with pytest.raises(ValueError, match=f"^TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS: expected a non-negative "
                                             f"integer, got {text!r}"):  # fmt: skip
            tk.validation.env_count("TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS", 5)
