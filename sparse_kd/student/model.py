"""The DLRM student (and teacher ranker): torchrec ``DLRM`` over one embedding table per sparse feature.

Notation: B batch size, F sparse features, D embedding dim, Dd dense input dim.

Table for feature ``f`` is named ``t_f`` (see :func:`table_name`). Tables are created on the
``meta`` device so that ``DistributedModelParallel`` materialises only each rank's shard.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sparse_kd.config import StudentConfig


def table_name(feature: str) -> str:
    return f"t_{feature}"


def feature_of(table: str) -> str:
    return table[2:] if table.startswith("t_") else table


def make_tables(num_embeddings: Mapping[str, int], dim: int) -> list[EmbeddingBagConfig]:
    """One sum-pooled table per feature, in the given (KJT key) order."""
    return [
        EmbeddingBagConfig(
            name=table_name(f), feature_names=[f], num_embeddings=int(n), embedding_dim=dim, pooling=PoolingType.SUM
        )
        for f, n in num_embeddings.items()
    ]


def build_dlrm(
    num_embeddings: Mapping[str, int], dense_in_features: int, cfg: StudentConfig, device: str | torch.device = "meta"
) -> DLRM:
    """A torchrec DLRM: forward(dense (B, Dd), sparse KJT with F keys) -> logits (B, 1).

    The embedding tables live on ``device`` (``meta`` for sharded training); dense layers on CPU.

    Example::

        m = build_dlrm({"user_id": 10, "item_id": 20}, 2, StudentConfig(), device="cpu")
    """
    ebc = EmbeddingBagCollection(tables=make_tables(num_embeddings, cfg.embedding_dim), device=torch.device(device))
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=dense_in_features,
        dense_arch_layer_sizes=list(cfg.dense_arch),
        over_arch_layer_sizes=list(cfg.over_arch),
        dense_device=torch.device("cpu"),
    )


def ebc_of(model: torch.nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) embedding bag collection inside a DLRM or a wrapper of one."""
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            return m
    raise ValueError("model has no torchrec EmbeddingBagCollection")
