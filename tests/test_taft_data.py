"""TAFT from datasets and DataLoaders: same result as tensors, shards as index sets, resume, recipe."""

import random
import resource

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torchvision.datasets import ImageFolder

import tangent_kernels as tk
from tangent_kernels import taft
from tangent_kernels.taft.data import transform
from test_taft import tiny_vit


def tiny_data(n=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def offsets(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


def trained(data, targets=None, config=taft.TrainConfig(epochs=2, batch_size=8), **kwargs):
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    result = taft.train(lin, data, targets, config, **kwargs)
    return lin, result


def test_a_dataset_or_dataloader_trains_as_the_tensors_do():
    inputs, targets = tiny_data()
    expected, _ = trained(inputs, targets)
    for data in (TensorDataset(inputs, targets), DataLoader(TensorDataset(inputs, targets), batch_size=8),
                 DataLoader(TensorDataset(inputs, targets), batch_size=8, num_workers=2)):  # fmt: skip
        lin, result = trained(data)
        assert_same(offsets(lin), offsets(expected))
        assert result.samples == 48 and result.samples_per_second > 0
    with pytest.raises(ValueError, match="a DataLoader with batch_size 4, but config.batch_size is 8"):
        trained(DataLoader(TensorDataset(inputs, targets), batch_size=4))
    with pytest.raises(TypeError, match="targets: expected None with a TensorDataset"):
        trained(TensorDataset(inputs, targets), targets)
    assert taft.accuracy(expected, TensorDataset(inputs, targets)) == taft.accuracy(expected, inputs, targets)


class Stream(IterableDataset):
    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def __iter__(self):
        return zip(self.inputs, self.targets)


def test_an_iterable_dataset_trains_in_stream_order_and_bad_samples_are_named():
    inputs, targets = tiny_data()
    lin, result = trained(Stream(inputs, targets))
    assert len(result.losses) == 2 and result.samples == 48
    private = taft.TrainConfig(epochs=1, privacy=taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    with pytest.raises(TypeError, match="expected a map-style Dataset, got an IterableDataset"):
        trained(Stream(inputs, targets), config=private)
    bad = targets.clone()
    bad[20] = 7
    with pytest.raises(ValueError, match=r"targets: expected class indices in \[0, 5\)"):
        trained(Stream(inputs, bad))
    with pytest.raises(ValueError, match=r"targets: expected class indices in \[0, 5\)"):
        trained(TensorDataset(inputs, bad))  # a dataset that keeps its targets: refused before training
    with pytest.raises(TypeError, match="expected samples \\(input tensor, target\\), got str"):
        trained(Stream(["a"] * 3, [1] * 3))
    with pytest.raises(ValueError, match="an iterable dataset that yields none"):  # (a bare StopIteration)
        trained(Stream([], []))
    with pytest.raises(TypeError, match="inputs: expected a tensor, a torch.utils.data.Dataset or a DataLoader"):
        trained([(inputs[0], 1)] * 3)


def write_image_folder(root, classes=3, per_class=4, size=16, seed=0):
    """PNG files in ``root/<class>/``; returns the root."""
    generator = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            pixels[..., c % 3] = 255  # a class cue
            Image.fromarray(pixels.numpy()).save(root / f"class_{c}" / f"{i}.png")
    return root


def small_timm_vit(classes=3):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=classes).eval()  # fmt: skip


def test_image_folder_shards_are_index_sets_and_forgetting_retrains_from_the_dataset(tmp_path):
    base = small_timm_vit()
    folder = ImageFolder(write_image_folder(tmp_path / "images"), transform=transform(base))
    lin = tk.linearize(base, 1)
    sharded = taft.ShardedTAFT(lin, taft.split_shards(len(folder), 2), taft.TrainConfig(epochs=1, batch_size=4))
    sharded.fit(folder, progress=False)
    sharded.save(tmp_path / "out")
    before = offsets(sharded.compose())
    victim = int(sharded.shards[1][0])
    assert sharded.forget_samples([victim], folder) == [1]
    assert victim not in sharded.shards[1].tolist()
    assert not torch.equal(offsets(sharded.model)["head.weight"], before["head.weight"])
    restored = taft.ShardedTAFT.load(tmp_path / "out", tk.linearize(base, 1))
    assert all(victim not in s.tolist() for s in restored.shards)
    assert 0.0 <= taft.accuracy(sharded.model, folder, batch_size=5) <= 1.0


class Generated(Dataset):
    """A billion samples made on access (never stored)."""

    def __len__(self):
        return 10**9

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(int(index))
        return torch.randn(1, 8, 8, generator=generator), int(index) % 5


def test_a_dataset_far_larger_than_memory_is_never_materialized():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    shards = [torch.arange(0, 16), torch.arange(10**9 - 16, 10**9)]
    sharded = taft.ShardedTAFT(lin, shards, taft.TrainConfig(epochs=1, batch_size=8))
    sharded.fit(Generated(), progress=False)
    assert sharded.num_samples == 10**9 and sharded.active() == [0, 1]
    assert sharded.forget_samples([10**9 - 1], Generated()) == [1]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 200 * 1024, f"peak resident memory grew by {grown / 1024:.0f} MiB"  # 10^9 samples: 256 GB


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    inputs, targets = tiny_data()
    config = taft.TrainConfig(epochs=3, batch_size=8, lr_milestones=(2,), dw_penalty=1e-3)
    uninterrupted, result = trained(TensorDataset(inputs, targets), config=config)

    class Killed(Exception):
        pass

    def kill_after_first(epoch, result):
        if epoch == 0:
            raise Killed

    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        trained(TensorDataset(inputs, targets), config=config, checkpoint=str(path), on_epoch=kill_after_first)
    resumed, again = trained(TensorDataset(inputs, targets), config=config, checkpoint=str(path))
    assert_same(offsets(resumed), offsets(uninterrupted), atol=1e-6)
    assert again.losses == result.losses and again.samples == 2 * 24  # only the epochs left were trained
    with pytest.raises(ValueError, match="belongs to another run"):
        trained(TensorDataset(inputs, targets), config=taft.TrainConfig(epochs=3, batch_size=8),
                checkpoint=str(path))  # fmt: skip


def test_a_checkpoint_of_another_base_or_other_data_is_refused(tmp_path):
    """The checkpoint's run named the settings, the data's length and the parameter shapes: a run
    killed and resumed around another base model (same shapes) or on other tensors of the same
    length resumed silently (offsets 0.02 off); now both are named in it."""
    inputs, targets = tiny_data()
    config = taft.TrainConfig(epochs=2, batch_size=8)
    path = str(tmp_path / "run.pt")
    trained(TensorDataset(inputs, targets), config=config, checkpoint=path)
    other_base = tk.linearize(tiny_vit(torch.float32, seed=1), 1)
    with pytest.raises(ValueError, match="belongs to another run"):
        taft.train(other_base, TensorDataset(inputs, targets), config=config, checkpoint=path)
    for data in (TensorDataset(inputs.flip(0), targets), TensorDataset(inputs, targets.roll(1))):
        with pytest.raises(ValueError, match="belongs to another run"):
            trained(data, config=config, checkpoint=path)
    trained(TensorDataset(inputs, targets), config=config, checkpoint=path)  # the same run resumes


def test_resume_restores_pythons_stream(tmp_path):
    """timm's augmentation draws from Python's ``random`` in the main process: a checkpoint holds its
    state, so a resumed run draws what the uninterrupted one drew."""
    inputs, targets = tiny_data()
    config = taft.TrainConfig(epochs=1, batch_size=8)
    path = str(tmp_path / "run.pt")
    random.seed(7)
    trained(TensorDataset(inputs, targets), config=config, checkpoint=path)
    expected = random.random()
    random.seed(8)
    trained(TensorDataset(inputs, targets), config=config, checkpoint=path)  # restored: nothing left to train
    assert random.random() == expected


def test_recipe_options():
    inputs, targets = tiny_data()
    plain, _ = trained(inputs, targets)
    penalized, _ = trained(inputs, targets, taft.TrainConfig(epochs=2, batch_size=8, dw_penalty=10.0))
    norm = lambda m: float(torch.sqrt(sum(p.detach().square().sum() for p in m.parameters())))  # noqa: E731
    assert norm(penalized) < norm(plain)
    decayed, _ = trained(inputs, targets, taft.TrainConfig(epochs=2, batch_size=8, lr_milestones=(1,), lr_decay=1.0))
    assert_same(offsets(decayed), offsets(plain))  # a decay of 1 is no decay
    with pytest.raises(ValueError, match="TrainConfig.lr_milestones: expected a tuple of increasing epochs"):
        taft.TrainConfig(epochs=2, lr_milestones=(2,))
    with pytest.raises(ValueError, match="TrainConfig.precision: 'bf16' is CUDA autocast"):
        trained(inputs, targets, taft.TrainConfig(epochs=1, precision="bf16"))
    with pytest.raises(ValueError, match="TrainConfig.precision: 'fp16' scales the loss"):
        taft.TrainConfig(precision="fp16", privacy=taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="data_parallel: expected a torch.distributed process group"):
        trained(inputs, targets, data_parallel=True)
    private = taft.TrainConfig(epochs=1, privacy=taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="data_parallel: DP-SGD under DDP is not supported"):
        trained(inputs, targets, private, data_parallel=True)
    base = tiny_vit(torch.float32)
    base.blocks[-1].attn.attn_drop.p = 0.5  # dropout on: eval mode turns it off, so two runs agree
    runs = []
    for _ in range(2):
        lin = tk.linearize(base, 1)
        taft.train(lin, inputs, targets, taft.TrainConfig(epochs=1, batch_size=8, eval_mode=True))
        runs.append(offsets(lin))
    assert_same(*runs)


def test_a_killed_fit_resumes_each_shard_and_save_deletes_the_checkpoints(tmp_path, monkeypatch):
    inputs, targets = tiny_data()
    config = taft.TrainConfig(epochs=2, batch_size=8)
    lin = tk.linearize(tiny_vit(torch.float32), 1)
    uninterrupted = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    uninterrupted.fit(inputs, targets, progress=False)

    class Killed(Exception):
        pass

    def killed_in_shard_1(*args, checkpoint=None, **kwargs):
        def kill(epoch, result):
            if checkpoint.endswith("shard_1.pt"):
                raise Killed

        return taft.train(*args, checkpoint=checkpoint, on_epoch=kill, **kwargs)

    sharded = taft.ShardedTAFT(lin, taft.split_shards(24, 2), config)
    monkeypatch.setattr(taft.shards, "train", killed_in_shard_1)
    with pytest.raises(Killed):
        sharded.fit(inputs, targets, progress=False, resume=tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["shard_0.pt", "shard_1.pt"]
    results = sharded.fit(inputs, targets, progress=False, resume=tmp_path)
    assert results[0].samples == 0 and results[1].samples == 12  # shard 0 was done, shard 1 had 1 epoch left
    for i in (0, 1):
        assert_same(sharded.offsets[i], uninterrupted.offsets[i], atol=1e-6)
    sharded.save(tmp_path)
    assert not list((tmp_path / "resume").iterdir())


class Records(Dataset):
    """Samples as dicts, as a Hugging Face dataset gives them."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return {"pixel_values": self.inputs[index], "label": int(self.targets[index])}


def pairs(records):
    return torch.stack([r["pixel_values"] for r in records]), torch.tensor([r["label"] for r in records])


def test_dict_samples_train_through_a_dataloaders_collate_fn():
    inputs, targets = tiny_data()
    expected, _ = trained(inputs, targets)
    lin, _ = trained(DataLoader(Records(inputs, targets), batch_size=8, collate_fn=pairs))
    assert_same(offsets(lin), offsets(expected))
    with pytest.raises(TypeError, match="got dict; give an image dataset the model's transform"):
        trained(Records(inputs, targets))
