"""Layer norm primal + tangent on every backend against the float64 reference, forward and backward."""

import pytest
import torch

import tangent_kernels as tk
from helpers import assert_close, backend_device, float64, grads, max_error, max_relative_error, walk_norm_rows
from tangent_kernels import functional as F
from tangent_kernels import last_backend, reference

# (backend, dtype): Triton ships fp32/fp16/bf16; the C++ op also takes fp64 and bf16.
BACKEND_DTYPES = [
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
    ("triton", torch.float16),
    ("cpp", torch.float32),
    ("cpp", torch.bfloat16),
    ("cpp", torch.float64),
    ("reference", torch.float32),
]
ROWS = [1, 197]  # a single token; ViT-B/16 at 224 px
WIDTHS = [7, 64, 768]  # prime, power of two, ViT-B width
# Which of (x_t, d_weight, d_bias) are given: all, the first linearized layer (no x_t), only x_t.
TANGENTS = {"all": (True, True, True), "no_x_t": (False, True, True), "only_x_t": (True, False, False)}


def make_inputs(rows, width, dtype, device, tangents):
    has_x_t, has_dw, has_db = tangents
    x = (torch.randn(2, rows, width, device=device) * 3 + 0.5).to(dtype)
    x_t = torch.randn(2, rows, width, device=device).to(dtype).requires_grad_() if has_x_t else None
    w = (1 + 0.5 * torch.randn(width, device=device)).to(dtype)
    b = torch.randn(width, device=device).to(dtype)
    dw = (0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_() if has_dw else None
    db = (0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_() if has_db else None
    return x, x_t, w, b, dw, db



@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("tangents", list(TANGENTS), ids=str)
def test_matches_reference(backend, dtype, rows, width, tangents, device, poisoned_outputs):
    check_against_reference(backend, dtype, rows, width, tangents, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("width", [17, 100])  # a tile and one feature; six tiles and a part
@pytest.mark.parametrize("tangents", list(TANGENTS), ids=str)
def test_walked_rows_match_reference(dtype, width, tangents, device, poisoned_outputs, monkeypatch):
    """Rows wider than ``ROW_TILE`` features, walked in tiles (here of 16)."""
    from tangent_kernels.triton import layer_norm

    walk_norm_rows(monkeypatch)
    assert layer_norm._kernels(width)[0] is layer_norm._layer_norm_jvp_fwd_tiled_kernel
    check_against_reference("triton", dtype, 3, width, tangents, device)


def check_against_reference(backend, dtype, rows, width, tangents, device):
    """Both streams and the gradients of every input through ``y_t`` against the float64 reference."""
    inputs = make_inputs(rows, width, dtype, backend_device(backend, device), TANGENTS[tangents])
    y, y_t = F.layer_norm_jvp(*inputs, eps=1e-6, backend=backend)
    assert last_backend("layer_norm_jvp") == backend

    inputs64 = float64(*inputs)
    y64, y_t64 = reference.layer_norm_jvp(*inputs64, eps=1e-6)
    y_same, y_t_same = reference.layer_norm_jvp(*(None if t is None else t.detach() for t in inputs), eps=1e-6)
    assert_close(y, y64, y_same, name="y")
    assert_close(y_t, y_t64, y_t_same, name="y_t")

    grad_y_t = torch.randn_like(y_t)
    ours = grads(y_t, inputs, grad_y_t)
    oracle = grads(y_t64, inputs64, grad_y_t.double())
    same = grads(reference.layer_norm_jvp(*inputs, eps=1e-6)[1], inputs, grad_y_t)
    for name, a, b, c in zip(("x", "x_t", "weight", "bias", "d_weight", "d_bias"), ours, oracle, same):
        if b is not None:
            assert_close(a, b, c, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("tangents", list(TANGENTS), ids=str)
def test_gradcheck_float64(backend, tangents):
    x, x_t, w, b, dw, db = make_inputs(3, 7, torch.float64, "cpu", TANGENTS[tangents])
    inputs = [t for t in (x_t, dw, db) if t is not None]

    def tangent_output(*given):
        it = iter(given)
        args = [next(it) if t is not None else None for t in (x_t, dw, db)]
        return F.layer_norm_jvp(x, args[0], w, b, args[1], args[2], backend=backend)

    assert torch.autograd.gradcheck(tangent_output, inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_primal_stream(backend):
    """Gradients of ``y`` with respect to x, weight and bias (an ordinary layer norm backward)."""
    x, _, w, b, _, _ = make_inputs(3, 7, torch.float64, "cpu", TANGENTS["all"])
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm_jvp(x, None, w, b, backend=backend)[0], inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_every_input(backend):
    """Both outputs w.r.t. every input, primal ones included: the second-order terms of y_t against
    finite differences (torch's own forward-AD rule for layer norm gets them wrong,
    pytorch/pytorch#196700, so it cannot be the oracle here)."""
    if backend == "cpp" and not tk.cpp.AVAILABLE:
        pytest.skip(tk.cpp.UNAVAILABLE_REASON)
    inputs = [t.requires_grad_() for t in make_inputs(3, 7, torch.float64, "cpu", TANGENTS["all"])]

    def both(x, x_t, w, b, dw, db):
        return F.layer_norm_jvp(x, x_t, w, b, dw, db, backend=backend)

    assert torch.autograd.gradcheck(both, inputs)


@pytest.mark.parametrize("walked", [False, True], ids=["one-tile", "walked"])
def test_second_order_terms_on_triton(walked, device, monkeypatch):
    """The gradient of y_t w.r.t. x and the weight (fp32 Triton) against the float64 reference's."""
    if walked:
        walk_norm_rows(monkeypatch)
    x, x_t, w, b, dw, db = make_inputs(4, 37, torch.float32, device, TANGENTS["all"])
    grad_y_t = torch.randn_like(x)
    found = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        primal = [t.detach().to(dtype).requires_grad_() for t in (x, w)]
        _, y_t = F.layer_norm_jvp(primal[0], *(t.to(dtype) for t in (x_t,)), primal[1], b.to(dtype), dw.to(dtype),
                                  db.to(dtype), backend=backend)  # fmt: skip
        found[backend] = torch.autograd.grad(y_t, primal, grad_y_t.to(dtype))
    for ours, expected in zip(found["triton"], found["reference"]):
        assert max_relative_error(ours, expected) < 1e-5


def test_auto_keeps_the_fused_op_when_a_primal_input_requires_grad():
    x, x_t, w, b, dw, db = make_inputs(4, 7, torch.float64, "cpu", TANGENTS["all"])
    x.requires_grad_()
    _, y_t = F.layer_norm_jvp(x, x_t, w, b, dw, db, backend="auto")
    assert last_backend("layer_norm_jvp") == ("cpp" if tk.cpp.AVAILABLE else "reference")
    (grad_x,) = torch.autograd.grad(y_t.sum(), x)
    assert torch.isfinite(grad_x).all()


# every backend, and the Triton kernels that walk rows wider than ROW_TILE in tiles (here of 16)
BACKENDS_AND_WALKED = [("triton", False), ("triton", True), ("cpp", False), ("reference", False)]


@pytest.mark.parametrize("backend,walked", BACKENDS_AND_WALKED, ids=str)
def test_nan_stays_in_its_row(backend, walked, device, monkeypatch):
    if walked:
        walk_norm_rows(monkeypatch)
    x, x_t, w, b, dw, db = make_inputs(5, 33, torch.float32, backend_device(backend, device), TANGENTS["all"])
    x[0, 1, 4] = float("nan")
    x_t = x_t.detach().clone()
    x_t[1, 3, 0] = float("nan")
    y, y_t = (t.detach().clone() for t in F.layer_norm_jvp(x, x_t, w, b, dw, db, backend=backend))
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y_t[0, 1]).all()
    assert torch.isnan(y_t[1, 3]).all() and not torch.isnan(y[1, 3]).any()
    y[0, 1], y_t[0, 1], y_t[1, 3] = 0, 0, 0
    assert torch.isfinite(y).all() and torch.isfinite(y_t).all()


@pytest.mark.parametrize("backend,walked", BACKENDS_AND_WALKED, ids=str)
def test_large_means_in_both_streams(backend, walked, device, monkeypatch):
    """Residual streams carry large per-token means (here 50σ in x and 30σ in x_t). ``Σ x̂`` is
    zero only up to rounding, so an uncentered ``mean(x̂ · x_t)`` multiplies that rounding by the
    mean of ``x_t``; y_t must stay as accurate as torch.func.jvp of torch's layer norm (fp32: 31
    units of rounding; 2900 before x_t was centered in that sum)."""
    if walked:
        walk_norm_rows(monkeypatch, tile=64)
    device = backend_device(backend, device)
    x = torch.randn(64, 384, device=device) + 50
    x_t = torch.randn(64, 384, device=device) + 30
    w, b = 1 + 0.5 * torch.randn(384, device=device), torch.randn(384, device=device)
    _, y_t = F.layer_norm_jvp(x, x_t, w, b, eps=1e-5, backend=backend)
    _, y_t_jvp = torch.func.jvp(lambda x: torch.nn.functional.layer_norm(x, (384,), w, b, 1e-5), (x,), (x_t,))
    _, y_t64 = reference.layer_norm_jvp(*float64(x, x_t, w, b), eps=1e-5)
    assert max_error(y_t, y_t64) <= 3 * max_error(y_t_jvp, y_t64)


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_no_tangent_gives_none(backend, device):
    x, _, w, b, _, _ = make_inputs(3, 16, torch.float32, backend_device(backend, device), TANGENTS["all"])
    y, y_t = F.layer_norm_jvp(x, None, w, b, backend=backend)
    assert y_t is None
    assert_close(y, reference.layer_norm_jvp(*float64(x, None, w, b))[0], dtype=torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_without_affine(backend, device):
    x = torch.randn(6, 10, device=backend_device(backend, device))
    x_t = torch.randn_like(x)
    y, y_t = F.layer_norm_jvp(x, x_t, None, None, eps=1e-5, backend=backend)
    y64, y_t64 = reference.layer_norm_jvp(*float64(x, x_t), None, None, eps=1e-5)
    assert_close(y, y64, dtype=torch.float32)
    assert_close(y_t, y_t64, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_strided_input(backend, device):
    """A transposed view (rows not contiguous) gives the same result as its contiguous copy."""
    base = torch.randn(12, 3, 8, device=backend_device(backend, device))
    x = base.transpose(0, 1)  # (3, 12, 8), last dim contiguous, rows strided
    x_t = torch.randn(8, 12, 3, device=x.device).permute(2, 1, 0)  # last dim not contiguous
    w, b = torch.randn(8, device=x.device), torch.randn(8, device=x.device)
    y, y_t = F.layer_norm_jvp(x, x_t, w, b, w, b, backend=backend)
    y64, y_t64 = reference.layer_norm_jvp(*float64(x, x_t, w, b, w, b))
    assert_close(y, y64, dtype=torch.float32)
    assert_close(y_t, y_t64, dtype=torch.float32)


class TestBadInput:
    def setup_method(self):
        self.x = torch.randn(4, 8)
        self.w = torch.randn(8)

    def test_tangent_shape(self):
        with pytest.raises(ValueError, match=r"x_t: expected shape \(4, 8\)"):
            F.layer_norm_jvp(self.x, torch.randn(4, 9), self.w, None)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="x_t: expected dtype torch.float32"):
            F.layer_norm_jvp(self.x, self.x.double(), self.w, None)
        with pytest.raises(TypeError, match="d_weight: expected dtype torch.float32"):
            F.layer_norm_jvp(self.x, None, self.w, None, self.w.half())

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="weight: expected device cpu"):
            F.layer_norm_jvp(self.x, None, self.w.to("meta"), None)

    def test_wrong_normalized_shape(self):
        with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
            F.layer_norm_jvp(self.x, None, torch.randn(7), None)
        with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
            F.layer_norm_jvp(self.x, None, self.w, torch.randn(4, 8))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
            F.layer_norm_jvp(torch.ones(4, 8, dtype=torch.int64), None, None, None)

    def test_offset_without_frozen_parameter(self):
        with pytest.raises(ValueError, match="d_weight: given without a frozen weight"):
            F.layer_norm_jvp(self.x, None, None, None, self.w)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend: expected one of"):
            F.layer_norm_jvp(self.x, None, self.w, None, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_primal_output_needs_no_grad_when_only_tangents_do(backend, device):
    """The primal stream must not look differentiable through the offsets (it feeds later layers)."""
    x, x_t, w, b, dw, db = make_inputs(3, 8, torch.float32, backend_device(backend, device), TANGENTS["all"])
    y, y_t = F.layer_norm_jvp(x, x_t, w, b, dw, db, backend=backend)
    assert not y.requires_grad and y_t.requires_grad


def _norm(centered, backend):
    """Layer norm or RMSNorm as a function of all its inputs, both streams out."""
    if centered:
        return lambda x, x_t, w, b, dw, db: F.layer_norm_jvp(x, x_t, w, b, dw, db, eps=1e-5, backend=backend)
    return lambda x, x_t, w, b, dw, db: F.rms_norm_jvp(x, x_t, w, dw, eps=1e-5, backend=backend)


@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_double_backward_on_the_fused_backend(centered):
    """gradgradcheck of both streams in every input: the backward of the fused backward raised
    (``layer_norm_vjp`` had no autograd formula), so ``autograd.functional.jvp`` and Hessian-vector
    products through TangentLayerNorm (and TangentAttention with qk_norm, TangentBlock) failed."""
    inputs = [t.detach().requires_grad_() for t in make_inputs(3, 6, torch.float64, "cpu", TANGENTS["all"])]
    assert torch.autograd.gradgradcheck(_norm(centered, "cpp"), inputs)


@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_double_backward_form_of_a_jvp_on_triton(centered, device):
    """``autograd.functional.jvp`` (backward of a backward) of ``y + y_t`` along ``x``, fp32 Triton
    against the float64 reference."""
    x, x_t, w, b, dw, db = (t.detach() for t in make_inputs(3, 37, torch.float32, device, TANGENTS["all"]))
    v = torch.randn_like(x)
    found = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        rest = [t.to(dtype) for t in (x_t, w, b, dw, db)]
        norm = _norm(centered, backend)
        _, tangent = torch.autograd.functional.jvp(lambda x: sum(norm(x, *rest)), x.to(dtype), v.to(dtype),
                                                   create_graph=True)  # fmt: skip
        found.append(tangent)
    assert_close(found[0], found[1], dtype=torch.float32, name="tangent of y_t")
