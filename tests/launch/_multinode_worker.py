"""torchrun entry point for test_multinode.py: train the tiny baseline with row_wise,
table_row_wise and table_wise tables; rank 0 writes OUT/result.json (metrics, world sizes,
checkpoint folder).

    python -m torch.distributed.run ... tests/launch/_multinode_worker.py OUT
"""

import json
import os
import sys
import warnings
from pathlib import Path


def main() -> None:
    warnings.filterwarnings("ignore")
    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.model import build_dlrm
    from sparse_kd.student.sharding import build_plan, describe_plan
    from sparse_kd.student.train import RankerSpec, train_ranker
    from helpers.tiny import tiny_config, tiny_dataset

    out = Path(sys.argv[1])
    cfg = tiny_config(
        str(out), nproc=2,
        student={"default_sharding": "table_wise", "sharding": {"user_id": "row_wise", "item_id": "table_row_wise"}},
        train={"epochs": 2},
    )
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)
    # the plan training builds (same inputs): which ranks hold each table
    num_emb = {f.name: f.num_embeddings for f in ds.features}
    plan = build_plan(build_dlrm(num_emb, ub.shape[1] + ib.shape[1], cfg.student), cfg.student, env.world_size)
    res = train_ranker(cfg, ds, RankerSpec("baseline", ub, ib), out / "baseline", env)
    if env.is_main:
        doc = {
            "metrics": res.metrics,
            "world_size": env.world_size,
            "local_world_size": env.local_world_size,
            "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
            "checkpoint": str(res.checkpoint),
            "num_embeddings": num_emb,
            "ranks": {row["table"]: row["ranks"] for row in describe_plan(plan)},
            "embedding_dim": cfg.student.embedding_dim,
        }
        (out / "result.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
