"""Compiled kernels at full sizes on a real GPU (skipped on the CPU, where the interpreter is too slow).

The other test files also run compiled on a GPU (their ``device`` fixture is CUDA there); these
add the sizes the interpreter cannot reach, N = 16384 included.
"""

import pytest
import torch

from tangent_kernels import functional as F
from tangent_kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled kernels at full sizes"),
]


def relative_norm_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_full_size(n, head_dim, causal):
    """bf16 kernel against an fp32 reference on the same (bf16-rounded) inputs, one head."""
    q, k, v, q_t, k_t, v_t = (torch.randn(1, 1, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(6))
    tangents = [t.requires_grad_() for t in (q_t, k_t, v_t)]
    o, o_t = F.attention_jvp(q, k, v, *tangents, causal=causal, backend="triton")
    ref_tangents = [t.detach().float().requires_grad_() for t in tangents]
    o_ref, o_t_ref = reference.attention_jvp(q.float(), k.float(), v.float(), *ref_tangents, causal=causal)
    assert relative_norm_error(o, o_ref) < 1e-2
    assert relative_norm_error(o_t, o_t_ref) < 1e-2
    grad = torch.randn_like(o_t)
    ours = torch.autograd.grad(o_t, tangents, grad)
    expected = torch.autograd.grad(o_t_ref, ref_tangents, grad.float())
    for name, a, b in zip(("q_t", "k_t", "v_t"), ours, expected):
        assert relative_norm_error(a, b) < 2e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "width"), [(256 * 197, 768), (256 * 197, 1024), (2048, 4096), (2048, 4097),
                                             (1024, 20000)])  # fmt: skip
def test_layer_norm_full_size(dtype, rows, width):
    """Rows held in one tile (up to 4096 features) and walked in tiles (wider), both streams and the
    gradients through ``y_t`` against the float64 reference."""
    x, x_t = (torch.randn(rows, width, device="cuda", dtype=dtype) for _ in range(2))
    w, b, dw, db = (torch.randn(width, device="cuda", dtype=dtype) for _ in range(4))
    tangents = [t.requires_grad_() for t in (x_t, dw, db)]
    y, y_t = F.layer_norm_jvp(x, x_t, w, b, dw, db, backend="triton")
    tangents64 = [t.detach().double().requires_grad_() for t in tangents]
    y64, y_t64 = reference.layer_norm_jvp(x.double(), tangents64[0], w.double(), b.double(), *tangents64[1:])
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_norm_error(y, y64) < bound and relative_norm_error(y_t, y_t64) < bound
    grad = torch.randn_like(y_t)
    for name, ours, expected in zip(("x_t", "d_weight", "d_bias"), torch.autograd.grad(y_t, tangents, grad),
                                    torch.autograd.grad(y_t64, tangents64, grad.double())):  # fmt: skip
        assert relative_norm_error(ours, expected) < 2 * bound, name
