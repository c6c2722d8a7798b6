"""The TAFT command line end to end on small image folders: train, eval, forget, and torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tangent_kernels import taft
from tangent_kernels.taft.cli import main, open_run
from test_taft_data import write_image_folder

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "16",
         "--model-args", json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})]  # fmt: skip


def train_args(data, out, *extra):
    return ["train", *MODEL, "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "4", *extra]


def saved(out):
    """The composition and the shards of the run in ``out``."""
    _, sharded, _ = open_run(str(out), torch.device("cpu"))
    return sharded.composed_offsets(), sharded


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_image_folder(root / "train", per_class=4), write_image_folder(root / "test", per_class=2, seed=1)


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_train_eval_forget(images, tmp_path, capsys):
    train, test = images
    out = tmp_path / "out"
    main(train_args(train, out, "--shards", "2", "--dw-penalty", "1e-5", "--eval-mode"))
    assert "saved 2 shard(s)" in capsys.readouterr().out
    composed, sharded = saved(out)
    main(train_args(train, out, "--shards", "2", "--dw-penalty", "1e-5", "--eval-mode"))  # done: nothing to resume
    assert all(torch.equal(composed[n], t) for n, t in saved(out)[0].items())
    with pytest.raises(SystemExit):
        main(train_args(train, out, "--shards", "3"))
    assert "holds another run" in capsys.readouterr().err

    main(["eval", "--out", str(out), "--data", str(test), "--per-shard"])
    printed = capsys.readouterr().out
    assert "composition of 2 shard(s): top-1" in printed and "shard 1 (6 samples): top-1" in printed

    victim = int(sharded.shards[1][0])
    path = Path(open_run(str(out), torch.device("cpu"))[2].samples[victim][0])
    (tmp_path / "forget.txt").write_text(f"{path.relative_to(train)}\n")
    main(["forget", "--out", str(out), "--samples", str(tmp_path / "forget.txt")])
    assert "retrained shard(s) [1]" in capsys.readouterr().out
    _, after = saved(out)
    assert victim not in after.shards[1].tolist() and len(after.shards[1]) == 5
    assert all(torch.equal(sharded.offsets[0][n], t) for n, t in after.offsets[0].items())  # shard 0 untouched
    main(["forget", "--out", str(out), "--shard", "0"])
    assert sorted(p.name for p in out.glob("shard_[0-9]*")) == ["shard_1.safetensors"]
    assert not list((out / "resume").iterdir())
    with pytest.raises(SystemExit):
        main(["forget", "--out", str(out), "--samples", "0,x"])
    assert "--samples: expected comma-separated sample ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # was timm's RuntimeError traceback
        main(["train", "--model", "no_such_vit", "--data", str(train), "--out", str(tmp_path / "other")])
    assert "train: error: --model: 'no_such_vit' is not a timm model" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_class_incremental_protocol_evaluates_after_each_task(images, tmp_path, capsys):
    train, test = images
    command = train_args(train, tmp_path / "out", "--shards", "3", "--protocol", "class-incremental", "--test", str(test))
    main(command)
    tasks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task ")]
    assert len(tasks) == 3 and "classes ['class_0']; composition top-1" in tasks[0]
    assert tasks[2].endswith("on 6 test images") and tasks[0].endswith("on 2 test images")
    main(command)  # a rerun (or a resumed run) scores each task's composition as the first did: not later tasks
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("task ")] == tasks


def this_package():
    """The environment for a subprocess that imports this checkout's ``tangent_kernels``."""
    path = os.pathsep.join([str(Path(taft.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def torchrun(args, cwd):
    """``train`` under ``torchrun --nproc_per_node 2`` (gloo on the CPU), in a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tangent_kernels.taft", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=this_package(), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def largest_difference(first, second):
    one, two = saved(first)[0], saved(second)[0]
    return max(float((one[n] - two[n]).abs().max()) for n in one)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_torchrun_two_processes_compose_as_one(images, tmp_path):
    train, _ = images
    main(train_args(train, tmp_path / "one", "--shards", "3"))
    printed = torchrun(train_args(train, tmp_path / "two", "--shards", "3"), tmp_path)
    for shard, rank in ((0, 0), (1, 1), (2, 0)):  # rank r trains shards r, r + 2, ...
        assert f"shard {shard} (rank {rank})" in printed
    assert largest_difference(tmp_path / "one", tmp_path / "two") <= 1e-6


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_data_parallel_shard_trains_as_one_process(images, tmp_path):
    """DDP, each rank on half of every batch: one process's result up to rounding (SGD: Adam's
    normalization turns the rounding of a near-zero gradient into a step of size lr)."""
    train, _ = images
    args = ("--shards", "1", "--epochs", "2", "--optimizer", "sgd")
    main(train_args(train, tmp_path / "one", *args))
    torchrun(train_args(train, tmp_path / "two", *args, "--data-parallel"), tmp_path)
    assert largest_difference(tmp_path / "one", tmp_path / "two") <= 1e-6


@pytest.mark.timeout(300)
def test_class_incremental_example_runs(tmp_path):
    """examples/taft_class_incremental.py end to end, briefly: its table has a row per task."""
    example = Path(__file__).parent.parent / "examples" / "taft_class_incremental.py"
    result = subprocess.run([sys.executable, str(example), "--epochs", "1", "--pretrain-epochs", "1"],
                            capture_output=True, text=True, timeout=240, env=this_package(), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit() and "]" in line]
    assert [row[0] for row in rows] == ["1", "2"] and all(0 <= float(row[-1]) <= 1 for row in rows)


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_a_refused_train_leaves_out_as_it_was(images, tmp_path, capsys):
    """Every setting is checked before run.json is written: a refused command (more shards than
    samples, CUDA autocast on the CPU) had left a run.json that refused the corrected command; and
    a run.json left by a command that failed before any shard saved an epoch does not refuse it."""
    train, _ = images
    out = tmp_path / "out"
    for refused, said in ((["--shards", "1000"], "num_shards"), (["--precision", "bf16"], "precision"),
                          (["--delta", "1e-6"], "--delta: the δ of (ε, δ)-DP applies to a --privacy run"),
                          (["--privacy", "1", "1", "--delta", "0"], "PrivacyConfig.delta"),  # (took δ = 1e-5)
                          (["--test", str(train)], "--test: the shards protocol evaluates nothing"),  # (ignored)
                          (["--weights", str(tmp_path / "nothing.pt")], "--weights: "),
                          (["--model-args", "{img_size: 8}"], "--model-args: expected a JSON object"),
                          (["--shards", "0"], "--shards: expected a positive integer"),
                          (["--img-size", "0"], "--img-size: expected a positive integer")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(train_args(train, out, *refused))
        assert not (out / "run.json").exists(), refused
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused once training began: a loss that diverged
        main(train_args(train, out, "--lr", "1e30", "--optimizer", "sgd"))
    assert "the loss became" in capsys.readouterr().err and (out / "run.json").exists()
    main(train_args(train, out))  # (the run.json left by a run that saved nothing had refused it)
    assert "saved 1 shard(s)" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_forget_retrains_as_trained_and_takes_an_image_path(images, tmp_path, capsys, monkeypatch):
    """``forget --samples`` retrains with the run's augmentation (it had retrained without), drawn by
    as many DataLoader workers as the run's (augmentation draws from each worker's stream: another
    number of workers gave offsets 7.9e-3 apart, and resuming with it was accepted), and takes one
    image's path (it had read the image as a text file of ids); a private run reports ε, and
    ``eval`` reports the ε saved with the shards."""
    train, _ = images
    out = tmp_path / "out"
    main(train_args(train, out, "--augment", "--privacy", "1.0", "1.0", "--num-workers", "1"))
    assert "-DP" in capsys.readouterr().out
    assert open_run(str(out), torch.device("cpu"), training=True)[1].config.num_workers == 1
    with pytest.raises(SystemExit):
        main(train_args(train, out, "--augment", "--privacy", "1.0", "1.0", "--num-workers", "0"))
    assert "holds another run" in capsys.readouterr().err
    augmented = []
    real_transform = taft.cli.transform
    monkeypatch.setattr(taft.cli, "transform", lambda base, augment=False: augmented.append(augment)
                        or real_transform(base, augment))  # fmt: skip
    image = open_run(str(out), torch.device("cpu"))[2].samples[0][0]
    main(["forget", "--out", str(out), "--samples", image])
    assert "retrained shard(s) [0]" in capsys.readouterr().out
    assert augmented[-1] is True
    for nothing in ("", ",", str(tmp_path / "empty.txt")):  # (forgot nothing, and said it rewrote OUT)
        (tmp_path / "empty.txt").write_text("\n")
        with pytest.raises(SystemExit):
            main(["forget", "--out", str(out), "--samples", nothing])
        assert "--samples: " in capsys.readouterr().err
    main(["eval", "--out", str(out), "--data", str(train), "--per-shard"])
    said = capsys.readouterr().out.splitlines()  # the ε the retraining spent, saved with the shard
    assert len(said) == 2 and all(line.endswith(", 1e-05)-DP") for line in said), said


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_forgetting_a_shard_needs_no_data(images, tmp_path, capsys):
    """The training data may be gone when a shard is to be forgotten (it had been required)."""
    data = tmp_path / "data"
    shutil.copytree(images[0], data)
    out = tmp_path / "out"
    main(train_args(data, out, "--shards", "2"))
    shutil.rmtree(data)
    main(["forget", "--out", str(out), "--shard", "0"])
    assert "forgot shard 0; 1 shard(s) left" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_hidden_folders_are_not_classes(images, tmp_path, capsys):
    """A notebook's ``.ipynb_checkpoints`` in the data folder became a fourth class (torchvision's rule)."""
    data = tmp_path / "data"
    shutil.copytree(images[0], data)
    (data / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((data / "class_0").iterdir()), data / ".ipynb_checkpoints" / "0-checkpoint.png")
    main(train_args(data, tmp_path / "out"))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["classes"] == ["class_0", "class_1", "class_2"]
    main(["eval", "--out", str(tmp_path / "out"), "--data", str(data)])
    assert "on 12 images" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:vit_tiny_patch16_224. no --weights")
def test_a_file_that_is_no_image_is_a_clean_error(images, tmp_path, capsys):
    """A Mac's ``._x.png`` resource fork in a class folder gave PIL's traceback mid-training."""
    data = tmp_path / "data"
    shutil.copytree(images[0], data)
    (data / "class_1" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    with pytest.raises(SystemExit):
        main(train_args(data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "tangent-taft train: error: " in err and "._0.png" in err and "Traceback" not in err
