"""Sharded checkpoints with ``torch.distributed.checkpoint``, written atomically.

Layout: ``<dir>/step_<global_step>/`` holds DCP files plus ``meta.json`` (epoch, step, format
version, a sha256 per file, the world size that saved it and, for a sharded model, the sharding
type of each table: see :mod:`sparse_kd.student.reshard` for what another world size can load). Every rank writes into ``step_N.tmp``; after a barrier rank 0
writes the manifest and renames the folder, so a ``step_N`` folder is always complete. A kill
during writing leaves only a ``.tmp`` folder (re-saving a step first moves the old one to
``.old``), which is ignored and cleaned up by the next save.

Hashing is shared, never repeated: on save each rank hashes the shard files it wrote
(``__<rank>_*.distcp``; rank 0 also ``.metadata``) and rank 0 gathers the digests; on a
multi-rank load each rank checks every world-size-th file and all ranks raise the first
mismatch. The weights of a module named :data:`FROZEN_MODULE` (rows rebuilt from their source
at every start, never trained: the sharded alignment targets of :mod:`sparse_kd.distill.targets`)
are not saved, and a load keeps the live ones. Waits on this work go through :func:`sparse_kd.dist.long_group`. Every rank writes
and reads these folders: they must be on a filesystem all ranks share
(:func:`sparse_kd.run_folder.check_shared_run_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sparse_kd.dist import long_all_gather_object, long_barrier
from sparse_kd.integrity import sha256_file

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
FROZEN_MODULE = "teacher_rows"


def frozen(key: str) -> bool:
    """Whether a state-dict key belongs to a :data:`FROZEN_MODULE` (left out of checkpoints)."""
    return FROZEN_MODULE in key.split(".")


def saved_state(model) -> dict:
    """``model.state_dict()`` without the frozen modules' weights."""
    return {k: v for k, v in model.state_dict().items() if not frozen(k)}


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or of another format version."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def plan_sharding(plan) -> dict[str, str]:
    """table name -> sharding type, for every table of a torchrec ``ShardingPlan``."""
    return {name: ps.sharding_type for path, mp in plan.plan.items() if not frozen(path) for name, ps in mp.items()}


def _sharding(model) -> dict[str, str]:
    """The plan's sharding types for a DistributedModelParallel (empty for other models)."""
    plan = getattr(model, "plan", None)
    return plan_sharding(plan) if plan is not None and hasattr(plan, "plan") else {}


def save(ck_dir: Path, model, optimizer, epoch: int, step_in_epoch: int, global_step: int, keep: int = 2) -> Path:
    ck_dir = Path(ck_dir)
    final = ck_dir / f"step_{global_step:08d}"
    tmp = ck_dir / f"step_{global_step:08d}.tmp"
    if _rank() == 0:
        ck_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    long_barrier()  # rank 0 may be deleting a large leftover
    state = {"model": saved_state(model), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(tmp))
    shares = long_all_gather_object(_hash_own_files(tmp, _rank(), _world_size()))  # also: every rank has written
    if _rank() == 0:
        files = {name: digest for share in shares for name, digest in share.items()}
        files.update({p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in files})
        files = dict(sorted(files.items()))
        meta = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": _world_size(),
            "sharding": _sharding(model),
            "files": files,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = None
        if final.exists():  # re-saving a step (e.g. after the refit): move the old one aside atomically
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
        _prune(ck_dir, keep)
    long_barrier()
    return final


def _owner(name: str, world_size: int) -> int:
    """The rank that hashes file ``name`` on save: r for DCP's ``__<r>_*`` shard files, else 0."""
    m = re.match(r"__(\d+)_", name)
    return int(m.group(1)) if m and int(m.group(1)) < world_size else 0


def _hash_own_files(folder: Path, rank: int, world_size: int) -> dict[str, str]:
    """sha256 of the files in ``folder`` that ``rank`` hashes (:func:`_owner`)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and _owner(p.name, world_size) == rank}


def _complete(ck_dir: Path) -> list[Path]:
    """Folders named exactly ``step_<digits>`` (not ``.tmp`` / ``.old`` leftovers), oldest first."""
    return sorted(p for p in ck_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "meta.json").is_file())


def _prune(ck_dir: Path, keep: int) -> None:
    for p in _complete(ck_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in list(ck_dir.glob("step_*.tmp")) + list(ck_dir.glob("step_*.old")):
        shutil.rmtree(p, ignore_errors=True)


def latest(ck_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    ck_dir = Path(ck_dir)
    if not ck_dir.is_dir():
        return None
    done = _complete(ck_dir)
    return done[-1] if done else None


def read_meta(path: Path) -> dict:
    """The checkpoint's ``meta.json`` (not checked against the files: see :func:`verify`)."""
    path = Path(path)
    mf = path / "meta.json"
    if not mf.is_file():
        raise CheckpointError(f"{path}: no meta.json: not a complete sparse_kd checkpoint")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e})") from None


def verify(path: Path, part: tuple[int, int] = (0, 1)) -> dict:
    """Check format version and every file's checksum; return the metadata.

    ``part`` = (i, n): check only every n-th file from the i-th (the ranks of a load share the
    work: :func:`load`)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')} but this sparse_kd reads version {FORMAT_VERSION}"
        )
    for name, digest in sorted(meta["files"].items())[part[0] :: part[1]]:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in meta.json is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch: the checkpoint was truncated or modified")
    return meta


def load(path: Path, model, optimizer=None) -> dict:
    """Load a (possibly differently sharded) checkpoint into ``model`` / ``optimizer`` in place.

    With several ranks (a collective, as ``dcp.load`` is) each rank verifies its share of the
    files; a damaged file makes every rank raise the same :class:`CheckpointError`."""
    if _world_size() == 1:
        meta = verify(path)
    else:
        meta, err = None, None
        try:
            meta = verify(path, (_rank(), _world_size()))
        except CheckpointError as e:
            err = str(e)
        errors = [e for e in long_all_gather_object(err) if e]
        if errors:
            raise CheckpointError(errors[0])
    live = model.state_dict()
    state = {"model": {k: v for k, v in live.items() if not frozen(k)}}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict({**live, **state["model"]})  # frozen rows: the live ones
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return meta
