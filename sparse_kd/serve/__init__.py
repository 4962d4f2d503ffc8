"""Serving: load a compressed artifact and score raw (user, item) id pairs.

Only torch, numpy and the standard library are imported here (no transformers, no torchrec, no
training code; fbgemm_gpu only for an artifact served on FBGEMM's TBE). The artifact format is
:mod:`sparse_kd.serve.format`; the predictor is :mod:`sparse_kd.serve.predictor`; the HTTP ranking
service (:mod:`sparse_kd.serve.service`, :mod:`sparse_kd.serve.server`) adds starlette and uvicorn.
"""

from sparse_kd.serve.format import ArtifactError, verify_artifact
from sparse_kd.serve.predictor import Predictor

__all__ = ["ArtifactError", "Predictor", "verify_artifact"]
