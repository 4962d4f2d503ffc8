"""Optimizers of a sharded ranker, as torchrec sets them up.

Sharded embedding tables get a fused optimizer applied in backward (:func:`sparse_optimizer` names
its class; ``apply_optimizer_in_backward`` is called on the un-sharded model, before
``DistributedModelParallel``, which fuses it into the sharded kernels). ``data_parallel`` tables
are not fused: torchrec replaces their weights with plain parameters of its dense kernel, which
DDP all-reduces, and the optimizer set in backward is lost on the way (measured with torchrec
1.8.0: they arrive without ``_in_backward_optimizers``). Until this module named them, they fell
into the dense Adam at ``train.dense_lr`` and ``train.sparse_optimizer`` was silently ignored;
:func:`combined_optimizer` now gives them ``train.sparse_optimizer`` at ``train.sparse_lr``, stepped
after the all-reduce, as the sharded tables get it. Dense parameters get Adam
(``train.weight_decay``: its L2 term). The embedding rows are regularised through the loss
(``train.embedding_l2``, :func:`sparse_kd.distill.losses.embedding_l2`), not through the fused
optimizer's ``weight_decay``: measured with fbgemm-gpu-cpu 1.8.0, the CPU kernel of
``EXACT_ROWWISE_ADAGRAD`` makes the same update with ``weight_decay=0.5`` (modes L2 and DECOUPLE)
as without it. ``adam`` (Adam on the rows a step touches, as matrix factorisation trains them):
torchrec maps it to FBGEMM's fused ``ADAM`` for sharded tables, which the CPU training kernel of
fbgemm-gpu-cpu 1.8.0 refuses ("not supported in CPU mode"; CPU takes exact Adagrad, row-wise
Adagrad and SGD), so on CPU :func:`check_sparse_optimizer` asks for ``data_parallel`` tables,
where it is :class:`LazyAdam`. The fused CUDA ``ADAM`` has not run here (no GPU). The matrix-
factorisation reference keeps its own lazy Adam over plain tensors (:mod:`sparse_kd.mf_reference`,
measured faster there than ``SparseAdam``). :func:`combined_optimizer` joins them into the one
``CombinedOptimizer`` the train pipeline steps and checkpoints save.
"""

from __future__ import annotations

import torch
from torch.optim._functional import sparse_adam
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from sparse_kd.checkpoint import frozen, plan_sharding
from sparse_kd.config import ConfigError, TrainConfig


class LazyAdam(torch.optim.SparseAdam):
    """Adam on the rows the step's gradient touches (nonzero rows), the others left as they are with
    their moments: what FBGEMM's fused ``ADAM`` does on sharded tables, and the lazy Adam of the
    matrix-factorisation reference. ``torch.optim.SparseAdam``'s update (``F.sparse_adam``) over the
    dense gradient's nonzero rows (a touched row whose gradient is exactly 0 counts as untouched);
    ``p.grad`` itself is left alone: it is a view into DDP's buckets, and assigning a sparse tensor
    to it fails in torchrec's dense kernel ("Could not run 'aten::view' ... 'SparseCPU'")."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, avgs, sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                params.append(p)
                grads.append(p.grad if p.grad.is_sparse else p.grad.to_sparse(1))
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            sparse_adam(params, grads, avgs, sqs, steps, eps=group["eps"], beta1=beta1, beta2=beta2,
                        lr=float(group["lr"]), maximize=group.get("maximize", False))
        return loss


CLASSES = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
           "adam": torch.optim.Adam}
# what FBGEMM's CPU training kernel takes (fbgemm-gpu-cpu 1.8.0); the rest only on data_parallel tables
CPU_FUSED = ("rowwise_adagrad", "adagrad", "sgd")


def sparse_optimizer(tc: TrainConfig) -> tuple[type, dict]:
    """(optimizer class, kwargs) of ``train.sparse_optimizer`` for ``apply_optimizer_in_backward``."""
    return CLASSES[tc.sparse_optimizer], {"lr": tc.sparse_lr}


def check_sparse_optimizer(tc: TrainConfig, plan: ShardingPlan, device_type: str) -> None:
    """Refuse, before anything trains, a sparse optimizer the tables' kernels cannot run here."""
    if device_type != "cpu" or tc.sparse_optimizer in CPU_FUSED:
        return
    fused = sorted(t for t, st in plan_sharding(plan).items() if st != "data_parallel")
    if fused:
        raise ConfigError(
            f"train.sparse_optimizer={tc.sparse_optimizer}: FBGEMM's CPU training kernel has no {tc.sparse_optimizer} "
            f"for sharded tables ({', '.join(fused)}). On CPU set student.default_sharding=data_parallel (and no "
            f"other type in student.sharding), or choose one of {', '.join(CPU_FUSED)}"
        )


def _table_paths(dmp: torch.nn.Module) -> tuple[str, ...]:
    plan = getattr(dmp, "plan", None)
    return tuple(p + "." for p in plan.plan) if plan is not None else ()


def combined_optimizer(dmp: torch.nn.Module, tc: TrainConfig) -> tuple[CombinedOptimizer, tuple[KeyedOptimizerWrapper, ...]]:
    """(the DMP's fused sparse optimizer + Adam over the dense parameters, the parts whose state is
    lazy: the dense Adam first, then the data_parallel tables' optimizer if any; a resume calls their
    ``init_state`` so that a checkpoint can load into it).

    The fused optimizers of frozen modules (:func:`sparse_kd.checkpoint.frozen`: sharded
    alignment targets, never updated) are left out, so checkpoints do not hold their state. The
    weights of ``data_parallel`` tables (parameters under a sharded module of the plan that no fused
    optimizer holds) get ``train.sparse_optimizer`` at ``train.sparse_lr``, not the dense Adam."""
    tables = _table_paths(dmp)
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated = {n: p for n, p in unfused.items() if n.startswith(tables) and not frozen(n)}
    dense = KeyedOptimizerWrapper(
        {n: p for n, p in unfused.items() if n not in replicated},
        lambda params: torch.optim.Adam(params, lr=tc.dense_lr, weight_decay=tc.weight_decay),
    )
    parts, lazy = [(k, o) for k, o in dmp.fused_optimizer.optimizers if not frozen(k)], [dense]
    if replicated:
        cls, kwargs = sparse_optimizer(tc)
        cls = LazyAdam if cls is torch.optim.Adam else cls  # fused ADAM's semantics (touched rows only)
        lazy.append(KeyedOptimizerWrapper(replicated, lambda params: cls(params, **kwargs)))
        parts.append(("data_parallel", lazy[-1]))
    return CombinedOptimizer([CombinedOptimizer(parts), dense]), tuple(lazy)
