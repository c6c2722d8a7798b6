"""Backend choice: what "auto" picks, what an unavailable backend says, and life without the extension."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as torch_F
from torch.autograd import forward_ad

import tangent_kernels as tk
from tangent_kernels import backends, cpp
from tangent_kernels import functional as F
from tangent_kernels import triton as triton_backend

F64 = torch.float64


def layer_norm_inputs():
    x = torch.randn(3, 5)
    return x, torch.randn_like(x), torch.randn(5), torch.randn(5)


def test_auto_picks_cpp_on_cpu():
    if not cpp.AVAILABLE:
        pytest.skip(cpp.UNAVAILABLE_REASON)
    F.layer_norm_jvp(*layer_norm_inputs(), backend="auto")
    assert tk.last_backend("layer_norm_jvp") == "cpp"


def test_explicit_reference_is_recorded():
    F.layer_norm_jvp(*layer_norm_inputs(), backend="reference")
    assert tk.last_backend("layer_norm_jvp") == "reference"


def test_unavailable_cpp_names_the_reason(monkeypatch):
    monkeypatch.setattr(cpp, "AVAILABLE", False)
    monkeypatch.setattr(cpp, "UNAVAILABLE_REASON", "the C++ extension tangent_kernels._C is not built")
    with pytest.raises(tk.BackendUnavailableError, match="backend 'cpp' .* extension tangent_kernels._C is not built"):
        F.layer_norm_jvp(*layer_norm_inputs(), backend="cpp")


def test_auto_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(cpp, "AVAILABLE", False)
    monkeypatch.setattr(cpp, "UNAVAILABLE_REASON", "not built in this test")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="falls back to the reference backend: not built in this test"):
        F.layer_norm_jvp(*layer_norm_inputs(), backend="auto")
    assert tk.last_backend("layer_norm_jvp") == "reference"


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    with pytest.raises(tk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        F.layer_norm_jvp(*layer_norm_inputs(), backend="triton")


def test_dtype_the_backend_lacks(device):
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    with pytest.raises(tk.BackendUnavailableError, match="dtype torch.float64 is not supported"):
        F.layer_norm_jvp(x, None, None, None, backend="triton")


def test_available_backends_reports_reasons(monkeypatch):
    status = tk.available_backends("cpu")
    assert status["reference"] == ""
    assert set(status) == {"triton", "cpp", "reference"}
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):  # (said "float32 is not supported")
        tk.available_backends("cpu", "float32")
    if triton_backend.AVAILABLE:  # a host without a GPU (it raised torch's "Found no NVIDIA driver")
        monkeypatch.setattr(triton_backend, "INTERPRETING", False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert "no CUDA GPU is available" in tk.available_backends("cuda")["triton"]


def test_last_backend_rejects_unknown_op():
    with pytest.raises(ValueError, match="op: expected one of"):
        tk.last_backend("conv_jvp")


def test_package_works_without_the_extension():
    """As after ``TANGENT_KERNELS_SKIP_EXT=1``: imports, runs on the reference, explains cpp."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["tangent_kernels._C"] = None  # makes `from . import _C` raise ImportError
        import torch, tangent_kernels as tk
        from tangent_kernels import functional as F
        x = torch.randn(3, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, y_t = F.layer_norm_jvp(x, x, None, None)
        assert tk.last_backend("layer_norm_jvp") == "reference"
        assert any("tangent_kernels._C" in str(w.message) for w in caught), caught
        try:
            F.layer_norm_jvp(x, x, None, None, backend="cpp")
        except tk.BackendUnavailableError as error:
            assert "TANGENT_KERNELS_SKIP_EXT" in str(error), error
        else:
            raise AssertionError("backend='cpp' ran without the extension")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_cpp_kernels_give_the_same_bits_on_any_thread_count():
    """The C++ kernels split their work into tasks fixed by the shapes, not by the threads (the
    tests' workers run one thread each, so this is where several threads run them; 2000 rows make
    several layer norm and GELU chunks): one and four threads give bit-identical outputs and
    gradients."""
    if not cpp.AVAILABLE:
        pytest.skip(cpp.UNAVAILABLE_REASON)

    def run():
        torch.manual_seed(0)
        attention = [torch.randn(2, 3, 37, 16, dtype=torch.float64, requires_grad=True) for _ in range(6)]
        norm = [torch.randn(2000, 33, requires_grad=True) for _ in range(2)] + [torch.randn(33) for _ in range(2)]
        gelu = [torch.randn(2000, 65), torch.randn(2000, 65, requires_grad=True)]  # (no second order in gelu)
        outputs = [*F.attention_jvp(*attention, backend="cpp"), *F.layer_norm_jvp(*norm, backend="cpp"),
                   *F.gelu_jvp(*gelu, backend="cpp")]  # fmt: skip
        loss = sum(out.square().sum() for out in outputs)
        return outputs + list(torch.autograd.grad(loss, attention + norm[:2] + gelu[1:]))

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(4)
        four = run()
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(one, four, strict=True))


def _forward_ad_calls() -> dict:
    """Per fused op: ``(primal input, the op's primal output as a function of it and a backend, the
    same in plain torch ops)``."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 8, dtype=F64), torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)
    w1, b1, w2, b2 = torch.randn(16, 8, dtype=F64), torch.randn(16, dtype=F64), torch.randn(8, 16, dtype=F64), torch.randn(8, dtype=F64)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=F64) for _ in range(3))
    ones = torch.ones_like(x)
    return {
        "layer_norm_jvp": (x, lambda x, be: F.layer_norm_jvp(x, None, w, b, eps=1e-5, backend=be)[0],
                           lambda x: torch_F.layer_norm(x, (8,), w, b, 1e-5)),
        "rms_norm_jvp": (x, lambda x, be: F.rms_norm_jvp(x, None, w, eps=1e-5, backend=be)[0],
                         lambda x: torch_F.rms_norm(x, (8,), w, 1e-5)),
        "linear_jvp": (x, lambda x, be: F.linear_jvp(x, None, w1, b1, activation="gelu", backend=be)[0],
                       lambda x: torch_F.gelu(torch_F.linear(x, w1, b1))),
        "gelu_jvp": (x, lambda x, be: F.gelu_jvp(x, ones, "tanh", backend=be)[0],
                     lambda x: torch_F.gelu(x, approximate="tanh")),
        "mlp_jvp": (x, lambda x, be: F.mlp_jvp(x, None, w1, b1, w2, b2, backend=be)[0],
                    lambda x: torch_F.linear(torch_F.gelu(torch_F.linear(x, w1, b1)), w2, b2)),
        "attention_jvp": (q, lambda q, be: F.attention_jvp(q, k, v, backend=be)[0],
                          lambda q: torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v),
    }  # fmt: skip


def _jvp_by(api: str, f, x, t):
    if api == "torch.func.jvp":
        return torch.func.jvp(f, (x,), (t,))[1]
    if api == "torch.compile of torch.func.jvp":
        torch._dynamo.reset()
        return torch.compile(lambda x, t: torch.func.jvp(f, (x,), (t,))[1], fullgraph=True)(x, t)
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(f(forward_ad.make_dual(x, t))).tangent


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad", "torch.compile of torch.func.jvp"])
@pytest.mark.parametrize("op", list(_forward_ad_calls()))
def test_forward_ad_through_a_fused_op_runs_the_reference(op, api):
    """The fused ops have no forward-AD rule, and torch dropped the tangent through them without an
    error (a zero tangent: layer norms, MLPs and attention differentiated by torch.func.jvp, e.g. a
    linearized ViT along its images; compiled, torch.compile's trace gave the same zero); ``"auto"``
    now runs the reference there."""
    x, ours, oracle = _forward_ad_calls()[op]
    t = torch.randn_like(x)
    expected = torch.func.jvp(oracle, (x,), (t,))[1]  # eager: compiled, torch's layer norm jvp fails
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(_jvp_by(api, lambda x: ours(x, "auto"), x, t), expected)
    assert tk.last_backend(op) == "reference"


@pytest.mark.skipif(not cpp.AVAILABLE, reason="needs the C++ extension")
@pytest.mark.parametrize("op", list(_forward_ad_calls()))
def test_forward_ad_through_an_explicit_fused_backend_is_refused(op):
    x, ours, _ = _forward_ad_calls()[op]
    name = "q" if op == "attention_jvp" else "x"
    with pytest.raises(tk.BackendUnavailableError, match=f"^{name}: carries a forward-AD tangent"):
        torch.func.jvp(lambda x: ours(x, "cpp"), (x,), (torch.randn_like(x),))
