"""The reference ops equal torch.func.jvp of the plain PyTorch layers (float64, rel. error < 1e-10).

The oracles are PyTorch's own layers (``F.linear``, ``F.layer_norm``, ``F.gelu``, timm's ``Mlp``,
``F.scaled_dot_product_attention`` with the math kernel), differentiated by ``torch.func.jvp``;
the reference writes the tangent formulas out by hand, so the two are independent.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import max_relative_error
from tangent_kernels import reference

F64 = torch.float64
ROWS = [1, 197]  # a single token; ViT-B/16 at 224 px
WIDTHS = [7, 64, 768]  # prime, power of two, ViT-B width


def randn(*shape):
    return torch.randn(*shape, dtype=F64)


def assert_matches(ours, oracle):
    for name, a, b in zip(("y", "y_t"), ours, oracle):
        assert max_relative_error(a, b) < 1e-10, f"{name}: relative error {max_relative_error(a, b):.2e}"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_jvp(rows, width, bias):
    out = width + 5
    x, x_t, w, dw = randn(rows, width), randn(rows, width), randn(out, width), randn(out, width)
    b, db = (randn(out), randn(out)) if bias else (None, None)
    oracle = jvp(lambda x, w, b: F.linear(x, w, b), (x, w, b), (x_t, dw, db)) if bias else jvp(
        lambda x, w: F.linear(x, w), (x, w), (x_t, dw)
    )
    assert_matches(reference.linear_jvp(x, x_t, w, b, dw, db), oracle)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_gelu_jvp(approximate, rows, width):
    x, x_t = randn(rows, width) * 3, randn(rows, width)
    oracle = jvp(lambda x: F.gelu(x, approximate=approximate), (x,), (x_t,))
    assert_matches(reference.gelu_jvp(x, x_t, approximate), oracle)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_jvp(rows, width):
    x, x_t = randn(3, rows, width) * 2 + 1, randn(3, rows, width)
    w, b, dw, db = randn(width), randn(width), randn(width), randn(width)
    oracle = jvp(lambda x, w, b: F.layer_norm(x, (width,), w, b, eps=1e-6), (x, w, b), (x_t, dw, db))
    assert_matches(reference.layer_norm_jvp(x, x_t, w, b, dw, db, eps=1e-6), oracle)


def test_layer_norm_jvp_without_affine():
    x, x_t = randn(5, 7), randn(5, 7)
    oracle = jvp(lambda x: F.layer_norm(x, (7,), eps=1e-5), (x,), (x_t,))
    assert_matches(reference.layer_norm_jvp(x, x_t, None, None, eps=1e-5), oracle)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_mlp_jvp(approximate, rows, width):
    from timm.layers import Mlp

    act = (lambda: torch.nn.GELU(approximate="tanh")) if approximate == "tanh" else torch.nn.GELU
    mlp = Mlp(width, hidden_features=2 * width + 1, act_layer=act).double()
    params = dict(mlp.named_parameters())
    d_params = {name: torch.randn_like(p) for name, p in params.items()}
    x, x_t = randn(rows, width), randn(rows, width)
    oracle = jvp(lambda x, p: functional_call(mlp, p, (x,)), (x, params), (x_t, d_params))
    ours = reference.mlp_jvp(
        x, x_t, params["fc1.weight"], params["fc1.bias"], params["fc2.weight"], params["fc2.bias"],
        d_params["fc1.weight"], d_params["fc1.bias"], d_params["fc2.weight"], d_params["fc2.bias"], approximate,
    )  # fmt: skip
    assert_matches(ours, oracle)


def sdpa_oracle(q, k, v, q_t, k_t, v_t, scale, causal, key_padding_mask):
    """torch.func.jvp of math SDPA, with the key mask in SDPA's own conventions."""
    attn_mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
        attn_mask = ~mask if mask.dtype == torch.bool else mask
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        if attn_mask is None:
            attn_mask = allowed
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & allowed
        else:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    gqa = q.shape[1] != k.shape[1]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)

    with sdpa_kernel(SDPBackend.MATH):
        return jvp(sdpa, (q, k, v), (q_t, k_t, v_t))


ATTENTION_CASES = [
    # (batch, q heads, kv heads, q len, k len, head dim)
    (2, 3, 3, 7, 7, 16),  # odd length
    (1, 2, 2, 1, 1, 8),  # a single token
    (1, 2, 2, 197, 197, 64),  # ViT-B/16 at 224 px
    (2, 4, 2, 5, 11, 80),  # grouped-query heads, Lq != Lk, head dim 80
    (1, 6, 1, 9, 4, 32),  # multi-query, Lq > Lk
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_attention_jvp(case, causal, mask):
    batch, hq, hkv, lq, lk, d = case
    q, q_t = randn(batch, hq, lq, d), randn(batch, hq, lq, d)
    k, v, k_t, v_t = (randn(batch, hkv, lk, d) for _ in range(4))
    key_padding_mask = None
    if mask == "bool":
        key_padding_mask = torch.rand(batch, lk) < 0.3
        key_padding_mask[:, 0] = False  # every query keeps a key, so no row is fully masked
    elif mask == "additive":
        key_padding_mask = randn(batch, lk)
    scale = 0.3 if d == 80 else None
    oracle = sdpa_oracle(q, k, v, q_t, k_t, v_t, scale, causal, key_padding_mask)
    ours = reference.attention_jvp(
        q, k, v, q_t, k_t, v_t, scale=scale, causal=causal, key_padding_mask=key_padding_mask
    )
    assert_matches(ours, oracle)


def test_attention_fully_masked_row_is_zero_like_sdpa():
    q, k, v, q_t, k_t, v_t = (randn(1, 1, 3, 4) for _ in range(6))
    mask = torch.tensor([[True, True, True]])
    out, out_t = reference.attention_jvp(q, k, v, q_t, k_t, v_t, key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out_t, torch.zeros_like(out_t))


def test_none_tangents_are_zero():
    x, w, b = randn(4, 7), randn(5, 7), randn(5)
    y, y_t = reference.linear_jvp(x, None, w, b, None, None)
    assert y_t is None
    _, y_t = reference.linear_jvp(x, None, w, b, None, b)
    assert torch.equal(y_t, b.expand(4, 5))
    q = randn(1, 1, 3, 4)
    assert reference.attention_jvp(q, q, q, None, None, None)[1] is None
