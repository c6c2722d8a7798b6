"""GELU and the MLP (stacked GEMMs + fused bias/GELU op) on every backend against the float64 reference."""

import pytest
import torch

import tangent_kernels as tk
from helpers import assert_close, backend_device, float64, grads
from tangent_kernels import functional as F
from tangent_kernels import reference

BACKEND_DTYPES = [
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
    ("triton", torch.float16),
    ("cpp", torch.float32),
    ("cpp", torch.bfloat16),
    ("cpp", torch.float64),
]
ROWS = [1, 197, 394]  # one token; ViT-B/16 at 224 px, batch 1 and 2
WIDTHS = [(7, 19), (33, 130)]  # (features, hidden): odd widths
# Which tangents are given: all, the first linearized layer (no x_t), only x_t (frozen weights).
TANGENTS = {"all": (True, True), "no_x_t": (False, True), "only_x_t": (True, False)}
PARAM_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")



def make_mlp(rows, width, dtype, device, tangents, bias=True):
    features, hidden = width
    has_x_t, has_offsets = tangents

    def rand(*shape, scale=1.0, grad=False):
        return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_(grad)

    x = rand(rows, features)
    x_t = rand(rows, features, grad=True) if has_x_t else None
    params = [rand(hidden, features, scale=features**-0.5), rand(hidden) if bias else None,
              rand(features + 3, hidden, scale=hidden**-0.5), rand(features + 3) if bias else None]  # fmt: skip
    offsets = [None if p is None or not has_offsets else rand(*p.shape, scale=0.1, grad=True) for p in params]
    return x, x_t, params, offsets


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("tangents", list(TANGENTS))
def test_mlp_matches_reference(backend, dtype, rows, width, approximate, tangents, device, poisoned_outputs):
    check_mlp(backend, dtype, rows, width, approximate, tangents, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("tangents", list(TANGENTS))
def test_mlp_fused_gemm_path(dtype, approximate, tangents, device, monkeypatch, poisoned_outputs):
    """Triton's fused-GEMM path (chosen where measured faster; forced here)."""
    monkeypatch.setenv("TANGENT_KERNELS_LINEAR_PATH", "fused")
    check_mlp("triton", dtype, 197, (33, 130), approximate, tangents, device)


def check_mlp(backend, dtype, rows, width, approximate, tangents, device):
    x, x_t, params, offsets = make_mlp(rows, width, dtype, backend_device(backend, device), TANGENTS[tangents])
    y, y_t = F.mlp_jvp(x, x_t, *params, *offsets, approximate=approximate, backend=backend)
    assert tk.last_backend("mlp_jvp") == backend
    inputs = (x, x_t, *params, *offsets)
    inputs64 = float64(*inputs)
    y64, y_t64 = reference.mlp_jvp(*inputs64, approximate)
    y_same, y_t_same = reference.mlp_jvp(*inputs, approximate)
    assert_close(y, y64, y_same.detach(), name="y")
    assert_close(y_t, y_t64, y_t_same.detach(), name="y_t")

    grad_y_t = torch.randn_like(y_t)
    ours, oracle, same = grads(y_t, inputs, grad_y_t), grads(y_t64, inputs64, grad_y_t.double()), grads(y_t_same, inputs, grad_y_t)
    for name, a, b, c in zip(("x", "x_t", *PARAM_NAMES, *(f"d_{n}" for n in PARAM_NAMES)), ours, oracle, same):
        if b is not None:
            assert_close(a, b, c, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_mlp_without_bias(backend, device):
    x, x_t, params, offsets = make_mlp(5, (7, 19), torch.float32, backend_device(backend, device), TANGENTS["all"], bias=False)
    y, y_t = F.mlp_jvp(x, x_t, *params, *offsets, backend=backend)
    y64, y_t64 = reference.mlp_jvp(*float64(x, x_t, *params, *offsets))
    assert_close(y, y64, dtype=torch.float32)
    assert_close(y_t, y_t64, dtype=torch.float32)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_gradcheck_cpp_float64(approximate):
    x, x_t, params, offsets = make_mlp(4, (5, 9), torch.float64, "cpu", TANGENTS["all"])
    trainable = [x_t, *offsets]

    def tangent(x_t, *offsets):
        return F.mlp_jvp(x, x_t, *params, *offsets, approximate=approximate, backend="cpp")[1]

    assert torch.autograd.gradcheck(tangent, trainable)
    primal = [t.detach().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(
        lambda x, *p: F.mlp_jvp(x, None, *p, approximate=approximate, backend="cpp")[0], primal
    )


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_mlp_second_order_term_raises(backend, device):
    x, x_t, params, offsets = make_mlp(4, (7, 19), torch.float32, backend_device(backend, device), TANGENTS["all"])
    params[0].requires_grad_()
    _, y_t = F.mlp_jvp(x, x_t, *params, *offsets, backend=backend)
    with pytest.raises(NotImplementedError, match="second-order"):
        y_t.sum().backward()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_reference(backend, dtype, approximate, device, poisoned_outputs):
    on = backend_device(backend, device)
    x = (3 * torch.randn(197, 33, device=on)).to(dtype)
    x_t = torch.randn(197, 33, device=on).to(dtype).requires_grad_()
    y, y_t = F.gelu_jvp(x, x_t, approximate, backend=backend)
    assert tk.last_backend("gelu_jvp") == backend
    x64, x_t64 = float64(x, x_t)
    y64, y_t64 = reference.gelu_jvp(x64, x_t64, approximate)
    y_same, y_t_same = reference.gelu_jvp(x, x_t, approximate)
    assert_close(y, y64, y_same.detach(), name="y")
    assert_close(y_t, y_t64, y_t_same.detach(), name="y_t")
    g = torch.randn_like(y_t)
    assert_close(grads(y_t, [x_t], g)[0], grads(y_t64, [x_t64], g.double())[0], grads(y_t_same, [x_t], g)[0])


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_nan_stays_in_its_row(backend, device):
    x, x_t, params, offsets = make_mlp(6, (7, 19), torch.float32, backend_device(backend, device), TANGENTS["all"])
    x[2, 3] = float("nan")
    y, y_t = (t.detach() for t in F.mlp_jvp(x, x_t, *params, *offsets, backend=backend))
    assert torch.isnan(y[2]).all() and torch.isnan(y_t[2]).all()
    keep = torch.arange(6) != 2
    assert torch.isfinite(y[keep]).all() and torch.isfinite(y_t[keep]).all()


class TestBadInput:
    def test_hidden_width_mismatch(self):
        x, x_t, (w1, b1, w2, b2), _ = make_mlp(3, (7, 19), torch.float32, "cpu", TANGENTS["all"])
        with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(out_features, 19\)"):
            F.mlp_jvp(x, x_t, w1, b1, w2[:, :-1], b2)

    def test_offset_shape(self):
        x, x_t, (w1, b1, w2, b2), _ = make_mlp(3, (7, 19), torch.float32, "cpu", TANGENTS["all"])
        with pytest.raises(ValueError, match=r"d_fc1_bias: expected shape \(19,\)"):
            F.mlp_jvp(x, x_t, w1, b1, w2, b2, d_fc1_bias=torch.zeros(18))

    def test_approximate(self):
        with pytest.raises(ValueError, match=r"approximate: expected one of \('none', 'tanh'\)"):
            F.gelu_jvp(torch.ones(3), torch.ones(3), approximate="sigmoid")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_primal_output_needs_no_grad_when_only_tangents_do(backend, device):
    x, x_t, params, offsets = make_mlp(3, (7, 19), torch.float32, backend_device(backend, device), TANGENTS["all"])
    y, y_t = F.mlp_jvp(x.view(1, 3, 7), x_t.view(1, 3, 7), *params, *offsets, backend=backend)
    assert not y.requires_grad and y_t.requires_grad
    y, y_t = F.gelu_jvp(x, x_t, backend=backend)
    assert not y.requires_grad and y_t.requires_grad
