"""Optimizers of a sharded ranker, as torchrec sets them up.

Embedding tables get a fused optimizer applied in backward (:func:`sparse_optimizer` names its
class; ``apply_optimizer_in_backward`` is called on the un-sharded model, before
``DistributedModelParallel``, which fuses it into the sharded kernels). Dense parameters get
Adam (``train.weight_decay``: its L2 term). The embedding rows are regularised through the loss
(``train.embedding_l2``, :func:`sparse_kd.distill.losses.embedding_l2`), not through the fused
optimizer's ``weight_decay``: measured with fbgemm-gpu-cpu 1.8.0, the CPU kernel of
``EXACT_ROWWISE_ADAGRAD`` makes the same update with ``weight_decay=0.5`` (modes L2 and DECOUPLE)
as without it. Adam is not offered: torchrec maps it to FBGEMM's fused ``ADAM``, which the CPU
training kernel of fbgemm-gpu-cpu 1.8.0 refuses ("not supported in CPU mode"; CPU takes exact
Adagrad, row-wise Adagrad and SGD). :func:`combined_optimizer` joins both into the one
``CombinedOptimizer`` the train pipeline steps and checkpoints save.
"""

from __future__ import annotations

import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sparse_kd.checkpoint import frozen
from sparse_kd.config import TrainConfig


def sparse_optimizer(tc: TrainConfig) -> tuple[type, dict]:
    """(optimizer class, kwargs) of ``train.sparse_optimizer`` for ``apply_optimizer_in_backward``."""
    classes = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    return classes[tc.sparse_optimizer], {"lr": tc.sparse_lr}


def combined_optimizer(dmp: torch.nn.Module, tc: TrainConfig) -> tuple[CombinedOptimizer, KeyedOptimizerWrapper]:
    """(the DMP's fused sparse optimizer + Adam over the dense parameters, the dense part alone).

    The fused optimizers of frozen modules (:func:`sparse_kd.checkpoint.frozen`: sharded
    alignment targets, never updated) are left out, so checkpoints do not hold their state."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=tc.dense_lr, weight_decay=tc.weight_decay),
    )
    sparse = CombinedOptimizer([(k, o) for k, o in dmp.fused_optimizer.optimizers if not frozen(k)])
    return CombinedOptimizer([sparse, dense]), dense
