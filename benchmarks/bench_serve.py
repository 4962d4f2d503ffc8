"""The HTTP ranking service under a bounded load on 127.0.0.1.

One command builds a synthetic model (random weights: latency does not depend on what it learned),
compresses it into fp32, int8 and int4 artifacts of the same model, starts
``sparse-kd serve ARTIFACT --port 0`` in its own process, and for each artifact:

1. swaps it in through ``POST /admin/reload`` (not timed);
2. runs ``--clients`` client processes, each on one keep-alive connection, ranking 1 user x
   ``--candidates`` items (``POST /rank``) back to back for ``--seconds`` (or ``--max-requests``);
3. halfway through, swaps in a copy of the same artifact (another manifest, so another id) and
   records how long the reload took and every request around it.

Then ``--malformed`` bad requests (bad JSON, wrong types, oversized lists and bodies, unknown keys,
wrong methods and paths) are sent by the same clients: each must get a 4xx, and the server must
still answer ``/health`` and a valid ``/rank`` afterwards. Before the server starts, the same
rankings are timed in process (``Predictor.score``, the floor under the HTTP latency), and the
per-request cost of Starlette, FastAPI and FastAPI + a pydantic body model is measured in process
on a trivial handler (``framework_overhead``; why the service uses Starlette), and so is the JSON
work around scoring with the standard library's json and with orjson (``codec_overhead``; why the
service uses orjson). ``--http h11 --loop asyncio`` runs the server on uvicorn's pure-Python parser
and loop instead of httptools and uvloop.

Latency is measured by the client: request written to response read. Requests per second:
successful requests over the phase's wall time. Everything is bounded (``--seconds`` per phase,
``--max-requests`` per client, ``--max-seconds`` overall) and stops the server at the end.
Targets (on the int4 artifact at 4 clients): p99 <= 15 ms, >= 300 requests/s; zero failed
requests across every swap; every malformed request answered 4xx with the server alive.

    python benchmarks/bench_serve.py                 # writes docs/bench/serve.json
    python benchmarks/bench_serve.py --quick         # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, read as _read, usable_cpus, write_json  # noqa: E402
from serve_load import (init_client, percentile, call, client_malformed, malformed_kinds, metrics,  # noqa: E402
                        run_phase, start_server, stop_server)

TARGETS = {"dtype": "int4", "clients": 4, "p99_ms": 15.0, "requests_per_s": 300.0}
DTYPES = ("fp32", "int8", "int4")


# ------------------------------------------------------------------------------------------ artifacts


def build_artifacts(work: Path, users: int, items: int, dim: int, dtypes: List[str], seed: int) -> Dict[str, Any]:
    """One synthetic model, compressed per dtype into ``work/<dtype>/a`` and a copy ``.../b`` whose
    manifest differs (so the swap shows in the responses' artifact id)."""
    import warnings

    import torch

    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import artifact_mappings, compress_model
    from sparse_kd.config import DataConfig, StudentConfig, SyntheticConfig
    from sparse_kd.data import load_dataset
    from sparse_kd.data.batching import count_dense
    from sparse_kd.student.model import build_dlrm

    warnings.filterwarnings("ignore")  # TorchScript's notes while scripting the serving model
    ds = load_dataset(DataConfig(source="synthetic", synthetic=SyntheticConfig(
        num_users=users, num_items=items, interactions_per_user=5, seed=seed)))
    ub, ib = count_dense(ds)
    torch.manual_seed(seed)
    student = StudentConfig(embedding_dim=dim, dense_arch=(64, dim), over_arch=(64, 32, 1))
    model = build_dlrm({f.name: f.num_embeddings for f in ds.features}, ub.shape[1] + ib.shape[1], student, device="cpu")
    model.eval()
    out: Dict[str, Any] = {"user_ids": list(ds.user_ids), "item_ids": list(ds.item_ids), "paths": {},
                           "features": {f.name: f.num_embeddings for f in ds.features}}
    for dt in dtypes:
        settings = {f.name: {"keep_ratio": 1.0, "dtype": dt, "fill": "zero"} for f in ds.features}
        comp = compress_model(model, ds, settings)
        a = work / dt / "a"
        A.save_artifact(a, comp, artifact_mappings(ds, comp), {"user": ub, "item": ib}, {"bench_serve": dt, "copy": "a"})
        b = work / dt / "b"
        shutil.copytree(a, b)
        m = json.loads((b / "manifest.json").read_text())
        m["config"] = {"bench_serve": dt, "copy": "b"}
        (b / "manifest.json").write_text(json.dumps(m))
        out["paths"][dt] = (str(a), str(b))
        out.setdefault("embedding_mb", {})[dt] = comp.embedding_bytes / 1e6
    return out


def in_process_ms(path: str, bodies: List[dict], calls: int, threads: int) -> Dict[str, float]:
    """Median / p99 ms of ``Predictor.score`` on the same rankings, in this process."""
    import torch

    from sparse_kd.serve import Predictor

    torch.set_num_threads(threads)
    p = Predictor.load(path)
    times = []
    for k in range(calls):
        b = bodies[k % len(bodies)]
        t0 = time.perf_counter()
        p.score([b["user"]] * len(b["items"]), b["items"])
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(percentile(times, 99), 3), "calls": calls}


# ------------------------------------------------------------------------------------------ framework overhead


def framework_overhead(calls: int, rounds: int) -> Dict[str, Any]:
    """In-process ASGI cost per request (microseconds) of one trivial JSON endpoint: a 1 x 500 rank
    body parsed, a small JSON answer; median over rounds. No network, no scoring."""
    import asyncio

    from fastapi import FastAPI
    from pydantic import BaseModel
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = json.dumps({"user": "u1", "items": [f"i{k}" for k in range(500)]}).encode()

    async def st_rank(request: Request) -> Response:
        doc = json.loads(await request.body())
        return Response(json.dumps({"n": len(doc["items"])}), media_type="application/json")

    # real annotations (this module's `from __future__ import annotations` makes them strings that
    # FastAPI would resolve in the module's globals, where these local imports are not)
    st_rank.__annotations__ = {"request": Request, "return": Response}
    starlette_app = Starlette(routes=[Route("/rank", st_rank, methods=["POST"])])
    fastapi_app = FastAPI()
    fastapi_app.post("/rank")(st_rank)

    class RankBody(BaseModel):
        user: str
        items: List[str]

    fastapi_pydantic = FastAPI()

    async def fp_rank(req: RankBody) -> Response:
        return Response(json.dumps({"n": len(req.items)}), media_type="application/json")

    fp_rank.__annotations__ = {"req": RankBody, "return": Response}
    fastapi_pydantic.post("/rank")(fp_rank)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/rank", "raw_path": b"/rank", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def call(app) -> None:
        sent, status = [False], []

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(m):
            if m["type"] == "http.response.start":
                status.append(m["status"])

        await app(dict(scope), receive, send)
        assert status == [200], status

    async def run() -> Dict[str, List[float]]:
        apps = {"starlette": starlette_app, "fastapi": fastapi_app, "fastapi_pydantic_model": fastapi_pydantic}
        for app in apps.values():
            for _ in range(min(100, calls)):
                await call(app)
        samples: Dict[str, List[float]] = {k: [] for k in apps}
        for _ in range(rounds):  # interleaved rounds: drift on a shared machine hits every app alike
            for name, app in apps.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    await call(app)
                samples[name].append((time.perf_counter() - t0) / calls * 1e6)
        return samples

    samples = asyncio.run(run())
    med = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    return {"us_per_request_median": med, "samples_us": {k: [round(x, 1) for x in v] for k, v in samples.items()},
            "calls_per_round": calls, "rounds": rounds,
            "note": "in-process ASGI call of a trivial endpoint that parses a 1 x 500 rank body; no network, no scoring"}


def codec_overhead(bodies: List[bytes], calls: int, rounds: int) -> Dict[str, Any]:
    """Microseconds per 1 x N rank request of the JSON work the service does around scoring, with
    the standard library's json and with orjson (what the service uses): parse the request body,
    write the response (N scores as floats, the order, flags). Median over interleaved rounds."""
    import numpy as np
    import orjson

    n = len(json.loads(bodies[0])["items"])
    rng = np.random.default_rng(0)
    answers = [{"user": "u1", "scores": rng.random(n, dtype=np.float32).tolist(), "order": rng.permutation(n).tolist(),
                "unknown_user": False, "unknown_items": [n - 2, n - 1], "artifact": "0123456789ab"} for _ in range(8)]
    work = {
        "json_parse": lambda k: json.loads(bodies[k % len(bodies)]),
        "orjson_parse": lambda k: orjson.loads(bodies[k % len(bodies)]),
        "json_dump": lambda k: json.dumps(answers[k % 8], separators=(",", ":"), allow_nan=False).encode(),
        "orjson_dump": lambda k: orjson.dumps(answers[k % 8]),
    }
    samples: Dict[str, List[float]] = {k: [] for k in work}
    for _ in range(rounds):
        for name, fn in work.items():
            t0 = time.perf_counter()
            for k in range(calls):
                fn(k)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    med = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    return {"us_per_request_median": med, "candidates": n, "calls_per_round": calls, "rounds": rounds,
            "note": "parse: one request body; dump: one response body (python floats of float32 scores)"}


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, short phases, few malformed requests")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="artifact table dtypes, comma-separated")
    ap.add_argument("--clients", type=int, default=None, help="concurrent client processes (default 4; quick 2)")
    ap.add_argument("--candidates", type=int, default=500, help="items per /rank request")
    ap.add_argument("--seconds", type=float, default=None, help="load phase per artifact (default 20; quick 2)")
    ap.add_argument("--max-requests", type=int, default=200_000, help="per client and phase")
    ap.add_argument("--warmup", type=int, default=None, help="untimed requests before each phase (default 200; quick 20)")
    ap.add_argument("--malformed", type=int, default=None, help="bad requests in all (default 10000; quick 300)")
    ap.add_argument("--users", type=int, default=None, help="users in the model (default 5000; quick 300)")
    ap.add_argument("--items", type=int, default=None, help="items in the model (default 20000; quick 2000)")
    ap.add_argument("--dim", type=int, default=None, help="embedding dim (default 64; quick 16)")
    ap.add_argument("--server-threads", type=int, default=1, help="serve --torch-threads")
    ap.add_argument("--server-workers", type=int, default=None, help="serve --workers (default: serve's default)")
    ap.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto", help="serve --http")
    ap.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="serve --loop")
    ap.add_argument("--max-body-bytes", type=int, default=65536, help="serve --max-body-bytes (a 1 x 500 body is far smaller)")
    ap.add_argument("--max-seconds", type=float, default=900, help="stop starting new phases after this long")
    ap.add_argument("--in-process-calls", type=int, default=None, help="Predictor.score calls timed per dtype (default 500; quick 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default docs/bench/serve.json; quick runs/bench/serve_quick.json)")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("clients", 4, 2), ("seconds", 20.0, 2.0), ("warmup", 200, 20), ("malformed", 10000, 300),
                              ("users", 5000, 300), ("items", 20000, 2000), ("dim", 64, 16), ("in_process_calls", 500, 50)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.out is None:
        args.out = str(ROOT / ("runs/bench/serve_quick.json" if q else "docs/bench/serve.json"))
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtype_list if d not in ("fp32", "fp16", "int8", "int4", "int2")]
    if bad:
        ap.error(f"--dtypes: {bad} not in fp32, fp16, int8, int4, int2")
    if args.clients < 1 or args.candidates < 1 or args.seconds <= 0:
        ap.error("--clients, --candidates and --seconds must be positive")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    info = machine_info({"usable_cpus_note": "the clients and the server share these cores"})
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    proc = None
    pool = None
    try:
        print(f"building {', '.join(args.dtype_list)} artifacts: {args.users} users, {args.items} items, dim {args.dim}", flush=True)
        arts = build_artifacts(work, args.users, args.items, args.dim, args.dtype_list, args.seed)
        rng = random.Random(args.seed)
        unknown = [f"unknown-item-{k}" for k in range(10)]
        docs = []
        for _ in range(64):
            items = rng.sample(arts["item_ids"], min(args.candidates - 2, len(arts["item_ids"]))) + rng.sample(unknown, 2)
            docs.append({"user": rng.choice(arts["user_ids"]), "items": items[: args.candidates]})
        bodies = [json.dumps(d).encode() for d in docs]
        print("timing Predictor.score in process", flush=True)
        in_proc = {dt: in_process_ms(arts["paths"][dt][0], docs, args.in_process_calls, args.server_threads)
                   for dt in args.dtype_list}
        print("timing the web frameworks in process", flush=True)
        overhead = framework_overhead(200 if args.quick else 2000, 3 if args.quick else 7)
        codec = codec_overhead(bodies, 200 if args.quick else 2000, 3 if args.quick else 7)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        pool = ctx.Pool(args.clients, initializer=init_client, initargs=(stop,))
        proc, addr = start_server(arts["paths"][args.dtype_list[0]][0], work / "server.log", args)
        print(f"server pid {proc.pid} on {addr}", flush=True)
        phases = []
        for dt in args.dtype_list:
            if time.time() - t_start > args.max_seconds:
                print(f"--max-seconds reached; skipping {dt}", flush=True)
                continue
            ph = run_phase(pool, stop, addr, dt, arts["paths"][dt], bodies, args, proc.pid)
            ph["in_process"] = in_proc[dt]
            ph["embedding_mb"] = round(arts["embedding_mb"][dt], 4)
            phases.append(ph)
            print(f"{dt}: {ph['requests_per_s']} req/s, p50 {ph['p50_ms']} ms, p99 {ph['p99_ms']} ms, errors {ph['errors']}; "
                  f"swap {ph['swap']['from']} -> {ph['swap']['to']} in {ph['swap']['reload_s']} s, "
                  f"{ph['swap']['window']['errors']} errors in its window", flush=True)
        kinds = malformed_kinds(max(args.candidates, 1000), args.max_body_bytes)
        share = [args.malformed // args.clients + (1 if c < args.malformed % args.clients else 0) for c in range(args.clients)]
        t0 = time.perf_counter()
        res = pool.starmap(client_malformed, [(addr, kinds, share[c], c * 7) for c in range(args.clients)])
        mal_s = time.perf_counter() - t0
        statuses: Counter = Counter()
        for r in res:
            statuses.update({int(k): v for k, v in r["statuses"].items()})
        health_status, _ = call(addr, "GET", "/health")
        rank_status, _ = call(addr, "POST", "/rank", bodies[0])
        malformed = {
            "requests": sum(statuses.values()), "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "not_4xx": sum(v for k, v in statuses.items() if not 400 <= k < 500), "kinds": len(kinds),
            "seconds": round(mal_s, 2), "health_after": health_status, "rank_after": rank_status,
            "server_alive": proc.poll() is None, "examples_not_4xx": [b for r in res for b in r["bad"]][:5],
        }
        print(f"malformed: {malformed['requests']} requests, statuses {malformed['by_status']}, "
              f"server alive {malformed['server_alive']}, /health {health_status}, /rank {rank_status}", flush=True)
        final_metrics = metrics(addr)
    finally:
        if pool is not None:
            pool.terminate()
        rc = stop_server(proc) if proc is not None else None
        log_text = (work / "server.log").read_text() if (work / "server.log").exists() else ""
        log_tail = log_text[-4000:]
        m = re.search(r"HTTP (\w+) on (\w+)", log_text)
        server_impl = {"http": m.group(1), "loop": m.group(2)} if m else None
        shutil.rmtree(work, ignore_errors=True)

    tgt = next((p for p in phases if p["dtype"] == TARGETS["dtype"]), None)
    at_target_clients = tgt is not None and tgt["clients"] == TARGETS["clients"]
    targets = {
        "int4_p99_ms": {"value": tgt and tgt["p99_ms"], "target": TARGETS["p99_ms"],
                        "met": bool(at_target_clients and tgt["p99_ms"] <= TARGETS["p99_ms"])},
        "int4_requests_per_s": {"value": tgt and tgt["requests_per_s"], "target": TARGETS["requests_per_s"],
                                "met": bool(at_target_clients and tgt["requests_per_s"] >= TARGETS["requests_per_s"])},
        "failed_requests_across_swaps": {"value": sum(p["errors"] for p in phases), "target": 0,
                                         "met": all(p["errors"] == 0 and p["swap"]["status"] == 200 for p in phases)},
        "malformed_all_4xx_server_alive": {"value": malformed["not_4xx"], "target": 0,
                                           "met": malformed["not_4xx"] == 0 and malformed["server_alive"]
                                           and malformed["health_after"] == 200 and malformed["rank_after"] == 200},
    }
    if not at_target_clients:
        for k in ("int4_p99_ms", "int4_requests_per_s"):
            targets[k]["note"] = f"targets are stated for {TARGETS['clients']} clients on int4; this run used {args.clients}"
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info["loadavg_end"] = _read("/proc/loadavg")
    busy = load_start >= 1.0
    if busy:
        print(f"WARNING: load average {load_start:.2f} before the run (other jobs on {usable_cpus()} cores): "
              "latencies are inflated and throughput depressed; rerun on a quiet machine", flush=True)
    print("\n| dtype | req/s | p50 ms | p99 ms | max ms | errors | in-process p50 ms | swap s | errors in swap window |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        print(f"| {p['dtype']} | {p['requests_per_s']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} | {p['errors']} | "
              f"{p['in_process']['p50_ms']} | {p['swap']['reload_s']} | {p['swap']['window']['errors']} |")
    print(f"\nframework overhead, us per request (in process): {overhead['us_per_request_median']}")
    print(f"JSON work, us per request (in process): {codec['us_per_request_median']}")
    for k, v in targets.items():
        print(f"target {k}: {v['value']} (goal {v['target']}) {'MET' if v['met'] else 'not met'}")
    doc = {
        "benchmark": "serve",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "machine_busy": busy,
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": load_end,
        "config": {k: getattr(args, k) for k in ("quick", "dtype_list", "clients", "candidates", "seconds", "max_requests",
                                                  "warmup", "malformed", "users", "items", "dim", "server_threads", "server_workers",
                                                  "max_body_bytes", "http", "loop", "seed")},
        "phases": phases,
        "malformed": malformed,
        "framework_overhead": overhead,
        "codec_overhead": codec,
        "server_metrics_end": {k: v for k, v in final_metrics.items() if not k.startswith("sparse_kd_request_seconds_bucket")},
        "server_impl": server_impl,
        "server_exit_code": rc,
        "server_log_tail": log_tail,
        "targets": targets,
        "notes": [
            "latency: client side, request written to response read, on a keep-alive connection per client",
            "requests_per_s: successful requests of all clients over the phase's wall time",
            "swap.window: requests started between the reload request and 0.5 s after its answer",
            "server_cpu_per_wall: the server process's CPU seconds per wall second during the phase",
            "machine_busy: the 1-minute load average was >= 1 before the run (other jobs held a core)",
            "model weights are random: latency does not depend on what a model learned",
        ],
        "elapsed_s": round(time.time() - t_start, 1),
    }
    write_json(args.out, doc)
    ok = targets["failed_requests_across_swaps"]["met"] and targets["malformed_all_4xx_server_alive"]["met"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
