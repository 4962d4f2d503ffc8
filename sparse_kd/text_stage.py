"""The text stage of a run: the teacher's embeddings of item and user text, and what stands for
user text in the teacher ranker and the distillation methods.

Called by every rank (:func:`~sparse_kd.pipeline.run_training`, the distill study, the scale
benchmark). The users' own texts grow with the user base, the items' with the catalogue: each
rank keeps its share of the users' rows (:class:`~sparse_kd.teacher.sharded_rows.ShardedRows`)
wherever the run's consumers can read them so (:func:`users_stay_sharded`): the teacher ranker's
features, alignment targets, the ``pca`` and ``learned`` weight transfer and the refit. Otherwise
(a teacher reading every dim replicated) every rank holds them all.
The items' rows stay split where no teacher reads any item's row per example (:func:`items_stay_sharded`);
users described by their clicks then get their history rows split the same way.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from sparse_kd import atomic
from sparse_kd.config import DistillConfig, ExperimentConfig
from sparse_kd.data.schema import RecDataset
from sparse_kd.dist import DistEnv, raise_if_any
from sparse_kd.distill.history import resolve_mode, resolve_user_text
from sparse_kd.distill.rows import IndexedRows, as_tensor

log = logging.getLogger(__name__)


def distilled_uses_text(dc: DistillConfig) -> bool:
    """Whether a distilled student reads text embeddings itself (alignment to text, weight transfer)."""
    return (dc.align.enabled and dc.align.target == "text") or dc.transfer.enabled


def users_stay_sharded(cfg: ExperimentConfig, ds: RecDataset, world: int, teachers: Iterable[ExperimentConfig] = ()) -> bool:
    """Whether the users' own text rows can stay split over the ranks for this run: several ranks,
    ``distill.user_text`` resolves to ``text`` or ``both`` (each rank then holds its block of users'
    own rows beside their history rows, :func:`~sparse_kd.distill.history.both_split`), the
    teacher ranker (``cfg``'s and each of ``teachers``, a study's teacher candidates) reads them PCA-reduced (not ``text_dim: -1``, unless its ``features_layout`` is
    ``sharded``: then every dim goes into the split table as it lies). Every distilled student
    reads them split: alignment (its target shards, or every row gathered once for replicated
    targets), the ``pca`` and ``learned`` weight transfer and the refit (maps fitted where the rows
    lie, :func:`~sparse_kd.distill.transfer.fit_map`; each rank the rows of its table shards)."""
    return (world > 1 and resolve_mode(cfg.distill.user_text, ds) in ("text", "both")
            and all(t.distill.teacher_ranker.text_dim != -1 or t.distill.teacher_ranker.features_layout == "sharded"
                    for t in (cfg, *teachers)))


def items_stay_sharded(cfg: ExperimentConfig, ds: RecDataset, world: int, teachers: Iterable[ExperimentConfig] = ()) -> bool:
    """Whether the items' text rows can stay split over the ranks for this run: several ranks, and
    no teacher ranker (``cfg``'s and each of ``teachers``) reads any item's row per pair
    (``history_pair``) or holds every dim of them whole (``text_dim: -1``, unless its
    ``features_layout`` is ``sharded``, which puts them in the split feature table as they lie,
    and no history attention reads them). Their consumers read them split, as the users' own
    rows: the teacher's features, alignment targets, the weight transfer and the refit, rank 0's
    run file.

    Users described by their click history (``distill.user_text`` ``history`` or ``both``) read
    any item's row: split items make their history rows split too, each rank the block of its
    users (:func:`~sparse_kd.distill.history.history_split`, a collective). With ``both`` a rank
    holds that block anyway. With ``history`` alone a rank then holds (I + U) / W rows instead of
    the I item rows (the history rows are computed when read): the items are split only when that
    is fewer, U < I (W - 1)."""
    def reads_split(tr) -> bool:
        every_dim_split = tr.features_layout == "sharded" and not tr.history_attention.enabled
        return not tr.history_pair and (tr.text_dim != -1 or every_dim_split)

    if world <= 1 or not all(reads_split(t.distill.teacher_ranker) for t in (cfg, *teachers)):
        return False
    mode = resolve_mode(cfg.distill.user_text, ds)
    return mode in ("text", "both") or ds.num_users < ds.num_items * (world - 1)


def text_embeddings(cfg: ExperimentConfig, ds: RecDataset, env: DistEnv, users: Optional[bool] = None,
                    shard_users: bool = False, shard_items: bool = False) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Teacher embeddings of user text (U, H), or None when the run does not use the users' own
    text (``users`` None: decided by ``distill.user_text``; an ``IndexedRows`` where texts repeat;
    a ``ShardedRows``, each rank its share, with ``shard_users``), and of item text (I, H; a
    ``ShardedRows`` with ``shard_items``, :func:`items_stay_sharded`).

    A collective: identical texts (blank ones included) are encoded once, each rank encodes a share
    of the distinct texts and the rows go over the process group, so no rank reads a file another
    wrote (:mod:`~sparse_kd.teacher.across_ranks`; rank 0 alone uses the teacher cache). Rank 0
    writes ``data/text_embeddings.safetensors`` for the compression stage, a block at a time; its
    ``user`` rows are the click-history embeddings when user text is not used.
    """
    from sparse_kd.distill.history import HistoryRows, history_split
    from sparse_kd.teacher import TextEncoder
    from sparse_kd.teacher.across_ranks import encode_across_ranks, encode_sharded
    from sparse_kd.teacher.encoder import TeacherModelError
    from sparse_kd.teacher.sharded_rows import write_rows_collective

    if users is None:
        users = resolve_mode(cfg.distill.user_text, ds) in ("text", "both")
    encoder, err = None, None
    try:  # every rank loads the teacher (a node without it must not leave the others waiting)
        encoder = TextEncoder.from_config(cfg.teacher, show_progress=env.is_main)
    except TeacherModelError as e:
        err = str(e)
    raise_if_any(err, TeacherModelError)

    def encode(texts, name: str):
        emb, inverse = encode_across_ranks(encoder, texts, cfg.teacher.cache_dir, name, encoder.dim)
        return emb if emb.shape[0] == inverse.shape[0] and bool((inverse == torch.arange(len(inverse))).all()) \
            else IndexedRows(emb, inverse)

    def split(texts, name: str):
        rows = encode_sharded(encoder, texts, cfg.teacher.cache_dir, name, encoder.dim)
        if env.is_main:
            log.info("%s' text rows: each rank keeps its share (%d distinct of %d over %d ranks)",
                     name, rows.n_distinct, len(rows), env.world_size)
        return rows

    multi = env.world_size > 1
    item = split(ds.item_text, "items") if shard_items and multi else as_tensor(encode(ds.item_text, "items"))
    user = None
    if users and shard_users and multi:
        user = split(ds.user_text, "users")
    elif users:
        user = encode(ds.user_text, "users")  # repeated texts stay one row each
    path = Path(cfg.output_dir) / "data" / "text_embeddings.safetensors"

    @contextlib.contextmanager
    def replacing():
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            yield f

    if user is not None:
        history = user
    elif getattr(item, "sharded", False):
        history = history_split(ds, item)  # a collective: each rank its block of users
    else:
        history = HistoryRows(ds, item) if env.is_main else None
    write_rows_collective(replacing, {"user": history, "item": item})  # every rank
    return user, item


def user_text_for(cfg: ExperimentConfig, ds: RecDataset, user_text: torch.Tensor, item_text: torch.Tensor,
                  env: Optional[DistEnv] = None) -> torch.Tensor:
    """What stands for user text in the teacher ranker and the distillation methods
    (``distill.user_text``: the users' own text, or their train-click history; see
    :mod:`sparse_kd.distill.history`). (U, H) or (U, 2H) for ``both``."""
    emb, mode = resolve_user_text(cfg.distill.user_text, ds, user_text, item_text)
    if env is None or env.is_main:
        log.info("user text: %s (distill.user_text=%s)", {"text": "the users' own text", "history": "mean teacher embedding "
                 "of each user's train clicks", "both": "own text and train-click history"}[mode], cfg.distill.user_text)
    return emb
