"""bench_train's variants, built in every rank: the project's training step (``project``, and
``distill`` with logit KD from stand-in teacher logits) and a plain torchrec loop (``plain``), each
as a :class:`Runner` the benchmark times round by round; and the profiler's top ops of a few steps."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterator, List

class Runner:
    """One variant: a pipeline, its batch iterator and what one loop step does besides progress()."""

    def __init__(self, name: str, sharding: str, step: Callable[[], Any]) -> None:
        self.name, self.sharding, self.step = name, sharding, step
        self.seconds: List[float] = []
        self.cpu_seconds: List[float] = []  # this process's CPU time over the same steps

    @property
    def key(self) -> str:
        return f"{self.sharding}/{self.name}"


def _config(opts: Dict[str, Any], sharding: str, world: int, distill: bool):
    from sparse_kd.config import config_from_dict

    raw: Dict[str, Any] = {
        "name": "bench_train",
        "output_dir": "unused",
        "nproc": world,
        "data": {"synthetic": opts["synthetic"]},
        "student": {"embedding_dim": opts["dim"], "dense_arch": [32, opts["dim"]], "default_sharding": sharding},
        "train": {"batch_size": opts["batch"], "epochs": 1000},
    }
    if distill:  # as configs/demo.yaml
        on = opts["distill_parts"]
        raw["distill"] = {
            "logit": {"enabled": "logit" in on, "kd_ratio": 0.5, "temperature": 2.0},
            "align": {"enabled": "align" in on, "weight": 0.1, "kind": opts["align_kind"], "layout": opts["align_layout"]},
            "transfer": {"enabled": "transfer" in on, "projection": "pca", "scale": 0.05},
        }
    return config_from_dict(raw, "<bench_train>")


def _endless(split, builder, global_batch: int, rank: int, world: int, seed: int, teacher_logits) -> Iterator[Any]:
    """train_batches, epoch after epoch (what train_ranker iterates, without the epoch ends)."""
    from sparse_kd.data.batching import train_batches

    for epoch in itertools.count():
        yield from train_batches(split, builder, global_batch, rank, world, epoch, seed, teacher_logits)


def build_project(opts, ds, env, sharding: str, kind: str, stand_in) -> Runner:
    """The recipe of ``train_ranker`` (sparse_kd/student/train.py): its ``build_sharded`` and
    loop body, minus checkpoints, evaluation and the CSV/TensorBoard writer. ``kind``: ``project``
    (the baseline student), ``distill`` (the distilled student) or ``teacher`` (the teacher ranker:
    the student's architecture plus the stand-in text PCA-reduced, its users' part held as
    ``opts["features_layout"]`` says)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from sparse_kd.data.batching import count_dense
    from sparse_kd.pipeline import distilled_spec
    from sparse_kd.student.spec import RankerResult, RankerSpec
    from sparse_kd.student.train import build_sharded

    distill = kind == "distill"
    cfg = _config(opts, sharding, env.world_size, distill)
    tc = cfg.train
    if kind == "teacher":
        from dataclasses import replace

        from sparse_kd.teacher_inputs import teacher_spec

        tr = replace(cfg.distill.teacher_ranker, features_layout=opts["features_layout"])
        cfg = replace(cfg, distill=replace(cfg.distill, teacher_ranker=tr))
        spec = teacher_spec(cfg, ds, stand_in[0], stand_in[1], world_size=env.world_size)
    elif distill:
        user_text, item_text, teacher_logits = stand_in
        teacher = RankerResult("teacher_ranker", {}, None, train_logits=teacher_logits)
        spec = distilled_spec(cfg, ds, user_text, item_text, teacher, name="distilled")
    else:
        ub, ib = count_dense(ds)
        spec = RankerSpec("baseline", ub, ib)
    builder, module, dmp, optimizer, _ = build_sharded(cfg, ds, spec, env, tc.seed)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    dmp.train()
    it = _endless(ds.splits["train"], builder, tc.batch_size, env.rank, env.world_size, tc.seed, spec.teacher_logits)
    state = {"global_step": 0, "n_seen": 0}

    def step() -> Any:  # the body of train_ranker's loop
        out = pipeline.progress(it)
        state["global_step"] += 1
        state["n_seen"] += out[1].numel() * env.world_size
        if env.is_main and state["global_step"] % tc.log_every == 0:
            _parts = {k: float(v) for k, v in module.last_parts.items()}  # what the loop's log reads (a sync), unused here
        return out

    r = Runner(kind, sharding, step)
    r.module = module  # type: ignore[attr-defined]
    return r


def build_plain(opts, ds, env, sharding: str, n_prebuilt: int) -> Runner:
    """torchrec's own minimum with the same model, optimizer, plan and data (prebuilt Batches)."""
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from sparse_kd.data.batching import BatchBuilder, count_dense
    from sparse_kd.student.model import build_dlrm
    from sparse_kd.student.sharding import build_plan
    from sparse_kd.student.optim import combined_optimizer, sparse_optimizer

    cfg = _config(opts, sharding, env.world_size, False)
    tc, sc = cfg.train, cfg.student
    ub, ib = count_dense(ds)
    builder = BatchBuilder(ds, ub, ib)
    num_emb = {f.name: f.num_embeddings for f in ds.features}
    model = DLRMTrain(build_dlrm(num_emb, builder.dense_dim, sc, device="meta"))
    opt_cls, opt_kwargs = sparse_optimizer(cfg.train)
    apply_optimizer_in_backward(opt_cls, model.model.sparse_arch.parameters(), opt_kwargs)
    plan = build_plan(model, sc, env.world_size, env.device.type)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan)
    optimizer, _ = combined_optimizer(dmp, cfg.train)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    dmp.train()
    src = _endless(ds.splits["train"], builder, tc.batch_size, env.rank, env.world_size, tc.seed, None)
    batches = [Batch(b.dense_features, b.sparse_features, b.labels) for b in itertools.islice(src, n_prebuilt)]
    it = itertools.cycle(batches)
    return Runner("plain", sharding, lambda: pipeline.progress(it))


def profile_steps(runner: Runner, steps: int, top: int, is_main: bool) -> List[Dict[str, Any]]:
    """torch.profiler over ``steps`` steps (every rank steps; rank 0 records): top ops by self CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    if not is_main:
        return []
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:top]
    out = [
        {
            "op": e.key,
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in rows
    ]
    # the project's own stages, inclusive time (record_function ranges and python-level functions)
    return out
