"""A ranker that is an ensemble: K trained members of one architecture, each from its own
training seed, whose mean logit is the ranker's.

The teacher ranker can be one (``distill.teacher_ranker.ensemble``): the members' errors are
partly independent, so their mean is a teacher that knows more than any one of them, the
classic teacher of distillation. The caller trains and predicts the members (callables, so this
module owns only the combination):

- metrics on every evaluation split, from the mean of the members' logits;
- the mean of their train logits, for logit KD;
- the members themselves, (spec, checkpoint) each, whose mean the distilled student also takes
  on sampled pairs (:func:`sparse_kd.pipeline.distilled_spec`). Hints (``distill.align.target:
  teacher``) and the ``learned`` transfer read member 0's tables: rows of different members
  live in different spaces and cannot be averaged.

Member 0 is the ranker as configured (its folder and seed); member k >= 1 trains into
``<name>_member_<k>`` with ``train.seed + k * MEMBER_SEED_STRIDE`` (same data split and
negatives file, other initialisation and order).
"""

from __future__ import annotations

from typing import Callable

import torch

from sparse_kd.data.schema import RecDataset
from sparse_kd.metrics import EVAL_SPLITS, binary_metrics
from sparse_kd.student.spec import RankerResult

MEMBER_SEED_STRIDE = 1_000_003


def member_name(name: str, k: int) -> str:
    return name if k == 0 else f"{name}_member_{k}"


def member_seed(seed: int, k: int) -> int:
    return seed + k * MEMBER_SEED_STRIDE


def combine(name: str, members: list[tuple[RankerResult, object]], ds: RecDataset,
            predict: Callable[[object, object, object], torch.Tensor]) -> RankerResult:
    """The ensemble of ``members`` ((result, spec) each, trained) as one result.

    predict(spec, checkpoint, rows) -> logits (N,) of one member on ``rows`` (a collective: every
    rank calls it alike). Metrics are computed from the mean logit on each split of
    :data:`~sparse_kd.metrics.EVAL_SPLITS`; train logits are the members' mean (None if any
    member has none); examples/s is the ensemble's (members train one after the other);
    checkpoint and history are member 0's.
    """
    if not members:
        raise ValueError(f"{name}: an ensemble needs at least one trained member")
    metrics = {}
    for s in EVAL_SPLITS:
        sp = ds.splits[s]
        logits = torch.stack([predict(spec, r.checkpoint, sp).float() for r, spec in members]).mean(0)  # (N,)
        metrics[s] = binary_metrics(logits, torch.from_numpy(sp.label))
    train = [r.train_logits for r, _ in members]
    train_logits = None if any(t is None for t in train) else torch.stack([t.float() for t in train]).mean(0)
    speeds = [r.examples_per_s for r, _ in members]
    speed = 1.0 / sum(1.0 / v for v in speeds) if all(v > 0 for v in speeds) else 0.0
    first = members[0][0]
    return RankerResult(name, metrics, first.checkpoint, train_logits, speed, first.history,
                        members=[(spec, r.checkpoint) for r, spec in members])
