"""The torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch),
and torch.compile(fullgraph=True) of a linearized model against eager, outputs and gradients."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tangent_kernels as tk
from tangent_kernels import ops


def backends_for(device):
    """(backend, device) pairs to check: C++ on the CPU, Triton where it runs."""
    pairs = [("cpp", torch.device("cpu"))] if tk.cpp.AVAILABLE else []
    return pairs + [("triton", device)]


def op_samples(backend, device):
    """One call per op, with tangents and offsets that require grad."""
    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device).requires_grad_(grad)

    x, w, b = rand(3, 5, 8), rand(8), rand(8)
    ln = (x, rand(3, 5, 8, grad=True), w, b, rand(8, grad=True), rand(8, grad=True), 1e-6, True, backend)
    y, _, mean, rstd = ops.layer_norm_jvp(*(t.detach() if isinstance(t, torch.Tensor) else t for t in ln))
    ln_vjp = (torch.randn_like(y), x, w, mean, rstd, True, True, True, backend)
    q, k, v = rand(2, 4, 7, 16), rand(2, 2, 9, 16), rand(2, 2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    mask[1, -2:] = True
    att = (q, k, v, rand(2, 4, 7, 16, grad=True), rand(2, 2, 9, 16, grad=True), rand(2, 2, 9, 16, grad=True),
           mask, 0.25, True, backend)  # fmt: skip
    o, _, lse = ops.attention_jvp(*(t.detach() if isinstance(t, torch.Tensor) else t for t in att))
    att_vjp = (torch.randn_like(o), q, k, v, o, lse, mask, 0.25, True, True, True, backend)
    gelu = (rand(6, 10), rand(6, 10, grad=True), rand(10), rand(10, grad=True), "tanh", backend)
    rms = (x, rand(3, 5, 8, grad=True), w, None, rand(8, grad=True), None, 1e-6, False, backend)
    samples = [(ops.layer_norm_jvp, ln), (ops.layer_norm_jvp, rms), (ops.layer_norm_vjp, ln_vjp),
               (ops.attention_jvp, att), (ops.attention_vjp, att_vjp), (ops.gelu_jvp, gelu)]  # fmt: skip
    if backend == "triton":  # the fused GEMM is Triton's alone
        linear = (rand(2, 5, 12), rand(2, 5, 12, grad=True), rand(7, 12), rand(7), rand(7, 12, grad=True),
                  rand(7, grad=True), "gelu", backend)  # fmt: skip
        samples.append((ops.linear_jvp, linear))
    return samples


def test_opcheck_every_op(device):
    for backend, on in backends_for(device):
        for op, args in op_samples(backend, on):
            torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    if not tk.cpp.AVAILABLE:
        pytest.skip(tk.cpp.UNAVAILABLE_REASON)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7).eval()
    lin = tk.linearize(model, "all", backend="cpp")
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0.0, 0.05)
    images = torch.randn(2, 3, 32, 32)

    def run(module):
        for p in lin.parameters():
            p.grad = None
        out = module(images)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in lin.parameters()]

    expected, expected_grads = run(lin)
    out, grads = run(torch.compile(lin, fullgraph=True))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_opcheck_the_raw_cpp_ops():
    """The C++ ops registered through their schema (no autograd of their own: the Python ops add it)."""
    if not tk.cpp.AVAILABLE:
        pytest.skip(tk.cpp.UNAVAILABLE_REASON)
    raw = torch.ops.tangent_kernels
    x, x_t, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    y, _, mean, rstd = raw.layer_norm_jvp_forward(x, x_t, w, w, w, w, 1e-6, True)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    o, _, lse = raw.attention_jvp_forward(q, k, k, q, k, k, None, 0.3, False)
    checks = "test_schema", "test_faketensor", "test_aot_dispatch_dynamic"
    for op, args in (
        (raw.layer_norm_jvp_forward, (x, x_t, w, w, w, w, 1e-6, True)),
        (raw.layer_norm_jvp_forward, (x, x_t, w, None, w, None, 1e-6, False)),  # RMSNorm
        (raw.layer_norm_backward, (torch.randn_like(y), x, w, mean, rstd, True, True, True)),
        (raw.attention_jvp_forward, (q, k, k, q, k, k, None, 0.3, False)),
        (raw.attention_backward, (torch.randn_like(o), q, k, k, o, lse, None, 0.3, False, True, True)),
        (raw.gelu_jvp_forward, (x, x_t, w, w, "none")),
    ):
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("global_pool", ["token", "avgmax"])
def test_compiled_forward_ad_level_around_a_linearized_vit(global_pool):
    """``torch.compile`` of a ``forward_ad`` level around a linearized ViT (a tangent along the
    images) equals eager; it raised "Nested forward mode AD is not supported", as the pooling head
    ran ``torch.func.jvp`` inside."""
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7,
                              global_pool=global_pool, class_token=global_pool == "token").eval()  # fmt: skip
    lin = tk.linearize(model, "all", backend="reference")
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0.0, 0.05)

    def streams(images, tangent):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(lin(forward_ad.make_dual(images, tangent)))

    images, tangent = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    expected = streams(images, tangent)
    torch._dynamo.reset()
    for out, e in zip(torch.compile(streams, fullgraph=True)(images, tangent), expected):
        torch.testing.assert_close(out, e, rtol=1e-5, atol=1e-5)


def test_opcheck_second_order_attention_on_transposed_inputs(device):
    """The fake of ``attention_second_order`` gives the real op's (contiguous) strides for inputs
    stored (B, N, H, D), as timm and Hugging Face hand them over; it had copied their strides,
    which ``torch.compile``'s stride checks refuse."""

    def rand(*shape):
        return torch.randn(*shape, device=device).transpose(1, 2)

    q, k, v, q_t, k_t, v_t = rand(2, 5, 4, 16), rand(2, 6, 2, 16), rand(2, 6, 2, 16), rand(2, 5, 4, 16), None, None
    o, _, lse = ops.attention_jvp(q, k, v, q_t, k_t, v_t, None, 0.25, False, "triton")
    args = (q, k, v, q_t, k_t, v_t, torch.randn_like(o), torch.randn_like(o), o, lse, None, 0.25, False, False)
    torch.library.opcheck(ops.attention_second_order, args, test_utils=("test_schema", "test_faketensor"))
