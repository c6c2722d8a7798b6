"""Fused attention primal + tangent (Triton) against the float64 reference, forward and backward."""

import math

import pytest
import torch

import tangent_kernels as tk
from helpers import assert_close, backend_device, float64, grads, max_error
from tangent_kernels import functional as F
from tangent_kernels import reference

# (backend, dtype): Triton ships fp32/fp16/bf16 (interpreter on the CPU); C++ also takes fp64.
BACKEND_DTYPES = [
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
    ("triton", torch.float16),
    ("cpp", torch.float32),
    ("cpp", torch.bfloat16),
    ("cpp", torch.float64),
]
CASES = [
    # (batch, q heads, kv heads, q len, k len, head dim)
    (1, 2, 2, 1, 1, 64),  # a single token
    (2, 3, 3, 7, 7, 32),  # odd length, several batches
    (1, 2, 2, 197, 197, 64),  # ViT-B/16 at 224 px
    (1, 1, 1, 257, 257, 80),  # longer than every tile list's tiles, a last tile of one row; head dim 80 (64 + 16)
    (2, 4, 2, 33, 50, 96),  # grouped-query heads, Lq < Lk, head dim 96
    (1, 4, 1, 50, 17, 16),  # multi-query, Lq > Lk, head dim 16
    (1, 2, 2, 9, 70, 256),  # head dim 256
    (1, 2, 2, 31, 45, 72),  # DiT-XL's head dim: blocks of 64 and 16 columns (8 of them padding)
    (1, 2, 1, 45, 31, 40),  # 32 + 16 columns, grouped-query heads
]
VARIANTS = ["plain", "causal", "bool_mask", "additive_mask", "causal_bool_mask"]


def make_inputs(case, dtype, device, variant="plain"):
    batch, hq, hkv, lq, lk, d = case
    q, q_t = (torch.randn(batch, hq, lq, d, device=device).to(dtype) for _ in range(2))
    k, v, k_t, v_t = (torch.randn(batch, hkv, lk, d, device=device).to(dtype) for _ in range(4))
    mask = None
    if "bool_mask" in variant:
        mask = torch.rand(batch, lk, device=device) < 0.3
        mask[:, 0] = False  # every query keeps a key (fully masked rows are tested separately)
    elif variant == "additive_mask":
        mask = torch.randn(batch, lk, device=device).to(dtype)
    return (q, k, v, q_t, k_t, v_t), dict(causal="causal" in variant, key_padding_mask=mask)


def reference_in(dtype, tensors, options):
    """The reference on copies in ``dtype`` (requires_grad kept), the mask converted alike."""
    copies = tuple(None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors)
    mask = options["key_padding_mask"]
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return copies, reference.attention_jvp(*copies, causal=options["causal"], key_padding_mask=mask)


def check_against_reference(tensors, options, dtype, backend="triton"):
    tensors = tuple(t.requires_grad_() for t in tensors)
    q, k, v, q_t, k_t, v_t = tensors
    o, o_t = F.attention_jvp(q.detach(), k.detach(), v.detach(), q_t, k_t, v_t, backend=backend, **options)
    assert tk.last_backend("attention_jvp") == backend
    ref64_in, (o64, o_t64) = reference_in(torch.float64, tensors, options)
    same_in, (o_same, o_t_same) = reference_in(dtype, tensors, options)
    assert_close(o, o64, o_same, name="o")
    assert_close(o_t, o_t64, o_t_same, name="o_t")

    # gradient through the tangent: reaches q_t, k_t, v_t
    grad_o_t = torch.randn_like(o_t)
    ours = grads(o_t, (q_t, k_t, v_t), grad_o_t)
    oracle = grads(o_t64, ref64_in[3:], grad_o_t.double())
    same = grads(o_t_same, same_in[3:], grad_o_t)
    for name, a, b, c in zip(("q_t", "k_t", "v_t"), ours, oracle, same):
        assert_close(a, b, c, name=f"grad {name}")

    # gradient through the primal output: reaches q, k, v
    prim = tuple(t.detach().requires_grad_() for t in (q, k, v))
    o = F.attention_jvp(*prim, backend=backend, **options)[0]
    grad_o = torch.randn_like(o)
    ours = grads(o, prim, grad_o)
    oracle = grads(o64, ref64_in[:3], grad_o.double())
    same = grads(o_same, same_in[:3], grad_o)
    for name, a, b, c in zip(("q", "k", "v"), ours, oracle, same):
        assert_close(a, b, c, name=f"grad {name}")



@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, backend, dtype, device, poisoned_outputs):
    tensors, options = make_inputs(case, dtype, backend_device(backend, device))
    check_against_reference(tensors, options, dtype, backend)


@pytest.mark.parametrize("head_dim,blocks", [(16, (16, 0)), (24, (32, 0)), (40, (32, 16)), (64, (64, 0)),
                                             (72, (64, 16)), (80, (64, 16)), (96, (64, 32)), (112, (128, 0)),
                                             (160, (128, 32))])  # fmt: skip
def test_head_dims_between_powers_of_two_are_split(head_dim, blocks):
    """Head dims between powers of two run as two power-of-two blocks of columns where that does
    less MMA work than padding to the next power of two (80: 64 + 16, not 128)."""
    pytest.importorskip("triton")
    from tangent_kernels.triton.attention import head_dim_blocks

    assert head_dim_blocks(head_dim) == blocks


@pytest.mark.parametrize("variant", VARIANTS[1:])
@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                           ("cpp", torch.float32), ("cpp", torch.bfloat16)], ids=str)  # fmt: skip
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5], CASES[7]], ids=str)
def test_masks_and_causal(case, backend, dtype, variant, device, poisoned_outputs):
    tensors, options = make_inputs(case, dtype, backend_device(backend, device), variant)
    check_against_reference(tensors, options, dtype, backend)


@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("triton", torch.float16),
                                           ("cpp", torch.bfloat16), ("reference", torch.bfloat16)], ids=str)  # fmt: skip
def test_tangent_scores_with_a_large_row_constant(backend, dtype, device, poisoned_outputs):
    """A key-bias offset shared by all keys adds ``q · db`` to every tangent score of a row. It
    cancels in ``O_t`` exactly and must not leave its 16-bit rounding behind: ``O_t`` stays within
    5 units of the dtype's rounding of its own scale (before the Triton kernel centered the tangent
    scores: 19 units in bf16 and 7.6 in fp16 at this 20σ offset; 2.9 and 1.1 after; the reference,
    evaluated in bf16 before it widened 16-bit inputs to fp32, was off by 31 units)."""
    (q, k, v, q_t, k_t, v_t), options = make_inputs((1, 2, 2, 197, 197, 64), dtype, backend_device(backend, device))
    k_t = (k_t.float() + 20 * torch.randn(1, 2, 1, 64, device=k_t.device)).to(dtype)
    o, o_t = F.attention_jvp(q, k, v, q_t, k_t, v_t, backend=backend)
    _, (o64, o_t64) = reference_in(torch.float64, (q, k, v, q_t, k_t, v_t), options)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for name, ours, exact in (("o", o, o64), ("o_t", o_t, o_t64)):
        assert max_error(ours, exact) <= 5 * unit_roundoff * exact.abs().max().item(), name


@pytest.mark.parametrize("variant", ["plain", "causal_bool_mask", "additive_mask"])
def test_cpp_gradcheck_float64(variant):
    """The C++ op's gradients to all six inputs (both output streams) pass gradcheck."""
    (q, k, v, q_t, k_t, v_t), options = make_inputs((1, 4, 2, 5, 6, 8), torch.float64, "cpu", variant)
    tangents = [t.requires_grad_() for t in (q_t, k_t, v_t)]
    assert torch.autograd.gradcheck(lambda *t: F.attention_jvp(q, k, v, *t, backend="cpp", **options)[1], tangents)
    primal = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *p: F.attention_jvp(*p, backend="cpp", **options)[0], primal)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("given", ["q_t", "k_t", "v_t", "q_t,k_t"])
def test_some_tangents_none(given, backend, device, poisoned_outputs):
    (q, k, v, q_t, k_t, v_t), options = make_inputs((2, 4, 2, 19, 23, 32), torch.float32, backend_device(backend, device))
    tangents = {"q_t": q_t, "k_t": k_t, "v_t": v_t}
    tangents = {name: (t if name in given.split(",") else None) for name, t in tangents.items()}
    o, o_t = F.attention_jvp(q, k, v, **tangents, backend=backend)
    o64, o_t64 = reference.attention_jvp(*float64(q, k, v, *tangents.values()))
    assert_close(o, o64, dtype=torch.float32)
    assert_close(o_t, o_t64, dtype=torch.float32, name="o_t")


def test_no_tangent_gives_none(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    o, o_t = F.attention_jvp(q, q, q, backend="triton")
    assert o_t is None
    assert_close(o, reference.attention_jvp(*float64(q, q, q), None, None, None)[0], dtype=torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_bnhd_layout(backend, device, poisoned_outputs):
    """(B, N, H, D) memory passed as transposed views gives the same result."""
    q, k, v, q_t, k_t, v_t = (torch.randn(2, 13, 3, 32, device=backend_device(backend, device)) for _ in range(6))
    views = [t.transpose(1, 2) for t in (q, k, v, q_t, k_t, v_t)]
    o, o_t = F.attention_jvp(*views, backend=backend)
    o64, o_t64 = reference.attention_jvp(*float64(*views))
    assert_close(o, o64, dtype=torch.float32)
    assert_close(o_t, o_t64, dtype=torch.float32)
    if backend == "triton":  # read in place, and the output keeps the layout
        assert o.transpose(1, 2).is_contiguous() and o_t.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_nan_in_a_query_row_stays_in_that_row(backend, device):
    device = backend_device(backend, device)
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((1, 2, 2, 37, 37, 32), torch.float32, device)
    q[0, 1, 5, 3] = math.nan
    o, o_t = F.attention_jvp(q, k, v, q_t, k_t, v_t, backend=backend)
    for out in (o, o_t):
        assert torch.isnan(out[0, 1, 5]).all()
        clean = out.clone()
        clean[0, 1, 5] = 0
        assert torch.isfinite(clean).all()


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fully_masked_row_gives_zeros(backend, device):
    device = backend_device(backend, device)
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((2, 2, 2, 5, 6, 16), torch.float32, device)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=device)
    mask[1] = True  # every key of batch 1 is padding
    q_t.requires_grad_()
    o, o_t = F.attention_jvp(q, k, v, q_t, k_t, v_t, key_padding_mask=mask, backend=backend)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.equal(o_t[1], torch.zeros_like(o_t[1]))
    o64, o_t64 = reference.attention_jvp(*float64(q, k, v, q_t, k_t, v_t), key_padding_mask=mask)
    assert_close(o_t, o_t64, dtype=torch.float32)
    (grad_q_t,) = torch.autograd.grad(o_t.sum(), q_t)
    assert torch.equal(grad_q_t[1], torch.zeros_like(grad_q_t[1])) and torch.isfinite(grad_q_t).all()


class TestBadInput:
    def setup_method(self):
        self.q = torch.randn(2, 4, 5, 16)
        self.k = torch.randn(2, 2, 6, 16)

    def test_heads_must_divide(self):
        with pytest.raises(ValueError, match="k: its 3 heads must divide the 4 heads of q"):
            F.attention_jvp(self.q, torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16))

    def test_head_dim_mismatch(self):
        with pytest.raises(ValueError, match="k: expected shape"):
            F.attention_jvp(self.q, torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8))

    def test_value_shape(self):
        with pytest.raises(ValueError, match=r"v: expected shape \(2, 2, 6, 16\)"):
            F.attention_jvp(self.q, self.k, torch.randn(2, 2, 7, 16))

    def test_tangent_shape(self):
        with pytest.raises(ValueError, match=r"k_t: expected shape \(2, 2, 6, 16\)"):
            F.attention_jvp(self.q, self.k, self.k, k_t=torch.randn(2, 4, 6, 16))

    def test_not_4d(self):
        with pytest.raises(ValueError, match="q: expected a 4-D"):
            F.attention_jvp(self.q[0], self.k, self.k)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="v: expected dtype torch.float32"):
            F.attention_jvp(self.q, self.k, self.k.double())

    def test_mask_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 6\)"):
            F.attention_jvp(self.q, self.k, self.k, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
            F.attention_jvp(self.q, self.k, self.k, key_padding_mask=torch.zeros(2, 6, dtype=torch.int64))

    def test_head_dim_too_large_for_triton(self, device):
        q = torch.randn(1, 1, 3, 264, device=device)
        with pytest.raises(tk.BackendUnavailableError, match="head dims up to 256, got 264"):
            F.attention_jvp(q, q, q, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_primal_output_needs_no_grad_when_only_tangents_do(backend, device):
    device = backend_device(backend, device)
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((1, 2, 2, 7, 7, 16), torch.float32, device)
    o, o_t = F.attention_jvp(q, k, v, q_t.requires_grad_(), k_t, v_t, backend=backend)
    assert not o.requires_grad and o_t.requires_grad
