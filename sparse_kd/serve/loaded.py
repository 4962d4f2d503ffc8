"""A loaded artifact as the service holds it: the predictor, its id indexes, the fallback for
unknown ids, and answers written as JSON bytes.

Unknown ids: an id absent from the artifact's ``mappings.json`` gets the artifact's fallback
(:func:`fallback_policy`: the manifest's ``fallback`` entry when it has one, else the predictor's
documented behaviour: empty embedding bags and zero dense features, as a cold entity with no
data) and is flagged in the response (``unknown_user``, ``unknown_items`` / ``unknown_users``:
indices into the request's lists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import orjson

from sparse_kd.serve import ArtifactError, Predictor  # the predictor's public API only
from sparse_kd.serve.predictor import DEFAULT_MAX_BATCH
from sparse_kd.serve.requests import RankRequest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

DEFAULT_FALLBACK = {
    "unknown_user": "every embedding bag of the user's features is empty (zero pooled embedding) and its dense "
                    "features are zeros, as for a cold user with no data",
    "unknown_item": "every embedding bag of the item's features is empty (zero pooled embedding) and its dense "
                    "features are zeros, as for a cold item with no data",
    "source": "sparse_kd.serve.predictor (the artifact's manifest names no other policy)",
}



def fallback_policy(manifest: dict) -> dict:
    """What unknown ids get: the manifest's ``fallback`` entry if the artifact records one, else
    the predictor's documented behaviour (:data:`DEFAULT_FALLBACK`)."""
    fb = manifest.get("fallback")
    return dict(fb) if isinstance(fb, dict) and fb else dict(DEFAULT_FALLBACK)



def manifest_state(d: Path) -> tuple[Optional[tuple], Optional[str], bytes]:
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
        return dumps(doc, probs), counts

    def score(self, users: list[str], items: list[str]) -> tuple[bytes, dict]:
        probs, st = self.predictor.score(users, items, return_stats=True)  # (P,) float32
        unknown_users = st["unknown_user_at"]
        unknown_items = st["unknown_item_at"]
        doc = {"scores": probs.tolist(), "unknown_users": unknown_users, "unknown_items": unknown_items,
               "artifact": self.artifact_id}
        counts = {"pairs": len(users), "unknown_users": len(unknown_users), "unknown_items": len(unknown_items)}
        return dumps(doc, probs), counts



def dumps(doc: dict, scores: np.ndarray) -> bytes:
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
        _, before, _ = manifest_state(d)
        predictor = Predictor.load(d, max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
                                   huge_pages=huge_pages)
        signature, after, data = manifest_state(d)
        if before is not None and before == after:
            manifest = json.loads(data)
            return Loaded(predictor, d, manifest, after, signature, time.time(), time.perf_counter() - t0,
                          fallback_policy(manifest))
        log.warning("%s was replaced while it was being loaded; loading it again", d)
    raise ArtifactError(f"{d}: the artifact kept changing while it was being loaded ({attempts} attempts)")



def summary(ld: Loaded) -> str:
    dtypes = sorted({str(t.get("dtype")) for t in ld.manifest.get("tables", {}).values()})
    return (f"artifact {ld.artifact_id} from {ld.path}: {len(ld.users)} users, {len(ld.items)} items, "
            f"table dtypes {'/'.join(dtypes)}, loaded in {ld.load_seconds:.2f}s")

