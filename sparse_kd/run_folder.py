"""May this command write into this run folder? Decided before anything is written.

A run folder (``output_dir``) belongs to one experiment: the settings that change what training
produces. They are recorded twice, in ``config.yaml`` (the resolved config) and in each trained
variant's ``model_meta.json`` (its fingerprint, see :func:`sparse_kd.pipeline.variant_fingerprint`).
A command whose settings differ from the folder's is refused with :class:`StaleRunError`,
one message that names every changed key (old -> new) and how to fix it, so two experiments
never mix: nothing of the old run is rewritten and nothing of the new one is written.

Free to change between runs into the same folder (they change where, how fast or how often,
not what is trained): ``name``, ``output_dir``, ``nproc`` (checkpoints reshard on load), the
``train`` keys ``checkpoint_every``, ``keep_checkpoints``, ``log_every``, ``eval_batch_size``,
``collective_timeout_s``; the ``teacher`` keys ``batch_size``, ``cuda_batch_size``, ``cache_dir``, ``sort_by_length``,
``num_threads``, ``allow_pickle_weights``; ``distill.align.layout`` and
``distill.teacher_ranker.features_layout`` (where the alignment targets and the teacher's user
features are held, not what they are); the ``compress`` and ``study`` sections. ``train.epochs``
may grow (training continues from the last checkpoint) but not fall below the epochs a variant
has already trained.

The config check applies once the folder holds results (a complete checkpoint of a variant, or
an ``artifact/``); a folder a failed first attempt left without any is rewritten freely.

Example::

    check_run_folder(cfg, {"baseline": fingerprint(cfg, "baseline", cfg.distill, seed=0)})
    # StaleRunError: runs/demo holds a run trained with other settings
    #   (data.synthetic.num_users: 600 -> 500); nothing was written. Fix: ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from sparse_kd.config import ConfigError, ExperimentConfig, config_from_dict, to_dict

FREE_KEYS = (
    "name", "output_dir", "nproc",
    "train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.eval_batch_size", "train.collective_timeout_s", "train.mf_reference",
    "teacher.batch_size", "teacher.cuda_batch_size", "teacher.cache_dir", "teacher.sort_by_length", "teacher.num_threads",
    "teacher.allow_pickle_weights", "distill.align.layout", "distill.teacher_ranker.features_layout",
    "compress", "study",
)
CONFIG_FILE = "config.yaml"
MODEL_META = "model_meta.json"
_MAX_LISTED = 8


class StaleRunError(RuntimeError):
    """A run folder holds results made under other settings than this command's."""


class RunFolderNotShared(ConfigError):
    """``output_dir`` is not one folder that every rank sees (multi-node without a shared filesystem)."""


SHARED_WAIT_S = 10.0  # how long a rank looks for a file another rank wrote (NFS caches lookups for seconds)


class _Said(str):
    """A value shown as written (not quoted) in a refusal."""


# ------------------------------------------------------------------------------------------ helpers


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``; an empty mapping is kept as a value."""
    if isinstance(doc, dict) and doc:
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: doc}


def _is_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def identity(config_doc: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings of a config dict that decide what training produces."""
    return {k: v for k, v in flatten(dict(config_doc)).items() if not _is_free(k)}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every flattened key whose value differs, in sorted key order."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _show(v: Any) -> str:
    if isinstance(v, _Said):
        return str(v)
    s = "(not set)" if v is None else repr(v) if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """``data.seed: 0 -> 1, ...`` by key, each key once (at most eight listed, then how many more)."""
    seen: dict[str, str] = {}
    for k, a, b in diffs:
        seen.setdefault(k, f"{k}: {_show(a)} -> {_show(b)}")
    parts = [seen[k] for k in sorted(seen)]
    more = f", and {len(parts) - _MAX_LISTED} more" if len(parts) > _MAX_LISTED else ""
    return ", ".join(parts[:_MAX_LISTED]) + more


def _read_config(path: Path) -> dict[str, Any]:
    """A saved config.yaml, flattened, with today's defaults for keys it lacks (keys added since)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise StaleRunError(
            f"{path}: unreadable ({type(e).__name__}), so it cannot be told whether this folder belongs to "
            f"this experiment; nothing was written. Fix: set output_dir=<another folder>, or delete "
            f"{path.parent} to start over."
        ) from None
    if not isinstance(raw, dict):
        raw = {}
    try:
        return flatten(to_dict(config_from_dict(raw, str(path))))
    except ConfigError:  # written by another version (a key since removed...): compare what is there
        out = {k: v for k, v in flatten(to_dict(ExperimentConfig())).items() if v != {}}
        out.update(flatten(raw))
        return out


def _checkpoint_meta(variant_dir: Path) -> Optional[dict]:
    """meta.json of the newest complete checkpoint (``checkpoints/step_<digits>``), or None."""
    ck = variant_dir / "checkpoints"
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "meta.json").is_file())
    for p in reversed(done):
        try:
            return json.loads((p / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # a damaged manifest: loading will say so; it still counts as a result below
    return {} if done else None


def holds_results(run_dir: Path) -> bool:
    """Whether a variant in ``run_dir`` has a complete checkpoint or ``artifact/`` has anything."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    if any((run_dir / "artifact").glob("*")):
        return True
    return any(p.is_dir() and _checkpoint_meta(p) is not None for p in run_dir.iterdir())


# ------------------------------------------------------------------------------------------ checks


def check_run_folder(cfg: ExperimentConfig, fingerprints: Mapping[str, dict] = ()) -> None:
    """Raise :class:`StaleRunError` if training ``cfg`` into ``cfg.output_dir`` would mix experiments.

    fingerprints: variant -> fingerprint of each variant this command trains. Reads only.
    """
    run = Path(cfg.output_dir)
    if not run.is_dir():
        return
    diffs: list[tuple[str, Any, Any]] = []
    cfg_path = run / CONFIG_FILE
    if cfg_path.is_file() and holds_results(run):
        diffs += changes(identity(_read_config(cfg_path)), identity(to_dict(cfg)))
    for name, fp in dict(fingerprints).items():
        vd = run / name
        meta = _checkpoint_meta(vd)
        if meta is None:
            continue
        try:
            old_fp = json.loads((vd / MODEL_META).read_text()).get("fingerprint")
        except (OSError, ValueError):
            old_fp = None
        if old_fp is not None:
            diffs += changes(flatten(old_fp), flatten(fp))
        reached = int(meta.get("epoch", 0)) + (1 if meta.get("step_in_epoch", 0) else 0)
        if reached > cfg.train.epochs:
            diffs.append(("train.epochs", _Said(f"{reached} already trained in {name}/"), cfg.train.epochs))
    if diffs:
        raise StaleRunError(
            f"{run} holds a run trained with other settings ({describe(diffs)}); nothing was written. "
            f"Fix: set output_dir=<another folder> to keep both runs, or delete {run} to retrain with these settings."
        )


def check_same_experiment(cfg: ExperimentConfig) -> None:
    """Raise :class:`StaleRunError` if ``cfg.output_dir/config.yaml`` was trained with other settings
    than ``cfg`` (for commands that read a trained run, such as compress). No config.yaml: no check."""
    run = Path(cfg.output_dir)
    cfg_path = run / CONFIG_FILE
    if not cfg_path.is_file():
        return
    diffs = changes(identity(_read_config(cfg_path)), identity(to_dict(cfg)))
    if diffs:
        raise StaleRunError(
            f"{run} was trained with other settings than this command's ({describe(diffs)}); nothing was written. "
            f"Fix: give the config and overrides the run was trained with (see {cfg_path}), or set output_dir= to "
            f"the run you mean."
        )


# ------------------------------------------------------------------------------- shared run folder


def _sees(path: Path, content: str, wait_s: float) -> bool:
    """Whether ``path`` holds ``content``, looking again for up to ``wait_s`` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == content:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_run_folder(output_dir: str, wait_s: Optional[float] = None) -> None:
    """Refuse a run folder that is not one folder shared by every rank (collective: every rank calls it).

    Rank 0 writes a file with a random nonce into ``output_dir``; after a broadcast every rank
    reads it back and writes an answer file, which rank 0 then reads. Any rank that cannot see
    rank 0's file (or whose answer rank 0 cannot see) makes every rank raise
    :class:`RunFolderNotShared`, naming the ranks and hosts, before anything else is written:
    rank 0 writes checkpoints' manifests and best-epoch copies, every rank writes checkpoint
    shards into the same folders and reads them back. An ``output_dir`` URL (``s3://...``) is
    refused on every rank (also with one process).
    """
    import socket
    import uuid

    import torch.distributed as dist

    from sparse_kd.dist import long_all_gather_object, long_broadcast_object

    if "://" in str(output_dir):
        raise ConfigError(
            f"output_dir: {output_dir!r} is a URL; the run folder must be a path. Object stores are not written "
            "directly (checkpoints are renamed into place atomically): mount the bucket at the same path on every "
            "node (e.g. s3fs, gcsfuse, blobfuse) or use a shared filesystem such as NFS."
        )
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    wait_s = SHARED_WAIT_S if wait_s is None else wait_s
    rank, host, run = dist.get_rank(), socket.gethostname(), Path(output_dir)
    first = None
    if rank == 0:
        try:
            run.mkdir(parents=True, exist_ok=True)
            nonce = uuid.uuid4().hex
            (run / f".shared_check_{nonce}").write_text(nonce)
            first = (nonce, host, None)
        except OSError as e:
            first = ("", host, f"rank 0 (host {host}) cannot write into output_dir {run}: {e}")
    nonce, host0, err = long_broadcast_object(first)
    if err:
        refusal = ConfigError(err)
        refusal.on_every_rank = True
        raise refusal
    token = run / f".shared_check_{nonce}"
    seen = rank == 0 or _sees(token, nonce, wait_s)
    if seen and rank > 0:
        try:
            token.with_name(f"{token.name}.rank{rank}").write_text(nonce)
        except OSError:
            seen = False
    answers = long_all_gather_object((seen, host))
    verdict = None
    if rank == 0:
        blind = [(r, h) for r, (ok, h) in enumerate(answers) if not ok]
        unheard = [(r, h) for r, (ok, h) in enumerate(answers) if ok and r > 0
                   and not _sees(token.with_name(f"{token.name}.rank{r}"), nonce, wait_s)]
        for p in [token] + [token.with_name(f"{token.name}.rank{r}") for r in range(1, len(answers))]:
            p.unlink(missing_ok=True)
        if blind or unheard:
            parts = []
            if blind:
                parts.append(f"rank(s) {_ranks(blind)} cannot see the file rank 0 (host {host0}) wrote there")
            if unheard:
                parts.append(f"rank 0 (host {host0}) cannot see the files rank(s) {_ranks(unheard)} wrote there")
            verdict = (
                f"output_dir {run} is not one folder shared by all {len(answers)} ranks: {'; '.join(parts)}. "
                "Rank 0 writes the checkpoints' manifests and best-epoch copies and every rank writes and reads "
                "checkpoint shards in this folder, so it must be on a filesystem every node mounts at the same "
                "path (e.g. NFS, or an object store mounted with s3fs/gcsfuse). Fix: set output_dir= to such a path."
            )
    verdict = long_broadcast_object(verdict)
    if verdict:
        err = RunFolderNotShared(verdict)
        err.on_every_rank = True  # the CLI lets the ranks leave together, once rank 0 has said why
        raise err


def _ranks(pairs: list[tuple[int, str]]) -> str:
    return ", ".join(f"{r} (host {h})" for r, h in pairs)
