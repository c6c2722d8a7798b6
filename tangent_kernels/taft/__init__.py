"""The TAFT toolkit (Tangent Attention Fine-Tuning, Liu, Golatkar and Soatto, ICLR 2024).

- ``rsl_loss``: the rescaled square loss;
- ``train`` / ``TrainConfig``: train a linearized model's offsets from tensors, a ``Dataset`` or a
  ``DataLoader`` (``taft.data``), optionally with DP-SGD (``PrivacyConfig``; ε from opacus's
  accountant, ``epsilon``), CUDA autocast, the paper's recipe (‖dw‖ penalty, step decay, eval
  mode), per-epoch checkpoints to resume from (``taft.resume``); configs and data are checked up front;
- ``split_shards``, ``ShardedTAFT``: one ``dw`` per data shard, their composition (an average of
  offsets, equal to the average of the shard models' outputs), exact forgetting of a shard or of
  samples (in memory and in every folder saved to), and checkpoints tied to the base model;
  shards dealt to the ranks of a ``torch.distributed`` group (``taft.distributed``);
- ``python -m tangent_kernels.taft`` (``tangent-taft``): train, evaluate and forget from the shell.
"""

from . import data, distributed, resume
from .loss import rsl_loss
from .privacy import PrivacyConfig, add_noise, clipped_gradient_sum, epsilon
from .shards import ShardedTAFT, average_offsets, split_shards
from .train import TrainConfig, TrainResult, accuracy, check_dataset, check_source, train

__all__ = [
    "PrivacyConfig",
    "ShardedTAFT",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "add_noise",
    "average_offsets",
    "check_dataset",
    "check_source",
    "clipped_gradient_sum",
    "epsilon",
    "rsl_loss",
    "split_shards",
    "train",
]
