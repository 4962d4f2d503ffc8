"""The DLRM student (and teacher ranker): torchrec ``DLRM`` over one embedding table per sparse feature.

Notation: B batch size, F sparse features, D embedding dim, Dd dense input dim.

Table for feature ``f`` is named ``t_f`` (see :func:`table_name`). Tables are created on the
``meta`` device so that ``DistributedModelParallel`` materialises only each rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torch import nn
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
    layers of rank ``dcn_rank`` over the (F + 1) * D concatenation). ``dot_logit``: the
    user_id . item_id dot product is added to the logit (:class:`DotOverArch`; dot interaction only)."""

    embedding_dim: int
    dense_arch: tuple[int, ...]
    over_arch: tuple[int, ...]
    interaction: str = "dot"
    dcn_layers: int = 3
    dcn_rank: int = 64
    dot_logit: bool = False

    def to_dict(self) -> dict:
        return {"embedding_dim": self.embedding_dim, "dense_arch": list(self.dense_arch),
                "over_arch": list(self.over_arch), "interaction": self.interaction, "dcn_layers": self.dcn_layers,
                "dcn_rank": self.dcn_rank, "dot_logit": self.dot_logit}

    @staticmethod
    def from_dict(d: Mapping) -> "Arch":
        """From :meth:`to_dict` (or a ``student`` config dict: a dot interaction)."""
        return Arch(int(d["embedding_dim"]), tuple(d["dense_arch"]), tuple(d["over_arch"]), d.get("interaction", "dot"),
                    int(d.get("dcn_layers", 3)), int(d.get("dcn_rank", 64)), bool(d.get("dot_logit", False)))


def arch_of(cfg: Union[StudentConfig, Arch]) -> Arch:
    """The student's architecture (a :class:`Arch` passes through)."""
    if isinstance(cfg, Arch):
        return cfg
    return Arch(cfg.embedding_dim, tuple(cfg.dense_arch), tuple(cfg.over_arch), dot_logit=cfg.dot_logit)


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
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=dense_in_features,
        dense_arch_layer_sizes=list(a.dense_arch),
        over_arch_layer_sizes=list(a.over_arch),
        dense_device=torch.device("cpu"),
    )
    if a.dot_logit:
        model.over_arch = DotOverArch(model.over_arch.model, dot_index(list(num_embeddings), a.embedding_dim))
    return model


def dot_index(keys: list[str], embedding_dim: int, a: str = "user_id", b: str = "item_id") -> int:
    """Where torchrec's ``InteractionArch`` puts the dot product of features ``a`` and ``b``: its
    output is the dense embedding (D) and then the upper triangle, row by row, diagonal excluded,
    of the Gram matrix of [dense, keys[0], ..., keys[F-1]]."""
    for f in (a, b):
        if f not in keys:
            raise ValueError(f"student.dot_logit: the model has no {f!r} feature (its features: {keys})")
    i, j = sorted((keys.index(a) + 1, keys.index(b) + 1))
    n = len(keys) + 1
    return embedding_dim + sum(n - 1 - r for r in range(i)) + (j - i - 1)


class DotOverArch(nn.Module):
    """torchrec's over MLP plus one column of its input: forward(x (B, D + F + F choose 2)) ->
    (B, 1) = mlp(x) + x[:, index], the user . item dot product added to the logit as in matrix
    factorisation. No parameters of its own: ``model`` is the ``OverArch``'s, so the state dict
    keys (``over_arch.model.*``) are those of a plain DLRM."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index: int = int(index)

    def forward(self, x):  # no annotations: fx copies them as strings (this file's __future__), TorchScript cannot read those
        return self.model(x) + x[:, self.index:self.index + 1]


def has_dot_logit(model: nn.Module) -> bool:
    """Whether ``model`` (a DLRM, or one wrapping it) adds the dot product (:class:`DotOverArch`)."""
    return any(isinstance(m, DotOverArch) for m in model.modules())


def ebc_of(model: torch.nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) embedding bag collection inside a DLRM or a wrapper of one."""
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            return m
    raise ValueError("model has no torchrec EmbeddingBagCollection")
