"""What a user's clicks say in text: user embeddings from history, and the teacher ranker's
history pair feature.

Notation: U users, I items, H text dim, P distinct (user, item) clicks in train, B batch size.

A user's *history embedding* is the mean of the unit-normalised teacher embeddings of the
items the user clicked (label 1) in the ``train`` split, never valid or test; a user with no
click in train gets a zero row. It lives in the item-text space, so a user and an item can be
compared directly, and it stands in for user text on datasets that have none
(:func:`resolve_user_text`).

:class:`HistoryPairFeature` gives the teacher ranker what its per-entity dense features cannot:
how close this item's text is to the texts of the *other* items this user clicked. A training
click (u, i) has i in u's history; the feature leaves it out (it is computed from the sum of
the history minus i whenever (u, i) is a training click), so a click is never explained by
itself, and training, valid and test pairs are scored by the same rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_kd.data.schema import RecDataset
from sparse_kd.distill.rows import as_tensor, row_selection

if TYPE_CHECKING:
    from sparse_kd.teacher.sharded_rows import ShardedRows


def train_clicks(ds: RecDataset) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs clicked in ``train``: two (P,) int64 arrays, sorted by user * I + item."""
    tr = ds.splits["train"]
    pos = tr.label > 0
    keys = np.unique(tr.user[pos].astype(np.int64) * ds.num_items + tr.item[pos].astype(np.int64))
    return keys // ds.num_items, keys % ds.num_items


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return F.normalize(x.float(), dim=1)


CLICK_CHUNK = 1 << 16  # clicks gathered at a time: a (P, H) gather would outweigh the (U, H) result
ROW_CHUNK = 1 << 14  # users per block when a whole (U, H) history tensor is built


def history_sums(ds: RecDataset, item_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (U, H) of the unit item embeddings each user clicked in train, and the count (U,)."""
    return HistoryRows(ds, item_text).sums(torch.arange(ds.num_users))


def history_text(ds: RecDataset, item_text: torch.Tensor) -> torch.Tensor:
    """(U, H) history embedding of every user: mean unit item embedding of the train clicks
    (:class:`HistoryRows` computes the same rows a block at a time)."""
    return HistoryRows(ds, item_text).materialize()


def click_sums(item_rows: torch.Tensor, item_norm: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor,
               users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, H) sums of the unit rows (``item_rows`` / ``item_norm``) of the items each of ``users``
    (n,) clicked, and the counts (n,), from the clicks grouped by user (``items``, ``offsets``
    (U + 1,)). Gathers at most CLICK_CHUNK rows at a time; runs on the tensors' device."""
    dev = item_rows.device
    start, counts = offsets[users], offsets[users + 1] - offsets[users]
    out = torch.zeros(len(users), item_rows.shape[1], device=dev)
    # click k of the selection belongs to output row owner[k] and sits at clicks[k] in items
    owner = torch.repeat_interleave(torch.arange(len(users), device=dev), counts)
    first = torch.cumsum(counts, 0) - counts
    clicks = torch.repeat_interleave(start - first, counts) + torch.arange(int(counts.sum()), device=dev)
    for lo in range(0, len(owner), CLICK_CHUNK):
        picked = items[clicks[lo : lo + CLICK_CHUNK]]
        rows = item_rows.index_select(0, picked).div_(item_norm.index_select(0, picked))
        out.index_add_(0, owner[lo : lo + CLICK_CHUNK], rows)
    return out, counts.float()


class HistoryRows:
    """The (U, H) history embeddings of :func:`history_text`, computed for the rows asked for and
    never held whole: what stands for user text in ``history`` mode, at any number of users.

    It stands in for the tensor where rows are read a block at a time: ``rows[r0:r1]``,
    ``rows[r0:r1, c0:c1]``, ``rows[bool mask]``, ``rows[index tensor]``, ``rows.shape``, ``len``,
    and :meth:`materialize` where a consumer needs the whole tensor. It holds a reference to
    the caller's item embeddings (no copy where they are fp32), their norms (4 bytes per item)
    and the train clicks by user (8 bytes per click, 8 per user), not U x H fp32
    (docs/BENCHMARKS.md, 4b).

    Example::

        rows = HistoryRows(ds, item_text)
        rows[0:1000]  # (1000, H), computed now; equal to history_text(ds, item_text)[0:1000]
    """

    def __init__(self, ds: RecDataset, item_text: torch.Tensor) -> None:
        u, i = train_clicks(ds)
        # the caller's item rows, not a unit copy: a gathered block is divided by its rows' norms,
        # exactly as F.normalize divides (the norm of the whole row, clamped at its eps)
        self.item_rows = item_text.float()
        self.item_norm = torch.linalg.vector_norm(self.item_rows, dim=1, keepdim=True).clamp_min(1e-12)  # (I, 1)
        self.items = torch.from_numpy(i)  # clicked items, grouped by user
        self.offsets = torch.from_numpy(np.searchsorted(u, np.arange(ds.num_users + 1)))  # (U + 1,)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.offsets.shape[0] - 1, self.item_rows.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        users, cols = row_selection(idx, len(self))
        sums, counts = self.sums(users)
        return sums.div_(counts.clamp_min(1.0)[:, None])[:, cols]

    def sums(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H) sums of the unit item rows each of ``users`` (n,) clicked in train, and the counts (n,)."""
        return click_sums(self.item_rows, self.item_norm, self.items, self.offsets, users)

    def materialize(self) -> torch.Tensor:
        """The whole (U, H) tensor, for consumers that need it (replicated alignment targets)."""
        return torch.cat([self[lo : lo + ROW_CHUNK] for lo in range(0, len(self), ROW_CHUNK)]) if len(self) else self[0:0]


def history_split(ds: RecDataset, items) -> "ShardedRows":
    """Collective: the history rows of :class:`HistoryRows` from item rows split over the ranks
    (``items``, a :class:`~sparse_kd.teacher.sharded_rows.ShardedRows`), split the same way: each
    rank gets the (U/W, H) rows of its block of users (:func:`~sparse_kd.dist.split_range`), and no
    rank holds any other item's row.

    Each rank sums the unit rows of the items it holds over the train clicks on them, for one
    block of at most ROW_CHUNK users at a time, and the partial sums are added on the rank that
    owns the block (``reduce``): U x H floats leave each rank in all, and no rank holds more than
    its share of items, its block of users and one chunk of partial sums. The same rows as
    :class:`HistoryRows` up to float rounding (the sums are added in another order)."""
    import torch.distributed as dist

    from sparse_kd.dist import long_group, split_range
    from sparse_kd.teacher.sharded_rows import ShardedRows

    g = long_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if g is not None else (0, 1)
    n, dim = ds.num_users, items.dim
    u, i = train_clicks(ds)
    user = torch.from_numpy(u)
    counts = torch.bincount(user, minlength=n).float().clamp_min(1.0)
    row = items.index[torch.from_numpy(i)]  # each click's distinct item row
    mine = (row >= items.lo) & (row < items.hi)
    user, row = user[mine], row[mine] - items.lo  # the clicks on this rank's items, still by user
    local = items.local.float()
    norm = torch.linalg.vector_norm(local, dim=1, keepdim=True).clamp_min(1e-12)
    lo, hi = split_range(n, rank, world)
    out = torch.empty(hi - lo, dim)
    for dst in range(world):  # every rank walks every block in the same order: one reduce per chunk
        a, b = split_range(n, dst, world)
        for c0 in range(a, b, ROW_CHUNK):
            c1 = min(b, c0 + ROW_CHUNK)
            k0, k1 = (int(x) for x in torch.searchsorted(user, torch.tensor([c0, c1])))
            part = torch.zeros(c1 - c0, dim)
            for s in range(k0, k1, CLICK_CHUNK):
                r = row[s : min(k1, s + CLICK_CHUNK)]
                part.index_add_(0, user[s : s + r.shape[0]] - c0, local.index_select(0, r).div_(norm.index_select(0, r)))
            if g is not None:
                dist.reduce(part, dst, group=g)
            if dst == rank:
                out[c0 - lo : c1 - lo] = part.div_(counts[c0:c1, None])
    return ShardedRows(out, torch.arange(n), lo, n)


def has_user_text(ds: RecDataset) -> bool:
    """False when every user's text is blank or all are the same (the text then says nothing)."""
    return len({t.strip() for t in ds.user_text}) > 1


def resolve_mode(mode: str, ds: RecDataset) -> str:
    """``distill.user_text`` with ``auto`` resolved: ``history`` when users have no text, else ``text``."""
    if mode == "auto":
        return "text" if has_user_text(ds) else "history"
    return mode


def resolve_user_text(mode: str, ds: RecDataset, user_text: torch.Tensor, item_text: torch.Tensor):
    """The (U, H') embeddings that stand for user text under ``distill.user_text`` = ``mode``,
    and the mode actually used (``auto`` resolved). In ``history`` mode they are a
    :class:`HistoryRows`, computed where read: no rank holds (U, H) of them."""
    mode = resolve_mode(mode, ds)
    if mode == "text":
        return user_text, mode
    split = getattr(item_text, "sharded", False)  # item rows split over the ranks: so are the history rows
    hist = history_split(ds, item_text) if split else HistoryRows(ds, item_text)
    if mode == "history":
        return hist, mode
    if mode == "both":
        if getattr(user_text, "sharded", False):
            return both_split(user_text, hist), mode
        return torch.cat([unit(as_tensor(user_text)), hist.full() if split else hist.materialize()], 1), mode
    raise ValueError(f"distill.user_text: unknown {mode!r}; expected auto, text, history or both")


def both_split(user_text, hist):
    """``distill.user_text: both`` from the users' own rows split over the ranks (a ``ShardedRows``,
    a collective): each rank holds the (U/W, 2H) rows of its block of users, the own row (unit)
    beside the history row, as a ``ShardedRows`` of one row per user. ``hist``: a
    :class:`HistoryRows` (every rank holds the item rows it reads) or the same block of history
    rows from :func:`history_split`. The rows ``torch.cat([unit(own), history], 1)`` gives, split."""
    import torch.distributed as dist

    from sparse_kd.dist import split_range
    from sparse_kd.teacher.sharded_rows import ShardedRows

    n, multi = user_text.shape[0], dist.is_initialized()
    lo, hi = split_range(n, dist.get_rank() if multi else 0, dist.get_world_size() if multi else 1)
    own = user_text.localize([(lo, hi)])  # this block's own rows, from the ranks that hold them
    block = torch.empty(hi - lo, user_text.dim + hist.shape[1])
    for a in range(lo, hi, ROW_CHUNK):
        b = min(hi, a + ROW_CHUNK)
        h = hist.local[a - lo : b - lo] if getattr(hist, "sharded", False) else hist[a:b]
        block[a - lo : b - lo] = torch.cat([unit(own[a:b]), h], 1)
    return ShardedRows(block, torch.arange(n), lo, n)


class HistoryPairFeature(nn.Module):
    """Dense pair features of (user, item) from the user's train clicks, leave-one-out.

    With s = (sum of the user's clicked unit item embeddings) minus e_i when (u, i) is itself a
    train click, and n the number of clicks left:
        mean_cos = s . e_i / n      (the mean cosine between item i and the user's other clicks)
        dir_cos  = s . e_i / |s|    (the cosine between item i and the direction of the history)
    both 0 for a user with no other click, then standardised with the mean and std over the
    training examples. forward(user (B,), item (B,)) -> (B, 2).

    The per-user sums (U, H) are held only while they fit ``held_sums_bytes`` (default
    HELD_SUMS_BYTES, 256 MB: 170k users at H = 384); above it each batch sums the clicks of its
    own users (:func:`click_sums`), so a rank holds the clicks by user (8 bytes per click and per
    user), not U x H fp32 (1.5 GB at 1M users). Both give the same numbers, bit for bit; the
    per-batch path pays a gather-and-add of the batch users' clicks, so small runs keep the sums.

    Args:
        ds: the dataset (the train split defines the histories).
        item_text: (I, H) teacher embeddings of the items (held by reference where fp32, not copied).

    Example::

        pair = HistoryPairFeature(ds, item_text)
        pair(torch.tensor([0, 3]), torch.tensor([5, 7])).shape  # (2, 2)
    """

    dim = 2
    STATS_ROWS = 200_000  # training examples the standardisation is estimated on (evenly spaced)
    HELD_SUMS_BYTES = 256 << 20

    def __init__(self, ds: RecDataset, item_text: torch.Tensor, held_sums_bytes: Optional[int] = None) -> None:
        super().__init__()
        self.num_items = ds.num_items
        rows = HistoryRows(ds, item_text)
        u, i = train_clicks(ds)
        # non-persistent buffers: they follow the module's device and stay out of checkpoints
        self.register_buffer("item_rows", rows.item_rows, persistent=False)  # (I, H), unit after / item_norm
        self.register_buffer("item_norm", rows.item_norm, persistent=False)  # (I, 1)
        self.register_buffer("items", rows.items, persistent=False)  # (P,) clicked items grouped by user
        self.register_buffer("offsets", rows.offsets, persistent=False)  # (U + 1,)
        limit = self.HELD_SUMS_BYTES if held_sums_bytes is None else held_sums_bytes
        self.held = ds.num_users * item_text.shape[1] * 4 <= limit
        sums = rows.sums(torch.arange(ds.num_users))[0] if self.held else torch.zeros(0, item_text.shape[1])
        self.register_buffer("sums", sums, persistent=False)  # (U, H) where held, else empty
        # (P + 1,) sorted keys user * I + item, led by -1 (never a pair) so it is never empty
        keys = np.concatenate([np.array([-1], dtype=np.int64), u * ds.num_items + i])
        self.register_buffer("click_keys", torch.from_numpy(keys), persistent=False)
        self.register_buffer("shift", torch.zeros(self.dim), persistent=False)
        self.register_buffer("scale", torch.ones(self.dim), persistent=False)
        tr = ds.splits["train"]
        if len(tr):
            picked = np.linspace(0, len(tr) - 1, num=min(len(tr), self.STATS_ROWS)).astype(np.int64)
            raw = self.raw(torch.from_numpy(tr.user[picked]), torch.from_numpy(tr.item[picked]))
            self.shift.copy_(raw.mean(0))
            self.scale.copy_(raw.std(0).clamp_min(1e-6) if raw.shape[0] > 1 else torch.ones(self.dim))

    def is_click(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """(B,) bool: (user, item) is a train click."""
        keys = user.long() * self.num_items + item.long()
        pos = torch.searchsorted(self.click_keys, keys).clamp_max(self.click_keys.shape[0] - 1)
        return self.click_keys.index_select(0, pos) == keys

    def user_sums(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H) click sums and (B,) counts of ``user`` (B,): read where held, else summed for the
        batch's distinct users."""
        if self.held:
            return self.sums.index_select(0, user), (self.offsets[user + 1] - self.offsets[user]).float()
        distinct, inverse = torch.unique(user, return_inverse=True)
        sums, counts = click_sums(self.item_rows, self.item_norm, self.items, self.offsets, distinct)
        return sums.index_select(0, inverse), counts.index_select(0, inverse)

    def raw(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """(B, 2) [mean_cos, dir_cos] before standardisation."""
        user, item = user.long(), item.long()
        e = self.item_rows.index_select(0, item).div_(self.item_norm.index_select(0, item))  # (B, H) unit rows
        m = self.is_click(user, item).float()  # (B,)
        sums, counts = self.user_sums(user)
        s = sums - m[:, None] * e  # (B, H) the history without this item
        n = counts - m  # (B,)
        dot = (s * e).sum(-1)  # (B,)
        norm = torch.linalg.vector_norm(s, dim=-1)
        has = n > 0.5
        mean_cos = torch.where(has, dot / n.clamp_min(1.0), torch.zeros_like(dot))
        dir_cos = torch.where(has & (norm > 1e-6), dot / norm.clamp_min(1e-6), torch.zeros_like(dot))
        return torch.stack([mean_cos, dir_cos], 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor, timestamp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 2); ``timestamp`` is not used (the history is every train click but the example's own)."""
        return (self.raw(user, item) - self.shift) / self.scale
