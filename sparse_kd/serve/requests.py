"""What a ranking request may be: parsing JSON bodies into typed requests, with limits.

Requests (JSON bodies; every problem with one is a :class:`RequestError` with a 4xx status and a
message naming the key; the only 5xx is a 503 when the service is overloaded):

* rank: ``{"user": str, "items": [str, ...], "top_k": int (optional)}`` with
  ``0 <= N <= Limits.max_candidates``;
* score: ``{"pairs": [[user, item], ...]}`` with ``0 <= P <= Limits.max_pairs``;
* reload: ``{"path": str}`` (optional; default: the folder served now).

Ids are non-empty strings; unknown keys, wrong types, empty ids are 422; a body that is not
JSON (or not UTF-8, or nested too deep for the parser) is 400; a body over
``Limits.max_body_bytes`` or a list over its limit is 413; when ``Limits.max_pending`` scoring
jobs already wait, the request gets 503 (overloaded, retry later).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import orjson

ORJSON_MAX_DEPTH = 1024  # orjson.loads refuses deeper nesting ("depth limit exceeded")



class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx, or 503 when overloaded) and a message saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message



class ReloadRefused(RequestError):
    """A new artifact failed verification or loading; the old one keeps serving."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)



@dataclass(frozen=True)
class Limits:
    """Per-request limits (see the module doc for the status each one gives)."""

    max_candidates: int = 1000
    max_pairs: int = 10000
    max_body_bytes: int = 1 << 20
    max_pending: int = 64

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_pairs", "max_body_bytes", "max_pending"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")



def _kind(v: Any) -> str:
    """A JSON value's type and a short excerpt, for error messages."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    text = json.dumps(v)[:40] if not isinstance(v, (list, dict)) else ("[...]" if isinstance(v, list) else "{...}")
    return f"{names.get(type(v), type(v).__name__)} {text}"



def parse_json(body: bytes) -> Any:
    """The request body as JSON (strict RFC 8259, parsed by orjson), or a 400 saying why not."""
    if not body.strip():
        raise RequestError(400, "empty body; send a JSON object (Content-Type: application/json)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "UTF-8" in e.msg:
            raise RequestError(400, f"body is not UTF-8 text ({e.msg}, at byte {e.pos}); send UTF-8 JSON") from None
        if "depth limit" in e.msg:
            raise RequestError(400, "body is not valid JSON for this service: nested too deeply "
                                    f"(orjson's limit is {ORJSON_MAX_DEPTH} levels)") from None
        raise RequestError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None



def _object(doc: Any, allowed: tuple[str, ...], required: tuple[str, ...], example: str) -> dict:
    if not isinstance(doc, dict):
        raise RequestError(422, f"the body must be a JSON object like {example}, got {_kind(doc)}")
    unknown = [k for k in doc if k not in allowed]
    if unknown:
        raise RequestError(422, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)} (e.g. {example})")
    missing = [k for k in required if k not in doc]
    if missing:
        raise RequestError(422, f"missing key {missing[0]!r}; expected {example}")
    return doc



def _id(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise RequestError(422, f"{where} must be a non-empty string (an id), got {_kind(v)}")
    return v



def _list(v: Any, where: str, limit: int, limit_name: str) -> list:
    if not isinstance(v, list):
        raise RequestError(422, f"{where} must be an array, got {_kind(v)}")
    if len(v) > limit:
        raise RequestError(413, f"{where} has {len(v)} entries, over the limit of {limit} ({limit_name}); "
                                "split the request")
    return v



@dataclass(frozen=True)
class RankRequest:
    user: str
    items: list[str]
    top_k: Optional[int] = None



RANK_EXAMPLE = '{"user": "u1", "items": ["i1", "i2"], "top_k": 10}'
SCORE_EXAMPLE = '{"pairs": [["u1", "i1"], ["u2", "i7"]]}'
RELOAD_EXAMPLE = '{"path": "/path/to/artifact"}'


def parse_rank(doc: Any, limits: Limits) -> RankRequest:
    d = _object(doc, ("user", "items", "top_k"), ("user", "items"), RANK_EXAMPLE)
    user = _id(d["user"], "user")
    items = _list(d["items"], "items", limits.max_candidates, "--max-candidates")
    for k, v in enumerate(items):
        if not isinstance(v, str) or not v:
            _id(v, f"items[{k}]")
    top_k = d.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RequestError(422, f"top_k must be an integer >= 1 (or absent for the whole order), got {_kind(top_k)}")
    return RankRequest(user, items, top_k)



def parse_score(doc: Any, limits: Limits) -> tuple[list[str], list[str]]:
    d = _object(doc, ("pairs",), ("pairs",), SCORE_EXAMPLE)
    pairs = _list(d["pairs"], "pairs", limits.max_pairs, "--max-pairs")
    users, items = [], []
    for k, p in enumerate(pairs):
        if not isinstance(p, list) or len(p) != 2:
            raise RequestError(422, f"pairs[{k}] must be [user, item] (an array of two ids), got {_kind(p)}")
        users.append(_id(p[0], f"pairs[{k}][0]"))
        items.append(_id(p[1], f"pairs[{k}][1]"))
    return users, items



def parse_reload(doc: Any) -> Optional[str]:
    d = _object(doc, ("path",), (), RELOAD_EXAMPLE)
    return None if d.get("path") is None else _id(d["path"], "path")

