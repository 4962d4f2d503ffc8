"""Memory for CPU serving: lookup tables on transparent huge pages (THP), and a malloc that
keeps freed memory.

A lookup reads a few rows scattered over tables of hundreds of MB: on 4 KiB pages nearly every
id costs a TLB miss (a page walk) before its cache miss. On 2 MiB pages the same tables need 512x
fewer TLB entries. ``torch.jit.load`` allocates buffers with malloc, which the kernel backs
with huge pages only when THP is ``always``; most distributions set ``madvise``, under which a
region gets huge pages only if the process asks (``madvise(MADV_HUGEPAGE)``).

:func:`place_on_huge_pages` moves every large CPU buffer of a loaded model (the tables' weights
and remaps) into an anonymous mapping that asks for huge pages, copying the bytes and pointing
the buffer at the new memory in place (``Tensor.set_``), so the (scripted) model keeps working
unchanged; values are bit-identical. With THP ``never`` (or off Linux) it changes nothing and
says so. ``benchmarks/bench_lookup.py`` measures the effect on lookups.

:func:`keep_freed_memory`: every lookup allocates a few temporaries of 100 KB to 1 MB (the
int32 ids, each operator's (B, D) output). glibc's malloc hands blocks that large out as fresh
``mmap`` regions, or trims them off the heap when freed, so each call faults its pages in again
(zero-filled, one fault per 4 KiB) and the faults' writes evict the hot rows from the caches.
Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt``) keeps such blocks in the
heap for reuse: the process holds on to its peak of temporaries instead. ``sparse-kd serve``
sets both (``--no-malloc-tuning`` turns it off); jemalloc or tcmalloc through ``LD_PRELOAD``
are the usual alternatives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's THP setting (``always``, ``madvise``, ``never``), or ``unavailable``."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``t`` in memory that asks for huge pages (the mapping lives as long
    as the tensor's storage)."""
    n = t.numel() * t.element_size()
    size = max(HUGE_PAGE, (n + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    out = torch.frombuffer(m, dtype=t.dtype, count=t.numel()).view(t.shape)  # the tensor keeps `m` alive
    out.copy_(t)
    return out


def place_on_huge_pages(model: Any, min_bytes: int = HUGE_PAGE) -> dict:
    """Move every CPU buffer of ``model`` of at least ``min_bytes`` onto huge pages (module doc).

    Returns {"thp": mode, "tensors": moved, "bytes": their bytes}; nothing is moved when THP is
    ``never``/unavailable or ``mmap.MADV_HUGEPAGE`` does not exist (not Linux)."""
    mode = thp_mode()
    report = {"thp": mode, "tensors": 0, "bytes": 0}
    if mode not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"):
        log.info("huge pages: not used (transparent huge pages: %s)", mode)
        return report
    with torch.no_grad():
        for _name, buf in model.named_buffers():  # each shared buffer once
            nbytes = buf.numel() * buf.element_size()
            if buf.device.type != "cpu" or nbytes < min_bytes or not buf.is_contiguous():
                continue
            buf.set_(huge_page_copy(buf))
            report["tensors"] += 1
            report["bytes"] += nbytes
    if report["tensors"]:
        log.info("huge pages: %d table buffers, %.1f MB (transparent huge pages: %s)", report["tensors"],
                 report["bytes"] / 2**20, mode)
    return report


M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Tell glibc's malloc to serve blocks under ``mmap_threshold`` bytes from the heap and to keep
    up to ``trim_threshold`` freed bytes (module doc). Returns whether it was applied (False where
    the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("malloc tuning: not applied (no glibc mallopt)")
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    log.debug("malloc tuning: %s (mmap threshold %d MB, trim threshold %d MB)", "applied" if ok else "refused",
             mmap_threshold >> 20, trim_threshold >> 20)
    return ok
