"""The TAFT toolkit: RSL loss, composition, exact forgetting, DP clipping and noise, checkpoints."""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tangent_kernels as tk
from tangent_kernels import taft


def tiny_vit(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=5)  # fmt: skip
    return model.to(dtype).eval()


def random_offsets(lin, seed):
    generator = torch.Generator().manual_seed(seed)
    return {n: 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in lin.named_parameters()}


def sharded_with_offsets(num_shards=3, blocks=1, backend="reference"):
    lin = tk.linearize(tiny_vit(), blocks, backend=backend)
    shards = taft.split_shards(30, num_shards, seed=1)
    sharded = taft.ShardedTAFT(lin, shards)
    sharded.offsets = {i: random_offsets(lin, 10 + i) for i in range(num_shards)}
    return sharded


def test_rsl_loss_matches_the_formula():
    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2, 0])
    kappa, alpha = 15.0, 2.5
    expected = 0.0
    for f, y in zip(logits, target):
        expected += (alpha * (f[y] - kappa) ** 2 + sum(f[i] ** 2 for i in range(4) if i != y)) / 4
    expected /= 6
    assert torch.allclose(taft.rsl_loss(logits, target, kappa, alpha), expected, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="target: expected"):
        taft.rsl_loss(logits, target.float())


@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_composition_output_is_the_mean_of_shard_outputs(weighting):
    sharded = sharded_with_offsets()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    weights = [1.0 if weighting == "uniform" else float(len(s)) for s in sharded.shards]
    expected = sum(w * sharded.shard_model(i)(images) for i, w in enumerate(weights)) / sum(weights)
    composed = sharded.compose(weighting)(images)
    assert (composed - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_forgetting_a_shard_is_exactly_the_composition_of_the_rest():
    sharded = sharded_with_offsets(num_shards=4)
    rest = taft.average_offsets([sharded.offsets[i] for i in (0, 2, 3)],
                                [float(len(sharded.shards[i])) for i in (0, 2, 3)])  # fmt: skip
    sharded.forget_shard(1)
    assert sharded.active() == [0, 2, 3]
    composed = sharded.composed_offsets()
    assert all(torch.equal(composed[n], rest[n]) for n in rest)


def test_forget_samples_retrains_only_the_shards_that_saw_them():
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(24, 1, 8, 8), torch.randint(0, 5, (24,))
    sharded = taft.ShardedTAFT(lin, taft.split_shards(24, 3, seed=0), taft.TrainConfig(epochs=1, batch_size=8))
    sharded.fit(inputs, targets, progress=False)
    before = {i: {n: t.clone() for n, t in o.items()} for i, o in sharded.offsets.items()}
    victim = int(sharded.shards[2][0])
    assert sharded.forget_samples([victim], inputs, targets) == [2]
    assert victim not in sharded.shards[2].tolist() and len(sharded.shards[2]) == 7
    for i in (0, 1):
        assert all(torch.equal(before[i][n], sharded.offsets[i][n]) for n in before[i])
    assert not all(torch.equal(before[2][n], sharded.offsets[2][n]) for n in before[2])


def test_split_shards_cover_the_data_once():
    shards = taft.split_shards(101, 4, seed=3)
    assert sorted(torch.cat(shards).tolist()) == list(range(101))
    labels = torch.arange(40) % 5
    by_class = taft.split_shards(40, 2, labels=labels)
    assert sorted(torch.cat(by_class).tolist()) == list(range(40))
    assert not set(labels[by_class[0]].tolist()) & set(labels[by_class[1]].tolist())


def test_per_sample_clipped_gradients_never_exceed_the_clip_norm():
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0.0, 0.5)
    params = list(lin.parameters())
    inputs, targets = 10 * torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    clip = 0.05
    loss = taft.TrainConfig().loss_fn()
    for i in range(6):
        summed, norms = taft.clipped_gradient_sum(lin, params, loss, inputs[i : i + 1], targets[i : i + 1], clip)
        assert norms[0] > clip  # the case where clipping acts
        assert math.sqrt(sum(float(g.square().sum()) for g in summed)) <= clip * (1 + 1e-9)


def test_dp_noise_has_the_stated_scale():
    config = taft.PrivacyConfig(noise_multiplier=1.3, max_grad_norm=0.7)
    zeros = [torch.zeros(200_000, dtype=torch.float64), torch.zeros(300, 500, dtype=torch.float64)]
    noisy = taft.add_noise(zeros, config, expected_batch_size=32.0, generator=torch.Generator().manual_seed(0))
    values = torch.cat([n.flatten() for n in noisy])
    expected_std = 1.3 * 0.7 / 32.0
    assert abs(values.std().item() / expected_std - 1) < 0.01
    assert abs(values.mean().item()) < 5 * expected_std / math.sqrt(values.numel())


def test_private_training_reports_opacus_epsilon():
    from opacus.accountants import RDPAccountant

    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(40, 1, 8, 8), torch.randint(0, 5, (40,))
    privacy = taft.PrivacyConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4)
    result = taft.train(lin, inputs, targets, taft.TrainConfig(epochs=2, batch_size=10, privacy=privacy))
    accountant = RDPAccountant()
    for _ in range(2 * 4):  # epochs × ceil(40 / 10) steps at sample rate 10 / 40
        accountant.step(noise_multiplier=1.1, sample_rate=0.25)
    assert result.epsilon == pytest.approx(accountant.get_epsilon(1e-4)) and result.delta == 1e-4
    assert all(math.isfinite(loss) for loss in result.losses)


def test_save_and_load_shards(tmp_path):
    sharded = sharded_with_offsets()
    sharded.forget_shard(0)
    sharded.save(tmp_path)
    restored = taft.ShardedTAFT.load(tmp_path, tk.linearize(tiny_vit(), 1, backend="reference"))
    assert restored.active() == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(restored.shards, sharded.shards))
    composed, expected = restored.composed_offsets(), sharded.composed_offsets()
    assert all(torch.equal(composed[n], expected[n]) for n in expected)
    with pytest.raises(tk.BaseMismatchError):
        taft.ShardedTAFT.load(tmp_path, tk.linearize(tiny_vit(seed=1), 1))


def test_parallel_shard_training_matches_serial():
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(24, 1, 8, 8), torch.randint(0, 5, (24,))
    config = taft.TrainConfig(epochs=1, batch_size=8)
    serial = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    serial.fit(inputs, targets, progress=False)
    parallel = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    parallel.fit(inputs, targets, workers=2, progress=False)
    for i in (0, 1):
        for name, value in serial.offsets[i].items():
            torch.testing.assert_close(parallel.offsets[i][name], value, rtol=1e-4, atol=1e-6)


def test_digits_example_runs(tmp_path):
    """The README's example runs end to end (offline data, CPU) and prints its table."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "taft_digits.py"
    result = subprocess.run([sys.executable, str(example), "--shards", "2"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "composition after forgetting shard 0" in result.stdout and "DP-TAFT (ε =" in result.stdout
