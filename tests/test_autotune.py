"""Autotuning: keys hold bucketed lengths (variable-length inputs do not retune on each new length),
and configs that overflow the launch device's shared memory are dropped before they run."""

from types import SimpleNamespace

import pytest
import torch

import tangent_kernels.triton as triton_package

if not triton_package.AVAILABLE:
    pytest.skip(triton_package.UNAVAILABLE_REASON, allow_module_level=True)

import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

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


def test_configs_over_the_devices_shared_memory_are_dropped(monkeypatch):
    """In order, and with autotuning off (one wanted) the first that fits runs; none fitting is
    Triton's OutOfResources (the second-order attention then falls back on torch ops)."""

    class Kernel:
        def warmup(self, grid, **kwargs):
            return SimpleNamespace(metadata=SimpleNamespace(shared=kwargs["BLOCK"] * 1000))

    configs = [triton.Config({"BLOCK": block}) for block in (200, 50, 100)]
    args = {"X": torch.empty(1)}
    assert fitting_configs(Kernel(), configs, args) == configs, "off CUDA every config is kept"
    monkeypatch.setattr(triton_package, "shared_memory_limit", lambda device: 101_376)
    assert fitting_configs(Kernel(), configs, args) == configs[1:]
    assert fitting_configs(Kernel(), configs, args, wanted=1) == configs[1:2]
    with pytest.raises(OutOfResources):
        fitting_configs(Kernel(), configs[:1], args)


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
