"""Helpers for the serving tests: small artifacts (built the way tests/compress/conftest.py builds them),
HTTP requests on fresh connections, artifact copies, Prometheus text."""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]


def compress_fixtures():
    """tests/compress/conftest.py as a module (make_dataset, train_dlrm, H)."""
    spec = importlib.util.spec_from_file_location("_compress_fixtures", ROOT / "tests" / "compress" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def save(out: Path, model, ds, builder, dtype: str, text: dict, config: Optional[dict] = None) -> Path:
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import artifact_mappings, compress_model

    settings = {f.name: {"keep_ratio": 1.0, "dtype": dtype, "fill": "zero"} for f in ds.features}
    comp = compress_model(model, ds, settings, text=text)
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense},
                    config or {"dtype": dtype})
    return out


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ HTTP


def request(url: str, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
            timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One HTTP request on a fresh connection; body: bytes as is, anything else as JSON."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.connect()
    # http.client writes headers and body separately: without TCP_NODELAY (which urllib3, requests and
    # httpx set) Nagle's algorithm holds the body until the server's delayed ACK
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
