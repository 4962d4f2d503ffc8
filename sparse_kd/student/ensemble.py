"""A ranker that is an ensemble: K trained members of one architecture, each from its own
training seed, whose mean logit is the ranker's.

The teacher ranker can be one (``distill.teacher_ranker.ensemble``): the members' errors are
partly independent, so their mean is a teacher that knows more than any one of them, the
classic teacher of distillation. The caller trains the members
(:func:`sparse_kd.pipeline.train_teacher`); this module owns only the combination:

- metrics on every evaluation split, from the mean of the logits each member kept when it was
  evaluated after training (``RankerResult.eval_logits``: no member is predicted twice);
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

import torch

from sparse_kd.data.schema import RecDataset
from sparse_kd.student.predict import split_metrics
from sparse_kd.student.spec import RankerResult

MEMBER_SEED_STRIDE = 1_000_003


def member_name(name: str, k: int) -> str:
    return name if k == 0 else f"{name}_member_{k}"


def member_seed(seed: int, k: int) -> int:
    return seed + k * MEMBER_SEED_STRIDE


def combine(name: str, members: list[tuple[RankerResult, object]], ds: RecDataset) -> RankerResult:
    """The ensemble of ``members`` ((result, spec) each, trained with ``want_train_logits``, so
    each kept its split logits) as one result.

    Metrics come from the mean logit on each split the members were evaluated on; train logits
    are the members' mean (None if any member has none); examples/s is the ensemble's (members
    train one after the other); checkpoint and history are member 0's; each member's own metrics
    are kept (``member_metrics``).
    """
    if not members:
        raise ValueError(f"{name}: an ensemble needs at least one trained member")
    missing = [r.name for r, _ in members if r.eval_logits is None]
    if missing:
        raise ValueError(f"{name}: members {missing} kept no split logits; train them with want_train_logits")
    splits = members[0][0].eval_logits
    logits = {s: torch.stack([r.eval_logits[s].float() for r, _ in members]).mean(0) for s in splits}  # (N_s,)
    train = [r.train_logits for r, _ in members]
    train_logits = None if any(t is None for t in train) else torch.stack([t.float() for t in train]).mean(0)
    speeds = [r.examples_per_s for r, _ in members]
    speed = 1.0 / sum(1.0 / v for v in speeds) if all(v > 0 for v in speeds) else 0.0
    first = members[0][0]
    return RankerResult(name, split_metrics(ds, logits), first.checkpoint, train_logits, speed, first.history,
                        members=[(spec, r.checkpoint) for r, spec in members], eval_logits=logits,
                        member_metrics=[r.metrics for r, _ in members])
