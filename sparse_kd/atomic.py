"""Whole-file writes: a file is either its old bytes or its new bytes, never half of each.

The bytes go to a temp file beside the target (``.<name>.<pid>.tmp``), are flushed to disk,
then ``os.replace``\\ d over the target. A writer killed midway leaves the old file and at most
a temp file, which nothing reads (stdlib only).

Example::

    write_text(run / "config.yaml", yaml.safe_dump(doc))
    with replacing(run / "data" / "entity_dense.pt") as tmp:
        torch.save(tensors, tmp)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text`` (UTF-8), atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def swap_in_dir(tmp: str | Path, out: str | Path, old: str | Path) -> None:
    """Put the complete folder ``tmp`` at ``out``. An existing ``out`` is first renamed to ``old``
    and deleted after: a kill between the two renames leaves ``old`` (readers that know the
    naming scheme move it back), never a half-written ``out``."""
    tmp, out, old = Path(tmp), Path(out), Path(old)
    if out.exists():
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
