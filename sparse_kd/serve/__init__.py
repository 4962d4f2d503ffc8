"""Serving: load a compressed artifact and score raw (user, item) id pairs.

Only torch, fbgemm_gpu, numpy and the standard library are imported here (no transformers,
no torchrec, no training code). See :mod:`sparse_kd.serve.predictor`.
"""

from sparse_kd.serve.predictor import ArtifactError, Predictor, verify_artifact

__all__ = ["ArtifactError", "Predictor", "verify_artifact"]
