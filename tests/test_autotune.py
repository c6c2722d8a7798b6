"""Autotuning: keys hold bucketed lengths (variable-length inputs do not retune on each new length),
and configs that overflow the launch device's shared memory are dropped before they run."""

from types import SimpleNamespace

import pytest
import torch

import tangent_kernels.triton as triton_package

if not triton_package.AVAILABLE:
    pytest.skip(triton_package.UNAVAILABLE_REASON, allow_module_level=True)

import triton  # noqa: E402
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

from tangent_kernels.triton import attention, attention_second_order, fitting_configs, length_bucket, linear  # noqa: E402


def test_length_bucket_is_the_next_power_of_two():
    assert [length_bucket(n) for n in (1, 2, 3, 197, 256, 257, 4095)] == [1, 2, 4, 256, 256, 512, 4096]


@pytest.mark.parametrize(
    "tuner, lengths",
    [(attention._attention_jvp_fwd, attention.LENGTHS), (attention._attention_bwd_dkdv, attention.LENGTHS),
     (attention._attention_bwd_dq, attention.LENGTHS), (attention_second_order._dkdv, attention.LENGTHS),
     (linear._linear_jvp, ("M",))],
)  # fmt: skip
def test_lengths_in_one_bucket_share_the_key(tuner, lengths):
    """The key the autotuner caches its choice under, for two lengths of one bucket and one of the next."""

    def key(length):
        return tuple(length if name in lengths else f"value of {name}" for name in tuner.keys)

    tuner.cache.clear()
    tuner.cache[key(197)] = "config"
    assert key(256) in tuner.cache and tuner.cache.get(key(129)) == "config"
    assert key(257) not in tuner.cache
    tuner.cache.clear()


class Kernel:
    """A compiled kernel's interface as ``fitting_configs`` uses it: ``warmup`` takes the launch grid
    and hands ``warmup=True`` on (so a ``grid`` or ``warmup`` among the arguments is a TypeError, as
    in Triton); its shared memory is 1000 bytes per unit of ``BLOCK``; ``BLOCK=13`` fails in ptxas."""

    arg_names = ["X"]

    def warmup(self, *args, grid, **kwargs):
        return self.run(*args, grid=grid, warmup=True, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        if kwargs["BLOCK"] == 13:
            raise PTXASError("ptxas fatal: no such register")
        return SimpleNamespace(metadata=SimpleNamespace(shared=kwargs["BLOCK"] * 1000))


def test_configs_over_the_devices_shared_memory_are_dropped(monkeypatch):
    """In order, and with autotuning off (one wanted) the first that fits runs; none fitting is
    Triton's OutOfResources (the second-order attention then falls back on torch ops)."""

    configs = [triton.Config({"BLOCK": block}) for block in (200, 50, 100)]
    args = {"X": torch.empty(1), "grid": (7,), "warmup": False}  # as Triton's autotuner hands them to a pruner
    assert fitting_configs(Kernel(), configs, args) == configs, "off CUDA every config is kept"
    monkeypatch.setattr(triton_package, "shared_memory_limit", lambda device: 101_376)
    assert fitting_configs(Kernel(), configs, args) == configs[1:]
    assert fitting_configs(Kernel(), configs, args, wanted=1) == configs[1:2]
    with pytest.raises(OutOfResources):
        fitting_configs(Kernel(), configs[:1], args)


def test_configs_that_do_not_compile_are_dropped(monkeypatch):
    """A config ptxas refuses on the launch device is skipped, as Triton's autotuner skips it; if no
    config compiles, the compile error."""
    monkeypatch.setattr(triton_package, "shared_memory_limit", lambda device: 101_376)
    configs = [triton.Config({"BLOCK": block}) for block in (13, 50)]
    assert fitting_configs(Kernel(), configs, {"X": torch.empty(1)}, wanted=1) == configs[1:]
    with pytest.raises(PTXASError):
        fitting_configs(Kernel(), configs[:1], {"X": torch.empty(1)})


def test_a_launch_on_a_gpu_prunes_with_the_kernels_own_arguments(monkeypatch):
    """A real launch through Triton's autotuner (interpreted), with the shared-memory check on as on
    a GPU: the pruner got the launch's ``grid`` and ``warmup`` too, and handed them to ``warmup``,
    a TypeError at the first launch of every autotuned kernel on a GPU."""
    if not triton_package.INTERPRETING:
        pytest.skip("drives the interpreter's launch")
    monkeypatch.setattr(triton_package, "shared_memory_limit", lambda device: 101_376)
    tuner = attention._attention_jvp_fwd
    compiled = []

    def warmup(*args, grid, **kwargs):  # the interpreter compiles nothing: check and record what it was given
        assert not args and set(kwargs) <= {*tuner.fn.arg_names, *triton.Config({}).all_kwargs()}, sorted(kwargs)
        compiled.append(kwargs)
        return SimpleNamespace(metadata=SimpleNamespace(shared=0))

    monkeypatch.setattr(tuner.fn, "warmup", warmup)
    tuner.cache.clear()
    q = torch.randn(1, 2, 5, 16)
    try:
        attention.forward(q, q, q, q, None, None, 0.25, False, None)
    finally:
        tuner.cache.clear()
    assert len(compiled) == 1 and {"Q", "BLOCK_M", "num_warps"} <= set(compiled[0])


@pytest.mark.parametrize("head_dim, width", [(64, 64), (72, 96), (80, 96), (96, 96), (40, 48), (128, 128), (160, 192)])
def test_split_head_dims_take_their_own_tile_lists(head_dim, width):
    """A head dim run as two column blocks (``head_dim_blocks``) takes the list of its split width
    (``tile_width``), whose first config was chosen spill-free for both blocks' tiles."""
    block_d, block_d2 = attention.head_dim_blocks(head_dim)
    assert attention.tile_width(block_d, block_d2) == width
    prune = attention._pruner(attention._FWD_CONFIGS)
    args = {"Q": torch.empty(1, dtype=torch.bfloat16), "head_dim": head_dim, "DOT_PRECISION": "tf32"}
    kept = prune(attention._configs(attention._FWD_CONFIGS), args, BLOCK_D=block_d, BLOCK_D2=block_d2)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == \
        attention._FWD_CONFIGS["16-bit"][width]
