"""The service's metrics: request counts and latency histograms per route, scored pairs, unknown
ids, reloads, in Prometheus' text exposition format (``GET /metrics``)."""

from __future__ import annotations

import bisect
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparse_kd.serve.loaded import Loaded

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

