"""The TAFT toolkit: RSL loss, composition, exact forgetting, DP clipping and noise, checkpoints."""

import dataclasses
import json
import math
import subprocess
import sys

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
    with pytest.raises(ValueError, match="kappa: expected a finite number > 0.0, got -1.0"):  # as TrainConfig
        taft.rsl_loss(logits, target, kappa=-1.0)


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


def test_privacy_without_opacus_is_refused_before_training(monkeypatch):
    """opacus is an optional dependency (``[taft]``); without it a private run trained every epoch
    and then failed to account for them. Settings are still made and read (the command line's
    ``eval`` of a private run needs no accountant)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else find_spec(name, *a))
    config = taft.TrainConfig(epochs=1, privacy=taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    with pytest.raises(ModuleNotFoundError, match=r"needs opacus.*tangent-kernels\[taft\]"):
        taft.train(lin, torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,)), config)


def test_loading_and_noise_settings_are_checked():
    """A prefetch_factor without workers (torch's DataLoader refuses it only when built, inside
    training), noise for a tensor (its rows were taken as the parameters' gradients), and the
    accuracy of no samples (0.0 before: undefined)."""
    with pytest.raises(ValueError, match="TrainConfig.prefetch_factor: applies to DataLoader worker processes"):
        taft.TrainConfig(prefetch_factor=2)
    taft.TrainConfig(prefetch_factor=2, num_workers=1)
    config = taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="summed: expected a list of gradient tensors"):
        taft.add_noise(torch.zeros(3, 4), config, 8.0)
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    assert math.isnan(taft.accuracy(lin, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


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


def test_privacy_spent_is_saved_with_the_shards(tmp_path):
    """Each privately trained shard's (ε, δ) is saved in its offsets file and loaded back (before,
    only the training printed it); the composition spends the largest of its shards' (each sample
    trained one shard), and is not private while a shard trained without privacy is in it."""
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(30, 1, 8, 8), torch.randint(0, 5, (30,))
    privacy = taft.PrivacyConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4)
    sharded = taft.ShardedTAFT(lin, [torch.arange(0, 10), torch.arange(10, 30)],
                               taft.TrainConfig(epochs=1, batch_size=5, privacy=privacy))  # fmt: skip
    results = sharded.fit(inputs, targets, progress=False)
    assert results[0].epsilon > results[1].epsilon  # (the smaller shard samples a larger fraction)
    assert sharded.privacy_spent() == (results[0].epsilon, 1e-4)
    sharded.save(tmp_path)
    restored = taft.ShardedTAFT.load(tmp_path, lin)
    assert restored.privacy_spent() == sharded.privacy_spent()
    restored.forget_shard(0)
    assert restored.privacy_spent() == (results[1].epsilon, 1e-4)
    assert taft.ShardedTAFT.load(tmp_path, lin).privacy_spent() == (results[1].epsilon, 1e-4)  # (rewritten)
    restored.results.pop(1)  # a shard trained without privacy
    assert restored.privacy_spent() is None
    restored.save(tmp_path)
    assert taft.ShardedTAFT.load(tmp_path, lin).privacy_spent() is None


def test_loaded_shards_retrain_only_by_their_own_recipe(tmp_path):
    """``load`` took any TrainConfig, and forgetting then retrained the shard by another recipe (not
    an exact forgetting): retraining needs the recipe saved with the shards (loading settings may
    differ); composing and forgetting whole shards need none."""
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(12, 1, 8, 8), torch.randint(0, 5, (12,))
    recipe = taft.TrainConfig(epochs=1, batch_size=4, optimizer="sgd", lr=0.05)
    sharded = taft.ShardedTAFT(lin, taft.split_shards(12, 2), recipe)
    sharded.fit(inputs, targets, progress=False)
    sharded.save(tmp_path)
    other = taft.ShardedTAFT.load(tmp_path, lin)  # the default recipe: Adam
    other.compose()
    with pytest.raises(ValueError, match="config: the trained shards were trained with"):
        other.forget_samples([0], inputs, targets)
    other.forget_shard(1)
    same = taft.ShardedTAFT.load(tmp_path, lin, dataclasses.replace(recipe, num_workers=1))
    assert taft.TrainConfig(lr=1).run() == taft.TrainConfig(lr=1.0).run()  # equal configs, one recipe
    privacy = (taft.PrivacyConfig(noise_multiplier=1, max_grad_norm=2), taft.PrivacyConfig(1.0, 2.0))
    assert len({taft.TrainConfig(privacy=p).run() for p in privacy}) == 1
    assert same.forget_samples([int(same.shards[0][0])], inputs, targets) == [0]
    index = json.loads((tmp_path / "taft.json").read_text())
    del index["recipe"]  # a folder saved before the recipe was recorded: not stamped with a loader's
    (tmp_path / "taft.json").write_text(json.dumps(index))
    taft.ShardedTAFT.load(tmp_path, lin).save(tmp_path)
    assert json.loads((tmp_path / "taft.json").read_text())["recipe"] is None
    assert taft.ShardedTAFT.load(tmp_path, lin, recipe).forget_samples([int(same.shards[0][1])], inputs, targets) == [0]
    fresh = taft.ShardedTAFT(lin, taft.split_shards(12, 2))
    fresh.config = recipe  # set before any shard trained: the recipe of what it trains
    fresh.fit(inputs, targets, shards=[0], progress=False)
    fresh.config = taft.TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="config: the trained shards were trained with"):
        fresh.fit(inputs, targets, shards=[1], progress=False)  # (shards of two recipes in one composition)


def test_parallel_shard_training_matches_serial():
    """SGD: processes use fewer threads (another summation order), and Adam's normalization turns
    the rounding of a near-zero gradient into a step of size lr."""
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    inputs, targets = torch.randn(24, 1, 8, 8), torch.randint(0, 5, (24,))
    config = taft.TrainConfig(epochs=1, batch_size=8, optimizer="sgd")
    serial = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    serial.fit(inputs, targets, progress=False)
    parallel = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    parallel.fit(inputs, targets, workers=2, progress=False)
    for i in (0, 1):
        for name, value in serial.offsets[i].items():
            torch.testing.assert_close(parallel.offsets[i][name], value, rtol=1e-4, atol=1e-6)


def test_a_shard_with_dropout_trains_alike_whatever_trained_before():
    """Dropout draws from torch's global stream, seeded per shard: shard 1 trained alone (as on its
    own rank, or when retrained after a forgetting) equals shard 1 trained after shard 0 (it had
    differed by 7.8e-3 between one process and two), and the caller's stream is left as it was."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=5, proj_drop_rate=0.3).train()  # fmt: skip
    lin = tk.linearize(model, 1)
    inputs, targets = torch.randn(24, 1, 8, 8), torch.randint(0, 5, (24,))
    config = taft.TrainConfig(epochs=1, batch_size=8, optimizer="sgd")
    both = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    both.fit(inputs, targets, progress=False)
    alone = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    before = torch.get_rng_state()
    alone.fit(inputs, targets, shards=[1], progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    for name, value in both.offsets[1].items():
        assert torch.equal(alone.offsets[1][name], value), name


def test_digits_example_runs(tmp_path):
    """The README's example runs end to end (offline data, CPU) and prints its table (at a twentieth
    of its epochs: this checks that every step runs, not the accuracies)."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "taft_digits.py"
    result = subprocess.run([sys.executable, str(example), "--shards", "2", "--epoch-scale", "0.05"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "composition after forgetting shard 0" in result.stdout and "DP-TAFT (ε =" in result.stdout


# --- Hardening: settings, data and shard indices are checked; forgetting leaves nothing behind ---


@pytest.mark.parametrize("field, value", [
    ("noise_multiplier", math.nan), ("noise_multiplier", math.inf), ("noise_multiplier", -1.0),
    ("noise_multiplier", True), ("noise_multiplier", "1.0"), ("max_grad_norm", math.nan),
    ("max_grad_norm", math.inf), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("max_grad_norm", True),
    ("delta", 0.0), ("delta", 1.0), ("delta", math.nan), ("delta", -1e-5), ("delta", False),
    ("noise_multiplier", 1e300),  # finite, but its product with max_grad_norm = 1e10 is not
])  # fmt: skip
def test_privacy_settings_are_checked(field, value):
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1e10, "delta": 1e-5, field: value}
    with pytest.raises((TypeError, ValueError), match=f"PrivacyConfig.{field}: expected"):
        taft.PrivacyConfig(**settings)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Optimal order is the")  # opacus: at extremes the best order is at an end
def test_epsilon_is_bounded_work_for_any_valid_setting():
    assert taft.epsilon(0.0, 0.25, 10, 1e-5) == math.inf  # no noise, no privacy
    assert taft.epsilon(1e-160, 0.5, 10, 1e-5) == math.inf  # its square underflows: the accountant never ends
    assert taft.epsilon(1.0, 0.25, 0, 1e-5) == 0.0
    huge_noise = taft.epsilon(1e200, 0.3, 10, 1e-5)  # overflows the accountant: a valid bound instead
    assert huge_noise == taft.epsilon(taft.privacy.MAX_ACCOUNTED_NOISE, 0.3, 10, 1e-5) and huge_noise < 0.2
    many_steps = [taft.epsilon(1.0, 0.01, steps, 1e-5) for steps in (10**3, 10**9, 10**30)]
    assert many_steps == sorted(many_steps) and all(math.isfinite(e) for e in many_steps)
    for bad in ({"sample_rate": 0.0}, {"sample_rate": 1.5}, {"sample_rate": math.nan}, {"steps": -1},
                {"steps": 2.0}, {"delta": 1.0}, {"noise_multiplier": math.nan}):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=f"{next(iter(bad))}: expected"):
            taft.epsilon(**{"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 10, "delta": 1e-5, **bad})


def test_private_training_without_noise_reports_infinite_epsilon():
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    inputs, targets = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    privacy = taft.PrivacyConfig(noise_multiplier=0.0, max_grad_norm=1.0)
    result = taft.train(lin, inputs, targets, taft.TrainConfig(epochs=1, batch_size=3, privacy=privacy))
    assert result.epsilon == math.inf and all(math.isfinite(loss) for loss in result.losses)


@pytest.mark.parametrize("field, value", [
    ("epochs", -1), ("epochs", 0), ("epochs", 2.0), ("epochs", True), ("batch_size", 0), ("batch_size", True),
    ("batch_size", 8.0), ("lr", math.nan), ("lr", -1e-3), ("lr", 0.0), ("lr", math.inf), ("lr", "1e-3"),
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("optimizer", "adamw"), ("loss", "mse"),
    ("kappa", math.nan), ("alpha", 0.0), ("seed", -1), ("seed", True), ("privacy", "dp"),
])  # fmt: skip
def test_train_config_is_checked(field, value):
    with pytest.raises((TypeError, ValueError), match=f"TrainConfig.{field}: expected .*, got"):
        taft.TrainConfig(**{field: value})


DATA_ERRORS = {
    "more targets than inputs": (lambda x, y: (x[:5], y), ValueError, "targets: expected 5 targets"),
    "fewer targets than inputs": (lambda x, y: (x, y[:5]), ValueError, "targets: expected 12 targets"),
    "no samples": (lambda x, y: (x[:0], y[:0]), ValueError, "inputs: expected at least one sample"),
    "float targets": (lambda x, y: (x, y.double()), TypeError, "targets: expected class indices"),
    "boolean targets": (lambda x, y: (x, y > 2), TypeError, "targets: expected class indices"),
    "2-D targets": (lambda x, y: (x, y[:, None]), ValueError, r"targets: expected \(12,\) class indices"),
    "a class the model lacks": (lambda x, y: (x, y.index_fill(0, torch.tensor([3]), 5)), ValueError, "0, 5"),
    "a negative class": (lambda x, y: (x, y.index_fill(0, torch.tensor([3]), -1)), ValueError, r"\[0, 5\)"),
    "NaN input": (lambda x, y: (x.index_fill(0, torch.tensor([2]), math.nan), y), ValueError, "inputs: exp"),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_train_checks_its_data(case):
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    make, error, message = DATA_ERRORS[case]
    inputs, targets = make(torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (12,)))
    with pytest.raises(error, match=message):
        taft.train(lin, inputs, targets, taft.TrainConfig(epochs=1))
    assert all(not p.any() for p in lin.parameters())  # nothing trained


def test_cross_entropy_takes_class_probabilities_and_a_diverging_loss_raises():
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    inputs = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    probabilities = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    result = taft.train(lin, inputs, probabilities, taft.TrainConfig(epochs=1, batch_size=3, loss="ce"))
    assert all(math.isfinite(loss) for loss in result.losses)
    with pytest.raises(FloatingPointError, match="smaller lr"):
        taft.train(lin, inputs, torch.randint(0, 5, (6,)), taft.TrainConfig(epochs=2, batch_size=2, lr=1e300,
                                                                              optimizer="sgd"))  # fmt: skip


@pytest.mark.parametrize("shards, error, message", [
    ([[0, 1], [-1, 2]], ValueError, "non-negative"),
    ([torch.tensor([True, False, True]), [3]], TypeError, "boolean mask"),
    ([torch.tensor([0.0, 1.0]), [2]], TypeError, "dtype torch.float32"),
    ([[0, True], [2]], TypeError, "True"),
    ([[0, 1.0], [2]], TypeError, "1.0"),
    ([[0, 1, 1], [2]], ValueError, "unique"),
    ([[0, 1], [1, 2]], ValueError, r"disjoint shards, got sample 1 in shards \[0, 1\]"),
    ([torch.tensor([[0, 1]]), [2]], ValueError, "1-D"),
    ([], TypeError, "non-empty list"),
    (torch.tensor([[0, 1], [2, 3]]), TypeError, "list"),
])  # fmt: skip
def test_shard_indices_are_checked(shards, error, message):
    with pytest.raises(error, match=message):
        taft.ShardedTAFT(tk.linearize(tiny_vit(), 1, backend="reference"), shards)


@pytest.mark.parametrize("args, error, message", [
    ((10, 0), ValueError, "num_shards"), ((10, 11), ValueError, "num_shards"),
    ((True, 1), TypeError, "num_samples"), ((10.0, 2), TypeError, "num_samples"),
    ((10, 2.0), TypeError, "num_shards"), ((0, 1), ValueError, "num_samples"),
])  # fmt: skip
def test_split_shards_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        taft.split_shards(*args)
    with pytest.raises(ValueError, match=r"labels: expected shape \(10,\)"):
        taft.split_shards(10, 2, labels=torch.arange(12) % 3)
    with pytest.raises(TypeError, match="labels: expected integer"):
        taft.split_shards(10, 2, labels=torch.zeros(10))


def test_fit_checks_indices_against_the_data():
    lin = tk.linearize(tiny_vit(), 1, backend="reference")
    inputs, targets = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (12,))
    config = taft.TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=r"shards\[1\]: expected sample indices below 12 .*, got 12"):
        taft.ShardedTAFT(lin, [[0, 1], [12]], config).fit(inputs, targets, progress=False)
    sharded = taft.ShardedTAFT(lin, [[0, 1, 2], [3, 4]], config)
    with pytest.raises(ValueError, match="shards\\[0\\]: expected a shard index in 0..1, got -1"):
        sharded.fit(inputs, targets, shards=[-1], progress=False)
    with pytest.raises(TypeError, match="shards\\[0\\]: expected an int"):
        sharded.fit(inputs, targets, shards=[True], progress=False)
    sharded.fit(inputs, targets, progress=False)
    with pytest.raises(ValueError, match="the 12 samples the shards were trained on, got 10"):
        sharded.fit(inputs[:10], targets[:10], progress=False)
    for samples, error, message in [([-1], ValueError, "non-negative"), ([12], ValueError, "below 12"),
                                    (torch.tensor([True]), TypeError, "boolean"), ([0.0], TypeError, "0.0"),
                                    ([3, 3], ValueError, "unique")]:  # fmt: skip
        with pytest.raises(error, match=message):
            sharded.forget_samples(samples, retrain=False)


def snapshot(sharded):
    offsets = {i: {n: t.clone() for n, t in o.items()} for i, o in sharded.offsets.items()}
    return [s.clone() for s in sharded.shards], offsets, dict(sharded.results)


def assert_unchanged(sharded, before):
    shards, offsets, results = before
    assert len(sharded.shards) == len(shards) and all(map(torch.equal, sharded.shards, shards))
    assert sorted(sharded.offsets) == sorted(offsets) and sharded.results == results
    assert all(torch.equal(sharded.offsets[i][n], offsets[i][n]) for i in offsets for n in offsets[i])


@pytest.mark.parametrize("index, error", [(-1, ValueError), (3, ValueError), (True, TypeError),
                                          (1.0, TypeError)])  # fmt: skip
def test_forget_shard_checks_the_index_before_changing_anything(index, error):
    sharded = sharded_with_offsets()
    before = snapshot(sharded)
    with pytest.raises(error, match="index"):
        sharded.forget_shard(index)
    assert_unchanged(sharded, before)


def shard_files(folder):
    return sorted(p.name for p in folder.glob("shard_[0-9]*.safetensors"))


def test_forgetting_deletes_the_shard_from_every_folder_saved_to(tmp_path):
    sharded = sharded_with_offsets()
    first, second = tmp_path / "first", tmp_path / "second"
    sharded.save(first)
    sharded.save(second)
    sharded.forget_shard(0)
    for folder in (first, second):
        assert not (folder / "shard_0.safetensors").exists()
        restored = taft.ShardedTAFT.load(folder, tk.linearize(tiny_vit(), 1, backend="reference"))
        assert restored.active() == [1, 2] and len(restored.shards[0]) == 0
    sharded.save(first)  # saving again writes the same consistent set
    assert shard_files(first) == ["shard_1.safetensors", "shard_2.safetensors"]
    restored = taft.ShardedTAFT.load(second, tk.linearize(tiny_vit(), 1, backend="reference"))
    restored.forget_shard(2)  # a loaded object rewrites the folder it came from
    assert shard_files(second) == ["shard_1.safetensors"]


def test_forgetting_deletes_the_shards_checkpoints_where_it_trained(tmp_path):
    """``fit(resume=ck)`` then ``save(final)``: forgetting shard 0 left ``ck/resume/shard_0.pt``,
    its trained offsets and optimizer state (only saved and loaded folders were rewritten)."""
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    sharded = taft.ShardedTAFT(lin, taft.split_shards(12, 2), taft.TrainConfig(epochs=1, batch_size=4))
    sharded.fit(torch.randn(12, 1, 8, 8), torch.zeros(12, dtype=torch.long), progress=False,
                resume=tmp_path / "ck")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ck" / "resume").iterdir()) == ["shard_0.pt", "shard_1.pt"]
    sharded.save(tmp_path / "final")
    sharded.forget_shard(0)
    assert sorted(p.name for p in (tmp_path / "ck" / "resume").iterdir()) == ["shard_1.pt"]


def test_save_removes_stale_shard_files(tmp_path):
    sharded = sharded_with_offsets()
    sharded.save(tmp_path)
    fresh = taft.ShardedTAFT(sharded.model, sharded.shards)
    fresh.offsets = {1: sharded.offsets[1]}
    fresh.save(tmp_path)
    assert shard_files(tmp_path) == ["shard_1.safetensors"]


def test_forgetting_recomposes_the_model():
    sharded = sharded_with_offsets()
    model = sharded.compose("uniform")
    sharded.forget_shard(1)
    expected = sharded.composed_offsets("uniform")
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    sharded.forget_samples(torch.cat([sharded.shards[0], sharded.shards[2]]), retrain=False)
    assert sharded.active() == [] and all(not p.any() for p in model.parameters())


def test_forget_samples_changes_nothing_when_it_cannot_finish(monkeypatch):
    sharded = sharded_with_offsets()
    before = snapshot(sharded)
    victim = int(sharded.shards[1][0])
    with pytest.raises(ValueError, match="retrain=True needs inputs and targets"):
        sharded.forget_samples([victim])
    assert_unchanged(sharded, before)

    def failing(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(taft.shards, "_train_shard", failing)
    inputs, targets = torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (30,))
    with pytest.raises(RuntimeError, match="training failed"):
        sharded.forget_samples([victim], inputs, targets)
    assert_unchanged(sharded, before)


def test_load_refuses_a_damaged_folder(tmp_path):
    sharded = sharded_with_offsets()
    sharded.forget_shard(0)
    lin = tk.linearize(tiny_vit(), 1, backend="reference")

    def saved(name):
        folder = tmp_path / name
        sharded.save(folder)
        return folder

    with pytest.raises(FileNotFoundError, match="taft.json"):
        taft.ShardedTAFT.load(tmp_path / "nowhere", lin)
    folder = saved("missing")
    (folder / "shard_2.safetensors").unlink()
    with pytest.raises(ValueError, match="a file is missing or left over"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("extra")
    (folder / "shard_0.safetensors").write_bytes((folder / "shard_1.safetensors").read_bytes())
    with pytest.raises(ValueError, match="a file is missing or left over"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("corrupted")
    (folder / "shard_1.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shard_1.safetensors: not a readable safetensors file"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("swapped")
    (folder / "shard_1.safetensors").write_bytes((folder / "shard_2.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds the offsets of shard '2', not 1"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("bad privacy")
    tk.checkpoint.save_offsets(lin, folder / "shard_1.safetensors", {"shard": "1", "epsilon": "small"},
                               state=sharded.offsets[1])  # fmt: skip
    with pytest.raises(ValueError, match=r"shard_1.safetensors: expected a number for each of \['epsilon', 'delta'\]"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("bad index")
    (folder / "taft.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        taft.ShardedTAFT.load(folder, lin)
    folder = saved("no samples")
    (folder / "shard_samples.safetensors").unlink()
    with pytest.raises(ValueError, match="shard_samples.safetensors: missing or unreadable"):
        taft.ShardedTAFT.load(folder, lin)


@pytest.mark.parametrize("weights, offsets_change, error, message", [
    ([math.nan, 1.0], None, ValueError, r"weights\[0\]"),
    ([math.inf, 1.0], None, ValueError, r"weights\[0\]"),
    ([1.0, -0.5], None, ValueError, r"weights\[1\]"), ([True, 1.0], None, TypeError, r"weights\[0\]"),
    ([0.0, 0.0], None, ValueError, "positive sum"), ([1.0], None, ValueError, "weights: expected 2"),
    ([1e308, 1e308], None, ValueError, "finite positive sum"),
    ([1.0, 1.0], lambda o: o.pop("head.bias"), ValueError, r"offsets\[1\].*missing \['head.bias'\]"),
    ([1.0, 1.0], lambda o: o.update({"extra": torch.zeros(2)}), ValueError, r"unexpected \['extra'\]"),
    ([1.0, 1.0], lambda o: o.update({"head.bias": torch.zeros(6).double()}), ValueError, r"\(6,\)"),
    ([1.0, 1.0], lambda o: o.update({"head.bias": o["head.bias"].float()}), ValueError, "torch.float32"),
    ([1.0, 1.0], lambda o: o.update({"head.bias": o["head.bias"].long()}), TypeError, "floating tensor"),
])  # fmt: skip
def test_average_offsets_checks_weights_and_offsets(weights, offsets_change, error, message):
    sharded = sharded_with_offsets(num_shards=2)
    offsets = [dict(sharded.offsets[0]), dict(sharded.offsets[1])]
    if offsets_change:
        offsets_change(offsets[1])
    with pytest.raises(error, match=message):
        taft.average_offsets(offsets, weights)


def test_shard_workers_end_with_the_process_that_started_them():
    """A shard worker asks Linux to kill it when its parent dies: a parent killed mid-``fit`` left
    its workers training on as orphans, writing checkpoints (and holding memory) until done."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = ("import ctypes, signal; from tangent_kernels.taft.shards import _end_with_the_parent; "
              "_end_with_the_parent(); found = ctypes.c_int(); "
              "ctypes.CDLL(None).prctl(2, ctypes.byref(found)); print(found.value == signal.SIGKILL)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip() == "True"


def test_shard_workers_and_data_parallel_are_refused_together():
    """``data_parallel`` trains every shard on every rank; the shard workers dropped it silently."""
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    sharded = taft.ShardedTAFT(lin, taft.split_shards(8, 2), taft.TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="workers: data_parallel trains every shard"):
        sharded.fit(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), workers=2, data_parallel=True)


def test_a_shard_worker_that_dies_is_named(monkeypatch):
    """A worker killed by a signal (out of memory) surfaced as ``BrokenProcessPool`` naming nothing:
    the error now names the shards left undone."""
    from concurrent.futures.process import BrokenProcessPool

    class DyingPool:  # yields shard 0's result, then its pool breaks
        def __init__(self, *args, **kwargs):
            pass

        def map(self, fn, jobs):
            yield fn(next(iter(jobs)))
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr(taft.shards, "ProcessPoolExecutor", DyingPool)
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    sharded = taft.ShardedTAFT(lin, taft.split_shards(12, 3), taft.TrainConfig(epochs=1, batch_size=4))
    with pytest.raises(RuntimeError, match=r"^shards: a worker process ended abruptly .* before shards \[1, 2\]"):
        sharded.fit(torch.randn(12, 1, 8, 8), torch.zeros(12, dtype=torch.long), workers=2, progress=False)
