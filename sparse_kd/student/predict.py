"""Prediction and evaluation of a sharded ranker over whole splits, on every rank.

Notation: N examples of a split, W ranks, per = eval_batch_size // W rows per rank and batch.

Sharded embedding lookups are collectives, so every rank runs every evaluation batch
(:func:`~sparse_kd.data.batching.eval_batches` pads the last ones); the logits of all ranks are
gathered in rank order and the padding dropped, so each rank returns the whole split's logits.
"""

from __future__ import annotations

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from sparse_kd.data.batching import BatchBuilder, eval_batches
from sparse_kd.data.schema import Interactions, RecDataset
from sparse_kd.dist import DistEnv, all_gather_cat
from sparse_kd.metrics import EVAL_SPLITS, binary_metrics


def predict_sharded(
    pipeline: TrainPipelineSparseDist,
    model: torch.nn.Module,
    split: Interactions,
    builder: BatchBuilder,
    eval_batch_size: int,
    env: DistEnv,
) -> torch.Tensor:
    """Logits (N,) for the whole ``split``, on every rank, through ``pipeline`` (which runs
    ``model``, the DMP; put in eval mode for the pass and back in train mode after)."""
    n = len(split)
    if n == 0:
        return torch.zeros(0)
    model.eval()
    per = max(1, eval_batch_size // env.world_size)
    outs = []
    batches = eval_batches(split, builder, eval_batch_size, env.rank, env.world_size)
    with torch.no_grad():
        while True:
            try:
                _, logits, _ = pipeline.progress(batches)
            except StopIteration:
                break
            # gathered where the logits are (nccl on CUDA): no host sync per batch
            outs.append(all_gather_cat(logits.reshape(-1).detach()))  # (W * per,)
    model.train()
    outs = [o.cpu() for o in outs]  # one copy back per split, after the pass
    # undo the per-rank padding: global batch g holds rank r's rows at [r*per, r*per + real)
    result = []
    for g, chunk in enumerate(outs):
        start = g * per * env.world_size
        for r in range(env.world_size):
            lo = min(n, start + r * per)
            real = min(n, lo + per) - lo
            result.append(chunk[r * per : r * per + real])
    return torch.cat(result)[:n]


def split_logits(
    pipeline: TrainPipelineSparseDist,
    model: torch.nn.Module,
    ds: RecDataset,
    builder: BatchBuilder,
    eval_batch_size: int,
    env: DistEnv,
    splits=EVAL_SPLITS,
) -> dict[str, torch.Tensor]:
    """split -> logits (N_split,) of every row (the same on every rank)."""
    return {s: predict_sharded(pipeline, model, ds.splits[s], builder, eval_batch_size, env) for s in splits}


def split_metrics(ds: RecDataset, logits: dict[str, torch.Tensor]) -> dict:
    """split -> {"auc", "logloss", "n"} of ``logits`` (split -> (N_split,)) against the split's labels."""
    return {s: binary_metrics(v, torch.from_numpy(ds.splits[s].label)) for s, v in logits.items()}

