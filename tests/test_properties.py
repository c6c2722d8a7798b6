"""Property-based checks (hypothesis): the C++ kernels equal the float64 reference on shapes drawn
at random, odd ones included, where hand-picked cases could miss a tail or an index bug."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tangent_kernels as tk
from helpers import max_relative_error
from tangent_kernels import functional as F
from tangent_kernels import reference

pytestmark = pytest.mark.skipif(not tk.cpp.AVAILABLE, reason=tk.cpp.UNAVAILABLE_REASON)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def attention_problems(draw):
    kv_heads = draw(st.integers(1, 3))
    shape = dict(batch=draw(st.integers(1, 2)), q_heads=kv_heads * draw(st.integers(1, 3)), kv_heads=kv_heads,
                 q_len=draw(st.integers(1, 300)), k_len=draw(st.integers(1, 300)), head_dim=draw(st.integers(1, 72)))  # fmt: skip
    return shape, draw(st.booleans()), draw(st.sampled_from([None, "bool", "additive"])), draw(st.integers(0, 2**31))


@SETTINGS
@given(attention_problems())
def test_cpp_attention_any_shape(problem):
    shape, causal, mask_kind, seed = problem
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, lq, lk, d = shape.values()
    q, q_t = (torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v, k_t, v_t = (torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) for _ in range(4))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, lk, generator=g) < 0.3
    elif mask_kind == "additive":
        mask = torch.randn(b, lk, generator=g, dtype=torch.float64)
    ours = F.attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal, key_padding_mask=mask, backend="cpp")
    expected = reference.attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal, key_padding_mask=mask)
    for a, e in zip(ours, expected):
        assert (a - e).abs().max() <= 1e-12 * max(1.0, e.abs().max().item())


@SETTINGS
@given(st.integers(1, 70), st.integers(1, 3000), st.booleans(), st.integers(0, 2**31))
def test_cpp_layer_norm_any_shape(rows, width, affine, seed):
    g = torch.Generator().manual_seed(seed)
    x, x_t = (torch.randn(rows, width, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    params = [torch.randn(width, generator=g, dtype=torch.float64) for _ in range(4)] if affine else [None] * 4
    ours = F.layer_norm_jvp(x, x_t, *params, backend="cpp")
    expected = reference.layer_norm_jvp(x, x_t, *params)
    for a, e in zip(ours, expected):
        assert max_relative_error(a, e) < 1e-12
