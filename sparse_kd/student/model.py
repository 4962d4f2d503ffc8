"""The DLRM student (and teacher ranker): torchrec ``DLRM`` over one embedding table per sparse feature.

Notation: B batch size, F sparse features, D embedding dim, Dd dense input dim.

Table for feature ``f`` is named ``t_f`` (see :func:`table_name`). Tables are created on the
``meta`` device so that ``DistributedModelParallel`` materialises only each rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
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


@dataclass(frozen=True)
class Arch:
    """A ranker's architecture: table width D, dense and over MLPs, and the interaction (``dot``:
    DLRM's pairwise dot products; ``dcn``: torchrec's ``DLRM_DCN``, ``dcn_layers`` low-rank cross
    layers of rank ``dcn_rank`` over the (F + 1) * D concatenation)."""

    embedding_dim: int
    dense_arch: tuple[int, ...]
    over_arch: tuple[int, ...]
    interaction: str = "dot"
    dcn_layers: int = 3
    dcn_rank: int = 64

    def to_dict(self) -> dict:
        return {"embedding_dim": self.embedding_dim, "dense_arch": list(self.dense_arch),
                "over_arch": list(self.over_arch), "interaction": self.interaction, "dcn_layers": self.dcn_layers,
                "dcn_rank": self.dcn_rank}

    @staticmethod
    def from_dict(d: Mapping) -> "Arch":
        """From :meth:`to_dict` (or a ``student`` config dict: a dot interaction)."""
        return Arch(int(d["embedding_dim"]), tuple(d["dense_arch"]), tuple(d["over_arch"]), d.get("interaction", "dot"),
                    int(d.get("dcn_layers", 3)), int(d.get("dcn_rank", 64)))


def arch_of(cfg: Union[StudentConfig, Arch]) -> Arch:
    """The student's architecture (a :class:`Arch` passes through)."""
    if isinstance(cfg, Arch):
        return cfg
    return Arch(cfg.embedding_dim, tuple(cfg.dense_arch), tuple(cfg.over_arch))


def teacher_arch(student: StudentConfig, teacher_ranker) -> Arch:
    """The teacher ranker's architecture: ``distill.teacher_ranker`` over the student's defaults."""
    tr = teacher_ranker
    return Arch(tr.embedding_dim or student.embedding_dim, tuple(tr.dense_arch or student.dense_arch),
                tuple(tr.over_arch or student.over_arch), tr.interaction, tr.dcn_layers, tr.dcn_rank)


def build_dlrm(
    num_embeddings: Mapping[str, int], dense_in_features: int, cfg: Union[StudentConfig, Arch],
    device: str | torch.device = "meta",
) -> DLRM:
    """A torchrec DLRM (or ``DLRM_DCN``): forward(dense (B, Dd), sparse KJT with F keys) -> logits (B, 1).

    The embedding tables live on ``device`` (``meta`` for sharded training); dense layers on CPU.
    ``cfg``: the student's config, or an :class:`Arch` (the teacher ranker's).

    Example::

        m = build_dlrm({"user_id": 10, "item_id": 20}, 2, StudentConfig(), device="cpu")
    """
    a = arch_of(cfg)
    ebc = EmbeddingBagCollection(tables=make_tables(num_embeddings, a.embedding_dim), device=torch.device(device))
    if a.interaction == "dcn":
        return DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=dense_in_features,
            dense_arch_layer_sizes=list(a.dense_arch),
            over_arch_layer_sizes=list(a.over_arch),
            dcn_num_layers=a.dcn_layers,
            dcn_low_rank_dim=a.dcn_rank,
            dense_device=torch.device("cpu"),
        )
    if a.interaction != "dot":
        raise ValueError(f"interaction {a.interaction!r} is not valid; expected dot or dcn")
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=dense_in_features,
        dense_arch_layer_sizes=list(a.dense_arch),
        over_arch_layer_sizes=list(a.over_arch),
        dense_device=torch.device("cpu"),
    )


def ebc_of(model: torch.nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) embedding bag collection inside a DLRM or a wrapper of one."""
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            return m
    raise ValueError("model has no torchrec EmbeddingBagCollection")
