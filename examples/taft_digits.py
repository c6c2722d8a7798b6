"""TAFT end to end, offline, on scikit-learn's digits (8×8 images), on the CPU in under a minute.

1. Pre-train a small timm ViT on digits 0–4.
2. On digits 5–9: fine-tune the last block, final norm and head the ordinary way (the baseline),
   and TAFT-fine-tune the same layers linearized, in shards trained separately.
3. Compose the shards (one model), forget one shard exactly, and train a private version (DP-SGD,
   ε from opacus's accountant).

    python examples/taft_digits.py [--shards 3] [--workers 2] [--backend auto] [--epoch-scale 1.0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

import tangent_kernels as tk
from tangent_kernels import taft


def digits(classes: range, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Train and test splits (70/30) of the digits in ``classes``, labels renumbered from 0."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    keep = torch.isin(labels, torch.tensor(list(classes)))
    images, labels = images[keep], labels[keep] - classes.start
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(order))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def small_vit(num_classes: int) -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                             mlp_ratio=2.0, num_classes=num_classes)  # fmt: skip


def fine_tune_last_block(model: VisionTransformer, data, config: taft.TrainConfig) -> VisionTransformer:
    """The baseline: ordinary fine-tuning of the layers TAFT-1 linearizes (last block, norm, head)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.blocks[-1], model.norm, model.head):
        for p in module.parameters():
            p.requires_grad_(True)
    taft.train(model, *data, config, progress="fine-tune")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="processes training shards in parallel")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--epoch-scale", type=float, default=1.0,
                        help="multiplies every epoch count (at least one epoch each): 0.05 runs every step quickly")
    args = parser.parse_args()
    if not args.epoch_scale > 0:  # (NaN too)
        parser.error(f"--epoch-scale: expected a positive number, got {args.epoch_scale}")

    def epochs(count: int) -> int:
        return max(1, round(count * args.epoch_scale))

    torch.manual_seed(0)
    rows = []  # (model, test accuracy, seconds)

    # 1. pre-train on digits 0-4
    start = time.perf_counter()
    pre_train, pre_test = digits(range(0, 5))
    base = small_vit(5)
    taft.train(base, *pre_train, taft.TrainConfig(epochs=epochs(30), lr=2e-3, loss="ce"), progress="pre-train")
    rows.append(("pre-trained ViT on 0-4", taft.accuracy(base, *pre_test), time.perf_counter() - start))

    # 2. digits 5-9: a new head fitted on frozen features (a linear probe), around which the
    #    baseline fine-tunes and TAFT linearizes the same layers
    train_data, test_data = digits(range(5, 10))
    base.reset_classifier(5)
    start = time.perf_counter()
    for p in base.parameters():
        p.requires_grad_(False)
    for p in base.head.parameters():
        p.requires_grad_(True)
    taft.train(base, *train_data, taft.TrainConfig(epochs=epochs(20), lr=1e-2, loss="ce"), progress="linear probe")
    for p in base.parameters():
        p.requires_grad_(True)
    rows.append(("linear probe (head only)", taft.accuracy(base, *test_data), time.perf_counter() - start))
    start = time.perf_counter()
    tuned = fine_tune_last_block(base, train_data, taft.TrainConfig(epochs=epochs(20), lr=2e-3, loss="ce"))
    rows.append(("fine-tuning (last block, norm, head)", taft.accuracy(tuned, *test_data), time.perf_counter() - start))

    linearized = tk.linearize(base, 1, backend=args.backend)
    config = taft.TrainConfig(epochs=epochs(40), lr=5e-3, loss="rsl", kappa=5.0)
    start = time.perf_counter()
    single = copy.deepcopy(linearized)
    taft.train(single, *train_data, config, progress="TAFT")
    rows.append(("TAFT-1, one model on all of 5-9", taft.accuracy(single, *test_data), time.perf_counter() - start))

    shards = taft.split_shards(len(train_data[1]), args.shards, seed=0)
    sharded = taft.ShardedTAFT(linearized, shards, config)
    start = time.perf_counter()
    sharded.fit(*train_data, workers=args.workers)
    seconds = time.perf_counter() - start
    for i in sharded.active():
        rows.append((f"TAFT shard {i} alone ({len(shards[i])} samples)", taft.accuracy(sharded.shard_model(i), *test_data),
                     sharded.results[i].seconds))  # fmt: skip
    start = time.perf_counter()
    rows.append((f"TAFT composition of {args.shards} shards", taft.accuracy(sharded.compose(), *test_data),
                 seconds + time.perf_counter() - start))  # fmt: skip
    start = time.perf_counter()
    sharded.forget_shard(0)
    rows.append(("composition after forgetting shard 0", taft.accuracy(sharded.compose(), *test_data),
                 time.perf_counter() - start))  # fmt: skip

    # 3. differential privacy
    privacy = taft.PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    private = copy.deepcopy(linearized)
    with torch.no_grad():
        for p in private.parameters():
            p.zero_()
    result = taft.train(private, *train_data, taft.TrainConfig(epochs=epochs(5), lr=2e-3, kappa=5.0, privacy=privacy),
                        progress="DP-TAFT")  # fmt: skip
    rows.append((f"DP-TAFT (ε = {result.epsilon:.2f}, δ = {privacy.delta:g})", taft.accuracy(private, *test_data),
                 result.seconds))  # fmt: skip

    print(f"\n{'model':<48} {'test accuracy':>13} {'seconds':>8}")
    for name, acc, secs in rows:
        print(f"{name:<48} {acc:>13.3f} {secs:>8.1f}")
    print(f"\nbackends: attention {tk.last_backend('attention_jvp')}, MLP {tk.last_backend('mlp_jvp')}, "
          f"layer norm {tk.last_backend('layer_norm_jvp')}")  # fmt: skip


if __name__ == "__main__":
    main()
