"""Helpers for the serving tests: HTTP requests on fresh connections, artifact copies, Prometheus text."""

from __future__ import annotations

import http.client
import json
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Optional


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ HTTP


def request(url: str, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
            timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One HTTP request on a fresh connection; body: bytes as is, anything else as JSON."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, path: str, body: Any = None, **kw) -> tuple[int, Any]:
    status, headers, data = request(url, "POST", path, body, **kw)
    return status, json.loads(data)


def get(url: str, path: str) -> tuple[int, bytes]:
    status, _, data = request(url, "GET", path)
    return status, data


def prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
