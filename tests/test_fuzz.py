"""Fuzzing the public entries: the regressions it found, each as the smallest call that showed it."""

import math

import pytest
import torch
import torch.nn.functional as torch_F
from helpers import max_relative_error
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from tangent_kernels import functional as F

needs_cpp = pytest.mark.skipif(not tk.cpp.AVAILABLE, reason=tk.cpp.UNAVAILABLE_REASON)
needs_triton = pytest.mark.skipif(not tk.backends.triton_backend.AVAILABLE, reason="triton is not importable")
RAW = torch.ops.tangent_kernels


def close_to_float64(ours, op, *args, tolerance=1e-5, **kwargs):
    """Every tensor of ``ours`` within ``tolerance`` (relative) of ``op`` on float64 copies of ``args``."""
    expected = op(*(a.double() if isinstance(a, Tensor) else a for a in args), **kwargs)
    for a, e in zip(ours, expected):
        assert a.isfinite().all() and max_relative_error(a, e) < tolerance, (a, e)


@needs_triton
def test_triton_reads_strided_parameters():
    """A layer-norm weight or a bias that is a strided view was read as if contiguous (errors ~4)."""
    x, x_t, w = torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 5)
    norm_w, bias = torch.randn(10)[::2], torch.randn(8)[::2]
    ours = F.layer_norm_jvp(x, x_t, norm_w, norm_w, norm_w, norm_w, backend="triton")
    close_to_float64(ours, tk.reference.layer_norm_jvp, x, x_t, norm_w, norm_w, norm_w, norm_w)
    ours = F.linear_jvp(x, x_t, w, bias, w, bias, activation="gelu", backend="triton")
    close_to_float64(ours, F.linear_jvp, x, x_t, w, bias, w, bias, activation="gelu", backend="reference")


@needs_triton
def test_raw_triton_attention_reads_any_last_stride():
    """``torch.ops.tangent_kernels.attention_jvp`` (and its VJP) with ``backend="triton"`` read a
    head dim of stride 2 as if it were 1 (functional made it unit stride, the raw op did not)."""
    q, k, v = (torch.randn(1, 2, 5, 8)[..., ::2] for _ in range(3))
    dense = [t.contiguous() for t in (q, k, v)]
    o, o_t, lse = RAW.attention_jvp(q, k, v, q, None, None, None, 0.5, False, "triton")
    expected = RAW.attention_jvp(*dense, dense[0], None, None, None, 0.5, False, "triton")
    assert all(torch.allclose(a, e) for a, e in zip((o, o_t, lse), expected))
    grads = RAW.attention_vjp(o, q, k, v, o, lse, None, 0.5, False, True, True, "triton")
    expected = RAW.attention_vjp(o, *dense, o, lse, None, 0.5, False, True, True, "triton")
    assert all(torch.allclose(a, e) for a, e in zip(grads, expected))


@needs_triton
def test_raw_triton_ops_refuse_what_triton_cannot_run():
    """The raw ops with ``backend="triton"`` ran float64 through float32 kernels (errors ~1e-8)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="h: the triton backend cannot run it"):
        RAW.gelu_jvp(x, x, None, None, "none", "triton")
    with pytest.raises(TypeError, match="x: the triton backend cannot run it"):
        RAW.layer_norm_jvp(x, x, None, None, None, None, 1e-5, "triton")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp), "triton", "auto"])
def test_layer_norm_of_no_features_is_empty(backend):
    """torch gives an empty result for a last dimension of 0; it was refused ("x: expected at least
    one feature")."""
    x = torch.randn(3, 0)
    y, y_t = F.layer_norm_jvp(x, x, torch.ones(0), torch.zeros(0), backend=backend)
    assert y.shape == y_t.shape == torch_F.layer_norm(x, (0,)).shape == (3, 0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp), "triton"])
@pytest.mark.parametrize("features, value", [(7, 12345.678), (1, 1.5e20), (5, 3e19), (100, 1e35)])
def test_layer_norm_of_a_constant_row(backend, features, value):
    """A constant float32 row: its mean's rounding error showed as variance (x̂ = ±0.7 at
    12345.678 where torch gives 0); beyond the overflow threshold eps · (1 / peak)² underflowed
    (rstd inf: y NaN; or y_t 11% off)."""
    x, x_t = torch.full((1, features), value), torch.randn(1, features) * value
    ours = F.layer_norm_jvp(x, x_t, None, None, backend=backend)
    expected = torch.func.jvp(
        lambda x: torch_F.layer_norm(x, (features,), eps=1e-6), (x.double(),), (x_t.double(),)
    )
    for a, e in zip(ours, expected):
        assert a.isfinite().all() and max_relative_error(a, e) < 1e-5


def test_reference_layer_norm_gradient_of_huge_rows():
    """A float32 row beyond the overflow threshold is divided by its peak; the gradient through
    that peak (x̂ does not depend on it) overflowed to inf · 0 = NaN with weights of 1e20."""
    x = torch.tensor([1.5e20, -2.9e19, -2.2e20], requires_grad=True)
    w = torch.tensor([5.7e19, -1.1e20, -1.4e20])
    y, _ = F.layer_norm_jvp(x, None, w, None, backend="reference")
    grad = torch.autograd.grad(y.sum(), x)[0]
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(torch_F.layer_norm(x64, (3,), w.double(), eps=1e-6).sum(), x64)[0]
    assert grad.isfinite().all() and max_relative_error(grad, expected) < 1e-4


def test_reference_attention_gradient_of_a_fully_masked_row():
    """A query row with every key masked: its softmax denominator was clamped to the smallest
    normal float, and an upstream gradient above ~4 overflowed there to NaN (inf · 0)."""
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4, requires_grad=True)
    v = 100 * torch.randn(1, 1, 2, 4)
    o, _ = F.attention_jvp(q, k, v, key_padding_mask=torch.tensor([[True, True]]), backend="reference")
    assert not o.any() and not torch.autograd.grad(o, k, torch.ones_like(o))[0].any()


def test_reference_gelu_second_order_in_float16():
    """The reference evaluated GELU's derivative in float16: x³ overflows for |x| > 40, and the
    gradient of y_t w.r.t. x came out NaN."""
    x, x_t = torch.tensor([46.2, -8.8, -65.4]), torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for dtype in (torch.float16, torch.float64):
        leaf = x.to(dtype).requires_grad_()
        y, y_t = F.gelu_jvp(leaf, x_t.to(dtype), "tanh", backend="reference")
        grads.append(torch.autograd.grad(0.7 * y.sum() + 1.3 * y_t.sum(), leaf)[0])
    assert grads[0].isfinite().all() and max_relative_error(grads[0], grads[1]) < 1e-2


@needs_cpp
def test_gelu_of_a_0d_tensor_on_the_fused_backends():
    """torch's GELU takes a 0-d tensor; the fused path refused it naming its internal ``h``."""
    x, x_t = torch.tensor(1.5), torch.tensor(0.5)
    close_to_float64(F.gelu_jvp(x, x_t, backend="cpp"), tk.reference.gelu_jvp, x, x_t)


@needs_cpp
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_with_no_output_features(activation):
    """A weight with 0 rows (and an MLP of hidden width 0): the GELU op was handed an empty ``h``
    and refused it by that internal name."""
    x, w1, w2 = torch.randn(2, 3), torch.randn(0, 3), torch.randn(4, 0)
    y, y_t = F.linear_jvp(x, x, w1, None, w1, None, activation=activation, backend="cpp")
    assert y.shape == y_t.shape == (2, 0)
    y, y_t = F.mlp_jvp(x, x, w1, None, w2, None, backend="cpp")
    assert not y.any() and y_t is not None and not y_t.any() and y.shape == (2, 4)


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpp", marks=needs_cpp), "triton"])
def test_attention_with_an_infinite_scale_follows_torch(backend):
    """scale = inf: torch adds a masked key's -inf to the ±inf score (NaN); the kernels skip
    masked keys (0). "auto" now runs the reference; an explicit fused backend refuses the scale."""
    q, k, v = torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]]]), torch.randn(1, 1, 2, 2)
    mask = torch.tensor([[True, False]])  # the masked key's score is +inf, the other one's -inf
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch_F.scaled_dot_product_attention(
            q, k, v, attn_mask=~mask[:, None, None, :], scale=math.inf
        )
    if backend != "auto":
        with pytest.raises(tk.BackendUnavailableError, match="scale: the fused kernels need a finite scale"):
            F.attention_jvp(q, k, v, scale=math.inf, key_padding_mask=mask, backend=backend)
        return
    o, _ = F.attention_jvp(q, k, v, scale=math.inf, key_padding_mask=mask, backend=backend)
    assert expected.isnan().all() and o.isnan().all()
    o, o_t = F.attention_jvp(q, -q, v[:, :, :1], q, None, None, scale=math.inf, backend=backend)
    assert not o.any() and not o_t.any()  # every score -inf: zeros, as a fully masked row (o_t was NaN)


@needs_cpp
def test_raw_cpp_ops_refuse_integer_tensors_by_name():
    """The C++ ops failed in their dtype dispatch ("not implemented for 'Long'"), naming nothing."""
    x = torch.ones(2, 2, 2, 2, dtype=torch.int64)
    for call, name in (
        (lambda: RAW.gelu_jvp_forward(x, None, None, None, "none"), "h"),
        (lambda: RAW.layer_norm_jvp_forward(x, None, None, None, None, None, 1e-5), "x"),
        (lambda: RAW.attention_jvp_forward(x, x, x, None, None, None, None, 1.0, False), "q"),
    ):
        with pytest.raises(RuntimeError, match=f"{name}: expected a floating-point tensor"):
            call()


@needs_cpp
def test_raw_cpp_layer_norm_backward_of_no_features():
    """A last dimension of 0 divided by zero in C++ (SIGFPE: the process died)."""
    x = torch.randn(3, 0)
    with pytest.raises(RuntimeError, match="x: expected at least one feature"):
        RAW.layer_norm_backward(x, x, None, torch.zeros(3), torch.zeros(3), True, True)
