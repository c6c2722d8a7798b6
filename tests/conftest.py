"""Test set-up shared by every test file.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before anything
imports ``tangent_kernels``: without a GPU, Triton kernels run on CPU tensors in the interpreter.
Autotuning collapses to one config (``TANGENT_KERNELS_AUTOTUNE=0``); the other configs are
covered by the compile checks for sm_80 and sm_90 (tests/test_compile_targets.py). The patched
attention and layer-norm router sends small CPU calls to torch's own code for speed; the tests'
calls are small, so they switch that off (``TANGENT_KERNELS_CPU_FUSED_MIN_SCORES=0``,
``TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS=0``) to test the kernels.
"""

import os
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TANGENT_KERNELS_AUTOTUNE", "0")
os.environ.setdefault("TANGENT_KERNELS_CPU_FUSED_MIN_SCORES", "0")  # the tests' small attention runs fused too
os.environ.setdefault("TANGENT_KERNELS_CPU_FUSED_MIN_ELEMENTS", "0")  # and their small layer norms
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per subprocess it starts): workers × torch's threads per core
    # oversubscribe the cores, and OpenMP's spinning threads then slow every worker many times over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where the Triton backend runs: the GPU if there is one, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned_outputs():
    """Fill every uninitialized allocation (Python or C++) with NaN, so an unwritten output fails."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
