"""linear_jvp (with and without the GELU epilogue) on every backend and Triton path, against float64."""

import pytest
import torch

import tangent_kernels as tk
from helpers import assert_close, float64, grads
from tangent_kernels import functional as F
from tangent_kernels import reference

# (backend, dtype, Triton path): the fused GEMM and the composite path (GEMMs + fused bias/GELU).
CONFIGS = [
    ("triton", torch.float32, "fused"),
    ("triton", torch.bfloat16, "fused"),
    ("triton", torch.float16, "fused"),
    ("triton", torch.float32, "composite"),
    ("triton", torch.bfloat16, "composite"),
    ("cpp", torch.float32, None),
    ("cpp", torch.float64, None),
]
ROWS = [1, 197, 394]  # one token; ViT-B/16 at 224 px, batch 1 and 2
SHAPES = [(7, 13), (70, 33)]  # (in, out): odd widths, more than one K step for the fused kernel
TANGENTS = {"all": (True, True), "no_x_t": (False, True), "only_x_t": (True, False)}


def make_linear(rows, shape, dtype, device, tangents, bias):
    features_in, features_out = shape
    has_x_t, has_offsets = tangents

    def rand(*size, scale=1.0, grad=False):
        return (scale * torch.randn(*size, device=device)).to(dtype).requires_grad_(grad)

    x = rand(rows, features_in)
    x_t = rand(rows, features_in, grad=True) if has_x_t else None
    w, b = rand(features_out, features_in, scale=features_in**-0.5), rand(features_out) if bias else None
    d_w = rand(features_out, features_in, scale=0.1, grad=True) if has_offsets else None
    d_b = rand(features_out, scale=0.1, grad=True) if has_offsets and bias else None
    return x, x_t, w, b, d_w, d_b


def reference_linear(inputs, activation):
    h, h_t = reference.linear_jvp(*inputs)
    if activation is None:
        return h, h_t
    return reference.gelu_jvp(h, h_t, "none" if activation == "gelu" else "tanh")


@pytest.mark.parametrize("backend,dtype,path", CONFIGS, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_matches_reference(backend, dtype, path, rows, shape, activation, device, monkeypatch, poisoned_outputs):
    check_linear(backend, dtype, path, rows, shape, activation, "all", True, device, monkeypatch)


@pytest.mark.parametrize("backend,dtype,path", [CONFIGS[0], CONFIGS[3], CONFIGS[5]], ids=str)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("tangents", list(TANGENTS))
@pytest.mark.parametrize("bias", [True, False])
def test_optional_inputs(backend, dtype, path, activation, tangents, bias, device, monkeypatch, poisoned_outputs):
    """Absent tangent input, offsets or bias (the first linearized layer, frozen weights, no bias)."""
    check_linear(backend, dtype, path, 197, SHAPES[1], activation, tangents, bias, device, monkeypatch)


def check_linear(backend, dtype, path, rows, shape, activation, tangents, bias, device, monkeypatch):
    if path is not None:
        monkeypatch.setenv("TANGENT_KERNELS_LINEAR_PATH", path)
    on = device if backend == "triton" else torch.device("cpu")
    inputs = make_linear(rows, shape, dtype, on, TANGENTS[tangents], bias)
    y, y_t = F.linear_jvp(*inputs, activation=activation, backend=backend)
    assert tk.last_backend("linear_jvp") == backend
    inputs64 = float64(*inputs)
    y64, y_t64 = reference_linear(inputs64, activation)
    y_same, y_t_same = reference_linear(inputs, activation)
    assert_close(y, y64, y_same.detach(), name="y")
    if y_t64 is None:
        assert y_t is None
        return
    assert_close(y_t, y_t64, y_t_same.detach(), name="y_t")
    g = torch.randn_like(y_t)
    names = ("x", "x_t", "weight", "bias", "d_weight", "d_bias")
    for name, a, b, c in zip(names, grads(y_t, inputs, g), grads(y_t64, inputs64, g.double()), grads(y_t_same, inputs, g)):
        if b is not None:
            assert_close(a, b, c, name=f"grad {name}")


@pytest.mark.parametrize("path", ["fused", "composite"])
def test_primal_gradients_through_the_fused_op(path, device, monkeypatch):
    """The ordinary gradient of y (to x, W0, b0) when no tangent is asked for it."""
    monkeypatch.setenv("TANGENT_KERNELS_LINEAR_PATH", path)
    x, _, w, b, _, _ = make_linear(9, (70, 33), torch.float32, device, TANGENTS["all"], True)
    primal = [t.requires_grad_() for t in (x, w, b)]
    y, _ = F.linear_jvp(*primal[:1], None, *primal[1:], activation="gelu", backend="triton")
    g = torch.randn_like(y)
    p64 = float64(*primal)
    y64, _ = reference_linear((p64[0], None, p64[1], p64[2], None, None), "gelu")
    for a, e in zip(grads(y, primal, g), grads(y64, p64, g.double())):
        assert_close(a, e, dtype=torch.float32)


@pytest.mark.parametrize("path", ["fused", "composite"])
def test_second_order_term_raises(path, device, monkeypatch):
    monkeypatch.setenv("TANGENT_KERNELS_LINEAR_PATH", path)
    x, x_t, w, b, d_w, d_b = make_linear(4, (7, 13), torch.float32, device, TANGENTS["all"], True)
    w.requires_grad_()
    _, y_t = F.linear_jvp(x, x_t, w, b, d_w, d_b, activation="gelu", backend="triton")
    with pytest.raises(NotImplementedError, match="second-order"):
        y_t.sum().backward()


def test_gradcheck_cpp_float64():
    x, x_t, w, b, d_w, d_b = make_linear(3, (5, 4), torch.float64, "cpu", TANGENTS["all"], True)
    assert torch.autograd.gradcheck(
        lambda x_t, d_w, d_b: F.linear_jvp(x, x_t, w, b, d_w, d_b, activation="gelu_tanh", backend="cpp")[1],
        (x_t, d_w, d_b),
    )


def test_unknown_activation():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="activation: expected one of"):
        F.linear_jvp(x, None, torch.randn(4, 3), activation="relu")


def test_unknown_path(monkeypatch, device):
    monkeypatch.setenv("TANGENT_KERNELS_LINEAR_PATH", "fastest")
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match="TANGENT_KERNELS_LINEAR_PATH"):
        F.linear_jvp(x, x, torch.randn(4, 3, device=device), backend="triton")
