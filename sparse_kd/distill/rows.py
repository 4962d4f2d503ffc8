"""Row sources: an (N, H) matrix that its consumers read a block of rows at a time, so that no
rank holds it whole where it is large.

Every consumer of teacher text rows (the teacher ranker's PCA features, weight transfer, the
refit, the alignment targets, rank 0's ``data/text_embeddings.safetensors``) reads them through
``rows[r0:r1]``, ``rows[bool mask]``, ``rows[index tensor]`` and ``rows.shape``, which a tensor
answers too. Two sources compute their rows when read:

- :class:`IndexedRows`: rows of a few distinct values, each held once (users described by a few
  fields: age, gender, occupation), here;
- :class:`~sparse_kd.distill.history.HistoryRows`: users given by their train clicks.

:func:`as_tensor` materialises a source for the consumers that need the whole tensor.
"""

from __future__ import annotations

import torch


def row_selection(idx, n: int) -> tuple[torch.Tensor, object]:
    """``rows[idx]`` of an (n, H) source: the selected rows as an int64 index, and the column index."""
    rows, cols = idx if isinstance(idx, tuple) else (idx, slice(None))
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise TypeError("a row source reads contiguous row slices, e.g. rows[r0:r1]")
        return torch.arange(*rows.indices(n)[:2]), cols
    rows = torch.as_tensor(rows)
    return (rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long().flatten()), cols


class IndexedRows:
    """Rows (N, H) = ``distinct[index[i]]``: each distinct row held once.

    Example::

        rows = IndexedRows(torch.randn(3, 8), torch.tensor([0, 0, 2, 1, 0]))
        rows[1:4]  # (3, 8): distinct rows 0, 2, 1
    """

    def __init__(self, distinct: torch.Tensor, index: torch.Tensor) -> None:
        self.distinct, self.index = distinct, index.long()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.shape[0], self.distinct.shape[1])

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        sel, cols = row_selection(idx, len(self))
        return self.distinct.index_select(0, self.index[sel])[:, cols]

    def materialize(self) -> torch.Tensor:
        return self.distinct.index_select(0, self.index)


def as_tensor(rows) -> torch.Tensor:
    """``rows`` as a tensor: a row source materialised, a tensor (or None) as it is."""
    return rows.materialize() if hasattr(rows, "materialize") else rows
