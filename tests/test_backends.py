"""Backend choice: what "auto" picks, what an unavailable backend says, and life without the extension."""

import subprocess
import sys
import textwrap

import pytest
import torch

import tangent_kernels as tk
from tangent_kernels import backends, cpp
from tangent_kernels import functional as F
from tangent_kernels import triton as triton_backend


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


def test_available_backends_reports_reasons():
    status = tk.available_backends("cpu")
    assert status["reference"] == ""
    assert set(status) == {"triton", "cpp", "reference"}


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
