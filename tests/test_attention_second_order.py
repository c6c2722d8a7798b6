"""Second-order attention: the gradient of o_t with respect to q, k, v, and the double backward of the VJP.

Oracles: autograd of ``reference.attention_jvp`` and torch's math SDPA, in float64, on tiny odd shapes
(Lq = 5, Lk = 7, grouped-query heads).
"""

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as torch_F
from timm.layers import Attention, LayerNorm, Mlp
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tangent_kernels as tk
from helpers import CompositeLayerNorm, assert_close, backend_device, max_error, max_relative_error
from tangent_kernels import cpp, ops, reference
from tangent_kernels import functional as F
from tangent_kernels.attention_second_order import primal_grads
from tangent_kernels.memory import saved_tensor_bytes
from tangent_kernels.patching import fused_attention

SHAPE = (1, 2, 1, 5, 7, 4)  # batch, q heads, kv heads (grouped-query), q len, k len, head dim
VARIANTS = ["plain", "causal", "bool_mask", "additive_mask"]


def make_inputs(shape=SHAPE, variant="plain", dtype=torch.float64, device="cpu"):
    """``(q, k, v, q_t, k_t, v_t)`` requiring grad, and the options of ``variant``."""
    batch, hq, hkv, lq, lk, d = shape
    q, q_t = (torch.randn(batch, hq, lq, d, dtype=dtype, device=device) for _ in range(2))
    k, v, k_t, v_t = (torch.randn(batch, hkv, lk, d, dtype=dtype, device=device) for _ in range(4))
    mask = None
    if variant == "bool_mask":
        mask = torch.rand(batch, lk, device=device) < 0.4
        mask[:, 0] = False  # every row keeps a key (fully masked rows: their own test)
    elif variant == "additive_mask":
        mask = torch.randn(batch, lk, dtype=dtype, device=device).requires_grad_()
    tensors = tuple(t.requires_grad_() for t in (q, k, v, q_t, k_t, v_t))
    return tensors, dict(causal=variant == "causal", key_padding_mask=mask)


def differentiable(tensors, options):
    """The inputs gradcheck perturbs: the six tensors and an additive mask."""
    mask = options["key_padding_mask"]
    return tensors + ((mask,) if mask is not None and mask.requires_grad else ())


def attention(backend, options):
    """``functional.attention_jvp`` as a function of the ``differentiable`` inputs."""

    def run(q, k, v, q_t, k_t, v_t, *mask):
        kwargs = {**options, "key_padding_mask": mask[0] if mask else options["key_padding_mask"]}
        return F.attention_jvp(q, k, v, q_t, k_t, v_t, backend=backend, **kwargs)

    return run


def skip_unless_cpp(backend):
    if backend == "cpp" and not cpp.AVAILABLE:
        pytest.skip(cpp.UNAVAILABLE_REASON)


# ----------------------------------------------------------------------------------------------
# the chunked second-order function against autograd of the reference


@pytest.mark.parametrize("shape", [SHAPE, (2, 4, 2, 9, 6, 8)], ids=str)  # Lq < Lk and Lq > Lk
@pytest.mark.parametrize("variant", VARIANTS)
def test_primal_grads_match_autograd_of_reference(variant, shape):
    """``<G_o, O> + <G, O_t>`` differentiated w.r.t. q, k, v (and an additive mask), blocks of 2 rows."""
    (q, k, v, q_t, k_t, v_t), options = make_inputs(shape, variant)
    mask = options["key_padding_mask"]
    o, o_t = reference.attention_jvp(q, k, v, q_t, k_t, v_t, scale=0.3, **options)
    grad_o, grad_o_t = torch.randn_like(o), torch.randn_like(o_t)
    wanted = (q, k, v) + ((mask,) if variant == "additive_mask" else ())
    expected = torch.autograd.grad((grad_o * o).sum() + (grad_o_t * o_t).sum(), wanted)
    ours = primal_grads(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, scale=0.3,
                        mask_grad=variant == "additive_mask", rows=2, **options)  # fmt: skip
    for name, a, b in zip(("q", "k", "v", "mask"), ours, expected):
        assert max_error(a, b) < 1e-12, name


@pytest.mark.parametrize("given", ["q_t", "k_t", "v_t", "q_t,k_t"])
def test_primal_grads_with_some_tangents_none(given):
    (q, k, v, q_t, k_t, v_t), options = make_inputs(variant="causal")
    tangents = {"q_t": q_t, "k_t": k_t, "v_t": v_t}
    tangents = {name: (t if name in given.split(",") else None) for name, t in tangents.items()}
    o_t = reference.attention_jvp(q, k, v, *tangents.values(), scale=0.5, **options)[1]
    grad_o_t = torch.randn_like(o_t)
    expected = torch.autograd.grad(o_t, (q, k, v), grad_o_t, materialize_grads=True)  # o_t = P V_t: no v
    ours = primal_grads(q, k, v, *tangents.values(), None, grad_o_t, scale=0.5, rows=3, **options)
    assert ours[3] is None
    for name, a, b in zip("qkv", ours, expected):
        assert max_error(a, b) < 1e-12, name


def test_fully_masked_rows_give_zero_and_finite_gradients():
    """Batch 1 has every key masked; in batch 0, key 0 is masked, so causal row 0 sees no key."""
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((2, 2, 1, 5, 4, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    mask[0, 0] = True
    grad_o, grad_o_t = torch.randn_like(q), torch.randn_like(q)
    ours = primal_grads(q, k, v, q_t, k_t, v_t, grad_o, grad_o_t, scale=0.5, causal=True,
                        key_padding_mask=mask, rows=2)[:3]  # fmt: skip
    for g in ours:
        assert torch.isfinite(g).all() and not g[1].any()
    assert not ours[0][0, :, 0].any()
    # The reference's own gradient is NaN in a fully masked row whose upstream exceeds about 2: its
    # softmax divides by the zero sum clamped to finfo.tiny, and 1/tiny times that overflows. With
    # those rows' upstream zeroed it is the oracle.
    seen = torch.ones(2, 1, 5, 1, dtype=torch.float64)
    seen[1], seen[0, :, 0] = 0, 0
    o, o_t = reference.attention_jvp(q, k, v, q_t, k_t, v_t, scale=0.5, causal=True, key_padding_mask=mask)
    expected = torch.autograd.grad((grad_o * seen * o).sum() + (grad_o_t * seen * o_t).sum(), (q, k, v))
    for name, a, b in zip("qkv", ours, expected):
        assert max_error(a, b) < 1e-12, name


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fully_masked_batch_through_the_fused_op(backend, device, poisoned_outputs):
    skip_unless_cpp(backend)
    device = backend_device(backend, device)
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((2, 2, 1, 5, 7, 8), dtype=torch.float32, device=device)
    mask = torch.zeros(2, 7, dtype=torch.bool, device=q.device)
    mask[1] = True
    _, o_t = F.attention_jvp(q, k, v, q_t, k_t, v_t, key_padding_mask=mask, backend=backend)
    grads = torch.autograd.grad(o_t, (q, k, v, q_t, k_t, v_t), torch.randn_like(o_t))
    for g in grads:
        assert torch.isfinite(g).all() and not g[1].any()


# ----------------------------------------------------------------------------------------------
# gradcheck of every output w.r.t. every input through the public function


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_and_gradgradcheck(backend, variant, poisoned_outputs):
    skip_unless_cpp(backend)
    tensors, options = make_inputs(variant=variant)
    inputs, run = differentiable(tensors, options), attention(backend, options)
    assert torch.autograd.gradcheck(run, inputs)
    assert tk.last_backend("attention_jvp") == backend
    assert torch.autograd.gradgradcheck(run, inputs, fast_mode=True)


def first_and_second_derivatives(run, inputs, probes):
    """``L = <G_o, o> + <G, o_t>``; its gradient ``g`` w.r.t. ``inputs`` (graph kept) and the gradient
    of ``Σ <W_i, g_i>`` w.r.t. ``inputs`` (every second derivative meets it)."""
    o, o_t = run(*inputs)
    grad_o, grad_o_t, weights = probes
    first = torch.autograd.grad((grad_o * o).sum() + (grad_o_t * o_t).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, first)), inputs)
    return first, second


@pytest.mark.parametrize("variant", ["plain", "causal", "additive_mask"])
def test_triton_first_and_second_derivatives(variant, device, poisoned_outputs):
    """Triton runs fp32 only (gradcheck needs float64): its derivatives against float64 autograd of the
    reference. The second derivatives run the fused forward (``J·g``) and backward (``Jᵀ·dO``) kernels."""
    tensors, options = make_inputs((1, 2, 1, 5, 7, 8), variant, torch.float32, device)
    inputs = differentiable(tensors, options)
    weights = [torch.randn_like(t) for t in inputs]
    probes = (torch.randn_like(tensors[0]), torch.randn_like(tensors[0]), weights)
    ours = first_and_second_derivatives(attention("triton", options), inputs, probes)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    mask64 = inputs64[6] if len(inputs64) > 6 else options["key_padding_mask"]
    probes64 = (probes[0].double(), probes[1].double(), [w.double() for w in probes[2]])
    expected = first_and_second_derivatives(attention("reference", {**options, "key_padding_mask": mask64}),
                                            inputs64, probes64)  # fmt: skip
    for order, ours_n, expected_n in zip(("first", "second"), ours, expected):
        for i, (a, b) in enumerate(zip(ours_n, expected_n)):
            assert max_relative_error(a, b) < 2e-5, f"{order} derivative, input {i}"


# ----------------------------------------------------------------------------------------------
# the fused backend keeps serving when primal inputs require grad


def test_auto_keeps_the_fused_backend_when_a_primal_input_requires_grad():
    skip_unless_cpp("cpp")
    (q, k, v, q_t, k_t, v_t), options = make_inputs(variant="additive_mask")
    F.attention_jvp(q, k, v, q_t, k_t, v_t, **options)
    assert tk.last_backend("attention_jvp") == "cpp"


def test_no_tangent_given_still_serves_the_primal_gradient():
    """With every tangent ``None`` the additive mask's gradient comes from the primal stream alone."""
    skip_unless_cpp("cpp")
    (q, k, v, *_), options = make_inputs(variant="additive_mask")
    o, o_t = F.attention_jvp(q, k, v, backend="cpp", **options)
    assert o_t is None
    expected = reference.attention_jvp(q, k, v, None, None, None, **options)[0]
    grad_o = torch.randn_like(o)
    ours = torch.autograd.grad(o, (q, k, v, options["key_padding_mask"]), grad_o)
    oracle = torch.autograd.grad(expected, (q, k, v, options["key_padding_mask"]), grad_o)
    for a, b in zip(ours, oracle):
        assert max_error(a, b) < 1e-12


# ----------------------------------------------------------------------------------------------
# fused_attention (tangent_kernels.patching): the VJP op's double backward


def math_sdpa(q, k, v, causal=False):
    with sdpa_kernel(SDPBackend.MATH):
        return torch_F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_gradgradcheck(causal):
    """The VJP op returns no gradient for its ``o`` and ``lse`` inputs; a double count would fail here."""
    skip_unless_cpp("cpp")
    q, k, v = make_inputs()[0][:3]
    run = functools.partial(fused_attention, causal=causal, backend="cpp")
    assert torch.autograd.gradgradcheck(run, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_functional_jvp_create_graph_matches_math_sdpa(causal, monkeypatch):
    """The double-backward JVP of public MeanFlow ports, and a loss on its outputs differentiated again."""
    skip_unless_cpp("cpp")
    q, k, v = make_inputs()[0][:3]
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    calls = []
    monkeypatch.setattr(ops, "primal_grads", lambda *a, **kw: calls.append(1) or primal_grads(*a, **kw))
    results = {}
    for name, f in (("ours", fused_attention), ("math", math_sdpa)):
        f = functools.partial(f, causal=causal)
        o, o_t = torch.autograd.functional.jvp(f, (q, k, v), tangents, create_graph=True)
        loss = (o * o_t).sum() + o_t.square().sum()
        results[name] = (o, o_t, *torch.autograd.grad(loss, (q, k, v)))
    for name, a, b in zip(("o", "o_t", "grad q", "grad k", "grad v"), results["ours"], results["math"]):
        assert max_relative_error(a, b) < 1e-12, name
    # the JVP's own backward asks for the gradient of its upstream only: the second-order term for
    # q, k, v runs once, for the loss
    assert len(calls) == 1


def test_func_grad_of_func_jvp_matches_math_sdpa():
    """``torch.func.grad`` around ``torch.func.jvp``: torch.func refuses the fused ops' registered
    backward (pytorch/pytorch#168393, #179652), so ``auto`` runs plain torch ops there (said once)
    and an explicit fused backend refuses."""
    skip_unless_cpp("cpp")
    q, k, v = (t.detach() for t in make_inputs()[0][:3])
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def loss(f):
        def run(q, k, v):
            o, o_t = torch.func.jvp(f, (q, k, v), tangents)
            return (o * o_t).sum() + o_t.square().sum()

        return torch.func.grad(run, argnums=(0, 1, 2))

    expected = loss(math_sdpa)(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process note that plain ops run
        ours = loss(fused_attention)(q, k, v)
    for a, b in zip(ours, expected):
        assert max_relative_error(a, b) < 1e-12
    with pytest.raises(tk.backends.BackendUnavailableError, match="backend 'cpp'.*torch.func transforms"):
        loss(lambda *x: fused_attention(*x, backend="cpp"))(q, k, v)


# ----------------------------------------------------------------------------------------------
# a DiT block (timm parts, adaLN modulation) through the MeanFlow JVP


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TinyDiT(nn.Module):
    """Patch embedding, a sinusoidal time embedding, one adaLN-Zero-style DiT block, a linear head."""

    def __init__(self, channels=3, dim=16, heads=2):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.time = Mlp(dim, dim, dim, act_layer=nn.SiLU)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = LayerNorm(dim, affine=False)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = LayerNorm(dim, affine=False)
        self.mlp = Mlp(dim, 2 * dim, act_layer=functools.partial(nn.GELU, approximate="tanh"))
        self.head = nn.Linear(dim, channels)

    def time_features(self, t):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.dim // 2, dtype=t.dtype) / (self.dim // 2))
        angles = t[:, None] * freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, z, t):
        c = self.time(self.time_features(t))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(c).chunk(6, dim=-1)
        x = self.embed(z)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return self.head(x)


def meanflow_step(model, z, t, v):
    """``u, du/dt`` along ``(v, 1)`` by ``torch.autograd.functional.jvp(create_graph=True)``, a loss on
    both, and its gradients w.r.t. every parameter."""
    u, du = torch.autograd.functional.jvp(model, (z, t), (v, torch.ones_like(t)), create_graph=True)
    loss = (u - (v - 0.3 * du)).square().mean() + (u * du).mean()
    return u, du, torch.autograd.grad(loss, list(model.parameters()))


def test_dit_block_meanflow_jvp_matches_the_float64_oracle():
    """The double-backward form through a patched DiT block, a loss on ``du/dt`` included, equals
    the unpatched block with explicit softmax attention and composite layer norms."""
    skip_unless_cpp("cpp")
    torch.manual_seed(0)
    model = TinyDiT().double()
    z, v = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    oracle = copy.deepcopy(model)
    oracle.attn.fused_attn = False  # timm's explicit softmax attention
    oracle.norm1, oracle.norm2 = CompositeLayerNorm(model.norm1.eps), CompositeLayerNorm(model.norm2.eps)
    expected = meanflow_step(oracle, z, t, v)
    with tk.patched(model):
        ours = meanflow_step(model, z, t, v)
        assert tk.last_backend("attention_jvp") == "cpp"
    assert max_relative_error(ours[0], expected[0]) < 1e-12
    assert max_relative_error(ours[1], expected[1]) < 1e-12
    for (name, _), a, b in zip(model.named_parameters(), ours[2], expected[2]):
        assert max_relative_error(a, b) < 1e-10, name


# ----------------------------------------------------------------------------------------------
# saved memory


def nbytes(*tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("tokens", [7, 256])
def test_saved_memory(tokens):
    """Frozen q, k, v (TAFT): q, k, v, o, lse are saved, as before the second-order path. Primal
    inputs requiring grad add the three tangents, O(N); the reference saves N×N probabilities."""
    skip_unless_cpp("cpp")
    (q, k, v, q_t, k_t, v_t), _ = make_inputs((1, 2, 1, tokens, tokens, 8), dtype=torch.float32)
    primal = tuple(t.detach() for t in (q, k, v))
    saved, (o, _) = saved_tensor_bytes(lambda: F.attention_jvp(*primal, q_t, k_t, v_t, backend="cpp"))
    lse_bytes = 2 * tokens * 4
    assert saved == nbytes(*primal, o) + lse_bytes
    second_order, _ = saved_tensor_bytes(lambda: F.attention_jvp(q, k, v, q_t, k_t, v_t, backend="cpp"))
    assert second_order == saved + nbytes(q_t, k_t, v_t)
    by_reference, _ = saved_tensor_bytes(lambda: F.attention_jvp(q, k, v, q_t, k_t, v_t, backend="reference"))
    assert by_reference >= 2 * tokens * tokens * 4  # at least one (B, H, N, N) fp32 tensor
    if tokens == 256:
        assert second_order < by_reference / 10


# ----------------------------------------------------------------------------------------------
# the fused Triton kernels of the second-order backward (used where nothing differentiates further)

TRITON_CASES = [
    # (shape, variant, tangents given, grad_o given)
    ((1, 2, 1, 5, 7, 8), "plain", "q_t,k_t,v_t", True),
    ((2, 4, 2, 37, 45, 32), "causal", "q_t,k_t,v_t", True),  # several query and key tiles, grouped heads
    ((2, 2, 2, 19, 40, 16), "bool_mask", "q_t,k_t,v_t", True),
    ((2, 2, 1, 20, 33, 16), "additive_mask", "q_t,k_t,v_t", True),
    ((1, 2, 1, 20, 33, 16), "plain", "v_t", False),  # O_t = P V_t: nothing reaches v
    ((1, 2, 1, 40, 17, 16), "causal", "k_t", True),  # Lq > Lk
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_kernels_match_the_chunked_recomputation(case, device, poisoned_outputs):
    from tangent_kernels.triton import attention as triton_attention
    from tangent_kernels.triton import attention_second_order as triton_second_order

    shape, variant, given, with_grad_o = case
    (q, k, v, *tangents), options = make_inputs(shape, variant, torch.float32, device)
    q, k, v = (t.detach() for t in (q, k, v))
    names = ("q_t", "k_t", "v_t")
    tangents = [t.detach() if name in given.split(",") else None for name, t in zip(names, tangents)]
    mask, causal, scale = options["key_padding_mask"], options["causal"], shape[-1] ** -0.5
    if variant == "bool_mask":
        mask[-1] = True  # the last batch has every key masked
    mask = None if mask is None else mask.detach()
    grad_o, grad_o_t = torch.randn_like(q) if with_grad_o else None, torch.randn_like(q)
    o, _, lse = triton_attention.forward(q, k, v, None, None, None, scale, causal, mask)
    ours = triton_second_order.primal_grads(q, k, v, *tangents, grad_o, grad_o_t, o, lse, scale, causal, mask,
                                            variant == "additive_mask")  # fmt: skip
    exact = primal_grads(*(None if t is None else t.double() for t in (q, k, v, *tangents, grad_o, grad_o_t)),
                         scale=scale, causal=causal, key_padding_mask=None if mask is None else mask.cpu(),
                         mask_grad=variant == "additive_mask")  # fmt: skip
    for name, a, b in zip(("q", "k", "v", "mask"), ours, exact):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all() and max_relative_error(a.cpu(), b.cpu()) < 1e-5, name


def spy_on_the_triton_kernels(monkeypatch) -> list:
    from tangent_kernels.triton import attention_second_order as triton_second_order

    calls, launch = [], triton_second_order.primal_grads
    monkeypatch.setattr(triton_second_order, "primal_grads", lambda *a: calls.append(1) or launch(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["causal", "additive_mask"])
def test_triton_second_order_backward_through_the_op(variant, dtype, device, poisoned_outputs, monkeypatch):
    """Every input's gradient of ``<G_o, o> + <G, o_t>`` against float64, with the bound of
    helpers.assert_close: twice the error of the reference evaluated in ``dtype``, plus atol."""
    calls = spy_on_the_triton_kernels(monkeypatch)
    tensors, options = make_inputs((1, 2, 1, 33, 47, 32), variant, dtype, device)
    inputs = differentiable(tensors, options)
    grad_o, grad_o_t = torch.randn_like(tensors[0]), torch.randn_like(tensors[0])

    def gradients(backend, inputs):
        o, o_t = attention(backend, options)(*inputs)
        loss = (grad_o.to(o.dtype) * o).sum() + (grad_o_t.to(o.dtype) * o_t).sum()
        return torch.autograd.grad(loss, inputs)

    ours = gradients("triton", inputs)
    assert calls, "the fused second-order kernels did not run"
    exact = gradients("reference", tuple(t.detach().double().requires_grad_() for t in inputs))
    same_dtype = gradients("reference", tuple(t.detach().requires_grad_() for t in inputs))
    for name, a, b, c in zip(("q", "k", "v", "q_t", "k_t", "v_t", "mask"), ours, exact, same_dtype):
        assert_close(a, b, c, name=f"grad {name}")


def test_triton_hessian_vector_product_of_fused_attention(device, poisoned_outputs, monkeypatch):
    """The VJP op's double backward without create_graph runs the fused kernels (upstream ``grad_out``,
    tangents the vector); against float64 math SDPA."""
    calls = spy_on_the_triton_kernels(monkeypatch)
    q, k, v = make_inputs((1, 2, 1, 33, 47, 32), dtype=torch.float32, device=device)[0][:3]
    grad_o, vector = torch.randn_like(q), [torch.randn_like(t) for t in (q, k, v)]

    def hvp(f, inputs):
        first = torch.autograd.grad(f(*inputs), inputs, grad_o.to(inputs[0].dtype), create_graph=True)
        return torch.autograd.grad(sum((w.to(g.dtype) * g).sum() for w, g in zip(vector, first)), inputs)

    ours = hvp(functools.partial(fused_attention, causal=True, backend="triton"), (q, k, v))
    assert calls, "the fused second-order kernels did not run"
    inputs64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    expected = hvp(functools.partial(math_sdpa, causal=True), inputs64)
    for name, a, b in zip("qkv", ours, expected):
        assert max_relative_error(a, b) < 2e-5, name


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck_with_primal_inputs_requiring_grad(backend, device):
    """Schema, fake tensors, autograd registration and AOT dispatch (which traces the new backward
    formulas) of the attention ops where q, k, v and an additive mask require grad."""
    skip_unless_cpp(backend)
    (q, k, v, q_t, k_t, v_t), options = make_inputs((1, 2, 1, 5, 7, 16), "additive_mask", torch.float32,
                                                    backend_device(backend, device))  # fmt: skip
    mask = options["key_padding_mask"]
    torch.library.opcheck(ops.attention_jvp, (q, k, v, q_t, k_t, v_t, mask, 0.25, True, backend))
    o, _, lse = ops.attention_jvp(*(t.detach() for t in (q, k, v, q_t, k_t, v_t, mask)), 0.25, True, backend)
    grad_o = torch.randn_like(o).requires_grad_()
    torch.library.opcheck(ops.attention_vjp, (grad_o, q, k, v, o, lse, mask, 0.25, True, True, True, backend))
    if backend == "triton":
        detached = (t.detach() for t in (q, k, v, q_t, k_t, v_t))
        args = (*detached, torch.randn_like(o), torch.randn_like(o), o, lse, mask.detach(), 0.25, True, True)
        torch.library.opcheck(ops.attention_second_order, args)


def test_fused_kernels_leave_fp32_head_dim_256_to_the_recomputation():
    """fp32 tiles at head dim 256 do not fit (triton/attention_second_order.py, configs)."""
    from tangent_kernels.triton.attention_second_order import serves

    assert serves(torch.bfloat16, 256) and serves(torch.float16, 200) and serves(torch.float32, 128)
    assert not serves(torch.float32, 256) and not serves(torch.float32, 130)


def test_kernels_that_do_not_fit_the_gpu_leave_the_term_to_the_recomputation(device, monkeypatch):
    """A GPU whose shared memory the fused second-order tiles exceed (fp32 TF32 tiles at head dim 128
    need 112 KB; sm_86/89 have 99 KB): Triton raises OutOfResources at launch, the term runs in torch
    ops, with one warning, and the gradients are the same."""
    from triton.runtime.errors import OutOfResources

    from tangent_kernels.triton import attention_second_order as triton_second_order

    def out_of_resources(*args):
        raise OutOfResources(114688, 101376, "shared memory")

    tensors, options = make_inputs((1, 2, 1, 9, 11, 16), "causal", torch.float32, device)
    inputs = differentiable(tensors, options)
    grad_o_t = torch.randn_like(tensors[0])

    def gradients():
        return torch.autograd.grad((grad_o_t * attention("triton", options)(*inputs)[1]).sum(), inputs)

    expected = gradients()
    monkeypatch.setattr(tk.backends, "_warned", set())
    monkeypatch.setattr(triton_second_order, "primal_grads", out_of_resources)
    with pytest.warns(UserWarning, match="second-order attention kernels do not fit this GPU"):
        found = gradients()
    for a, b in zip(found, expected):
        assert max_relative_error(a, b) < 1e-5
