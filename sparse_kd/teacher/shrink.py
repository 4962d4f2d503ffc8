"""A smaller teacher distilled from the configured one: k of its layers, tuned on the data's texts.

Notation: N texts, k kept transformer layers (of L in the source teacher), H hidden size.

:func:`shrink_teacher` keeps the source teacher's tokenizer and embeddings and k of its L
transformer layers (initialised from the teacher's own layers: by default evenly spaced and
always including the last one, e.g. layers 2, 4, 6 of 6 for k=3 and 3, 6 for k=2), then
fine-tunes that cut to reproduce the full teacher's fp32 embeddings of the given texts:

    loss = mean over texts of (1 - cos(student(x), teacher_fp32(x)))
           + token_loss * mean over tokens of (1 - cos(student token state, teacher token state))

where both embeddings are what :class:`~sparse_kd.teacher.encoder.TextEncoder` computes (the
same tokenization and truncation, :func:`~sparse_kd.teacher.encoder.mean_pool` over the
attention mask, L2 normalisation) and the token states are the last hidden states they pool
(kept in memory in bf16: about 0.5 GB for 10000 texts of 64 tokens). The texts are
deduplicated and a held-out part (never trained on) measures the result: the reported cosines are those of the saved folder, loaded
back through ``TextEncoder`` at the configured precision (``auto``: bf16 where native), to the
source teacher's fp32 embeddings.

The result is an ordinary local BERT folder (``save_pretrained`` with safetensors, plus the
teacher's tokenizer files, plus ``shrink.json``: the source model and its fingerprint, the
kept layers, a digest of the texts it was tuned on and the held-out cosines). Setting
``teacher.model: <folder>`` selects it everywhere (``encode``, training, ``add-items``), with
no other code path. The folder is built in a hidden temp sibling and renamed into place: a
failed or killed run never leaves a loadable half-written folder at ``out_dir``.

From the command line::

    sparse-kd teacher-shrink configs/ml1m_text.yaml --layers 2 --out models/minilm-l2-ml1m
    sparse-kd encode configs/ml1m_text.yaml teacher.model=models/minilm-l2-ml1m

Measured (``benchmarks/bench_teacher.py --quick --shrink-recipe full``, all-MiniLM-L6-v2, tuned on
3600 synthetic texts for 8 epochs, measured on 128 other texts, bf16, a 2-core AMD EPYC with
AVX512-BF16): 2 layers mean cosine 0.9934 (min 0.971) to the fp32 teacher at 2.8x the texts/s of
the 6-layer bf16 default (5.8x naive fp32); 3 layers 0.9952 (min 0.982) at 1.9x (3.9x naive).
Tuning took 270 s (2 layers) and 350 s (3 layers) on 1 thread. The token-level term
(``token_loss``) raised the 2-layer held-out cosine from 0.9906 to 0.9919 at equal cost (1800
texts, 10 epochs); 3600 texts for 8 epochs gave 0.9939.

The pooled targets (the source teacher's fp32 embeddings of the data's texts) are cached in
``teacher.cache_dir`` like any teacher embeddings; the token states take one more fp32 teacher
pass over the training texts. Tuning runs on the CPU. ``benchmarks/bench_teacher.py`` measures the
shrunk models' texts/s and cosine (methods ``shrunk2_bf16``, ``shrunk3_bf16``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparse_kd.atomic import swap_in_dir
from sparse_kd.teacher.cache import encode_cached, texts_digest
from sparse_kd.teacher.layers import _resolve_layers, cut_layers
from sparse_kd.teacher.encoder import TeacherModelError, TextEncoder, mean_pool, resolve_model_path

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "shrink.json"
# tokenizer files copied verbatim from the source folder (the tokenizer is kept, byte for byte)
_TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")


class ShrinkError(ValueError):
    """Settings :func:`shrink_teacher` cannot run with (named, with the allowed values)."""


def source_layers(teacher_cfg: Any) -> int:
    """L, the transformer layers of the teacher ``teacher_cfg.model`` (from its config.json; no model load)."""
    path = resolve_model_path(teacher_cfg.model, getattr(teacher_cfg, "allow_pickle_weights", False))
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    n = cfg.get("num_hidden_layers", cfg.get("n_layers"))
    if not isinstance(n, int):
        raise TeacherModelError(f"teacher.model: {str(path)!r}: config.json names no num_hidden_layers to shrink")
    return n


def check_settings(teacher_cfg: Any, layers: int | Sequence[int], out_dir: str | Path, epochs: int, lr: float,
                   batch_size: int, held_out_fraction: float) -> list[int]:
    """The 0-based layers to keep; raises :class:`ShrinkError` naming a setting that cannot work."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ShrinkError(f"held_out_fraction (--held-out): must be in (0, 1), got {held_out_fraction}")
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ShrinkError(f"epochs >= 0, batch_size >= 1 and lr > 0 needed, got {epochs}, {batch_size}, {lr}")
    out = Path(out_dir)
    if out.exists() and not (out / PROVENANCE_FILE).is_file():
        raise ShrinkError(f"{out}: exists and was not written by shrink_teacher (no {PROVENANCE_FILE}); "
                          "choose another --out or remove it")
    try:
        return _resolve_layers(layers, source_layers(teacher_cfg))
    except ValueError as e:
        if isinstance(e, TeacherModelError):
            raise
        raise ShrinkError(str(e)) from None


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T), as TextEncoder builds them."""
    t_max = max(len(b) for b in batch)
    ids = torch.full((len(batch), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), t_max, dtype=torch.long)
    for r, b in enumerate(batch):
        ids[r, :len(b)] = torch.as_tensor(b, dtype=torch.long)
        mask[r, :len(b)] = 1
    return ids, mask


def _embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
           normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TextEncoder's embedding (B, H), with gradients: mean pool over the mask, then L2 normalise;
    and the last hidden states (B, T, H) it pools."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    emb = mean_pool(hidden, mask)
    return (F.normalize(emb, dim=-1) if normalize else emb), hidden


def _token_targets(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 128) -> list[torch.Tensor]:
    """The teacher's last hidden states per text, (T_i, H) bf16 each (length-sorted batches)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b_ids, b_mask = _pad([ids[i] for i in idx], pad_id)
            hidden = model(input_ids=b_ids, attention_mask=b_mask).last_hidden_state
            for r, i in enumerate(idx):
                out[i] = hidden[r, :len(ids[i])].to(torch.bfloat16).clone()
    return out


def _token_loss(hidden: torch.Tensor, targets: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of 1 - cos(student token state, teacher token state)."""
    t = torch.zeros(hidden.shape, dtype=torch.float32)
    for r, x in enumerate(targets):
        t[r, :x.shape[0]] = x.float()
    m = mask.to(torch.float32)
    return ((1.0 - F.cosine_similarity(hidden.float(), t, dim=-1)) * m).sum() / m.sum()


def _cosines(encoder: TextEncoder, texts: list[str], targets: torch.Tensor) -> torch.Tensor:
    if not texts:
        return torch.ones(0)
    return F.cosine_similarity(encoder.encode(texts), targets, dim=1)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def _threads(n: int):
    """torch intra-op threads set to ``n`` inside the block (0: unchanged)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _is_interactive() -> bool:
    return sys.stderr.isatty()


def shrink_teacher(
    teacher_cfg: Any,
    texts: Sequence[str],
    layers: int | Sequence[int],
    out_dir: str | Path,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    *,
    max_texts: int | None = 10000,
    train_word_embeddings: bool = False,
    dropout: bool = False,
    token_loss: float = 1.0,
    num_threads: int | None = None,
    data_info: dict[str, Any] | None = None,
    show_progress: bool | None = None,
    _before_rename: Any = None,
) -> dict[str, Any]:
    """Distil the teacher of ``teacher_cfg`` into one with ``layers`` of its layers; save it at ``out_dir``.

    Args:
        teacher_cfg: a :class:`~sparse_kd.config.TeacherConfig` (its ``model`` is the source; its
            ``max_length``, ``normalize``, ``precision``, ``cache_dir`` apply).
        texts: the texts to tune on (e.g. the data's item and user texts); deduplicated.
        layers: k (keep k evenly spaced layers, the last included) or the 0-based indices to keep.
        out_dir: the folder to write (a folder a previous shrink wrote is replaced atomically;
            any other existing path is refused).
        epochs, lr, batch_size: AdamW over the training texts, linear warm-up (5%) then linear decay.
        seed: the held-out split, the sample (``max_texts``) and the batch order.
        held_out_fraction: share of the distinct texts kept out of training, for the report (0 < f < 1).
        max_texts: tune on at most this many distinct texts (a seeded sample; None: all).
        train_word_embeddings: also tune the word-embedding table (off: it stays the teacher's,
            which keeps words absent from the tuning texts where the teacher put them, and is faster).
        dropout: train with the model's dropout (off: dropout is disabled while tuning, since the
            student regresses fixed targets; the cosines measured above were tuned without it, and
            a first run with it, at a lower lr, converged slower -- not an isolated comparison).
        token_loss: weight of a second loss term, the mean over tokens of 1 - cosine between the
            student's and the teacher's last hidden states (the states the embedding pools; 0: off).
            It gives many targets per text instead of one, which generalises better from few texts.
        num_threads: torch CPU threads while tuning (None: ``teacher_cfg.num_threads``; 0: torch's default).
            On a machine shared with other jobs, 1 thread can be several times faster than 2.
        data_info: what the texts are (e.g. the config's data section), recorded in ``shrink.json``.
        show_progress: tqdm bars (None: when stderr is a terminal).

    Returns {"layers", "train_texts", "held_out_texts", "held_out_mean_cos", "held_out_min_cos",
    "seconds"} plus "kept_layers", "untuned_held_out_mean_cos" (the cut before tuning),
    "precision" (of the held-out measurement) and "out_dir".
    """
    t_start = time.perf_counter()
    kept = check_settings(teacher_cfg, layers, out_dir, epochs, lr, batch_size, held_out_fraction)
    out = Path(out_dir)
    progress = _is_interactive() if show_progress is None else show_progress
    threads = int(getattr(teacher_cfg, "num_threads", 0) if num_threads is None else num_threads)

    uniq = list(dict.fromkeys(str(t) for t in texts))
    rng = random.Random(seed)
    rng.shuffle(uniq)
    if max_texts is not None and len(uniq) > max_texts:
        logger.info("shrink: tuning on a sample of %d of %d distinct texts (max_texts)", max_texts, len(uniq))
        uniq = uniq[:max_texts]
    if len(uniq) < 2:
        raise ShrinkError(f"shrink: need at least 2 distinct texts, got {len(uniq)}")
    n_held = min(len(uniq) - 1, max(1, round(held_out_fraction * len(uniq))))
    held, train = uniq[:n_held], uniq[n_held:]

    # targets: the source teacher's fp32 embeddings (cached like any teacher embeddings)
    source = TextEncoder.from_config(teacher_cfg, precision="fp32", device="cpu", show_progress=progress,
                                     num_threads=threads)
    t0 = time.perf_counter()
    targets = encode_cached(source, held + train, teacher_cfg.cache_dir, "shrink_targets")
    held_t, train_t = targets[:n_held], targets[n_held:]
    logger.info("shrink: teacher targets for %d texts (%d held out) in %.1fs", len(uniq), n_held,
                time.perf_counter() - t0)

    teacher = source.model
    n_src = int(teacher.config.num_hidden_layers)
    student = cut_layers(teacher, kept)
    tok = source.tokenizer
    ids = tok(train, truncation=True, max_length=source.max_length, padding=False,
              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    token_t: list[torch.Tensor] = []
    if token_loss > 0 and epochs > 0:
        t0 = time.perf_counter()
        with _threads(threads):
            token_t = _token_targets(teacher, ids, pad_id)
        logger.info("shrink: teacher token states for %d texts in %.1fs", len(train), time.perf_counter() - t0)
    del teacher
    # held-out measurement: TextEncoder's own path, at the configured precision
    meter = TextEncoder.from_config(teacher_cfg, device="cpu", show_progress=False, num_threads=threads)
    dtype = torch.bfloat16 if meter.precision == "bf16" else torch.float32

    def held_out_cos(model: torch.nn.Module) -> torch.Tensor:
        import copy

        meter.model = copy.deepcopy(model).eval().to(dtype)
        return _cosines(meter, held, held_t)

    untuned = held_out_cos(student).mean().item()
    logger.info("shrink: layers %s of %d; untuned cut: held-out mean cosine %.5f", kept, n_src, untuned)

    # ---- fine-tune
    torch.manual_seed(seed)
    word = student.get_input_embeddings()
    if not train_word_embeddings:
        word.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    autocast = meter.precision == "bf16"  # the folder will run in bf16: tune under bf16 autocast (faster)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    try:
        student.train(dropout)
        with tqdm(total=epochs * steps_per_epoch, unit="step", desc="shrink", disable=not progress) as bar:
            for ep in range(epochs):
                t_ep, loss_sum = time.perf_counter(), 0.0
                order = torch.randperm(len(train), generator=g).tolist()
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    b_ids, b_mask = _pad([ids[i] for i in idx], pad_id)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        emb, hidden = _embed(student, b_ids, b_mask, meter.normalize)
                    loss = (1.0 - F.cosine_similarity(emb, train_t[idx], dim=1)).mean()
                    emb_loss = loss.item()
                    if token_t:
                        loss = loss + token_loss * _token_loss(hidden, [token_t[i] for i in idx], b_mask)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    loss_sum += emb_loss * len(idx)
                    bar.update(1)
                    bar.set_postfix(loss=f"{emb_loss:.5f}")
                student.eval()
                cos = held_out_cos(student)
                student.train(dropout)
                logger.info("shrink: epoch %d/%d: train 1-cos %.5f, held-out mean cosine %.5f (min %.5f) in %.1fs",
                            ep + 1, epochs, loss_sum / len(train), cos.mean().item(), cos.min().item(),
                            time.perf_counter() - t_ep)
    finally:
        torch.set_num_threads(prev_threads)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)

    # ---- write: a hidden temp sibling, checked by loading it back, then renamed into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.shrink-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        student.save_pretrained(str(tmp), safe_serialization=True)
        for f in _TOKENIZER_COPY:
            if (source.path / f).is_file():
                shutil.copy2(source.path / f, tmp / f)
        check = TextEncoder.from_config(teacher_cfg, model=str(tmp), device="cpu", show_progress=False,
                                        num_threads=threads)
        cos = _cosines(check, held, held_t)
        if check.dim != int(targets.shape[1]) or int(check.model.config.num_hidden_layers) != len(kept):
            raise RuntimeError(f"shrink: the saved folder {tmp} does not load back as a {len(kept)}-layer model")
        del check
        report = {
            "layers": len(kept),
            "train_texts": len(train),
            "held_out_texts": n_held,
            "held_out_mean_cos": round(cos.mean().item(), 6),
            "held_out_min_cos": round(cos.min().item(), 6),
            "seconds": 0.0,
            "kept_layers": kept,
            "untuned_held_out_mean_cos": round(untuned, 6),
            "precision": meter.precision,
            "out_dir": str(out),
        }
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        cfg_dict = dataclasses.asdict(teacher_cfg) if dataclasses.is_dataclass(teacher_cfg) else {}
        provenance = {
            "format": 1,
            "what": "a teacher shrunk by sparse_kd.teacher.shrink: layers kept from the source, tuned to its "
                    "fp32 embeddings (mean pooling, L2 normalised)",
            "source": {"model": str(teacher_cfg.model), "path": str(source.path), "fingerprint": source.fingerprint,
                       "num_layers": n_src},
            "kept_layers": kept,
            "data": {"info": data_info or {}, "distinct_texts": len(uniq), "train_texts": len(train),
                     "held_out_texts": n_held, "train_texts_sha256": texts_digest(sorted(train)),
                     "held_out_texts_sha256": texts_digest(sorted(held))},
            "tuning": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                       "held_out_fraction": held_out_fraction, "max_texts": max_texts,
                       "train_word_embeddings": train_word_embeddings, "dropout": dropout,
                       "bf16_autocast": autocast, "token_loss": token_loss,
                       "loss": "1 - cosine of the embeddings + token_loss x mean over tokens of 1 - cosine of the "
                               "last hidden states",
                       "max_length": meter.max_length, "normalize": meter.normalize},
            "teacher_config": cfg_dict,
            "held_out": {"precision": meter.precision, "mean_cos": report["held_out_mean_cos"],
                         "min_cos": report["held_out_min_cos"], "untuned_mean_cos": report["untuned_held_out_mean_cos"]},
            "seconds": report["seconds"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if _before_rename is not None:  # tests: fail between the last write and the rename
            _before_rename(tmp)
        swap_in_dir(tmp, out, out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("shrink: wrote %s: %d of %d layers, held-out mean cosine %.5f (min %.5f; untuned %.5f) at %s "
                "in %.1fs; use it with teacher.model=%s", out, len(kept), n_src, report["held_out_mean_cos"],
                report["held_out_min_cos"], untuned, meter.precision, report["seconds"], out)
    return report
