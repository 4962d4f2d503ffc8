"""Lookup tables on transparent huge pages (THP), for CPU serving.

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
"""

from __future__ import annotations

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
    seen: set[int] = set()
    with torch.no_grad():
        for _name, buf in model.named_buffers():
            nbytes = buf.numel() * buf.element_size()
            if buf.device.type != "cpu" or nbytes < min_bytes or not buf.is_contiguous() or id(buf) in seen:
                continue
            seen.add(id(buf))
            buf.set_(huge_page_copy(buf))
            report["tensors"] += 1
            report["bytes"] += nbytes
    if report["tensors"]:
        log.info("huge pages: %d table buffers, %.1f MB (transparent huge pages: %s)", report["tensors"],
                 report["bytes"] / 2**20, mode)
    return report
