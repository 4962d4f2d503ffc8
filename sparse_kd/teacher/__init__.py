"""The BERT text teacher: cached sentence embeddings of item and user texts.

Example::

    from sparse_kd.config import TeacherConfig
    from sparse_kd.teacher import encode_texts

    emb = encode_texts(TeacherConfig(), ["Toy Story (1995). Genres: Animation, Comedy."], "items")
    emb.shape  # (1, 384) float32, unit rows; a second call reads .cache/teacher, no model load
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_kd.teacher.cache import CacheReport, cache_key, encode_cached, encode_cached_with_report
from sparse_kd.teacher.encoder import TeacherModelError, TextEncoder, resolve_model_path

__all__ = [
    "CacheReport", "TeacherModelError", "TextEncoder", "cache_key", "encode_cached",
    "encode_cached_with_report", "encode_texts", "resolve_model_path",
]

logger = logging.getLogger(__name__)


def encode_texts(cfg: Any, texts: Sequence[str], name: str, *, cache_dir: str | Path | None = None,
                 **encoder_overrides: Any) -> torch.Tensor:
    """Teacher embeddings (N, H) float32 of ``texts`` under ``cfg`` (a TeacherConfig), cached on disk.

    ``name`` names the cache file (``items``, ``users``); ``cache_dir`` defaults to ``cfg.cache_dir``.
    Building the encoder only checks and hashes the model folder: transformers is imported and the
    model loaded only on a cache miss. ``encoder_overrides`` go to :class:`TextEncoder` (e.g.
    ``show_progress=False``, ``precision="fp32"``).
    """
    encoder = TextEncoder.from_config(cfg, **encoder_overrides)
    return encode_cached(encoder, texts, cfg.cache_dir if cache_dir is None else cache_dir, name)
