"""The teacher ranker's history attention: one training step's forward + backward with DIN's
unit built as written (an MLP over the (B, L + 1, 4 d) concatenation [q, k, q * k, q - k]) against
the factored scorer the project runs (:meth:`sparse_kd.distill.attention.HistoryAttention.scores`:
the same function, its first layer split into a per-example, a per-item and a per-entry part).
Only the scorer differs; window, item representations and pooling are the module's in both.

Synthetic clicks at ml-1m-text's shape by default (6,040 users, 3,018 items, 150 clicks a user,
64-dim item text, L = 50, d = 32, 32 hidden units, batch 1024). The two forms run in interleaved
rounds; reported: median ms per step of each, the median per-round speed-up, and the largest
difference of their outputs. Writes JSON (``--out``).

    python benchmarks/bench_attention.py --out docs/bench/attention.json
    python benchmarks/bench_attention.py --quick      # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import machine_info, write_json  # noqa: E402


def dataset(users: int, items: int, clicks: int, seed: int = 0):
    from sparse_kd.data.schema import Interactions, RecDataset
    from sparse_kd.data.split import id_feature

    rng = np.random.default_rng(seed)
    n = users * clicks
    tr = Interactions(np.repeat(np.arange(users), clicks), rng.integers(0, items, n), np.ones(n, dtype=np.float32),
                      np.zeros(n, dtype=np.int64))
    us, its = [f"u{k}" for k in range(users)], [f"i{k}" for k in range(items)]
    return RecDataset(us, its, [""] * users, [""] * items, [id_feature("user_id", "user", us), id_feature("item_id", "item", its)],
                      {"train": tr})


def unit_as_written(att):
    """The module's scorer replaced by DIN's unit on the concatenated inputs (what the factored
    form replaces); everything else (window, representations, pooling) stays the module's."""
    def scores(q, k, _k_proj):
        qe = q[:, None, :].expand_as(k)
        return att.unit(torch.cat([qe, k, qe * k, qe - k], -1)).squeeze(-1)
    return scores


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=6040)
    ap.add_argument("--items", type=int, default=3018)
    ap.add_argument("--clicks", type=int, default=150, help="train clicks per user")
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per form per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="a small shape, 2 rounds of 2 steps")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    if a.quick:
        a.users, a.items, a.clicks, a.batch, a.steps, a.rounds = 200, 100, 20, 64, 2, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from sparse_kd.distill.attention import HistoryAttention

    torch.manual_seed(0)
    att = HistoryAttention(dataset(a.users, a.items, a.clicks), torch.randn(a.items, a.text_dim), a.max_len, a.dim,
                           "din", a.hidden)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, a.users, (a.batch,), generator=g), torch.randint(0, a.items, (a.batch,), generator=g))
               for _ in range(a.steps)]
    factored, written = att.scores, unit_as_written(att)

    def run(scores):
        def fn(u, i):
            att.scores = scores  # an instance attribute: this call's scorer
            return att(u, i, None)
        return fn

    forms = {"concatenated": run(written), "factored": run(factored)}
    with torch.no_grad():
        diff = max(float((forms["factored"](u, i) - forms["concatenated"](u, i)).abs().max()) for u, i in batches[:2])

    def step(fn, u, i):
        att.zero_grad(set_to_none=True)
        fn(u, i).square().mean().backward()

    for fn in forms.values():  # warm-up
        step(fn, *batches[0])
    ms = {n: [] for n in forms}
    for _ in range(a.rounds):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            for u, i in batches:
                step(fn, u, i)
            ms[name].append((time.perf_counter() - t0) * 1000 / len(batches))
    speedups = [c / f for c, f in zip(ms["concatenated"], ms["factored"])]
    out = {
        "machine": machine_info({"threads": torch.get_num_threads()}),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "ms_per_step": {n: {"median": statistics.median(v), "rounds": v} for n, v in ms.items()},
        "speedup_median": statistics.median(speedups),
        "max_abs_output_diff": diff,
        "examples_per_s_factored": a.batch / (statistics.median(ms["factored"]) / 1000),
    }
    print(f"history attention, batch {a.batch}, L {a.max_len}, d {a.dim}, hidden {a.hidden}, {a.items} items, "
          f"{torch.get_num_threads()} thread(s): forward + backward per step")
    for n, v in ms.items():
        print(f"  {n:13s} {statistics.median(v):8.2f} ms (median of {a.rounds} rounds)")
    print(f"  factored speed-up {out['speedup_median']:.2f}x; largest output difference {diff:.2e}")
    if a.out:
        write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
