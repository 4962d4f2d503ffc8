"""bench_lookup's measurement: a :class:`Variant` (one lookup, timed split across the cores and as
one stream per core, each round paired with the floor measured the same way), the machine's copy
bandwidth, rounds over every variant, and the profiler's view of one lookup."""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from lookup_tables import Batch

FLOOR = "embbag_fp32"



# ----------------------------------------------------------------------------------------------
# Measurement


class Variant:
    def __init__(
        self,
        name: str,
        call: Callable[[Batch], Any],
        bytes_per_batch: Callable[[Batch], int],
        *,
        dtype: str,
        remap: bool,
        parallel: bool,
        row_bytes: int,
        set_workers: Optional[Callable[[int], None]] = None,
        weight_bytes: int = 0,
        kernel: str = "",
    ) -> None:
        self.name, self.call, self.bytes_per_batch = name, call, bytes_per_batch
        self.kernel = kernel
        self.dtype, self.remap, self.parallel, self.row_bytes = dtype, remap, parallel, row_bytes
        self.set_workers = set_workers
        self.weight_bytes = weight_bytes
        self.cursor = 0
        self.iters: Dict[int, int] = {}
        self.samples: Dict[int, List[float]] = {}  # threads -> ids/s per round
        self.gbps: Dict[int, List[float]] = {}
        self.paired: Dict[int, List[float]] = {}  # threads -> ratio to the floor, same round
        self.cpu_util: Dict[int, List[float]] = {}
        self.per_cpu: Dict[int, List[float]] = {}  # ids per CPU-second of this process
        # streams: `threads` threads, each looking up its own batches one after another on one core
        # (intra-op threads 1, one worker), as `sparse-kd serve` scores requests on its --workers threads
        self.stream_samples: Dict[int, List[float]] = {}
        self.stream_paired: Dict[int, List[float]] = {}  # ratio to the floor's streams, same round
        self.best_paired: Dict[int, List[float]] = {}  # best of (split, streams) over the floor's best

    def run(self, batches: List[Batch], threads: int, target_s: float) -> float:
        if self.set_workers is None:
            return self._run(batches, threads, target_s)
        # the serving lookup spreads a batch over `threads` forked workers and runs each operator
        # on one thread: torch's intra-op threads at 1, as `sparse-kd serve` runs it
        self.set_workers(threads)
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(batches, threads, target_s)
        finally:
            torch.set_num_threads(prev)

    def _run(self, batches: List[Batch], threads: int, target_s: float) -> float:
        if threads not in self.iters:  # calibrate: warm up, then size a sample to ~target_s
            for _ in range(2):
                self.call(batches[self.cursor % len(batches)])
                self.cursor += 1
            t0 = time.perf_counter()
            self.call(batches[self.cursor % len(batches)])
            self.cursor += 1
            one = max(time.perf_counter() - t0, 1e-6)
            self.iters[threads] = int(min(500, max(2, math.ceil(target_s / one))))
        n = self.iters[threads]
        todo = [batches[(self.cursor + i) % len(batches)] for i in range(n)]
        self.cursor += n
        self.call(todo[0])  # warm this round (thread switch, caches)
        # Python's cyclic GC off while timing, as ``timeit`` does: a collection that happens to
        # start inside one variant's sample would charge it for every object this process holds
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            c0 = time.process_time()
            t0 = time.perf_counter()
            for b in todo:
                self.call(b)
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
        finally:
            if gc_was_on:
                gc.enable()
        ids = sum(b.ids for b in todo)
        nbytes = sum(self.bytes_per_batch(b) for b in todo)
        rate = ids / dt
        self.samples.setdefault(threads, []).append(rate)
        self.gbps.setdefault(threads, []).append(nbytes / dt / 1e9)
        # CPU seconds this process got per wall second of the sample: ~threads when the cores
        # were ours, far less when other jobs held them
        self.cpu_util.setdefault(threads, []).append(cpu / dt)
        self.per_cpu.setdefault(threads, []).append(ids / max(cpu, 1e-9))
        return rate


    def run_streams(self, batches: List[Batch], threads: int, target_s: float) -> float:
        """ids/s of ``threads`` threads, each calling the variant on its own batches (one worker,
        intra-op threads 1) for about ``target_s``: the way a service with one scoring thread per
        core uses the cores, where ``run`` splits every batch across them."""
        if self.set_workers is not None:
            self.set_workers(1)
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        n = max(2, self.iters.get(1) or self.iters.get(threads) or 2)  # calls of ~target_s on one core
        starts = [(self.cursor + k * n) for k in range(threads)]
        self.cursor += threads * n
        for k in range(threads):  # warm every stream's first batch
            self.call(batches[starts[k] % len(batches)])
        ids = [0] * threads
        barrier = threading.Barrier(threads + 1)

        def stream(k: int) -> None:
            barrier.wait()
            for i in range(n):
                b = batches[(starts[k] + i) % len(batches)]
                self.call(b)
                ids[k] += b.ids

        pool = [threading.Thread(target=stream, args=(k,)) for k in range(threads)]
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            for t in pool:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in pool:
                t.join()
            dt = time.perf_counter() - t0
        finally:
            if gc_was_on:
                gc.enable()
            torch.set_num_threads(prev)
        rate = sum(ids) / dt
        self.stream_samples.setdefault(threads, []).append(rate)
        return rate


_COPY_BUFFERS: Dict[int, tuple] = {}


def copy_bandwidth(nbytes: int, threads: int, reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` (fp32 tensors of ``nbytes`` each), counting read + write bytes."""
    torch.set_num_threads(threads)
    n = nbytes // 4
    if n not in _COPY_BUFFERS:
        _COPY_BUFFERS.clear()
        _COPY_BUFFERS[n] = (torch.ones(n), torch.empty(n))
    src, dst = _COPY_BUFFERS[n]
    dst.copy_(src)
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best.append(2 * n * 4 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(best)


def measure_rounds(
    variants: List[Variant], batches: List[Batch], threads: List[int], rounds: int, target_s: float,
    copy_samples: Dict[int, List[float]], copy_bytes: int, loads: List[float],
) -> None:
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for th in threads:
            torch.set_num_threads(th)
            floor_rate = None
            split: Dict[str, float] = {}
            for v in variants:
                rate = v.run(batches, th, target_s)
                split[v.name] = rate
                if v.name == FLOOR:
                    floor_rate = rate
                if floor_rate:
                    v.paired.setdefault(th, []).append(rate / floor_rate)
            if th > 1:  # the same cores used as a service uses them: one stream of batches per core
                floor_stream = None
                for v in variants:
                    rate = v.run_streams(batches, th, target_s)
                    if v.name == FLOOR:
                        floor_stream = rate
                    if floor_stream and floor_rate:
                        v.stream_paired.setdefault(th, []).append(rate / floor_stream)
                        v.best_paired.setdefault(th, []).append(
                            max(rate, split[v.name]) / max(floor_stream, floor_rate))
            copy_samples.setdefault(th, []).append(copy_bandwidth(copy_bytes, th, 3))
            torch.set_num_threads(th)


def profile_lookup(call: Callable[[Batch], Any], batches: List[Batch], threads: int, calls: int,
                   top: int) -> List[Dict[str, Any]]:
    """Operator-level CPU profile (torch.profiler) of ``calls`` lookups; top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    for b in batches[:2]:
        call(b)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            call(batches[i % len(batches)])
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                "self_cpu_pct": round(100.0 * e.self_cpu_time_total / total_self, 1),
            }
        )
    rows.append({"op": "<wall time of the profiled calls>", "calls": calls, "self_cpu_ms": round(wall * 1e3, 2),
                 "self_cpu_pct": round(100.0 * total_self / 1e3 / (wall * 1e3), 1)})
    return rows
