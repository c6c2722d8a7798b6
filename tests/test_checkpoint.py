"""Offsets checkpoints: the base fingerprint (architecture and weights), header checks, and exact
dtypes and shapes on load."""

import functools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tangent_kernels as tk
from tangent_kernels import checkpoint


def tiny_vit(seed=0, **changes):
    torch.manual_seed(seed)
    args = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                num_classes=5)  # fmt: skip
    return VisionTransformer(**{**args, **changes}).double().eval()


def with_random_offsets(lin, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return lin


class Tiny(nn.Module):
    """One frozen weight and one offset of a chosen dtype and shape: the smallest linearized module."""

    def __init__(self, dtype=torch.float64, shape=(3,)):
        super().__init__()
        self.register_buffer("weight0", torch.ones(3, dtype=torch.float64), persistent=False)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=dtype.is_floating_point)


def test_offsets_round_trip_and_report_no_incompatible_keys(tmp_path):
    lin = with_random_offsets(tk.linearize(tiny_vit(), 1, backend="reference"))
    tk.save_offsets(lin, tmp_path / "dw.safetensors", {"note": "x"})
    restored = tk.linearize(tiny_vit(), 1, backend="reference")
    keys = tk.load_offsets(restored, tmp_path / "dw.safetensors")
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), restored.parameters()))


# Each keeps every weight (same seed, same shapes) and changes the function.
ARCHITECTURE_CHANGES = {
    "num_heads": dict(num_heads=4),
    "layer norm eps": dict(norm_layer=functools.partial(nn.LayerNorm, eps=1e-2)),
    "gelu approximation": dict(act_layer=functools.partial(nn.GELU, approximate="tanh")),
    "pooling": dict(global_pool="avg", fc_norm=False),
}


@pytest.mark.parametrize("change", ARCHITECTURE_CHANGES)
@pytest.mark.parametrize("blocks", [1, "all"])
def test_same_weights_under_another_architecture_are_refused(tmp_path, change, blocks):
    base, other = tiny_vit(), tiny_vit(**ARCHITECTURE_CHANGES[change])
    weights, other_weights = base.state_dict(), other.state_dict()
    assert list(weights) == list(other_weights)
    assert all(torch.equal(weights[k], other_weights[k]) for k in weights)
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert not torch.allclose(base(images), other(images))  # the change matters
    lin = with_random_offsets(tk.linearize(base, blocks, backend="reference"))
    tk.save_offsets(lin, tmp_path / "dw.safetensors")
    with pytest.raises(tk.BaseMismatchError, match="architecture"):
        tk.load_offsets(tk.linearize(other, blocks, backend="reference"), tmp_path / "dw.safetensors")


def test_other_weights_are_refused(tmp_path):
    tk.save_offsets(tk.linearize(tiny_vit(), 1), tmp_path / "dw.safetensors")
    with pytest.raises(tk.BaseMismatchError, match="frozen weights"):
        tk.load_offsets(tk.linearize(tiny_vit(seed=1), 1), tmp_path / "dw.safetensors")


def test_fingerprint_ignores_mode_offsets_backend_and_use():
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    before = tk.base_fingerprint(lin)
    lin.train()
    with_random_offsets(lin, seed=3)
    lin(torch.randn(2, 1, 8, 8, dtype=torch.float64)).sum().backward()
    assert tk.base_fingerprint(lin) == before
    assert tk.base_fingerprint(tk.linearize(tiny_vit(), 1, backend="auto")) == before
    text = "\n".join(checkpoint.architecture(lin))
    assert "0x" not in text and " at " not in text  # no memory address: the same in every process
    assert "num_heads = 2" in text and "eps = 1e-06" in text and "pool_type='token'" in text


def test_describe_is_exact_for_settings_and_never_shows_an_address():
    assert checkpoint.describe(functools.partial(nn.GELU, approximate="tanh")) == (
        "partial(torch.nn.modules.activation.GELU, approximate='tanh')"
    )
    assert checkpoint.describe((1, 2.5, None, True, torch.float16)) == "(1, 2.5, None, True, torch.float16)"
    assert checkpoint.describe(object()) == "<builtins.object>"


@pytest.mark.parametrize("key", checkpoint.RESERVED_KEYS)
def test_reserved_metadata_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="reserved"):
        tk.save_offsets(Tiny(), tmp_path / "dw.safetensors", {key: "0" * 64})


def test_metadata_must_map_str_to_str(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        tk.save_offsets(Tiny(), tmp_path / "dw.safetensors", {"epoch": 3})


def header_of(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


HEADER_DAMAGE = {
    "no header": (lambda h: None, "format"),
    "no format": (lambda h: {k: v for k, v in h.items() if k != "format"}, "format"),
    "another format": (lambda h: {**h, "format": "something/else"}, "not a tangent_kernels offsets file"),
    "old format": (lambda h: {**h, "format": "tangent_kernels.offsets/1"}, "save them again"),
    "no fingerprint": (lambda h: {k: v for k, v in h.items() if k != "base_fingerprint"}, "base_fingerprint"),
    "non-hex fingerprint": (lambda h: {**h, "base_fingerprint": "z" * 64}, "base_fingerprint"),
    "short fingerprint": (lambda h: {**h, "architecture_fingerprint": "abc"}, "architecture_fingerprint"),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_malformed_headers_are_refused_clearly(tmp_path, damage):
    path = tmp_path / "dw.safetensors"
    tk.save_offsets(Tiny(), path)
    rewrite, message = HEADER_DAMAGE[damage]
    save_file({"weight": torch.zeros(3, dtype=torch.float64)}, str(path), metadata=rewrite(header_of(path)))
    with pytest.raises(ValueError, match=message):
        tk.load_offsets(Tiny(), path)


def test_corrupted_files_are_refused(tmp_path):
    path = tmp_path / "dw.safetensors"
    tk.save_offsets(Tiny(), path)
    other_values = {"weight": torch.ones(3, dtype=torch.float64)}
    save_file(other_values, str(path), metadata=header_of(path))
    with pytest.raises(ValueError, match="corrupted"):
        tk.load_offsets(Tiny(), path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tk.load_offsets(Tiny(), path)
    with pytest.raises(FileNotFoundError):
        tk.load_offsets(Tiny(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("saved, loaded", [(dict(dtype=torch.int64), {}), (dict(dtype=torch.float32), {}),
                                           (dict(shape=(3, 1)), {})])  # fmt: skip
def test_offsets_must_match_the_parameter_dtype_and_shape(tmp_path, saved, loaded):
    tk.save_offsets(Tiny(**saved), tmp_path / "dw.safetensors")
    with pytest.raises(ValueError, match=r"weight: expected dtype torch.float64 and shape \(3,\)"):
        tk.load_offsets(Tiny(**loaded), tmp_path / "dw.safetensors", strict=False)


def test_save_refuses_a_state_that_does_not_fit_the_module(tmp_path):
    with pytest.raises(ValueError, match="weight: expected dtype torch.float64"):
        tk.save_offsets(Tiny(), tmp_path / "dw.safetensors", state={"weight": torch.zeros(3).long()})
    with pytest.raises(ValueError, match="missing"):
        tk.save_offsets(Tiny(), tmp_path / "dw.safetensors", state={})


def test_non_strict_load_returns_missing_and_unexpected_keys(tmp_path):
    tk.save_offsets(Tiny(), tmp_path / "dw.safetensors")
    larger = Tiny()
    larger.extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    keys = tk.load_offsets(larger, tmp_path / "dw.safetensors", strict=False)
    assert keys.missing_keys == ["extra"] and keys.unexpected_keys == []
    with pytest.raises(RuntimeError, match="extra"):
        tk.load_offsets(larger, tmp_path / "dw.safetensors")
    tk.save_offsets(larger, tmp_path / "larger.safetensors")
    keys = tk.load_offsets(Tiny(), tmp_path / "larger.safetensors", strict=False)
    assert keys.missing_keys == [] and keys.unexpected_keys == ["extra"]
