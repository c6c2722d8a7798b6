"""RMSNorm primal + tangent on every backend against ``torch.func.jvp`` of ``F.rms_norm`` in float64,
forward and backward, and its routing: ``F.rms_norm`` in ``fused_jvp()``, ``nn.RMSNorm`` and timm's
``RmsNorm`` under ``patch``."""

import copy
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as torch_F
from torch import nn
from torch.func import functional_call, jvp

import tangent_kernels as tk
from helpers import assert_close, backend_device, grads, walk_norm_rows
from tangent_kernels import functional as F
from tangent_kernels import last_backend
from tangent_kernels.patching import list_swaps

BACKEND_DTYPES = [
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
    ("cpp", torch.float32),
    ("cpp", torch.float16),
    ("cpp", torch.float64),
    ("reference", torch.float32),
]
SHAPES = [(1, 1, 5), (2, 3, 37), (2, 197, 64)]  # one feature row; odd sizes; ViT tokens


def oracle(x, x_t, weight, d_weight, eps):
    """``(y, y_t)`` by ``torch.func.jvp`` of torch's ``rms_norm`` in float64 (differentiable)."""
    primals = tuple(t for t in (x, weight) if t is not None)
    tangents = tuple(
        (torch.zeros_like(p) if t is None else t) for p, t in zip(primals, (x_t, d_weight)[: len(primals)])
    )
    shape = x.shape[-1:]
    if weight is None:
        return jvp(lambda x: torch_F.rms_norm(x, shape, None, eps), primals, tangents)
    return jvp(lambda x, w: torch_F.rms_norm(x, shape, w, eps), primals, tangents)


def make_inputs(shape, dtype, device, *, x_t=True, d_weight=True, affine=True):
    x = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_() if affine else None
    xt = torch.randn(shape, device=device).to(dtype).requires_grad_() if x_t else None
    dw = (0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_() if d_weight and affine else None
    return x, xt, w, dw


def as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("given", ["all", "only_x_t", "only_d_weight", "no_weight"])
def test_matches_torch_jvp_float64(backend, dtype, shape, given, device, poisoned_outputs):
    check_against_torch_jvp(backend, dtype, shape, given, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("given", ["all", "only_x_t", "only_d_weight", "no_weight"])
def test_walked_rows_match_torch_jvp_float64(dtype, given, device, poisoned_outputs, monkeypatch):
    """Rows wider than ``ROW_TILE`` features, walked in tiles (here of 16)."""
    walk_norm_rows(monkeypatch)
    check_against_torch_jvp("triton", dtype, (2, 3, 37), given, device)


def check_against_torch_jvp(backend, dtype, shape, given, device):
    """Both streams and the gradients of every input against the float64 oracle."""
    flags = {"all": {}, "only_x_t": {"d_weight": False}, "only_d_weight": {"x_t": False},
             "no_weight": {"affine": False}}[given]  # fmt: skip
    x, xt, w, dw = make_inputs(shape, dtype, backend_device(backend, device), **flags)
    y, y_t = F.rms_norm_jvp(x, xt, w, dw, eps=1e-5, backend=backend)
    assert last_backend("rms_norm_jvp") == backend

    x64, xt64, w64, dw64 = as64(x, xt, w, dw)
    y64, y_t64 = oracle(x64, xt64, w64, dw64, 1e-5)
    same = tk.reference.layer_norm_jvp(x.detach(), *(None if t is None else t.detach() for t in (xt, w)), None,
                                       None if dw is None else dw.detach(), None, 1e-5, centered=False)  # fmt: skip
    assert_close(y, y64, same[0], name="y")
    assert_close(y_t, y_t64, same[1], name="y_t")

    # gradients of a loss on both streams, every input (primal ones: the second-order terms)
    g, g_t = torch.randn_like(y), torch.randn_like(y_t)
    inputs, inputs64 = (x, xt, w, dw), (x64, xt64, w64, dw64)
    ours = grads(torch.cat([y.flatten(), y_t.flatten()]), inputs, torch.cat([g.flatten(), g_t.flatten()]))
    expected = grads(torch.cat([y64.flatten(), y_t64.flatten()]), inputs64,
                     torch.cat([g.flatten(), g_t.flatten()]).double())  # fmt: skip
    for name, a, b in zip(("x", "x_t", "weight", "d_weight"), ours, expected):
        if b is not None:
            assert_close(a, b, dtype=dtype, name=f"grad {name}", factor=4.0)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_float64(backend):
    """Both streams w.r.t. every input against finite differences (the reference to second order;
    the fused backward, like layer norm's, is not differentiable again)."""
    inputs = make_inputs((2, 3, 7), torch.float64, "cpu")

    def both(x, x_t, w, dw):
        return F.rms_norm_jvp(x, x_t, w, dw, eps=1e-6, backend=backend)

    assert torch.autograd.gradcheck(both, inputs)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(both, inputs)


def test_default_eps_is_torchs():
    """``eps=None``: torch's default, float32's machine epsilon for 16-bit inputs (not their own)."""
    x = torch.randn(3, 16) * 1e-3
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        ours, _ = F.rms_norm_jvp(x.to(dtype), None, None, backend="cpp")
        assert_close(ours, torch_F.rms_norm(x.to(dtype), (16,)).double(), dtype=dtype, name=str(dtype))


@pytest.mark.parametrize("backend,walked", [("triton", False), ("triton", True), ("cpp", False), ("reference", False)],
                         ids=str)  # fmt: skip
def test_zero_row_and_nan_row(backend, walked, device, monkeypatch):
    """An all-zero row gives zeros in both streams (rstd = eps^-½, torch's answer); NaN stays in its
    row (``walked``: rows walked in tiles of 16, as rows wider than ``ROW_TILE``)."""
    if walked:
        walk_norm_rows(monkeypatch)
    x, xt, w, dw = (t.detach() for t in make_inputs((1, 4, 33), torch.float32, backend_device(backend, device)))
    x[0, 0] = 0.0
    x[0, 2, 5] = float("nan")
    y, y_t = F.rms_norm_jvp(x, xt, w, dw, eps=1e-6, backend=backend)
    y64, y_t64 = oracle(x.double(), xt.double(), w.double(), dw.double(), 1e-6)
    assert torch.isnan(y[0, 2]).all() and torch.isnan(y_t[0, 2]).all()
    rows = [0, 1, 3]
    assert_close(y[0, rows], y64[0, rows], name="y")
    assert_close(y_t[0, rows], y_t64[0, rows], name="y_t")


def test_rejects_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        F.rms_norm_jvp(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="d_weight"):
        F.rms_norm_jvp(x, None, None, torch.ones(8))
    with pytest.raises(TypeError, match="eps"):
        F.rms_norm_jvp(x, None, None, eps="small")


def test_functional_rms_norm_in_fused_jvp():
    """``F.rms_norm`` and ``torch.rms_norm`` in the routing mode run the fused op, exact in float64;
    a norm over two dimensions runs torch's own."""
    x, xt = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    w = torch.randn(12, dtype=torch.float64)
    for call in (lambda x: torch_F.rms_norm(x, (12,), w, 1e-5), lambda x: torch.rms_norm(x, [12], w, 1e-5)):
        expected = jvp(call, (x,), (xt,))
        F.rms_norm_jvp(x, None, None, backend="reference")  # so that "cpp" below is this call's
        with tk.fused_jvp():
            found = jvp(call, (x,), (xt,))
        assert last_backend("rms_norm_jvp") == "cpp"
        for a, b in zip(found, expected):
            assert_close(a, b, name="rms_norm")
    with tk.fused_jvp():
        two_dims = jvp(lambda x: torch_F.rms_norm(x, (5, 12)), (x,), (xt,))
    for a, b in zip(two_dims, jvp(lambda x: torch_F.rms_norm(x, (5, 12)), (x,), (xt,))):
        assert_close(a, b, name="two dims")


def float64_rms_norm(norm, x):
    """diffusers' ``RMSNorm`` by torch's ``F.rms_norm`` (the oracle's)."""
    y = torch_F.rms_norm(x, x.shape[-1:], norm.weight, norm.eps)
    return y if norm.bias is None else y + norm.bias


def test_patched_rms_norm_modules():
    """``nn.RMSNorm``, timm's ``RmsNorm`` and diffusers' ``RMSNorm`` (with a bias, and without
    affine) in a model: patched ``jvp`` along the input and along the parameters (LinearizedModel),
    and the gradients of a loss on both outputs, equal the unpatched model's in float64; a deep
    copy of the patched model uses its own weights."""
    timm_layers = pytest.importorskip("timm.layers")
    diffusers_norms = pytest.importorskip("diffusers.models.normalization")
    model = nn.Sequential(nn.Linear(24, 40), nn.RMSNorm(40), nn.GELU(), timm_layers.RmsNorm(40, eps=1e-5),
                          diffusers_norms.RMSNorm(40, eps=1e-6, bias=True),
                          diffusers_norms.RMSNorm(40, eps=1e-6, elementwise_affine=False), nn.Linear(40, 8)).double()  # fmt: skip
    with torch.no_grad():
        model[4].bias.normal_()
    patched = copy.deepcopy(model)
    for norm in (model[4], model[5]):  # diffusers' takes the variance in float32 even for float64 inputs
        norm.forward = functools.partial(float64_rms_norm, norm)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tangent_kernels.patch: found no attention module")
        tk.patch(patched)
    assert [line.split(":")[0] for line in list_swaps(patched)] == ["1", "3", "4", "5"]
    x, x_t = torch.randn(3, 7, 24, dtype=torch.float64), torch.randn(3, 7, 24, dtype=torch.float64)
    F.rms_norm_jvp(x, None, None, backend="reference")  # so that "cpp" below is the patched model's
    for a, b in zip(jvp(patched, (x,), (x_t,)), jvp(model, (x,), (x_t,))):
        assert_close(a, b, name="jvp along x")
    assert last_backend("rms_norm_jvp") == "cpp"

    params = {n: p.detach() for n, p in model.named_parameters()}
    offsets = {n: (1e-2 * torch.randn_like(p)).requires_grad_() for n, p in params.items()}

    def linearized(net):
        y, y_t = jvp(lambda p: functional_call(net, p, (x,)), (params,), (offsets,))
        return torch.autograd.grad((y + y_t).square().sum(), list(offsets.values()))

    for a, b in zip(linearized(patched), linearized(model)):
        assert_close(a, b, name="grad of the offsets")

    twin = copy.deepcopy(patched)
    with torch.no_grad():
        twin[3].weight.mul_(2)
        model[3].weight.mul_(2)
    for a, b in zip(jvp(twin, (x,), (x_t,)), jvp(model, (x,), (x_t,))):
        assert_close(a, b, name="deep copy")
    tk.unpatch(twin)
    tk.unpatch(patched)


@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_tangent_rms_norm_module(kind):
    """``tangent_module`` of ``nn.RMSNorm`` / timm's ``RmsNorm`` is the fused ``TangentRMSNorm``:
    ``(y, y_t)`` with its weight offset equal ``torch.func.jvp`` along the weight and the input."""
    timm_layers = pytest.importorskip("timm.layers")
    norm = (nn.RMSNorm(19, eps=1e-5) if kind == "torch" else timm_layers.RmsNorm(19, eps=1e-5)).double()
    with torch.no_grad():
        norm.weight.normal_()
    tangent = tk.modules.tangent_module(norm)
    assert isinstance(tangent, tk.modules.TangentRMSNorm)
    with torch.no_grad():
        tangent.weight.normal_()
    x, x_t = torch.randn(2, 5, 19, dtype=torch.float64), torch.randn(2, 5, 19, dtype=torch.float64)
    expected = jvp(lambda x, w: torch_F.rms_norm(x, (19,), w, 1e-5), (x, norm.weight.detach()),
                   (x_t, tangent.weight.detach()))  # fmt: skip
    for a, b in zip(tangent(x, x_t), expected):
        assert_close(a, b, name=kind)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(backend_dtype=st.sampled_from([("triton", torch.float32), ("cpp", torch.float32), ("cpp", torch.float64),
                                      ("cpp", torch.bfloat16), ("reference", torch.float64)]),  # fmt: skip
       rows=st.integers(0, 9), width=st.integers(1, 70), given_parts=st.sampled_from(["x_t", "d_weight", "both", "no_weight"]),
       eps=st.sampled_from([None, 1e-6, 1e-2]), magnitude=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**31))  # fmt: skip
def test_fuzz_against_torch_jvp(backend_dtype, rows, width, given_parts, eps, magnitude, seed):
    """Random shapes (no rows included), magnitudes, eps and tangent sets on every backend: both
    streams and the gradients of every input against ``torch.func.jvp`` of ``F.rms_norm`` in float64."""
    backend, dtype = backend_dtype
    torch.manual_seed(seed)
    flags = {"x_t": {"d_weight": False}, "d_weight": {"x_t": False}, "both": {}, "no_weight": {"affine": False}}
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x, xt, w, dw = make_inputs((rows, width), dtype, device, **flags[given_parts])
    with torch.no_grad():
        x.mul_(magnitude)
    y, y_t = F.rms_norm_jvp(x, xt, w, dw, eps=eps, backend=backend)
    default_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    x64, xt64, w64, dw64 = as64(x, xt, w, dw)
    y64, y_t64 = oracle(x64, xt64, w64, dw64, default_eps if eps is None else eps)
    assert_close(y, y64, dtype=dtype, name="y")
    assert_close(y_t, y_t64, dtype=dtype, name="y_t")
    if rows:
        g = torch.randn_like(y)
        for name, a, b in zip(("x", "x_t", "weight", "d_weight"), grads(y_t, (x, xt, w, dw), g),
                              grads(y_t64, (x64, xt64, w64, dw64), g.double())):  # fmt: skip
            if a is None and b is not None:  # y_t does not depend on it (only d_weight: y_t = x̂ · d_weight)
                assert not b.any(), f"grad {name}: None, expected {b}"
            elif b is not None:
                assert_close(a, b, dtype=dtype, name=f"grad {name}")
