"""Weight transfer after training: rows of rarely seen entities re-set from their text.

Notation: N entities of a table, H text dim, D embedding dim.

Entities with few training interactions keep rows close to their initialisation. After
training, a ridge map text -> row is fitted on the rows of the entities seen at least
``min_count`` times and applied to the others (:class:`~sparse_kd.student.spec.RefitSpec`), so
their rows land in the space the student learned. The trained rows are read from the run's
last sharded checkpoint; :func:`sparse_kd.student.init.write_tables` writes the result back.

Rank 0 alone reads the tables and fits the maps (the other ranks wait on the long-wait group);
every rank then computes only the rows of its own shards from the shared map
(:class:`~sparse_kd.distill.transfer.ProjectedRows`): no rank holds a second (N, D) copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparse_kd.dist import on_main
from sparse_kd.distill.transfer import ProjectedRows
from sparse_kd.ridge import ridge_fit, ridge_predict
from sparse_kd.student.model import table_name
from sparse_kd.student.spec import RefitSpec


def read_table(checkpoint: Path, feature: str) -> torch.Tensor:
    """The (N, D) trained rows of ``feature``'s table in ``checkpoint`` (its size as saved), read
    whole in this process (no collective; whatever sharding saved it), and no other table."""
    import torch.distributed.checkpoint as dcp

    key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.{table_name(feature)}.weight"
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.get(f"model.{key}")  # flattened
    if saved is None:
        raise FileNotFoundError(f"{checkpoint}: no table {table_name(feature)} for feature {feature!r} in this checkpoint")
    state = {"model": {key: torch.empty(tuple(saved.size))}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state["model"][key]


def _fit_on(refit: RefitSpec, feat: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(refit.counts[feat])) >= refit.min_count


def refit_rows(checkpoint: Path, refit: RefitSpec, num_rows: dict[str, int], dim: int) -> dict[str, ProjectedRows]:
    """Rows to write for ``refit``: feature -> (N, D) rows, NaN where a row is kept.

    Collective (every rank calls it): rank 0 reads each table from ``checkpoint`` and fits the
    map; each rank gets the maps and computes rows when they are read. A feature with fewer
    than two rows to fit on, or with nothing to replace, is left out.
    """

    def fit() -> dict[str, torch.Tensor]:
        maps = {}
        for feat, text in refit.text.items():
            fit_on = _fit_on(refit, feat)
            if int(fit_on.sum()) < 2 or bool(fit_on.all()):
                continue
            trained = read_table(checkpoint, feat)
            maps[feat] = ridge_fit(text[fit_on].float(), trained[fit_on], l2=refit.l2)
        return maps

    return {feat: ProjectedRows(refit.text[feat], lambda x, w=w: ridge_predict(x.float(), w), w.shape[1],
                                skip=_fit_on(refit, feat))
            for feat, w in on_main(fit).items()}
