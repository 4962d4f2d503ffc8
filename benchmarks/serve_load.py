"""bench_serve's load: the server it starts and stops, the clients that load it (one keep-alive
connection per process, and the malformed requests), and the summaries of a phase (latency
percentiles, requests/s, the swap in the middle). ``benchmarks/bench_serve.py`` runs them."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from machine import read as _read

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ server


def start_server(artifact: str, log: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sparse_kd.cli", "serve", artifact, "--port", "0", "--watch", "0",
           "--torch-threads", str(args.server_threads), "--max-body-bytes", str(args.max_body_bytes),
           "--max-candidates", str(max(args.candidates, 1000))]
    if args.server_workers is not None:
        cmd += ["--workers", str(args.server_workers)]
    cmd += ["--http", args.http, "--loop", args.loop]
    f = open(log, "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 where /proc is unavailable)."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if len(fields) < 13:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(addr: str, method: str, path: str, body: Optional[bytes] = None, timeout: float = 120.0) -> tuple[int, bytes]:
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def metrics(addr: str) -> Dict[str, float]:
    status, data = call(addr, "GET", "/metrics")
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


# ------------------------------------------------------------------------------------------ clients


_STOP = None  # the phase's stop event, set in each client process by init_client


def init_client(stop) -> None:
    global _STOP
    _STOP = stop


def client_load(addr: str, bodies: List[bytes], start_at: float, deadline: float, max_requests: int,
                candidates: int) -> Dict[str, Any]:
    """One client: POST /rank back to back on one keep-alive connection from wall time ``start_at``
    until the phase's stop event (or ``deadline``). Returns per request (start offset s, latency s,
    status, artifact id)."""
    host, port = addr.split(":")
    conn = _connect(host, int(port))
    starts, lats, statuses, arts, errors = [], [], [], [], []
    headers = {"Content-Type": "application/json"}
    while time.time() < start_at:
        time.sleep(0.001)
    k = 0
    while not _STOP.is_set() and time.time() < deadline and k < max_requests:
        body = bodies[k % len(bodies)]
        t0 = time.time()
        p0 = time.perf_counter()
        try:
            conn.request("POST", "/rank", body, headers)
            r = conn.getresponse()
            data = r.read()
            status = r.status
        except (OSError, http.client.HTTPException) as e:
            status, data = -1, b""
            if len(errors) < 5:
                errors.append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = _connect(host, int(port))
        lat = time.perf_counter() - p0
        art = ""
        if status == 200:
            i = data.rfind(b'"artifact":"')
            art = data[i + 12: i + 24].decode() if i >= 0 else "?"
            if k % 50 == 0:  # a full structural check now and then (parsing every answer costs client CPU)
                doc = json.loads(data)
                if len(doc["scores"]) != candidates or sorted(doc["order"]) != list(range(candidates)):
                    status = -2
                    if len(errors) < 5:
                        errors.append("malformed 200 answer")
        starts.append(round(t0 - start_at, 6))
        lats.append(lat)
        statuses.append(status)
        arts.append(art)
        k += 1
    conn.close()
    return {"starts": starts, "lats": lats, "statuses": statuses, "arts": arts, "errors": errors}


def _connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY, as urllib3 / requests / httpx set it: http.client
    writes the headers and the body separately, and without it Nagle's algorithm holds the body
    until the server's delayed ACK (tens of ms per request)."""
    import socket

    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def malformed_kinds(max_candidates: int, max_body_bytes: int) -> List[tuple[str, str, bytes]]:
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    return [
        ("POST", "/rank", b""),
        ("POST", "/rank", b"{not json"),
        ("POST", "/rank", b'{"user": "u1", "items": ["i1"]'),
        ("POST", "/rank", b'{"user": "\xff"}'),
        ("POST", "/rank", b"[" * 5000 + b"]" * 5000),
        ("POST", "/rank", b"[]"),
        ("POST", "/rank", j({"items": ["i1"]})),
        ("POST", "/rank", j({"user": 7, "items": ["i1"]})),
        ("POST", "/rank", j({"user": "", "items": ["i1"]})),
        ("POST", "/rank", j({"user": "u1", "items": "i1"})),
        ("POST", "/rank", j({"user": "u1", "items": ["i1", None, 3]})),
        ("POST", "/rank", j({"user": "u1", "items": ["i1"], "top_k": -1})),
        ("POST", "/rank", j({"user": "u1", "items": ["i1"], "extra": 1})),
        ("POST", "/rank", j({"user": "u1", "items": ["i"] * (max_candidates + 1)})),
        ("POST", "/rank", b" " * (max_body_bytes + 1)),
        ("POST", "/score", j({"pairs": [["u1"]]})),
        ("POST", "/score", j({"pairs": "u1,i1"})),
        ("GET", "/rank", b""),
        ("PUT", "/score", b"{}"),
        ("POST", "/no/such/endpoint", b"{}"),
        ("POST", "/admin/reload", b"{oops"),
        ("POST", "/admin/reload", j({"path": 5})),
    ]


def client_malformed(addr: str, kinds: List[tuple[str, str, bytes]], n: int, offset: int) -> Dict[str, Any]:
    host, port = addr.split(":")
    conn = _connect(host, int(port))
    statuses: Counter = Counter()
    bad: List[str] = []
    for k in range(n):
        method, path, body = kinds[(k + offset) % len(kinds)]
        try:
            conn.request(method, path, body or None, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            statuses[r.status] += 1
            if not 400 <= r.status < 500 and len(bad) < 5:
                bad.append(f"{method} {path} {body[:40]!r} -> {r.status}")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = _connect(host, int(port))
        except (OSError, http.client.HTTPException) as e:
            statuses[-1] += 1
            if len(bad) < 5:
                bad.append(f"{method} {path} {body[:40]!r} -> {type(e).__name__}: {e}")
            conn.close()
            conn = _connect(host, int(port))
    conn.close()
    return {"statuses": dict(statuses), "bad": bad}


# ------------------------------------------------------------------------------------------ summaries


def percentile(xs: List[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def summarize(results: List[Dict[str, Any]], keep=lambda start: True) -> Dict[str, Any]:
    """Latency percentiles (ms) and counts over the requests whose start offset ``keep`` accepts."""
    lats, n, errors = [], 0, 0
    for r in results:
        for s, lat, st in zip(r["starts"], r["lats"], r["statuses"]):
            if keep(s):
                n += 1
                if st == 200:
                    lats.append(lat * 1e3)
                else:
                    errors += 1
    return {"requests": n, "ok": len(lats), "errors": errors,
            "p50_ms": round(percentile(lats, 50), 3), "p90_ms": round(percentile(lats, 90), 3), "p99_ms": round(percentile(lats, 99), 3),
            "max_ms": round(max(lats), 3) if lats else float("nan"),
            "mean_ms": round(statistics.fmean(lats), 3) if lats else float("nan")}


def run_phase(pool, stop, addr: str, dtype: str, paths: tuple[str, str], bodies: List[bytes], args: argparse.Namespace,
              server_pid: int) -> Dict[str, Any]:
    """Load on one artifact for ``args.seconds``; halfway, swap in its copy; the phase goes on for at
    least a second after the swap's answer, so requests on the new artifact are measured too."""
    status, data = call(addr, "POST", "/admin/reload", json.dumps({"path": paths[0]}).encode())
    if status != 200:
        raise RuntimeError(f"could not swap in {paths[0]}: {status} {data[:300]!r}")
    for k in range(args.warmup):
        call(addr, "POST", "/rank", bodies[k % len(bodies)])
    m0 = metrics(addr)
    cpu0 = cpu_seconds(server_pid)
    stop.clear()
    start_at = time.time() + 1.0  # every client connected and waiting
    deadline = start_at + 3 * args.seconds + 120  # hard stop, should the stop event never come
    per_client = [bodies[c::args.clients] or bodies for c in range(args.clients)]
    jobs = [pool.apply_async(client_load, (addr, per_client[c], start_at, deadline, args.max_requests, args.candidates))
            for c in range(args.clients)]
    time.sleep(max(0.0, start_at + args.seconds / 2 - time.time()))
    s0 = time.time() - start_at
    status, data = call(addr, "POST", "/admin/reload", json.dumps({"path": paths[1]}).encode())
    s1 = time.time() - start_at
    time.sleep(max(0.0, max(start_at + args.seconds, start_at + s1 + 1.0) - time.time()))
    stop.set()
    results = [j.get(timeout=3 * args.seconds + 300) for j in jobs]
    cpu1 = cpu_seconds(server_pid)
    m1 = metrics(addr)
    ends = [s + lat for r in results for s, lat in zip(r["starts"], r["lats"])]
    wall = max(ends) if ends else 0.0
    overall = summarize(results)
    overall["requests_per_s"] = round(overall["ok"] / wall, 1) if wall > 0 else 0.0
    in_window = lambda x: s0 <= x < s1 + 0.5  # noqa: E731
    swap = summarize(results, in_window)
    steady = summarize(results, lambda x: not in_window(x))
    answer = json.loads(data) if data[:1] == b"{" else {}
    ids = Counter(a for r in results for a, st in zip(r["arts"], r["statuses"]) if st == 200)
    key = 'sparse_kd_request_seconds_{}{{route="/rank"}}'
    server_n = m1.get(key.format("count"), 0) - m0.get(key.format("count"), 0)
    server_s = m1.get(key.format("sum"), 0) - m0.get(key.format("sum"), 0)
    return {
        "dtype": dtype, "clients": args.clients, "candidates": args.candidates, "seconds": args.seconds,
        **overall, "wall_s": round(wall, 3),
        "server_mean_ms": round(server_s / server_n * 1e3, 3) if server_n else None,
        "server_cpu_per_wall": round((cpu1 - cpu0) / wall, 2) if wall > 0 else None,
        "outside_swap_window": steady,
        "swap": {"status": status, "swapped": answer.get("swapped"), "reload_s": round(s1 - s0, 3),
                 "at_s": round(s0, 3), "from": answer.get("previous"), "to": (answer.get("artifact") or {}).get("id"),
                 "window": swap, "answers_by_artifact": dict(ids)},
        "client_errors": [e for r in results for e in r["errors"]][:5],
    }
