"""The ranking service's core, apart from any web framework: request parsing and limits, the
loaded artifact (held by one reference and swapped atomically), scoring off the event loop,
reloads, and metrics. :mod:`sparse_kd.serve.server` puts it behind HTTP.

Notation: N candidate items of one ``/rank`` request, P pairs of one ``/score`` request.

Requests (JSON bodies; every problem with one is a :class:`RequestError` with a 4xx status and a
message naming the key; the only 5xx is a 503 when the service is overloaded):

* rank: ``{"user": str, "items": [str, ...], "top_k": int (optional)}`` with
  ``0 <= N <= Limits.max_candidates``;
* score: ``{"pairs": [[user, item], ...]}`` with ``0 <= P <= Limits.max_pairs``;
* reload: ``{"path": str}`` (optional; default: the folder served now).

Ids are non-empty strings; unknown keys, wrong types, empty ids are 422; a body that is not
JSON (or not UTF-8, or nested too deep for the parser) is 400; a body over
``Limits.max_body_bytes`` or a list over its limit is 413; when ``Limits.max_pending`` scoring
jobs already wait, the request gets 503 (overloaded, retry later).

Unknown ids: an id absent from the artifact's ``mappings.json`` gets the artifact's fallback
(:func:`fallback_policy`: the manifest's ``fallback`` entry when it has one, else the predictor's
documented behaviour: empty embedding bags and zero dense features, as a cold entity with no
data) and is flagged in the response (``unknown_user``, ``unknown_items`` / ``unknown_users``:
indices into the request's lists).

Swaps: :meth:`Service.reload` verifies and loads the new artifact on a loader thread while the
current one keeps serving, then replaces the one reference :attr:`Service.current`. A request
takes that reference once, when it starts, so requests in flight finish on the artifact they
started with; the old artifact is freed when the last of them ends. An artifact that fails
verification or loading is refused (:class:`ReloadRefused`) and the old one keeps serving.
With ``watch_interval > 0`` the service polls ``<artifact>/manifest.json`` and reloads when the
folder was replaced (what :func:`sparse_kd.compress.artifact.save_artifact` does, e.g. through
``sparse-kd add-items``).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import orjson

from sparse_kd.serve import ArtifactError, Predictor  # the predictor's public API only
from sparse_kd.serve.predictor import DEFAULT_MAX_BATCH

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ORJSON_MAX_DEPTH = 1024  # orjson.loads refuses deeper nesting ("depth limit exceeded")

DEFAULT_FALLBACK = {
    "unknown_user": "every embedding bag of the user's features is empty (zero pooled embedding) and its dense "
                    "features are zeros, as for a cold user with no data",
    "unknown_item": "every embedding bag of the item's features is empty (zero pooled embedding) and its dense "
                    "features are zeros, as for a cold item with no data",
    "source": "sparse_kd.serve.predictor (the artifact's manifest names no other policy)",
}


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx, or 503 when overloaded) and a message saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ReloadRefused(RequestError):
    """A new artifact failed verification or loading; the old one keeps serving."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)


@dataclass(frozen=True)
class Limits:
    """Per-request limits (see the module doc for the status each one gives)."""

    max_candidates: int = 1000
    max_pairs: int = 10000
    max_body_bytes: int = 1 << 20
    max_pending: int = 64

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_pairs", "max_body_bytes", "max_pending"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


# ------------------------------------------------------------------------------------------ parsing


def _kind(v: Any) -> str:
    """A JSON value's type and a short excerpt, for error messages."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    text = json.dumps(v)[:40] if not isinstance(v, (list, dict)) else ("[...]" if isinstance(v, list) else "{...}")
    return f"{names.get(type(v), type(v).__name__)} {text}"


def parse_json(body: bytes) -> Any:
    """The request body as JSON (strict RFC 8259, parsed by orjson), or a 400 saying why not."""
    if not body.strip():
        raise RequestError(400, "empty body; send a JSON object (Content-Type: application/json)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "UTF-8" in e.msg:
            raise RequestError(400, f"body is not UTF-8 text ({e.msg}, at byte {e.pos}); send UTF-8 JSON") from None
        if "depth limit" in e.msg:
            raise RequestError(400, "body is not valid JSON for this service: nested too deeply "
                                    f"(orjson's limit is {ORJSON_MAX_DEPTH} levels)") from None
        raise RequestError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _object(doc: Any, allowed: tuple[str, ...], required: tuple[str, ...], example: str) -> dict:
    if not isinstance(doc, dict):
        raise RequestError(422, f"the body must be a JSON object like {example}, got {_kind(doc)}")
    unknown = [k for k in doc if k not in allowed]
    if unknown:
        raise RequestError(422, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)} (e.g. {example})")
    missing = [k for k in required if k not in doc]
    if missing:
        raise RequestError(422, f"missing key {missing[0]!r}; expected {example}")
    return doc


def _id(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise RequestError(422, f"{where} must be a non-empty string (an id), got {_kind(v)}")
    return v


def _list(v: Any, where: str, limit: int, limit_name: str) -> list:
    if not isinstance(v, list):
        raise RequestError(422, f"{where} must be an array, got {_kind(v)}")
    if len(v) > limit:
        raise RequestError(413, f"{where} has {len(v)} entries, over the limit of {limit} ({limit_name}); "
                                "split the request")
    return v


@dataclass(frozen=True)
class RankRequest:
    user: str
    items: list[str]
    top_k: Optional[int] = None


RANK_EXAMPLE = '{"user": "u1", "items": ["i1", "i2"], "top_k": 10}'
SCORE_EXAMPLE = '{"pairs": [["u1", "i1"], ["u2", "i7"]]}'
RELOAD_EXAMPLE = '{"path": "/path/to/artifact"}'


def parse_rank(doc: Any, limits: Limits) -> RankRequest:
    d = _object(doc, ("user", "items", "top_k"), ("user", "items"), RANK_EXAMPLE)
    user = _id(d["user"], "user")
    items = _list(d["items"], "items", limits.max_candidates, "--max-candidates")
    for k, v in enumerate(items):
        if not isinstance(v, str) or not v:
            _id(v, f"items[{k}]")
    top_k = d.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RequestError(422, f"top_k must be an integer >= 1 (or absent for the whole order), got {_kind(top_k)}")
    return RankRequest(user, items, top_k)


def parse_score(doc: Any, limits: Limits) -> tuple[list[str], list[str]]:
    d = _object(doc, ("pairs",), ("pairs",), SCORE_EXAMPLE)
    pairs = _list(d["pairs"], "pairs", limits.max_pairs, "--max-pairs")
    users, items = [], []
    for k, p in enumerate(pairs):
        if not isinstance(p, list) or len(p) != 2:
            raise RequestError(422, f"pairs[{k}] must be [user, item] (an array of two ids), got {_kind(p)}")
        users.append(_id(p[0], f"pairs[{k}][0]"))
        items.append(_id(p[1], f"pairs[{k}][1]"))
    return users, items


def parse_reload(doc: Any) -> Optional[str]:
    d = _object(doc, ("path",), (), RELOAD_EXAMPLE)
    return None if d.get("path") is None else _id(d["path"], "path")


# ------------------------------------------------------------------------------------------ artifact


def fallback_policy(manifest: dict) -> dict:
    """What unknown ids get: the manifest's ``fallback`` entry if the artifact records one, else
    the predictor's documented behaviour (:data:`DEFAULT_FALLBACK`)."""
    fb = manifest.get("fallback")
    return dict(fb) if isinstance(fb, dict) and fb else dict(DEFAULT_FALLBACK)


def _manifest_state(d: Path) -> tuple[Optional[tuple], Optional[str], bytes]:
    """(stat signature, sha256, bytes) of ``d/manifest.json``; (None, None, b"") while it is absent."""
    try:
        with open(d / MANIFEST, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError:
        return None, None, b""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), hashlib.sha256(data).hexdigest(), data


def manifest_signature(d: Path) -> Optional[tuple]:
    """Cheap change detector of an artifact folder: stat of its manifest (None while absent)."""
    try:
        st = os.stat(Path(d) / MANIFEST)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class Loaded:
    """One loaded artifact and what the service needs besides the predictor (immutable once built).

    artifact_id: the first hex digits of the manifest's sha256 (the manifest holds the sha256 of
    every file, so equal ids mean equal artifacts)."""

    predictor: Predictor
    path: Path
    manifest: dict
    digest: str
    signature: tuple
    loaded_at: float
    load_seconds: float
    fallback: dict = field(default_factory=dict)

    @property
    def artifact_id(self) -> str:
        return self.digest[:12]

    @property
    def users(self) -> dict:
        """The artifact's user ids (the predictor's id -> row index: ``in`` and ``len`` work)."""
        return self.predictor.user_index

    @property
    def items(self) -> dict:
        """The artifact's item ids (the predictor's id -> row index)."""
        return self.predictor.item_index

    def describe(self) -> dict:
        tables = {t: {k: v.get(k) for k in ("feature", "dtype", "rows_original", "rows_kept", "fill")}
                  for t, v in self.manifest.get("tables", {}).items()}
        return {"id": self.artifact_id, "path": str(self.path), "created_utc": self.manifest.get("created_utc"),
                "loaded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "load_seconds": round(self.load_seconds, 3), "users": len(self.users), "items": len(self.items),
                "tables": tables, "fallback": self.fallback}

    # scoring: runs on a worker thread; returns (response bytes, counts for the metrics)

    def rank(self, req: RankRequest) -> tuple[bytes, dict]:
        n = len(req.items)
        probs, st = self.predictor.score([req.user] * n, req.items, return_stats=True)  # (N,) float32
        order = np.argsort(-probs, kind="stable")  # best first; equal scores keep request order
        if req.top_k is not None:
            order = order[: req.top_k]
        unknown_user = req.user not in self.users
        unknown_items = st["unknown_item_at"]
        doc = {"user": req.user, "scores": probs.tolist(), "order": order.tolist(), "unknown_user": unknown_user,
               "unknown_items": unknown_items, "artifact": self.artifact_id}
        counts = {"pairs": n, "unknown_users": int(unknown_user), "unknown_items": len(unknown_items)}
        return _dumps(doc, probs), counts

    def score(self, users: list[str], items: list[str]) -> tuple[bytes, dict]:
        probs, st = self.predictor.score(users, items, return_stats=True)  # (P,) float32
        unknown_users = st["unknown_user_at"]
        unknown_items = st["unknown_item_at"]
        doc = {"scores": probs.tolist(), "unknown_users": unknown_users, "unknown_items": unknown_items,
               "artifact": self.artifact_id}
        counts = {"pairs": len(users), "unknown_users": len(unknown_users), "unknown_items": len(unknown_items)}
        return _dumps(doc, probs), counts


def _dumps(doc: dict, scores: np.ndarray) -> bytes:
    """The response body. orjson writes a 1 x 500 answer in about a twentieth of ``json.dumps``'s
    time (``codec_overhead`` in docs/bench/serve.json, from ``benchmarks/bench_serve.py``). It
    writes NaN and inf as null, so a non-finite score is refused here first."""
    if not np.isfinite(scores).all():
        raise RuntimeError("the artifact produced a non-finite score (NaN or inf); its weights are broken")
    return orjson.dumps(doc)


def load_artifact(path: str | Path, max_batch: Optional[int] = None, attempts: int = 3,
                  huge_pages: bool = True) -> Loaded:
    """Verify (checksums, format version) and load an artifact folder for serving.

    The manifest is read before and after loading: if the folder was replaced meanwhile (a writer
    renamed a new artifact into place), the load is repeated, so the predictor and the manifest
    always come from one artifact. max_batch: the predictor's (None: its default). huge_pages: see
    :meth:`Predictor.load`. Raises
    :class:`ArtifactError` (or whatever loading raised)."""
    d = Path(path).absolute()
    for _ in range(attempts):
        t0 = time.perf_counter()
        _, before, _ = _manifest_state(d)
        predictor = Predictor.load(d, max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                                   huge_pages=huge_pages)
        signature, after, data = _manifest_state(d)
        if before is not None and before == after:
            manifest = json.loads(data)
            return Loaded(predictor, d, manifest, after, signature, time.time(), time.perf_counter() - t0,
                          fallback_policy(manifest))
        log.warning("%s was replaced while it was being loaded; loading it again", d)
    raise ArtifactError(f"{d}: the artifact kept changing while it was being loaded ({attempts} attempts)")


# ------------------------------------------------------------------------------------------ metrics


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations per upper bound (cumulative when rendered, as Prometheus wants)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, run = [], 0
        for b, c in zip(list(self.bounds) + [math.inf], self.counts):
            run += c
            out.append(("+Inf" if b == math.inf else repr(b), run))
        return out


class Metrics:
    """Request counts by route and status, latency histograms by route, scoring and reload counters.

    Updated only on the event loop thread (no locks needed)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.counters = {"scored_pairs": 0, "unknown_users": 0, "unknown_items": 0, "reloads_ok": 0,
                         "reloads_refused": 0, "overloaded": 0}
        self.in_flight = 0
        self.started = time.time()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = Histogram()
        h.observe(seconds)

    def add(self, counts: dict) -> None:
        self.counters["scored_pairs"] += counts["pairs"]
        self.counters["unknown_users"] += counts["unknown_users"]
        self.counters["unknown_items"] += counts["unknown_items"]

    def render(self, current: Loaded, pending: int) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        lines = ["# HELP sparse_kd_requests_total HTTP requests by route and status.",
                 "# TYPE sparse_kd_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'sparse_kd_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP sparse_kd_request_seconds Server-side latency: request received to response sent.",
                  "# TYPE sparse_kd_request_seconds histogram"]
        for route, h in sorted(self.latency.items()):
            for le, n in h.cumulative():
                lines.append(f'sparse_kd_request_seconds_bucket{{route="{route}",le="{le}"}} {n}')
            lines.append(f'sparse_kd_request_seconds_sum{{route="{route}"}} {h.sum!r}')
            lines.append(f'sparse_kd_request_seconds_count{{route="{route}"}} {h.count}')
        c = self.counters
        lines += [
            "# HELP sparse_kd_scored_pairs_total (user, item) pairs scored.",
            "# TYPE sparse_kd_scored_pairs_total counter",
            f"sparse_kd_scored_pairs_total {c['scored_pairs']}",
            "# HELP sparse_kd_unknown_ids_total Ids absent from the artifact (given the fallback), per request entry.",
            "# TYPE sparse_kd_unknown_ids_total counter",
            f'sparse_kd_unknown_ids_total{{kind="user"}} {c["unknown_users"]}',
            f'sparse_kd_unknown_ids_total{{kind="item"}} {c["unknown_items"]}',
            "# HELP sparse_kd_reloads_total Artifact reloads: swapped in, or refused (the old one kept serving).",
            "# TYPE sparse_kd_reloads_total counter",
            f'sparse_kd_reloads_total{{result="ok"}} {c["reloads_ok"]}',
            f'sparse_kd_reloads_total{{result="refused"}} {c["reloads_refused"]}',
            "# HELP sparse_kd_overloaded_total Requests answered 503 because max_pending scoring jobs waited.",
            "# TYPE sparse_kd_overloaded_total counter",
            f"sparse_kd_overloaded_total {c['overloaded']}",
            "# HELP sparse_kd_in_flight_requests HTTP requests being handled now.",
            "# TYPE sparse_kd_in_flight_requests gauge",
            f"sparse_kd_in_flight_requests {self.in_flight}",
            "# HELP sparse_kd_pending_scoring_jobs Scoring jobs queued or running.",
            "# TYPE sparse_kd_pending_scoring_jobs gauge",
            f"sparse_kd_pending_scoring_jobs {pending}",
            "# HELP sparse_kd_artifact_info The artifact served now (value 1).",
            "# TYPE sparse_kd_artifact_info gauge",
            f'sparse_kd_artifact_info{{id="{current.artifact_id}",path="{_label(str(current.path))}"}} 1',
            "# HELP sparse_kd_uptime_seconds Seconds since the service started.",
            "# TYPE sparse_kd_uptime_seconds gauge",
            f"sparse_kd_uptime_seconds {time.time() - self.started:.3f}",
        ]
        return "\n".join(lines) + "\n"


def _label(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ------------------------------------------------------------------------------------------ service


class Service:
    """The serving state: the current artifact, the scoring threads, limits, metrics, reloads.

    artifact: folder to load now (an :class:`ArtifactError` here means the service does not start).
    workers: scoring threads (torch releases the GIL inside the model; the request parsing stays on
    the event loop); 0 scores on the event loop itself: no thread hand-off per request, but nothing
    else (health, metrics, reading the next request) runs while one request is scored.
    watch_interval: seconds between checks of ``manifest.json`` (0: no watching).
    """

    def __init__(self, artifact: str | Path, limits: Limits = Limits(), workers: int = 1,
                 watch_interval: float = 0.0, max_batch: Optional[int] = None,
                 admin_token: Optional[str] = None, huge_pages: bool = True) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if watch_interval < 0:
            raise ValueError(f"watch_interval must be >= 0, got {watch_interval}")
        self.limits = limits
        self.max_batch = max_batch
        self.watch_interval = float(watch_interval)
        self.admin_token = admin_token
        self.huge_pages = bool(huge_pages)
        self.metrics = Metrics()
        self.current = self._load(artifact)
        log.info("serving %s", _summary(self.current))
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="sparse_kd-score") if workers else None
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="sparse_kd-load")
        self.pending = 0
        self._reload_lock = asyncio.Lock()
        self._refused_signature: Optional[tuple] = None
        self._closed = threading.Event()

    def _load(self, path: str | Path) -> Loaded:
        return load_artifact(path, self.max_batch, huge_pages=self.huge_pages)

    async def run_scoring(self, fn: Callable[..., tuple[bytes, dict]], *args: Any) -> bytes:
        """Run ``fn(*args)`` on a scoring thread (or inline when ``workers == 0``); 503 when
        ``max_pending`` jobs already wait."""
        if self.executor is None:
            body, counts = fn(*args)
            self.metrics.add(counts)
            return body
        if self.pending >= self.limits.max_pending:
            self.metrics.counters["overloaded"] += 1
            raise RequestError(503, f"overloaded: {self.pending} scoring jobs pending (--max-pending "
                                    f"{self.limits.max_pending}); retry shortly")
        self.pending += 1
        try:
            body, counts = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.pending -= 1
        self.metrics.add(counts)
        return body

    async def rank(self, req: RankRequest) -> bytes:
        loaded = self.current  # taken once: this request finishes on this artifact whatever is swapped in
        return await self.run_scoring(loaded.rank, req)

    async def score(self, users: list[str], items: list[str]) -> bytes:
        loaded = self.current
        return await self.run_scoring(loaded.score, users, items)

    async def reload(self, path: Optional[str | Path] = None, reason: str = "request") -> dict:
        """Load ``path`` (default: the folder served now) off the request path and swap it in.

        Returns {"swapped": bool, "artifact": {...}, "previous": id}; an identical artifact at the
        same path (same manifest bytes) is not loaded again. Raises :class:`ReloadRefused`."""
        async with self._reload_lock:
            old = self.current
            target = Path(path).absolute() if path is not None else old.path
            if target == old.path:
                _, digest, _ = _manifest_state(target)
                if digest == old.digest:
                    return {"swapped": False, "reason": "unchanged (same folder, same manifest)",
                            "artifact": old.describe(), "previous": old.artifact_id}
            log.info("loading %s (%s) while %s keeps serving", target, reason, old.artifact_id)
            try:
                new = await asyncio.get_running_loop().run_in_executor(self.loader, self._load, target)
            except Exception as e:  # whatever breaks a load refuses the artifact; the old one keeps serving
                self.metrics.counters["reloads_refused"] += 1
                self._refused_signature = manifest_signature(target)
                why = str(e) if isinstance(e, ArtifactError) else f"{type(e).__name__}: {e}"
                msg = f"refused: {why}" if why.startswith(str(target)) else f"refused {target}: {why}"
                log.error("%s; still serving %s (%s)", msg, old.artifact_id, old.path)
                raise ReloadRefused(f"{msg}; still serving {old.artifact_id} ({old.path})") from None
            self.current = new  # one reference assignment: atomic for every request that starts after it
            self.metrics.counters["reloads_ok"] += 1
            self._refused_signature = None
            log.info("swapped %s -> %s (%s, %s)", old.artifact_id, new.artifact_id, reason, _summary(new))
            return {"swapped": True, "artifact": new.describe(), "previous": old.artifact_id}

    async def watch(self) -> None:
        """Reload when the served folder's manifest changes (it was replaced); runs until cancelled."""
        while True:
            await asyncio.sleep(self.watch_interval)
            cur = self.current
            sig = manifest_signature(cur.path)
            if sig is None or sig == cur.signature or sig == self._refused_signature:
                continue
            try:
                await self.reload(cur.path, reason="manifest.json changed")
            except ReloadRefused:
                pass  # logged; retried when the manifest changes again
            except Exception:  # never let the watcher die silently
                log.exception("watching %s failed; watching goes on", cur.path)

    def check_admin(self, token: Optional[str]) -> None:
        import hmac

        if self.admin_token is not None and not hmac.compare_digest(token or "", self.admin_token):
            raise RequestError(403, "admin endpoints need the header X-Admin-Token with the --admin-token value")

    def health(self) -> dict:
        return {"status": "ok", "artifact": self.current.describe(), "uptime_s": round(time.time() - self.metrics.started, 3),
                "pending": self.pending, "limits": {k: getattr(self.limits, k) for k in
                                                    ("max_candidates", "max_pairs", "max_body_bytes", "max_pending")},
                "reloads": {"ok": self.metrics.counters["reloads_ok"], "refused": self.metrics.counters["reloads_refused"]},
                "watch_interval_s": self.watch_interval, "workers": self.workers}

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            if self.executor is not None:
                self.executor.shutdown(wait=True)
            self.loader.shutdown(wait=True)


def _summary(ld: Loaded) -> str:
    dtypes = sorted({str(t.get("dtype")) for t in ld.manifest.get("tables", {}).values()})
    return (f"artifact {ld.artifact_id} from {ld.path}: {len(ld.users)} users, {len(ld.items)} items, "
            f"table dtypes {'/'.join(dtypes)}, loaded in {ld.load_seconds:.2f}s")
