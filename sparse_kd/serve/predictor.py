"""Score (user, item) pairs with a compressed artifact, in a process without training code or BERT.

Imports only torch, numpy and the standard library (plus :mod:`sparse_kd.serve.format`): not
transformers, not torchrec, not ``sparse_kd.student`` / ``sparse_kd.compress``, and not
``fbgemm_gpu`` unless the artifact is served on FBGEMM's TBE (``serving.kernel: fbgemm_tbe``,
GPU serving), which needs its operators (a test checks this in a fresh subprocess).

Artifact layout, manifest and verification: :mod:`sparse_kd.serve.format`. :func:`verify_artifact`
checks the format version, the manifest's file table and every file's size and sha256 before
anything is loaded; a problem is an :class:`ArtifactError` naming the file. Artifacts of an older
format version are refused with the command that rebuilds them.

Scoring (:meth:`Predictor.score`) returns click probabilities, sigmoid(logit), as float32
(:meth:`Predictor.score_logits` returns the logits). Behaviour at the edges:

* unknown user / item id: every bag of that entity's features is empty (the sum-pooled embedding
  is a zero vector) and its dense features are zeros, like a cold entity with no data. Unknown
  ids are counted: ``stats`` of the call (``return_stats=True``; ``unknown_user_at`` and
  ``unknown_item_at`` list their positions in the arguments), the running totals in
  :attr:`Predictor.stats`, and a log line at INFO.
* empty input: an empty array, the model is not run.
* more pairs than ``max_batch``: split into chunks of ``max_batch`` internally; the result is
  the same as one call per chunk, concatenated.
* wrong types: ``TypeError`` naming the argument (``user_ids`` must be a list or tuple of str;
  ``user_ids[3]`` names the first bad element); different lengths: ``ValueError``.

Threads: a CPU artifact's lookups use ``threads`` workers (default ``torch.get_num_threads()``
at load time; see :class:`sparse_kd.serve.cpu_model.QuantizedLookup`); calls from several
threads at once are safe (the model keeps no state between calls). A ``cuda`` artifact runs on
the GPU (inputs are moved there, scores come back to the CPU); that path has not been run on
this project's machines, which have no GPU.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from sparse_kd.integrity import sha256_file  # noqa: F401  (re-exported)
from sparse_kd.serve.memory import place_on_huge_pages
from sparse_kd.serve.format import (  # noqa: F401  (re-exported: the format's names, for callers)
    FORMAT,
    FORMAT_VERSION,
    KERNEL_TBE,
    MANIFEST,
    REQUIRED_FILES,
    ArtifactError,
    recover_interrupted_replacement,
    verify_artifact,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4096


def _load_model(d: Path, manifest: dict) -> tuple[torch.jit.ScriptModule, torch.device]:
    serving = manifest["serving"]
    if serving["kernel"] == KERNEL_TBE:
        try:
            importlib.import_module("fbgemm_gpu")  # registers the torch.ops.fbgemm operators the TBE calls
        except ImportError as e:
            raise ArtifactError(f"{d / MANIFEST}: served on FBGEMM's TBE, which needs fbgemm_gpu ({e}); install "
                                "fbgemm-gpu, or rebuild the artifact with compress.serve_device=cpu") from None
    device = torch.device(serving["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{d / MANIFEST}: built for serving on cuda, but this process sees no GPU; rebuild it "
                            "with compress.serve_device=cpu to serve on CPU")
    versions = manifest.get("versions", {})
    if versions.get("torch") and versions["torch"] != torch.__version__:
        log.warning("artifact made with torch %s, running %s", versions["torch"], torch.__version__)
    try:
        model = torch.jit.load(str(d / "model.pt"), map_location=device)
    except Exception as e:  # corrupt but checksum-consistent files are not expected; still name it
        raise ArtifactError(f"{d / 'model.pt'}: cannot be loaded as TorchScript ({e})") from None
    return model, device


class _CSR:
    """One feature's entity bags: entity k owns ``values[offsets[k]:offsets[k + 1]]``."""

    def __init__(self, offsets: Sequence[int], values: Sequence[int], dtype: Any = np.int64) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        v = np.asarray(values, dtype=np.int64)
        if dtype == np.int32 and v.size and int(v.max()) >= 2**31:
            dtype = np.int64
        self.values = v.astype(dtype, copy=False)
        self.lengths = np.diff(self.offsets)
        # every entity owns exactly one id (an id feature, a one-hot category): a gather is one take
        self.single = bool(self.lengths.size) and bool((self.lengths == 1).all())

    def gather(self, ents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ents (B,) entity indices, -1 unknown -> lengths (B,), values (sum lengths,)."""
        known = ents >= 0
        if self.single:
            if known.all():
                return np.ones(ents.shape[0], dtype=np.int64), self.values[ents]
            return known.astype(np.int64), self.values[ents[known]]
        e = np.where(known, ents, 0)
        lengths = np.where(known, self.lengths[e], 0)
        starts = self.offsets[e]
        total = int(lengths.sum())
        excl = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - excl, lengths) + np.arange(total)
        return lengths, self.values[idx]


class _Index(dict):
    """id -> row of the artifact's id list; an unknown id reads -1 (so the whole list maps in one
    C loop, ``map(index.__getitem__, ids)``, with no Python call per known id)."""

    __slots__ = ()

    def __missing__(self, key: Any) -> int:
        return -1

    def rows(self, ids: list) -> np.ndarray:
        return np.fromiter(map(self.__getitem__, ids), dtype=np.int64, count=len(ids))


def _check_ids(name: str, ids: Any) -> list:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of str, got {type(ids).__name__}")
    for k, v in enumerate(ids):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{k}] must be str, got {type(v).__name__} {v!r}")
    return list(ids)


class Predictor:
    """A loaded artifact. ``Predictor.load(dir).score(["u1"], ["i7"])`` -> array([0.73], float32)."""

    def __init__(self, model: torch.jit.ScriptModule, manifest: dict, mappings: dict, entity_dense: dict,
                 max_batch: int = DEFAULT_MAX_BATCH, device: str | torch.device = "cpu") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.device = torch.device(device)
        self.manifest = manifest
        self.max_batch = int(max_batch)
        self.keys: list[str] = list(manifest["model"]["keys"])
        self.user_index = _Index((u, k) for k, u in enumerate(mappings["user_ids"]))
        self.item_index = _Index((i, k) for k, i in enumerate(mappings["item_ids"]))
        feats = mappings["features"]
        missing = [k for k in self.keys if k not in feats]
        if missing:
            raise ArtifactError(f"mappings.json: no mapping for features {missing}")
        self.owners = [feats[k]["owner"] for k in self.keys]
        # a CPU artifact's lookups read int32 ids: the bags are kept as int32, so that no request
        # pays an int64 -> int32 cast (a pass over the ids into a fresh buffer on every call)
        cpu_kernel = manifest.get("serving", {}).get("kernel") != KERNEL_TBE
        self.csr = [_CSR(feats[k]["offsets"], feats[k]["values"], np.int32 if cpu_kernel else np.int64)
                    for k in self.keys]
        self.user_dense = entity_dense["user"].float().numpy()
        self.item_dense = entity_dense["item"].float().numpy()
        if self.user_dense.shape[0] != len(self.user_index) or self.item_dense.shape[0] != len(self.item_index):
            raise ArtifactError("entity_dense.pt: rows do not match the ids in mappings.json")
        self.stats = {"pairs": 0, "unknown_users": 0, "unknown_items": 0, "chunks": 0, "calls": 0}

    @classmethod
    def load(cls, artifact_dir: str | Path, max_batch: int = DEFAULT_MAX_BATCH, warmup: bool = True,
             threads: Optional[int] = None, huge_pages: bool = True) -> "Predictor":
        """Verify (checksums, version) and load an artifact folder.

        warmup: run the model twice on a tiny batch, so that TorchScript's profiling executor
        (about 0.2 s per call for its first two calls, measured) does not delay the first request.
        threads: lookup workers of a CPU artifact (default ``torch.get_num_threads()``).
        huge_pages: put a CPU artifact's tables (buffers of 2 MiB or more) on transparent huge
        pages (:mod:`sparse_kd.serve.memory`; fewer TLB misses per lookup, same values).
        """
        d = Path(artifact_dir)
        manifest = verify_artifact(d)
        model, device = _load_model(d, manifest)
        if huge_pages and device.type == "cpu":
            place_on_huge_pages(model)
        mappings = json.loads((d / "mappings.json").read_text(encoding="utf-8"))
        entity_dense = torch.load(d / "entity_dense.pt", weights_only=True)
        p = cls(model, manifest, mappings, entity_dense, max_batch, device)
        p.set_threads(threads if threads is not None else torch.get_num_threads())
        if warmup:
            p.warmup()
        return p

    def set_threads(self, threads: int) -> None:
        """Lookup workers per call from now on (CPU artifacts; a no-op for the TBE)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if hasattr(self.model, "set_num_workers"):
            self.model.set_num_workers(int(threads))

    def warmup(self, calls: int = 2) -> None:
        """Run the model ``calls`` times on a two-pair batch (not counted in :attr:`stats`)."""
        users = [next(iter(self.user_index), "?")] * 2
        items = [next(iter(self.item_index), "?")] * 2
        dense, values, lengths, _ = self.inputs(users, items)
        with torch.no_grad():
            for _ in range(calls):
                self._run(dense, values, lengths)

    def _run(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        dev = self.device
        out = self.model(dense.to(dev), values.to(dev), lengths.to(dev))
        return out.reshape(-1).float().cpu().numpy()

    # ------------------------------------------------------------------------------------------

    def inputs(self, user_ids: list[str], item_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Model inputs for one chunk: dense (B, Dd), values (nnz,), lengths (F*B,), stats."""
        u = self.user_index.rows(user_ids)
        i = self.item_index.rows(item_ids)
        lengths, values = [], []
        for owner, csr in zip(self.owners, self.csr):
            ln, vl = csr.gather(u if owner == "user" else i)
            lengths.append(ln)
            values.append(vl)
        ud = np.where((u >= 0)[:, None], self.user_dense[np.maximum(u, 0)], 0.0)
        idn = np.where((i >= 0)[:, None], self.item_dense[np.maximum(i, 0)], 0.0)
        dense = torch.from_numpy(np.concatenate([ud, idn], axis=1).astype(np.float32))
        bad_u, bad_i = np.flatnonzero(u < 0), np.flatnonzero(i < 0)
        stats = {"unknown_users": int(bad_u.size), "unknown_items": int(bad_i.size),
                 "unknown_user_at": bad_u, "unknown_item_at": bad_i}
        return (
            dense,
            torch.from_numpy(np.concatenate(values)),
            torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
            stats,
        )

    def score_logits(self, user_ids: list[str], item_ids: list[str], return_stats: bool = False):
        """Logits (B,) float32 for the pairs (user_ids[k], item_ids[k]); see the module doc."""
        users = _check_ids("user_ids", user_ids)
        items = _check_ids("item_ids", item_ids)
        if len(users) != len(items):
            raise ValueError(f"user_ids has {len(users)} ids but item_ids has {len(items)}; give one item per user")
        stats = {"pairs": len(users), "unknown_users": 0, "unknown_items": 0, "chunks": 0}
        outs, bad_u, bad_i = [], [], []
        with torch.no_grad():
            for lo in range(0, len(users), self.max_batch):
                dense, values, lengths, st = self.inputs(users[lo: lo + self.max_batch], items[lo: lo + self.max_batch])
                outs.append(self._run(dense, values, lengths))
                stats["unknown_users"] += st["unknown_users"]
                stats["unknown_items"] += st["unknown_items"]
                bad_u.append(st["unknown_user_at"] + lo)
                bad_i.append(st["unknown_item_at"] + lo)
                stats["chunks"] += 1
        result = np.concatenate(outs) if outs else np.zeros(0, dtype=np.float32)
        for k, v in stats.items():
            self.stats[k] += v
        # positions of the unknown ids in the arguments, as lists of int (this call's stats only)
        stats["unknown_user_at"] = np.concatenate(bad_u).tolist() if bad_u else []
        stats["unknown_item_at"] = np.concatenate(bad_i).tolist() if bad_i else []
        self.stats["calls"] += 1
        if stats["unknown_users"] or stats["unknown_items"]:
            log.info("scored %d pairs: %d unknown user ids, %d unknown item ids (zero embeddings, zero dense)",
                     stats["pairs"], stats["unknown_users"], stats["unknown_items"])
        return (result, stats) if return_stats else result

    def score(self, user_ids: list[str], item_ids: list[str], return_stats: bool = False):
        """Click probabilities (B,) float32, sigmoid of :meth:`score_logits`."""
        logits, stats = self.score_logits(user_ids, item_ids, return_stats=True)
        probs = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        return (probs, stats) if return_stats else probs
