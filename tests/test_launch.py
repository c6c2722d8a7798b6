"""What a GPU launch needs that the interpreter does not check: the tensors' device made current,
32-bit row offsets that cannot wrap, torch's TF32 setting read as torch 2.14 keeps it; and
launches from several threads taking turns."""

import contextlib
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import tangent_kernels.triton as triton_package

if not triton_package.AVAILABLE:
    pytest.skip(triton_package.UNAVAILABLE_REASON, allow_module_level=True)

from tangent_kernels.triton import attention, attention_second_order, gelu, layer_norm, linear  # noqa: E402

LAUNCHERS = [attention.forward, attention.backward, attention_second_order.primal_grads, layer_norm.forward,
             layer_norm.backward, linear.forward, gelu.forward]  # fmt: skip


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device and its stream: each launcher makes the device of
    its tensors current (a model on cuda:1 while cuda:0 is current read another GPU's memory)."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    on_device = triton_package.launcher(lambda first, second: (first, second, list(entered)))
    assert on_device(SimpleNamespace(device=torch.device("cuda", 1)), 2)[2] == [torch.device("cuda", 1)]
    assert on_device(torch.empty(1), 2)[2] == [torch.device("cuda", 1)], "CPU tensors: no device entered"
    assert all(getattr(launch, "__wrapped__", None) for launch in LAUNCHERS)


def test_launches_from_several_threads_take_turns():
    """``nn.DataParallel`` launches a replica per GPU from threads at once: Triton's autotuner keeps
    the running launch's arguments on itself and the interpreter swaps ``triton.language`` while a
    kernel runs, so concurrent launches crashed ("Did you forget to add @triton.jit?" in 1-2 of
    3-4 threads, every run). Each thread's results equal the same launches run alone."""
    from tangent_kernels import functional

    def launches(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for n in (3, 5, 7):
            x, q = torch.randn(n, 8, generator=g), torch.randn(1, 1, n, 8, generator=g)
            out += functional.layer_norm_jvp(x, x, torch.ones(8), torch.zeros(8), backend="triton")
            out += functional.attention_jvp(q, q, q, q, q, q, backend="triton")
        return out

    alone = [launches(seed) for seed in range(3)]
    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = launches(seed)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as GPUs' short launches would
    try:
        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for seed, expected in enumerate(alone):
        assert all(torch.equal(a, b) for a, b in zip(results[seed], expected, strict=True))


def test_attention_rows_past_32_bit_offsets_are_refused(monkeypatch):
    """Row offsets are 32-bit (``row × row stride``): a tensor whose last row starts past 2**31 - 1
    elements (N = 524288 tokens of 32 heads × 128) would wrap; refused, naming it (here with the
    limit lowered, on tensors that fit in a test)."""
    q = torch.randn(1, 2, 9, 8)  # contiguous: rows 8 apart, the last one ends at element 72
    monkeypatch.setattr(triton_package, "MAX_ROW_OFFSET", 72)
    triton_package.check_row_offsets(q=q)
    monkeypatch.setattr(triton_package, "MAX_ROW_OFFSET", 71)
    with pytest.raises(ValueError, match=r"^q: 9 rows 8 elements apart reach past 2\*\*31 - 1"):
        attention.forward(q, q, q, None, None, None, 0.5, False, None)
    k = torch.randn(1, 9, 2, 8).transpose(1, 2)  # (B, N, H, D) storage: rows 16 apart
    monkeypatch.setattr(triton_package, "MAX_ROW_OFFSET", 130)
    with pytest.raises(ValueError, match=r"^k: 9 rows 16 elements apart"):
        attention.forward(q, k, k, None, None, None, 0.5, False, None)


@pytest.fixture
def matmul_precision():
    """Restores torch's fp32 matmul precision settings after the test."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_tf32_setting_read_through_every_api(matmul_precision):
    """fp32 tiles multiply as TF32 exactly when torch's CUDA matmuls may; once torch's new API had set
    it, reading the legacy ``allow_tf32`` raised, so every fp32 launch failed."""
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    assert triton_package.dot_precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"
    assert triton_package.dot_precision(torch.float32) == "ieee"
    matmul.fp32_precision, torch.backends.fp32_precision = "none", "tf32"  # defers to the global setting
    assert triton_package.dot_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert triton_package.dot_precision(torch.float32) == "ieee"
    matmul.allow_tf32 = True
    assert triton_package.dot_precision(torch.float32) == "tf32"
    assert triton_package.dot_precision(torch.bfloat16) == "tf32"  # 16-bit tiles: unused


def test_gpus_older_than_ampere_are_refused(monkeypatch):
    """The kernels are compiled and checked for sm_80 and newer (bf16 tensor cores, 99 KB or more of
    shared memory): on a T4 or V100 the Triton backend says so, and ``"auto"`` picks another."""
    monkeypatch.setattr(triton_package, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for capability, refused in (((7, 5), True), ((8, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = triton_package.unsupported_reason(torch.device("cuda"), torch.float16)
        assert reason == ("Tesla T4 has compute capability 7.5; the kernels need 8.0 or newer" if refused else "")
    assert triton_package.unsupported_reason(torch.device("cuda", 3), torch.float16) == (
        "device cuda:3 does not exist (1 CUDA GPUs)")  # (torch raised before)
