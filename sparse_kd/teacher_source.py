"""A teacher ranker trained by another run, reused (``distill.teacher_ranker.from_run``).

A large teacher costs far more to train than the students it teaches (an ensemble of 5 DIN
rankers: about an hour per seed on ml-1m-text here), and several students usually learn from
one teacher: other sizes, other distillation settings. ``from_run`` names the run folder that
trained it (``{seed}`` in the path is replaced by the seed, so a study's seed folders pair up:
``runs/ml1m_text_d64_ensemble/seed_{seed}``). This run then trains no teacher: it reads the
source's ``config.yaml`` and takes the teacher as that config defines it (architecture, text
features, ensemble members, seeds), evaluates each member from its final checkpoint and gives
the students its logits, exactly as if it had trained it. Nothing in the source folder is
written.

Refused up front, with the key that differs, where the reuse would be wrong:

- the source saw other data or splits: every ``data`` key but ``loader_workers`` must be equal
  (the data path compared where it resolves to), so the teacher's train logits are row for row
  this run's train split;
- the teacher's text features would differ: ``teacher.model``, ``teacher.max_length`` and
  ``distill.user_text`` must be equal (this run encodes the text the teacher reads);
- the source's teacher is not finished (its newest complete checkpoint is not marked with the
  source's ``train.epochs``), or its folder was trained with other settings than the source's
  config.yaml says (its model_meta.json fingerprint);
- the source itself reuses a teacher (one hop only).

This run's own ``distill.teacher_ranker`` keys other than ``from_run`` must be left at their
defaults: the teacher is the source's, and a key set here would silently mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import ConfigError, ExperimentConfig, config_from_dict, to_dict
from sparse_kd.run_folder import CONFIG_FILE, flatten
from sparse_kd.student.ensemble import member_name

DATA_FREE = ("loader_workers",)  # how batches are read, not which rows
TEXT_KEYS = ("teacher.model", "teacher.max_length", "distill.user_text")


def reuses_teacher(cfg: ExperimentConfig) -> bool:
    return bool(cfg.distill.teacher_ranker.from_run)


def source_dir(cfg: ExperimentConfig, seed: int) -> Path:
    """The source run folder of ``distill.teacher_ranker.from_run`` for ``seed``."""
    return Path(cfg.distill.teacher_ranker.from_run.replace("{seed}", str(seed)))


def source_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The source run's config (``output_dir`` set to the source folder), checked against ``cfg``
    for ``seed``; raises :class:`ConfigError` naming the key, the file and the fix. Reads files:
    call on rank 0 (:func:`sparse_kd.dist.on_main`)."""
    src = source_dir(cfg, seed)
    path = src / CONFIG_FILE
    where = f"distill.teacher_ranker.from_run={cfg.distill.teacher_ranker.from_run!r}"
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist. Give the folder of a run that trained its teacher ranker "
                          "(its output_dir; for a study, its seed folder, e.g. runs/NAME/seed_{seed}).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {path} is unreadable ({type(e).__name__}: {e})") from None
    scfg = config_from_dict(raw if isinstance(raw, dict) else {}, str(path))
    scfg = dataclasses.replace(scfg, output_dir=str(src))
    if reuses_teacher(scfg):
        raise ConfigError(f"{where}: {path} reuses a teacher itself (from_run={scfg.distill.teacher_ranker.from_run!r}); "
                          "point from_run at the run that trained it")
    diffs = _differences(cfg, scfg)
    if diffs:
        raise ConfigError(
            f"{where}: the teacher in {src} was trained on other data or text than this run uses "
            f"({', '.join(diffs[:8])}), so its logits would not match this run's examples. Fix: set those keys "
            f"as in {path}, or train a teacher for this run (remove from_run)."
        )
    tr = cfg.distill.transfer
    t_dim = scfg.distill.teacher_ranker.embedding_dim or scfg.student.embedding_dim
    if tr.enabled and tr.projection == "learned" and t_dim != cfg.student.embedding_dim:
        raise ConfigError(f"distill.transfer.projection: 'learned' maps text to the teacher ranker's rows, which must "
                          f"have the student's dim ({cfg.student.embedding_dim}); the teacher in {src} has {t_dim}. "
                          "Use projection: pca with this teacher.")
    return scfg


def checked_source(cfg: ExperimentConfig, seed: int, name: str) -> Optional[ExperimentConfig]:
    """:func:`source_config`, with every member of the source's teacher ranker ``name`` finished
    (:func:`finished_checkpoint`); None where ``cfg`` trains its own teacher. Reads files: call on
    rank 0 (:func:`sparse_kd.dist.on_main`)."""
    if not reuses_teacher(cfg):
        return None
    src = source_config(cfg, seed)
    for k in range(src.distill.teacher_ranker.ensemble):
        finished_checkpoint(src, member_name(name, k))
    return src


def _differences(cfg: ExperimentConfig, scfg: ExperimentConfig) -> list[str]:
    mine, theirs = flatten(to_dict(cfg)), flatten(to_dict(scfg))
    keys = [k for k in mine if k.startswith("data.") and k.split(".", 1)[1] not in DATA_FREE] + list(TEXT_KEYS)
    out = []
    for k in keys:
        a, b = mine.get(k), theirs.get(k)
        if k == "data.path" and a and b and Path(a).resolve() == Path(b).resolve():
            continue
        if a != b:
            out.append(f"{k}: {_show(b)} there, {_show(a)} here")
    return out


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def finished_checkpoint(scfg: ExperimentConfig, name: str) -> Path:
    """The final checkpoint of the source's ranker ``name``; refused where there is none yet."""
    d = Path(scfg.output_dir) / name
    latest = ckpt.latest(d / "checkpoints")
    epoch = ckpt.read_meta(latest).get("epoch", 0) if latest is not None else 0
    if latest is None or epoch < scfg.train.epochs:
        state = "has no complete checkpoint" if latest is None else f"is at epoch {epoch} of {scfg.train.epochs}"
        raise ConfigError(
            f"distill.teacher_ranker.from_run: the teacher ranker {d} {state}: it has not finished training. Finish "
            f"that run first (rerun the command that trained {scfg.output_dir}; it resumes), then rerun this one."
        )
    return latest


def source_speed(scfg: ExperimentConfig) -> float:
    """The teacher's training examples/s as the source recorded it (its study_metrics.json or
    metrics.json), 0.0 where it did not."""
    folder = Path(scfg.output_dir)
    for name, keys in (("study_metrics.json", ("cost", "teacher_ranker", "train_examples_per_s")),
                       ("metrics.json", ("examples_per_s", "teacher_ranker"))):
        doc = _read_json(folder / name)
        for k in keys:
            doc = doc.get(k) if isinstance(doc, dict) else None
        if isinstance(doc, (int, float)):
            return float(doc)
    return 0.0


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
