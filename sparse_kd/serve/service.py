"""The ranking service's core, apart from any web framework: request parsing and limits, the
loaded artifact (held by one reference and swapped atomically), scoring off the event loop,
reloads, and metrics. :mod:`sparse_kd.serve.server` puts it behind HTTP.

Notation: N candidate items of one ``/rank`` request, P pairs of one ``/score`` request.

Requests: :mod:`.requests`; the loaded artifact and unknown ids: :mod:`.loaded`; metrics:
:mod:`.metrics`.

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
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from sparse_kd.serve import ArtifactError
from sparse_kd.serve.loaded import Loaded, load_artifact, manifest_signature, manifest_state, summary
from sparse_kd.serve.metrics import Metrics
from sparse_kd.serve.requests import Limits, RankRequest, ReloadRefused, RequestError

log = logging.getLogger(__name__)


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
        log.info("serving %s", summary(self.current))
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
                _, digest, _ = manifest_state(target)
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
            log.info("swapped %s -> %s (%s, %s)", old.artifact_id, new.artifact_id, reason, summary(new))
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
            raise RequestError(403, "admin endpoints need the header X-Admin-Token with the service's admin token")

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
