"""The shared validation layer: every entry refuses what its kernels cannot serve, by name, and
gives torch's answer where torch accepts an input (empty dimensions, masks of another dtype,
rows whose squares overflow)."""

import threading

import pytest
import torch
import torch.nn.functional as torch_F

import tangent_kernels as tk
from helpers import backend_device, max_relative_error
from tangent_kernels import functional as F
from tangent_kernels import reference

needs_cpp = pytest.mark.skipif(not tk.cpp.AVAILABLE, reason=tk.cpp.UNAVAILABLE_REASON)
F64 = dict(dtype=torch.float64)
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), "triton"]


def qkv(batch=1, heads=2, q_len=3, k_len=5, head_dim=4, dtype=torch.float64, device="cpu"):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(batch, heads, k_len, head_dim, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


class TestAttentionInputs:
    """Inputs every attention entry (functional, the raw torch.library ops) refuses by name."""

    @pytest.mark.parametrize("case, error, message", [
        (dict(v=torch.randn(1, 2, 4, 4, **F64)), ValueError, r"v: expected shape \(1, 2, 5, 4\)"),
        (dict(k=torch.randn(1, 2, 5, 3, **F64), v=torch.randn(1, 2, 5, 3, **F64)), ValueError, "k: expected shape"),
        (dict(k=torch.randn(2, 2, 5, 4, **F64), v=torch.randn(2, 2, 5, 4, **F64)), ValueError, "k: expected shape"),
        (dict(q=torch.randn(1, 3, 3, 4, **F64)), ValueError, "k: its 2 heads must divide the 3 heads of q"),
        (dict(v=torch.randn(1, 2, 5, 4, dtype=torch.float32)), TypeError, "v: expected dtype torch.float64"),
        (dict(k=torch.randn(1, 2, 5, 4, device="meta", **F64)), ValueError, "k: expected device cpu"),
        (dict(q=torch.randn(1, 2, 3, 4, **F64).to_sparse()), TypeError, "q: expected a dense"),
        (dict(q=torch.ones(1, 2, 3, 4, dtype=torch.int64)), TypeError, "q: expected a floating-point tensor"),
        (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.int64)), TypeError, "key_padding_mask: expected dtype torch.bool"),
        (dict(key_padding_mask=torch.ones(1, 5, device="meta", **F64)), ValueError, "key_padding_mask: expected device cpu"),
        (dict(causal=1), TypeError, "causal: expected True or False"),
        (dict(scale="0.5"), TypeError, "scale: expected a real number"),
        (dict(scale=True), TypeError, "scale: expected a real number"),
    ])  # fmt: skip
    def test_functional_refuses(self, case, error, message):
        q, k, v = qkv()
        args = {"q": q, "k": k, "v": v, **case}
        kwargs = {name: args.pop(name) for name in ("key_padding_mask", "causal", "scale") if name in args}
        with pytest.raises(error, match=message):
            F.attention_jvp(args["q"], args["k"], args["v"], backend="reference", **kwargs)

    @pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=needs_cpp)])
    def test_raw_ops_refuse_what_their_kernels_cannot_serve(self, backend, device):
        device = backend_device(backend, device)
        q, k, v = qkv(dtype=torch.float32, device=device)
        op = torch.ops.tangent_kernels
        with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
            op.attention_jvp(q, k, v, None, None, None, torch.ones(1, 5, dtype=torch.int64, device=device), 0.5, False,
                             backend)  # fmt: skip
        with pytest.raises(ValueError, match=r"v: expected shape"):
            op.attention_jvp(q, k, v[:, :, :4], None, None, None, None, 0.5, False, backend)
        with pytest.raises(ValueError, match=r"lse: expected shape \(1, 2, 3\)"):
            op.attention_vjp(q, q, k, v, q, torch.zeros(1, 2, device=device), None, 0.5, False, True, True, backend)
        with pytest.raises(ValueError, match="q: the fused kernels need a non-empty tensor"):
            op.attention_jvp(q[:, :, :0], k, v, None, None, None, None, 0.5, False, backend)

    @needs_cpp
    def test_raw_cpp_ops(self):
        q, k, v = qkv(dtype=torch.float32)
        op = torch.ops.tangent_kernels
        with pytest.raises(ValueError, match="k: expected device cpu"):  # the shape-only kernel would run
            op.attention_jvp_forward(q, k.to("meta"), v.to("meta"), None, None, None, None, 0.5, False)
        with pytest.raises(RuntimeError, match="key_padding_mask: expected dtype bool"):
            op.attention_jvp_forward(q, k, v, None, None, None, torch.ones(1, 5, dtype=torch.int64), 0.5, False)
        with pytest.raises(RuntimeError, match="lse: expected a floating"):
            op.attention_backward(q, q, k, v, q, torch.zeros(1, 2), None, 0.5, False, True, True)
        with pytest.raises(RuntimeError, match=r"key_padding_mask: expected shape \(1, 5\)"):
            op.attention_backward(q, q, k, v, q, torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool), 0.5, False,
                                  True, True)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    dict(k_len=0),  # no keys: torch gives zeros
    dict(head_dim=0),
    dict(batch=0),
    dict(q_len=0),
    dict(heads=0),
])  # fmt: skip
def test_empty_dimensions_give_torchs_answer(backend, shape, device):
    device = backend_device(backend, device)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = qkv(**{"dtype": dtype, "device": device, **shape})
    q.requires_grad_()
    o, o_t = F.attention_jvp(q, k, v, q, k, v, backend=backend)
    expected = torch_F.scaled_dot_product_attention(q, k, v)
    assert o.shape == o_t.shape == expected.shape and o.dtype == dtype
    assert torch.equal(o, expected) and not o_t.any()
    if q.numel():  # gradients flow (zeros) rather than "does not require grad"
        assert not torch.autograd.grad(o.sum() + o_t.sum(), q)[0].any()


def test_meta_tensors_give_meta_results():
    q, k, v = qkv(device="meta")
    o, o_t = F.attention_jvp(q, k, v, q, None, None)
    assert o.device.type == o_t.device.type == "meta" and o.shape == q.shape
    y, y_t = F.layer_norm_jvp(q, q, None, None)
    assert y.device.type == "meta" and y_t.shape == q.shape


def test_floating_mask_of_another_dtype_is_added_in_the_inputs_dtype():
    """fp64 inputs with an fp16 additive mask: fp64 results (it used to return fp16)."""
    q, k, v = qkv()
    mask = torch.randn(1, 5).half()
    for backend in ("reference", "auto"):
        o, o_t = F.attention_jvp(q, k, v, q, None, None, key_padding_mask=mask, backend=backend)
        assert o.dtype == o_t.dtype == torch.float64
    o, _ = reference.attention_jvp(q, k, v, None, None, None, key_padding_mask=mask)
    expected = torch_F.scaled_dot_product_attention(q, k, v, attn_mask=mask.double()[:, None, None, :])
    assert o.dtype == torch.float64 and max_relative_error(o, expected) < 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e20, 1e36])
def test_layer_norm_of_rows_whose_squares_overflow(backend, magnitude, device):
    """|x| ~ 1e20 in float32: x̂ is finite (it used to be exactly 0, so y was the bias)."""
    device = backend_device(backend, device)
    x, x_t = torch.randn(3, 33, device=device) * magnitude, torch.randn(3, 33, device=device)
    w, b, dw, db = (torch.randn(33, device=device) for _ in range(4))
    x[1] /= magnitude  # an ordinary row beside them
    y, y_t = F.layer_norm_jvp(x, x_t * magnitude, w, b, dw, db, backend=backend)
    expected = reference.layer_norm_jvp(*(t.double() for t in (x, x_t * magnitude, w, b, dw, db)))
    assert max_relative_error(y, expected[0]) < 1e-5 and max_relative_error(y_t, expected[1]) < 1e-5
    assert (y - b).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_non_finite_rows_is_nan(backend, device):
    device = backend_device(backend, device)
    x = torch.randn(3, 9, device=device)
    x[0, 2], x[1, 5] = float("inf"), float("nan")
    y, y_t = F.layer_norm_jvp(x, x, None, None, backend=backend)
    assert y[:2].isnan().all() and y_t[:2].isnan().all() and y[2].isfinite().all()


def test_last_backend_is_per_thread():
    q, k, v = qkv()
    seen, barrier = {}, threading.Barrier(2)

    def run(backend):
        for _ in range(20):
            F.attention_jvp(q, k, v, backend=backend)
            barrier.wait()
            seen.setdefault(backend, set()).add(tk.last_backend("attention_jvp"))
            barrier.wait()

    threads = [threading.Thread(target=run, args=(b,)) for b in ("reference", "cpp" if tk.cpp.AVAILABLE else "auto")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["reference"] == {"reference"}


@pytest.mark.parametrize("bad", ["refernce", None, 3])
def test_modules_check_their_backend_when_built(bad):
    with pytest.raises(ValueError, match="backend: expected one of"):
        tk.modules.TangentLinear(torch.nn.Linear(3, 2), backend=bad)
    with pytest.raises(ValueError, match="backend: expected one of"):
        tk.modules.tangent_module(torch.nn.LayerNorm(3), backend=bad)
