"""The serving artifact: one folder a serving process loads with :class:`sparse_kd.serve.Predictor`.

Layout, manifest schema, verification and crash recovery: :mod:`sparse_kd.serve.format` (shared
with the reader). Serialization is TorchScript: on the CPU kernel the serving module scripts as it
is and needs only torch to run; on the TBE (GPU serving) it goes through ``torchrec.fx.Tracer``
keeping FBGEMM's TBE as a leaf, and needs torch and fbgemm_gpu. No torchrec module is imported
by a process that loads either, and every buffer, including the remaps, is saved with the model.
``torch.export`` also works for the TBE model (after ``torchrec.pt2.utils.register_fake_classes()``),
but a process that loads and runs it needs torchrec imported for the KeyedJaggedTensor pytree and
fake classes; TorchScript keeps the serving process smaller.

Writes are atomic: everything goes to a temporary sibling folder, the manifest (with the sha256
and size of every file) is written last, then the folder is renamed into place (an existing
artifact is moved aside first and deleted after). A crash leaves either the old artifact or the
new one, plus at most a ``.tmp-*`` / ``.old-*`` folder that the next save removes. The writer
replaces only an artifact (of any format version) or an empty folder: anything else at the
output path (a run folder, a file, an artifact folder holding unlisted files) is refused with an
:class:`~sparse_kd.serve.format.ArtifactError` before anything is written or moved.

:func:`add_items` serves new items known only by their text (no clicks, no retraining): their
item_id rows are computed offline from their teacher text embedding through the ridge map saved
in ``text_maps.pt``, quantized to the table's dtype and appended; the existing rows' bytes are
copied unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from sparse_kd import atomic
from sparse_kd.compress import quantize as Q
from sparse_kd.compress import rows as QR
from sparse_kd.compress import table_bytes as TB
from sparse_kd.compress.prune import text_rows
from sparse_kd.integrity import sha256_file
from sparse_kd.serve.format import (
    FORMAT,
    FORMAT_VERSION,
    KERNEL_CPU,
    MANIFEST,
    ArtifactError,
    not_an_artifact,
    old_glob,
    old_sibling,
    recover_interrupted_replacement,
    tmp_glob,
    tmp_sibling,
    verify_artifact,
)

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    """A compressed model with everything the artifact holds besides the scripted model.

    tables: table -> info (feature, owner, dtype, rows_original, rows_kept, rows_stored, fill,
    keep_ratio, importance, bytes {...}, fp32_bytes). remaps: table -> (N,) int32.
    text_maps: feature -> (H + 1, D). dense_fp32: fp32 state of the dense layers.
    model_info: keys, owners, dense_in_features, embedding_dim, dense_arch, over_arch,
    dense_int8, remap, row_alignment, kernel, device. pruned: feature -> the fp32 pruned and
    filled table as pruning made it, before the hot-first layout and folding (what distillation
    after compression trains; not saved; empty for a loaded artifact).
    """

    serving: torch.nn.Module
    tables: dict
    remaps: dict
    text_maps: dict
    dense_fp32: dict
    model_info: dict
    notes: list = field(default_factory=list)
    pruned: dict = field(default_factory=dict, repr=False)

    @property
    def embedding_bytes(self) -> int:
        return sum(t["bytes"]["total"] for t in self.tables.values())

    @property
    def fp32_bytes(self) -> int:
        return sum(t["fp32_bytes"] for t in self.tables.values())


def library_versions() -> dict:
    import fbgemm_gpu
    import torchrec

    return {
        "torch": torch.__version__,
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "unknown"),
        "torchrec": getattr(torchrec, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _write_json(path: Path, doc) -> None:
    text = json.dumps(doc)  # the C encoder: ~2x faster than json.dump's on millions of ids
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_out_dir(out: Path) -> None:
    """Refuse (ArtifactError) an output path the writer must not replace: see
    :func:`sparse_kd.serve.format.not_an_artifact`. Nothing is touched."""
    out = Path(out)
    recover_interrupted_replacement(out)
    why = not_an_artifact(out)
    if why:
        raise ArtifactError(
            f"refusing to write an artifact to {out}: {why}. Writing an artifact replaces the whole folder; "
            "give an empty or new folder (the default is <run>/artifact/<variant>), or delete it yourself"
        )


def _cleanup_siblings(out: Path) -> None:
    recover_interrupted_replacement(out)  # never delete the only complete copy
    for p in out.parent.glob(tmp_glob(out)):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(old_glob(out)):
        shutil.rmtree(p, ignore_errors=True)


def save_artifact(
    out_dir: str | Path,
    comp: Compressed,
    mappings: dict,
    entity_dense: Mapping[str, torch.Tensor],
    config: dict,
    history: Optional[list] = None,
    scripted: Optional[torch.jit.ScriptModule] = None,
) -> dict:
    """Write the artifact folder atomically; returns the manifest.

    mappings: as ``RecDataset.save_mappings`` writes it; entity_dense: {"user": (U, Du), "item": (I, Di)};
    config: what made it (compress config, source run/variant, plan), stored in the manifest.
    """
    out = Path(out_dir)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_siblings(out)
    tmp = tmp_sibling(out, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        sm = scripted if scripted is not None else Q.script_model(comp.serving)
        torch.jit.save(sm, str(tmp / "model.pt"))
        log.info("artifact: model scripted and saved in %.1fs", time.perf_counter() - t0)
        _write_json(tmp / "mappings.json", mappings)
        torch.save({k: v.float().contiguous() for k, v in entity_dense.items()}, tmp / "entity_dense.pt")
        torch.save({k: v.to(torch.int32).contiguous() for k, v in comp.remaps.items()}, tmp / "remaps.pt")
        torch.save({k: v.float().contiguous() for k, v in comp.text_maps.items()}, tmp / "text_maps.pt")
        torch.save({k: v.contiguous() for k, v in comp.dense_fp32.items()}, tmp / "dense_fp32.pt")
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        serving = {"kernel": comp.model_info.get("kernel", KERNEL_CPU), "device": comp.model_info.get("device", "cpu")}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "serving": serving,
            "model": {**comp.model_info, **serving, "file": "model.pt", "output": "logits"},
            "tables": comp.tables,
            "bytes": {  # embedding storage (tables + remaps), MB = 10^6 bytes; same keys as the stage report
                "total": comp.embedding_bytes,
                "total_mb": comp.embedding_bytes / 1e6,
                "fp32_total": comp.fp32_bytes,
                "fp32_mb": comp.fp32_bytes / 1e6,
                "ratio": comp.fp32_bytes / max(1, comp.embedding_bytes),
                "files_total": sum(v["bytes"] for v in files.values()),
            },
            "entities": {"users": len(mappings["user_ids"]), "items": len(mappings["item_ids"])},
            "files": files,
            "config": config,
            "versions": library_versions(),
            "history": list(history or []),
            "notes": comp.notes,
        }
        _write_json(tmp / MANIFEST, manifest)
        atomic.swap_in_dir(tmp, out, old_sibling(out, uuid.uuid4().hex[:8]))
        log.info("artifact: %s written (%d files, %.1f MB) in %.1fs", out, len(files),
                 manifest["bytes"]["files_total"] / 1e6, time.perf_counter() - t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_artifact_parts(artifact_dir: str | Path) -> dict:
    """Verify and load everything of an artifact (for tools that rebuild it, not for serving)."""
    d = Path(artifact_dir)
    manifest = verify_artifact(d)
    parts = {"manifest": manifest, "scripted": torch.jit.load(str(d / "model.pt"), map_location="cpu"),
             "mappings": json.loads((d / "mappings.json").read_text(encoding="utf-8")),
             "entity_dense": torch.load(d / "entity_dense.pt", weights_only=True)}
    for name in ("remaps", "text_maps", "dense_fp32"):
        f = d / f"{name}.pt"
        if name + ".pt" not in manifest["files"]:
            raise ArtifactError(f"{f}: not listed in {MANIFEST}; the artifact cannot be rebuilt")
        parts[name] = torch.load(f, weights_only=True)
    return parts


def _skeleton(model_info: dict, dense_fp32: dict):
    """A float DLRM with the artifact's dense layers (its tables are placeholders)."""
    from sparse_kd.config import StudentConfig
    from sparse_kd.student.model import build_dlrm

    sc = StudentConfig(embedding_dim=model_info["embedding_dim"], dense_arch=tuple(model_info["dense_arch"]),
                       over_arch=tuple(model_info["over_arch"]), dot_logit=bool(model_info.get("dot_logit", False)))
    m = build_dlrm({k: 1 for k in model_info["keys"]}, model_info["dense_in_features"], sc, device="cpu")
    missing, unexpected = m.load_state_dict(dense_fp32, strict=False)
    dense_missing = [k for k in missing if "embedding_bag" not in k]
    if dense_missing or unexpected:
        raise ArtifactError(f"dense_fp32.pt: does not fit the model (missing {dense_missing}, unexpected {unexpected})")
    if model_info.get("dense_int8"):
        QR.quantize_dense_layers(m)
    return m.eval()


def add_entities(
    artifact_dir: str | Path,
    owner: str,
    ids: list[str],
    text_embeddings: torch.Tensor,
    out_dir: Optional[str | Path] = None,
) -> dict:
    """Append users or items known only by text to an artifact (in place unless ``out_dir``).

    owner: "item" (rows of ``item_id``) or "user" (``user_id``). text_embeddings: (K, H) teacher
    text embeddings of the new entities (the same encoder and settings as training; computed
    offline by the caller). The new entities get: their id row = text -> row ridge map applied to
    the text, quantized to the table's dtype; empty bags in every other feature of that owner;
    zero dense features (what a cold entity gets from ``count_dense``). Existing rows are copied
    byte for byte. Returns {"added": K, "table": ..., "rows": ..., "manifest": ...}.
    """
    if owner not in ("user", "item"):
        raise ValueError(f"owner must be 'user' or 'item', got {owner!r}")
    if isinstance(ids, str) or not isinstance(ids, (list, tuple)) or not all(isinstance(x, str) for x in ids):
        raise TypeError("ids must be a list of str")
    ids = list(ids)
    text = torch.as_tensor(text_embeddings).float()
    if text.dim() != 2 or text.shape[0] != len(ids):
        raise ValueError(f"text_embeddings must be ({len(ids)}, H), got {tuple(text.shape)}")
    parts = load_artifact_parts(artifact_dir)
    manifest, mappings = parts["manifest"], parts["mappings"]
    key = f"{owner}_ids"
    known = set(mappings[key])
    dup = [x for x in ids if x in known]
    if dup or len(set(ids)) != len(ids):
        raise ValueError(f"{owner} ids already in the artifact or repeated: {sorted(set(dup))[:5] or 'repeated ids'}")
    feat = f"{owner}_id"
    tname = QR.table_name(feat)
    if feat not in parts["text_maps"]:
        raise ArtifactError(f"text_maps.pt: no text map for {feat}; cannot compute rows from text")
    info = manifest["model"]
    keys = info["keys"]
    qtables = Q.extract_qtables(parts["scripted"])
    qt = qtables[feat]
    new_rows = text_rows(text, parts["text_maps"][feat])  # (K, D)
    # new rows go after the stored ones: in a tiered table (compress/tiers.py), into the last tier
    # (the coldest; new items have no reads yet)
    rows_of = qt.parts[-1] if qt.parts is not None else qt
    w, sb = QR.quantize_rows(new_rows, rows_of.dtype, manifest["tables"][tname].get("quantizer", "minmax"))
    r0, k = qt.num_rows, len(ids)
    vocab_n = len(mappings["features"][feat]["vocab"])
    # a folded table (remap: fold) has no remap: its ids arrive as stored rows from mappings.json
    folded = manifest["tables"][tname].get("remap") == "folded"
    n_orig = vocab_n if folded else (qt.remap.numel() if qt.remap is not None else r0)
    if n_orig != vocab_n:
        raise ArtifactError(f"remaps.pt / model.pt: {feat} maps {n_orig} ids but mappings.json has {vocab_n}")
    rows_of.weight = torch.cat([rows_of.weight, w])
    rows_of.scale_bias = None if sb is None else torch.cat([rows_of.scale_bias, sb])
    if qt.remap is not None:
        qt.remap = torch.cat([qt.remap, torch.arange(r0, r0 + k, dtype=torch.int32)])
    # mappings: new entities, new id vocabulary entries, empty bags elsewhere
    mappings[key] = list(mappings[key]) + ids
    for fname, fm in mappings["features"].items():
        if fm["owner"] != owner:
            continue
        last = fm["offsets"][-1]
        if fname == feat:
            fm["vocab"] = list(fm["vocab"]) + ids
            first = r0 if folded else vocab_n  # the new rows, as the bags address them
            fm["values"] = list(fm["values"]) + list(range(first, first + k))
            fm["offsets"] = list(fm["offsets"]) + [last + j + 1 for j in range(k)]
        else:
            fm["offsets"] = list(fm["offsets"]) + [last] * k
    ed = dict(parts["entity_dense"])
    ed[owner] = torch.cat([ed[owner], torch.zeros(k, ed[owner].shape[1])])
    serving = Q.assemble_dlrm(_skeleton(info, parts["dense_fp32"]), qtables, keys, info["remap"], info["row_alignment"],
                              manifest["serving"]["kernel"], manifest["serving"]["device"])
    tb = TB.table_bytes(serving)
    tables = manifest["tables"]
    for t, b in tb.items():
        tables[t]["bytes"] = b
        tables[t]["rows_stored"] = b["rows"]
    tables[tname]["rows_original"] = vocab_n + k
    tables[tname]["rows_added_from_text"] = tables[tname].get("rows_added_from_text", 0) + k
    remaps = {QR.table_name(f): q.remap for f, q in qtables.items() if q.remap is not None}
    comp = Compressed(serving, tables, remaps, parts["text_maps"], parts["dense_fp32"],
                      {kk: v for kk, v in info.items() if kk not in ("file", "output")}, manifest.get("notes", []))
    comp.model_info.update(manifest["serving"])
    history = list(manifest.get("history", [])) + [
        {"added": k, "owner": owner, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ]
    new_manifest = save_artifact(out_dir or artifact_dir, comp, mappings, ed, manifest["config"], history)
    return {"added": k, "table": tname, "rows": tb[tname]["rows"], "manifest": new_manifest, "serving": serving}


def add_items(artifact_dir: str | Path, item_ids: list[str], text_embeddings: torch.Tensor,
              out_dir: Optional[str | Path] = None) -> dict:
    """Append new items known only by text (see :func:`add_entities`)."""
    return add_entities(artifact_dir, "item", item_ids, text_embeddings, out_dir)
