"""The serving artifact's format: the one module its writer (:mod:`sparse_kd.compress.artifact`)
and its reader (:mod:`sparse_kd.serve.predictor`) both import.

Only the standard library and :mod:`sparse_kd.integrity` are imported here, so a serving process
reads and checks an artifact without torch, FBGEMM, torchrec or any training code.

An artifact is one folder::

    manifest.json      written last; the schema below
    model.pt           TorchScript: forward(dense (B, Dd) f32, values (nnz,) int, lengths (F*B,) int)
                       -> logits (B,)
    mappings.json      raw user / item ids and, per sparse feature, its owner, vocabulary and CSR
                       (offsets, values) over the owner's entities; values are the table's rows
                       (stored rows when the table's remap is folded, tables.<t>.remap "folded")
    entity_dense.pt    {"user": (U, Du), "item": (I, Di)} float32 dense features per entity
    remaps.pt          {table: (N,) int32} original id -> stored row (-1 pruned), pruned tables only
    text_maps.pt       {feature: (H + 1, D)} ridge maps text -> row (for adding entities later)
    dense_fp32.pt      fp32 dense-layer weights (to rebuild the model when entities are added)

Manifest (version 2)::

    format          "sparse_kd.artifact"
    format_version  2
    serving         {"kernel": "torch_quantized" | "fbgemm_tbe", "device": "cpu" | "cuda"}
    model           keys, owners, dense_in_features, embedding_dim, dense_arch, over_arch, dot_logit,
                    dense_int8, remap, folded, row_alignment, kernel, device, file, output
    tables          {table: {feature, owner, dtype, keep_ratio, rows_original, rows_kept,
                    rows_stored, fill, clusters, remap, importance, fp32_bytes, bytes: {dtype,
                    rows, row_bytes, weights, padding, remap, total}}}; bytes are the loaded
                    model's real buffers
    bytes           embedding storage totals; files_total
    files           {name: {"sha256": hex, "bytes": int}} for every file but the manifest; names
                    are plain file names inside the folder (no "/", "\\", "..", leading ".")
    entities, config, versions, history, notes, created_utc

Kernels (``serving.kernel``):

``torch_quantized``  (device ``cpu``) PyTorch's own quantized EmbeddingBag operators, which run
                     FBGEMM's JIT-generated CPU kernels; needs only torch to serve.
``fbgemm_tbe``       FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` (device ``cuda`` for GPU
                     serving, ``cpu`` only to compare against); needs ``fbgemm_gpu`` to serve.

Version history: 1 served every table on the TBE (CPU), with no ``serving`` section. Version 1
artifacts are refused with a message that names their version and the command that rebuilds
them (:func:`rebuild_command`); the writer replaces them in place.

Writes are atomic (the writer's side): the new artifact is built in a temporary sibling
``.<name>.tmp-*``, then an existing artifact is moved aside to ``.<name>.old-*``, the new one is
renamed in and the old one deleted. :func:`recover_interrupted_replacement` undoes a crash
between the two renames; :func:`not_an_artifact` says why a folder must not be replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

from sparse_kd.integrity import sha256_file

log = logging.getLogger(__name__)

FORMAT = "sparse_kd.artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.pt", "mappings.json", "entity_dense.pt")
KERNEL_CPU = "torch_quantized"
KERNEL_TBE = "fbgemm_tbe"
KERNELS = (KERNEL_CPU, KERNEL_TBE)
DEVICES = ("cpu", "cuda")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, corrupt, of another format version, or a folder that
    must not be replaced by one (the message names the file or folder)."""


# ------------------------------------------------------------------------------------------
# Sibling folders of an atomic replacement


def tmp_glob(d: Path) -> str:
    return f".{d.name}.tmp-*"


def old_glob(d: Path) -> str:
    return f".{d.name}.old-*"


def tmp_sibling(d: Path, tag: str) -> Path:
    return d.parent / f".{d.name}.tmp-{tag}"


def old_sibling(d: Path, tag: str) -> Path:
    return d.parent / f".{d.name}.old-{tag}"


def recover_interrupted_replacement(d: Path) -> None:
    """A writer killed between moving the old artifact aside (``.<name>.old-*``) and renaming the new
    one in leaves nothing at ``d``: move the newest complete old copy back (logged)."""
    d = Path(d)
    if d.exists():
        return
    olds = sorted((p for p in d.parent.glob(old_glob(d)) if (p / MANIFEST).is_file()),
                  key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], d)
        log.warning("%s: restored the previous artifact from %s (a replacement was interrupted)", d, olds[-1].name)


# ------------------------------------------------------------------------------------------
# Manifest


def read_manifest(d: Path) -> dict:
    """The parsed manifest of folder ``d`` (format checked, version not). Raises ArtifactError."""
    mf = d / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{mf}: missing; {d} is not a complete sparse_kd artifact")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e}); the file is truncated or modified") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: not a {FORMAT} manifest")
    return manifest


def rebuild_command(manifest: dict, d: Path) -> str:
    """The command that rebuilds the artifact at ``d`` from the run it came from."""
    src = manifest.get("config", {}).get("source", {}) if isinstance(manifest.get("config"), dict) else {}
    run, variant = (src.get("run_dir"), src.get("variant")) if isinstance(src, dict) else (None, None)
    cfg = str(Path(run) / "config.yaml") if isinstance(run, str) and run else "CONFIG"
    var = variant if isinstance(variant, str) and variant else "VARIANT"
    return f"sparse-kd compress {cfg} --variant {var} --out {d}"


def check_file_name(mf: Path, name: object) -> str:
    """A manifest file name must be a plain name inside the folder: no path separators, no
    ``..``, not absolute, not hidden, not the manifest itself."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name == MANIFEST:
        raise ArtifactError(
            f"{mf}: file name {name!r} in 'files' is not a plain file name inside the artifact folder "
            "(letters, digits, '_', '-', '.'; no path separators or '..'); the manifest is corrupt or was edited"
        )
    return name


def _check_files(mf: Path, files: object) -> dict:
    if not isinstance(files, dict):
        raise ArtifactError(f"{mf}: no 'files' table")
    for name, info in files.items():
        check_file_name(mf, name)
        ok = (isinstance(info, dict) and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)
              and info["bytes"] >= 0 and isinstance(info.get("sha256"), str) and _SHA256.match(info["sha256"]))
        if not ok:
            raise ArtifactError(
                f"{mf}: files.{name} must be {{\"sha256\": 64 hex digits, \"bytes\": a non-negative int}}, got {info!r}; "
                "the manifest is corrupt or was edited"
            )
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{mf}: required file {name} is not listed")
    return files


def _check_serving(mf: Path, manifest: dict) -> None:
    s = manifest.get("serving")
    if not isinstance(s, dict) or s.get("kernel") not in KERNELS or s.get("device") not in DEVICES:
        raise ArtifactError(
            f"{mf}: 'serving' must be {{\"kernel\": one of {', '.join(KERNELS)}, \"device\": one of "
            f"{', '.join(DEVICES)}}}, got {s!r}"
        )
    if s["kernel"] == KERNEL_CPU and s["device"] != "cpu":
        raise ArtifactError(f"{mf}: serving kernel {KERNEL_CPU} runs on device cpu only, got {s['device']!r}")


def verify_artifact(artifact_dir: str | Path) -> dict:
    """Check the manifest (format, version, schema of ``files`` and ``serving``) and every listed
    file (present, size, sha256) before anything is loaded.

    Returns the manifest. Raises :class:`ArtifactError` naming the offending file."""
    d = Path(artifact_dir)
    recover_interrupted_replacement(d)
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such artifact folder")
    mf = d / MANIFEST
    manifest = read_manifest(d)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        old = " (it serves every table on FBGEMM's TBE, slower on CPU than the current kernels)" if version == 1 else ""
        raise ArtifactError(
            f"{mf}: artifact format version {version!r}{old}, but this sparse_kd reads version {FORMAT_VERSION}; "
            f"rebuild it with `{rebuild_command(manifest, d)}`"
        )
    files = _check_files(mf, manifest.get("files"))
    _check_serving(mf, manifest)
    for name, info in files.items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"{f}: {size} bytes but {MANIFEST} says {info['bytes']}: the file is truncated or modified")
        if sha256_file(f) != info["sha256"]:
            raise ArtifactError(f"{f}: sha256 mismatch with {MANIFEST}: the file is corrupted or modified")
    return manifest


# ------------------------------------------------------------------------------------------
# What the writer may replace


def not_an_artifact(d: Path) -> Optional[str]:
    """Why the writer must refuse to replace folder ``d`` (None: it may).

    It may replace nothing (``d`` absent), an empty folder, or a sparse_kd artifact of any format
    version whose folder holds only its manifest and the files the manifest lists. Anything else
    (a run folder, a file, a folder with other files, an unreadable manifest) is refused, so that
    a wrong ``--out`` never deletes data."""
    d = Path(d)
    if not d.exists() and not d.is_symlink():
        return None
    if d.is_symlink() or not d.is_dir():
        return f"{d} exists and is not a folder"
    entries = sorted(p.name for p in d.iterdir())
    if not entries:
        return None
    if MANIFEST not in entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        return f"{d} is not a sparse_kd artifact (no {MANIFEST}; it holds {shown})"
    try:
        manifest = read_manifest(d)
    except ArtifactError as e:
        return f"{d} does not hold a readable artifact ({e})"
    files = manifest.get("files")
    listed = set(files) if isinstance(files, dict) else set()
    extra = [n for n in entries if n != MANIFEST and n not in listed]
    if extra:
        return f"{d} holds files its {MANIFEST} does not list ({', '.join(extra[:6])})"
    return None
