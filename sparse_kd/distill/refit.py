"""Weight transfer after training: rows of rarely seen entities re-set from their text.

Notation: N entities of a table, H text dim, D embedding dim.

Entities with few training interactions keep rows close to their initialisation. After
training, a ridge map text -> row is fitted on the rows of the entities seen at least
``min_count`` times and applied to the others (:class:`~sparse_kd.student.spec.RefitSpec`), so
their rows land in the space the student learned. The trained rows are read from the run's
last sharded checkpoint; :func:`sparse_kd.student.init.write_tables` writes the result back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparse_kd.ridge import ridge_fit, ridge_predict
from sparse_kd.student.model import table_name
from sparse_kd.student.spec import RefitSpec


def refit_rows(checkpoint: Path, refit: RefitSpec, num_rows: dict[str, int], dim: int) -> dict[str, torch.Tensor]:
    """Rows to write for ``refit``: feature -> (N, D), NaN where a row is kept.

    Reads each table in full from ``checkpoint`` (every rank reads the files; no collective).
    A feature with fewer than two rows to fit on, or with nothing to replace, is left out.
    """
    import torch.distributed.checkpoint as dcp

    out = {}
    for feat, text in refit.text.items():
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.{table_name(feat)}.weight"
        state = {"model": {key: torch.empty(num_rows[feat], dim)}}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        trained = state["model"][key]  # (N, D)
        counts = torch.from_numpy(np.asarray(refit.counts[feat]))
        fit_on = counts >= refit.min_count
        if int(fit_on.sum()) < 2 or bool(fit_on.all()):
            continue
        w = ridge_fit(text[fit_on].float(), trained[fit_on], l2=refit.l2)
        rows = torch.full_like(trained, float("nan"))
        rows[~fit_on] = ridge_predict(text[~fit_on].float(), w)
        out[feat] = rows
    return out
