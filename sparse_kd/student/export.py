"""Load a trained ranker from its sharded checkpoint into one plain, unsharded CPU DLRM.

Compression and serving start from here: ``torch.distributed.checkpoint`` reshards whatever
plan the training used into the full tables of a local model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torchrec.models.dlrm import DLRM

from sparse_kd import checkpoint as ckpt
from sparse_kd.run_folder import MODEL_META, StaleRunError  # noqa: F401 (re-exported)
from sparse_kd.student.model import Arch, build_dlrm


def write_model_meta(
    variant_dir: Path, num_embeddings: dict[str, int], dense_in: int, student: dict, fingerprint: dict | None = None
) -> None:
    """Record what is needed to rebuild the model: table sizes (KJT key order), dense width, and
    its architecture (``student``: :meth:`~sparse_kd.student.model.Arch.to_dict`, or the student
    config's dict).

    ``fingerprint`` holds the settings that change what training produces. If the folder already
    has checkpoints made under a different fingerprint, resuming from them would silently mix
    two experiments, so this raises :class:`StaleRunError` naming the changed keys instead.
    """
    variant_dir = Path(variant_dir)
    check_fingerprint(variant_dir, fingerprint)
    variant_dir.mkdir(parents=True, exist_ok=True)
    doc = {"num_embeddings": num_embeddings, "dense_in_features": dense_in, "student": student, "fingerprint": fingerprint}
    meta_path = variant_dir / MODEL_META
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(meta_path)


def check_fingerprint(variant_dir: Path, fingerprint: dict | None) -> None:
    """Raise :class:`StaleRunError` if ``variant_dir`` has checkpoints made under another fingerprint."""
    meta_path = Path(variant_dir) / MODEL_META
    if fingerprint is not None and meta_path.is_file() and ckpt.latest(Path(variant_dir) / "checkpoints") is not None:
        old = json.loads(meta_path.read_text()).get("fingerprint")
        if old is not None and old != fingerprint:
            changed = sorted(_diff(old, fingerprint))
            raise StaleRunError(
                f"{variant_dir} holds checkpoints trained with a different configuration "
                f"(changed: {', '.join(changed[:8])}). Delete that folder to retrain, or set "
                f"output_dir=... to keep both runs."
            )


def _diff(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return set() if a == b else {prefix}


def load_dlrm(variant_dir: Path, checkpoint: Path | None = None) -> DLRM:
    """The DLRM of a trained variant (newest complete checkpoint unless one is given), fp32 on CPU."""
    variant_dir = Path(variant_dir)
    meta_path = variant_dir / MODEL_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; is {variant_dir} a trained sparse_kd run folder?")
    meta = json.loads(meta_path.read_text())
    arch = Arch.from_dict(meta["student"])  # the variant's own architecture (a teacher ranker's may differ)
    model = build_dlrm(meta["num_embeddings"], meta["dense_in_features"], arch, device="cpu")
    path = checkpoint or ckpt.latest(variant_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"{variant_dir / 'checkpoints'}: no complete checkpoint")
    ckpt.verify(path)
    # the checkpoint holds the training wrapper's state: the DLRM is under "model."
    wrapped = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = {"model": wrapped}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()})
    return model.eval()
