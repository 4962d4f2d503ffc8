"""Serving: load a compressed artifact and score raw (user, item) id pairs.

Only torch, fbgemm_gpu, numpy and the standard library are imported here (no transformers,
no torchrec, no training code). See :mod:`sparse_kd.serve.predictor`; the HTTP ranking service
(:mod:`sparse_kd.serve.service`, :mod:`sparse_kd.serve.server`) adds starlette and uvicorn.
"""

from sparse_kd.serve.predictor import ArtifactError, Predictor, verify_artifact

__all__ = ["ArtifactError", "Predictor", "verify_artifact"]
