"""``sparse-kd add-items ARTIFACT items.csv``: new items known only by their text, into an artifact.

Steps: verify the artifact; read ``items.csv`` (header ``item_id,text``; the same CSV rules as the
data format in :mod:`sparse_kd.data.csv_format`); encode the texts with the teacher of the run
that made the artifact (its ``config.yaml``, found through the manifest's
``config.source.run_dir``, or the ``--config`` given); compute each item's ``item_id`` row from
its text through the artifact's ridge map and write the new artifact atomically
(:func:`sparse_kd.compress.artifact.add_items`); then, with ``--notify URL``, ask a running
service to swap it in (``POST URL/admin/reload``). A service started with ``--watch`` picks the
replaced folder up by itself.

Every problem is an error naming the file, line and column (items.csv), or the artifact file or
config key, with how to fix it. Other columns of items.csv are ignored (logged): the new items
get empty bags in the artifact's other item features and zero dense features, as
:func:`~sparse_kd.compress.artifact.add_entities` documents.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from sparse_kd.config import ConfigError, ExperimentConfig, load_config
from sparse_kd.data.csv_reader import fail, read_table
from sparse_kd.data.split import truncate_text
from sparse_kd.serve.predictor import ArtifactError, verify_artifact

log = logging.getLogger(__name__)

ID, TEXT = "item_id", "text"


@dataclass
class NewItems:
    """Rows of an items.csv: ids, texts (cut to ``max_text_chars``), their 1-based lines."""

    ids: list[str]
    texts: list[str]
    lines: list[int]
    ignored_columns: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def read_items_csv(path: str | Path, known_ids: set[str], max_text_chars: int, artifact: str = "the artifact") -> NewItems:
    """Parse ``path`` (``item_id,text[,...]``); an id already in ``known_ids`` is an error naming its line."""
    path = Path(path)
    t = read_table(path, (ID, TEXT), f"{ID},{TEXT}")
    ci, ct = t.col(ID), t.col(TEXT)
    out = NewItems([], [], [], [c for c in t.columns if c not in (ID, TEXT)])
    first: dict[str, int] = {}
    for line, f in t.rows:
        iid = f[ci].strip()
        if not iid:
            raise fail(path, line, ID, f"empty {ID}", f"give every row a non-empty {ID}")
        if iid in first:
            raise fail(path, line, ID, f"duplicate {ID} {iid[:60]!r} (first defined on line {first[iid]})",
                        f"keep one row per {ID}")
        if iid in known_ids:
            raise fail(path, line, ID, f"{ID} {iid[:60]!r} is already in {artifact}",
                        "remove the row, or give the new item an id of its own (rows of existing items are "
                        "never replaced from text)")
        text = f[ct].strip()
        if not text:
            raise fail(path, line, TEXT, f"empty or whitespace-only text for {ID} {iid[:60]!r}",
                        "give every new item a short description (title, category, ...): its row is computed "
                        "from the teacher's embedding of this text")
        first[iid] = line
        out.ids.append(iid)
        out.texts.append(truncate_text(text, max_text_chars, out.report))
        out.lines.append(line)
    return out


def run_config(artifact: Path, manifest: dict, config: Optional[str | Path] = None) -> tuple[ExperimentConfig, str]:
    """(config, where it came from): ``config`` if given, else the source run's ``config.yaml``."""
    if config is not None:
        return load_config(config), str(config)
    src = (manifest.get("config") or {}).get("source") or {}
    run_dir = src.get("run_dir") if isinstance(src, dict) else None
    fix = ("pass --config with the YAML of the run that trained the artifact's model (its teacher settings must "
           "match the ones its text map was fitted on)")
    if not run_dir:
        raise ConfigError(f"{artifact / 'manifest.json'}: names no source run (config.source.run_dir), so the "
                          f"teacher settings are unknown; {fix}")
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"{p}: missing (the run folder named by {artifact / 'manifest.json'} "
                          f"config.source.run_dir); {fix}")
    return load_config(p), str(p)


def add_items_from_csv(artifact: str | Path, items_csv: str | Path, config: Optional[str | Path] = None,
                       out: Optional[str | Path] = None) -> dict:
    """Encode the texts of ``items_csv`` with the teacher and append the items to ``artifact``
    (written to ``out``, default in place, atomically). Returns {"added", "artifact", "first_ids",
    "teacher_config", "ignored_columns", "truncated_texts", "rows"}."""
    from sparse_kd.compress import artifact as A
    from sparse_kd.teacher import encode_texts

    art = Path(artifact)
    manifest = verify_artifact(art)
    device = manifest.get("serving", {}).get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{art}: a GPU artifact (serving.device cuda): adding items rebuilds its FBGEMM CUDA tables, "
                            "which needs a visible CUDA GPU; run add-items on the GPU host that serves it")
    if "text_maps.pt" not in manifest["files"]:
        raise ArtifactError(f"{art / 'text_maps.pt'}: not in the artifact; it cannot compute rows from text")
    maps = torch.load(art / "text_maps.pt", weights_only=True)
    if ID not in maps:
        raise ArtifactError(f"{art / 'text_maps.pt'}: no text map for {ID} (the artifact was compressed without "
                            "the run's text embeddings); new items cannot get rows from their text")
    mappings = json.loads((art / "mappings.json").read_text(encoding="utf-8"))
    cfg, cfg_source = run_config(art, manifest, config)
    items = read_items_csv(items_csv, set(mappings["item_ids"]), cfg.data.max_text_chars, str(art))
    if items.ignored_columns:
        log.warning("%s: columns %s are ignored; new items get empty bags in the artifact's other item features",
                    items_csv, items.ignored_columns)
    log.info("encoding %d item texts with the teacher of %s", len(items.ids), cfg_source)
    emb = encode_texts(cfg.teacher, items.texts, "new_items", show_progress=False)  # (K, H)
    want = maps[ID].shape[0] - 1
    if emb.shape[1] != want:
        raise ConfigError(f"teacher.model: {cfg.teacher.model!r} (from {cfg_source}) gives {emb.shape[1]}-dim text "
                          f"embeddings, but {art / 'text_maps.pt'} maps {want}-dim ones; pass --config with the "
                          "config of the run that trained the artifact's model")
    register_fbgemm_script_enums()
    res = A.add_items(art, items.ids, emb, out_dir=out)
    dest = Path(out) if out is not None else art
    log.info("added %d items to %s (%s now has %d rows)", res["added"], dest, res["table"], res["rows"])
    return {"added": res["added"], "artifact": str(dest), "first_ids": items.ids[:5], "teacher_config": cfg_source,
            "ignored_columns": items.ignored_columns, "truncated_texts": items.report.get("truncated_texts", 0),
            "rows": res["rows"]}


def register_fbgemm_script_enums() -> None:
    """Register FBGEMM's enums (``SparseType``, ``EmbeddingLocation``, ...) as TorchScript classes.

    :func:`sparse_kd.compress.artifact.add_entities` reads the loaded ``model.pt``'s TBE attribute
    ``embedding_specs`` from Python, whose tuples hold these enums; in a process that never
    scripted a TBE (a fresh ``add-items``) TorchScript cannot convert them ("Unknown reference to
    ScriptClass ...SparseType"). Compiling each enum once registers it; doing it again is a no-op.
    """
    import enum

    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.tbe.config import embedding_config
    from torch._sources import fake_range
    from torch.jit.annotations import try_ann_to_type

    for cls in (SparseType, embedding_config.EmbeddingLocation, embedding_config.PoolingMode,
                embedding_config.BoundsCheckMode, embedding_config.ComputeDevice):
        assert issubclass(cls, enum.Enum)
        try_ann_to_type(cls, fake_range())


def notify(url: str, artifact: str | Path, token: Optional[str] = None, timeout: float = 120.0) -> dict:
    """``POST {url}/admin/reload {"path": artifact}``; returns the service's answer.

    Raises RuntimeError saying what the service answered (or why it could not be reached)."""
    endpoint = url.rstrip("/") + "/admin/reload"
    body = json.dumps({"path": str(Path(artifact).absolute())}).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Admin-Token"] = token
    req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:500]
        raise RuntimeError(f"{endpoint} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"{endpoint}: cannot reach the service ({getattr(e, 'reason', e)})") from None
