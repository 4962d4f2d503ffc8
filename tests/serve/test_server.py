"""The HTTP ranking service over real HTTP on 127.0.0.1 (server in a thread): results equal the
predictor's, unknown ids flagged, every bad request a 4xx, swaps without failed requests,
corrupt artifacts refused, metrics, the folder watcher."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse

import numpy as np
import pytest
import torch

from sparse_kd.serve import Predictor
from sparse_kd.serve.loaded import DEFAULT_FALLBACK, fallback_policy
from sparse_kd.serve.requests import Limits
from sparse_kd.serve.service import Service
from sparse_kd.serve.server import running_server

from serve_helpers import copy_artifact, get, post, prometheus, request


@pytest.fixture(scope="module", params=[None, ("h11", "asyncio")], ids=["default-impl", "h11-asyncio"])
def server(artifacts, request):
    """The service on uvicorn's default (httptools + uvloop when installed) and on its pure-Python
    parser and loop: bad input must be a 4xx on both."""
    svc = Service(artifacts.a, Limits(max_candidates=50, max_pairs=40, max_body_bytes=4096))
    with running_server(svc, impl=request.param) as url:
        yield url, svc


def _ids(artifacts):
    return list(artifacts.ds.user_ids), list(artifacts.ds.item_ids)


def test_rank_equals_predictor_and_flags_unknown_ids(server, artifacts):
    url, svc = server
    users, items = _ids(artifacts)
    cands = items[:12] + ["no-such-item"] + items[12:15]
    status, doc = post(url, "/rank", {"user": users[3], "items": cands})
    assert status == 200
    want = Predictor.load(artifacts.a).score([users[3]] * len(cands), cands)
    np.testing.assert_array_equal(np.asarray(doc["scores"], dtype=np.float32), want)
    assert doc["order"] == np.argsort(-want, kind="stable").tolist()
    assert doc["unknown_user"] is False and doc["unknown_items"] == [12]
    assert doc["artifact"] == svc.current.artifact_id and doc["user"] == users[3]
    status, doc = post(url, "/rank", {"user": "nobody", "items": items[:5], "top_k": 2})
    assert status == 200 and doc["unknown_user"] is True and doc["unknown_items"] == []
    assert len(doc["scores"]) == 5 and len(doc["order"]) == 2
    assert doc["scores"][doc["order"][0]] >= doc["scores"][doc["order"][1]] >= max(
        s for k, s in enumerate(doc["scores"]) if k not in doc["order"])
    status, doc = post(url, "/rank", {"user": users[0], "items": []})
    assert status == 200 and doc["scores"] == [] and doc["order"] == []


def test_score_pairs_equal_predictor(server, artifacts):
    url, _ = server
    users, items = _ids(artifacts)
    pairs = [[users[k % len(users)], items[(3 * k) % len(items)]] for k in range(9)] + [["ghost", items[0]], [users[1], "ghost"]]
    status, doc = post(url, "/score", {"pairs": pairs})
    assert status == 200
    want = Predictor.load(artifacts.a).score([p[0] for p in pairs], [p[1] for p in pairs])
    np.testing.assert_array_equal(np.asarray(doc["scores"], dtype=np.float32), want)
    assert doc["unknown_users"] == [9] and doc["unknown_items"] == [10]


def test_health_describes_the_artifact_and_fallback(server, artifacts):
    url, svc = server
    status, data = get(url, "/health")
    doc = json.loads(data)
    assert status == 200 and doc["status"] == "ok"
    art = doc["artifact"]
    assert art["id"] == svc.current.artifact_id and art["path"] == str(artifacts.a.absolute())
    assert (art["users"], art["items"]) == (len(artifacts.ds.user_ids), len(artifacts.ds.item_ids))
    assert {t["dtype"] for t in art["tables"].values()} == {"int8"}
    assert art["fallback"] == DEFAULT_FALLBACK
    assert doc["limits"]["max_candidates"] == 50


def test_fallback_policy_comes_from_the_manifest_when_it_has_one():
    assert fallback_policy({}) == DEFAULT_FALLBACK
    fb = {"unknown_item": "mean of the item rows"}
    assert fallback_policy({"fallback": fb}) == fb


BAD = [  # (method, path, body, headers, status, words in the message)
    ("POST", "/rank", b"", {}, 400, "empty body"),
    ("POST", "/rank", b"{bad json", {}, 400, "not valid JSON"),
    ("POST", "/rank", b'{"user": "u1", "items": ["i1"]', {}, 400, "not valid JSON"),
    ("POST", "/rank", b'{"user": "\xff\xfe"}', {}, 400, "UTF-8"),
    ("POST", "/rank", b"[" * 2000 + b"]" * 2000, {}, 400, "nested too deeply"),
    ("POST", "/rank", b'{"user": "u1", "items": ["i1"],}', {}, 400, "not valid JSON"),
    ("POST", "/rank", b"NaN", {}, 400, "not valid JSON"),  # not JSON (RFC 8259), though Python's json reads it
    ("POST", "/rank", b'{"user": "\\ud800", "items": []}', {}, 400, "not valid JSON"),  # a lone surrogate
    ("POST", "/rank", b'{"user": "u1", "items": []} x', {}, 400, "not valid JSON"),
    ("POST", "/rank", b"[]", {}, 422, "must be a JSON object"),
    ("POST", "/rank", b'"u1"', {}, 422, "must be a JSON object"),
    ("POST", "/rank", {"items": ["i1"]}, {}, 422, "missing key 'user'"),
    ("POST", "/rank", {"user": "u1"}, {}, 422, "missing key 'items'"),
    ("POST", "/rank", {"user": 7, "items": ["i1"]}, {}, 422, "user must be a non-empty string"),
    ("POST", "/rank", {"user": "", "items": ["i1"]}, {}, 422, "user must be a non-empty string"),
    ("POST", "/rank", {"user": None, "items": ["i1"]}, {}, 422, "got null"),
    ("POST", "/rank", {"user": "u1", "items": "i1"}, {}, 422, "items must be an array"),
    ("POST", "/rank", {"user": "u1", "items": ["i1", None]}, {}, 422, "items[1] must be a non-empty string"),
    ("POST", "/rank", {"user": "u1", "items": ["i1", ["i2"]]}, {}, 422, "items[1]"),
    ("POST", "/rank", {"user": "u1", "items": ["i1"] * 51}, {}, 413, "over the limit of 50"),
    ("POST", "/rank", {"user": "u1", "items": ["i1"], "topk": 3}, {}, 422, "unknown key 'topk'"),
    ("POST", "/rank", {"user": "u1", "items": ["i1"], "top_k": 0}, {}, 422, "top_k must be an integer >= 1"),
    ("POST", "/rank", {"user": "u1", "items": ["i1"], "top_k": True}, {}, 422, "top_k"),
    ("POST", "/rank", {"user": "u1", "items": ["i1"], "top_k": 2.5}, {}, 422, "top_k"),
    ("POST", "/rank", b"x" * 5000, {}, 413, "over the limit of 4096 bytes"),
    ("POST", "/score", {"pairs": [["u1", "i1"], ["u1"]]}, {}, 422, "pairs[1] must be [user, item]"),
    ("POST", "/score", {"pairs": [["u1", 3]]}, {}, 422, "pairs[0][1] must be a non-empty string"),
    ("POST", "/score", {"pairs": {"u1": "i1"}}, {}, 422, "pairs must be an array"),
    ("POST", "/score", {"pairs": [["u", "i"]] * 41}, {}, 413, "--max-pairs"),
    ("POST", "/score", {"users": ["u1"]}, {}, 422, "unknown key 'users'"),
    ("GET", "/rank", None, {}, 405, "GET is not allowed"),
    ("DELETE", "/health", None, {}, 405, "not allowed"),
    ("POST", "/nope", b"{}", {}, 404, "no such endpoint /nope"),
    ("GET", "/../../etc/passwd", None, {}, 404, "no such endpoint"),
    ("POST", "/admin/reload", b"{oops", {}, 400, "not valid JSON"),
    ("POST", "/admin/reload", {"path": 3}, {}, 422, "path must be a non-empty string"),
    ("POST", "/admin/reload", {"folder": "x"}, {}, 422, "unknown key 'folder'"),
]


@pytest.mark.parametrize("method,path,body,headers,status,words", BAD, ids=[f"{b[0]} {b[1]} {b[4]} {b[5][:24]}" for b in BAD])
def test_bad_requests_get_a_4xx_with_a_message(server, method, path, body, headers, status, words):
    url, _ = server
    got, hdrs, data = request(url, method, path, body, headers)
    assert got == status, data
    assert hdrs["content-type"].startswith("application/json")
    assert words in json.loads(data)["error"]


def test_server_survives_garbage_and_chunked_oversized_bodies(server, artifacts):
    url, _ = server
    u = urllib.parse.urlsplit(url)
    for raw in (b"\x00\x01garbage\r\n\r\n", b"POST /rank HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n", b"POST /rank HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"):
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(raw)
            answer = s.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]
    # a chunked body (no Content-Length) over the limit is cut off while streaming
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        chunk = b"a" * 3000
        s.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    status, doc = post(url, "/rank", {"user": artifacts.ds.user_ids[0], "items": artifacts.ds.item_ids[:3]})
    assert status == 200 and len(doc["scores"]) == 3


def test_metrics_count_requests_by_route_and_status(artifacts):
    svc = Service(artifacts.a)
    with running_server(svc) as url:
        body = {"user": artifacts.ds.user_ids[0], "items": artifacts.ds.item_ids[:4] + ["ghost"]}
        for _ in range(3):
            assert post(url, "/rank", body)[0] == 200
        assert request(url, "POST", "/rank", b"nope")[0] == 400
        assert request(url, "GET", "/missing")[0] == 404
        status, data = get(url, "/metrics")
    assert status == 200
    m = prometheus(data.decode())
    assert m['sparse_kd_requests_total{route="/rank",status="200"}'] == 3
    assert m['sparse_kd_requests_total{route="/rank",status="400"}'] == 1
    assert m['sparse_kd_requests_total{route="other",status="404"}'] == 1
    assert m['sparse_kd_request_seconds_count{route="/rank"}'] == 4
    buckets = [v for k, v in m.items() if k.startswith('sparse_kd_request_seconds_bucket{route="/rank"')]
    assert buckets == sorted(buckets) and buckets[-1] == 4  # cumulative, +Inf holds every request
    assert m["sparse_kd_scored_pairs_total"] == 15
    assert m['sparse_kd_unknown_ids_total{kind="item"}'] == 3 and m['sparse_kd_unknown_ids_total{kind="user"}'] == 0
    assert m[f'sparse_kd_artifact_info{{id="{svc.current.artifact_id}",path="{artifacts.a.absolute()}"}}'] == 1


def _blocking(loaded):
    """Make ``loaded``'s predictor wait in score() until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    real = loaded.predictor.score

    def score(*a, **k):
        entered.set()
        assert release.wait(60)
        return real(*a, **k)

    loaded.predictor.score = score
    return entered, release


def test_in_flight_request_finishes_on_the_old_artifact_across_a_swap(artifacts):
    svc = Service(artifacts.a, workers=2)
    old_id = svc.current.artifact_id
    entered, release = _blocking(svc.current)
    body = {"user": artifacts.ds.user_ids[1], "items": artifacts.ds.item_ids[:6]}
    with running_server(svc) as url:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(url, "/rank", body)))
        t.start()
        assert entered.wait(60)  # the request is inside the old artifact's scoring now
        status, doc = post(url, "/admin/reload", {"path": str(artifacts.b)})
        assert status == 200 and doc["swapped"] is True and doc["previous"] == old_id
        new_id = doc["artifact"]["id"]
        assert new_id != old_id
        status, fresh = post(url, "/rank", body)  # served by the new artifact while the old request waits
        assert status == 200 and fresh["artifact"] == new_id
        assert t.is_alive()
        release.set()
        t.join(60)
    status, doc = result["r"]
    assert status == 200 and doc["artifact"] == old_id
    np.testing.assert_array_equal(np.asarray(doc["scores"], np.float32),
                                  Predictor.load(artifacts.a).score([body["user"]] * 6, body["items"]))
    np.testing.assert_array_equal(np.asarray(fresh["scores"], np.float32),
                                  Predictor.load(artifacts.b).score([body["user"]] * 6, body["items"]))


def test_no_request_fails_while_artifacts_are_swapped_back_and_forth(artifacts):
    svc = Service(artifacts.a)
    ids = {svc.current.artifact_id}
    body = {"user": artifacts.ds.user_ids[2], "items": artifacts.ds.item_ids}
    statuses, seen, stop = [], set(), threading.Event()

    def client(url):
        while not stop.is_set():
            status, doc = post(url, "/rank", body)
            statuses.append(status)
            seen.add(doc.get("artifact"))

    with running_server(svc) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(2)]
        for t in threads:
            t.start()
        for path in (artifacts.b, artifacts.a):
            status, doc = post(url, "/admin/reload", {"path": str(path)})
            assert status == 200 and doc["swapped"] is True
            ids.add(doc["artifact"]["id"])
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) == {200}
    assert seen <= ids and len(ids) == 2


def test_corrupt_or_missing_artifact_is_refused_and_the_old_one_keeps_serving(artifacts, tmp_path):
    svc = Service(artifacts.a)
    bad = copy_artifact(artifacts.b, tmp_path / "bad")
    data = bytearray((bad / "entity_dense.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "entity_dense.pt").write_bytes(bytes(data))
    body = {"user": artifacts.ds.user_ids[0], "items": artifacts.ds.item_ids[:3]}
    with running_server(svc) as url:
        before = post(url, "/rank", body)[1]
        status, doc = post(url, "/admin/reload", {"path": str(bad)})
        assert status == 422
        assert "entity_dense.pt" in doc["error"] and "sha256" in doc["error"] and "still serving" in doc["error"]
        status, doc = post(url, "/admin/reload", {"path": str(tmp_path / "nowhere")})
        assert status == 422 and "no such artifact folder" in doc["error"]
        status, after = post(url, "/rank", body)
        assert status == 200 and after == before
        health = json.loads(get(url, "/health")[1])
        assert health["artifact"]["id"] == before["artifact"] and health["reloads"] == {"ok": 0, "refused": 2}
        status, doc = post(url, "/admin/reload")  # the served folder again: unchanged, not reloaded
        assert status == 200 and doc["swapped"] is False


def test_admin_token_guards_reload(artifacts):
    svc = Service(artifacts.a, admin_token="s3cret")
    with running_server(svc) as url:
        status, doc = post(url, "/admin/reload", {"path": str(artifacts.b)})
        assert status == 403 and "X-Admin-Token" in doc["error"]
        status, doc = post(url, "/admin/reload", {"path": str(artifacts.b)}, headers={"X-Admin-Token": "wrong"})
        assert status == 403
        status, doc = post(url, "/admin/reload", {"path": str(artifacts.b)}, headers={"X-Admin-Token": "s3cret"})
        assert status == 200 and doc["swapped"] is True


def test_overload_is_a_503_with_retry_after_never_a_hang(artifacts):
    svc = Service(artifacts.a, Limits(max_pending=1))
    entered, release = _blocking(svc.current)
    body = {"user": artifacts.ds.user_ids[0], "items": artifacts.ds.item_ids[:2]}
    with running_server(svc) as url:
        t = threading.Thread(target=post, args=(url, "/rank", body))
        t.start()
        assert entered.wait(60)
        status, headers, data = request(url, "POST", "/rank", body)
        assert status == 503 and headers["retry-after"] == "1" and "--max-pending" in json.loads(data)["error"]
        release.set()
        t.join(60)
        assert post(url, "/rank", body)[0] == 200


def _wait_for(fn, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_watcher_swaps_in_a_replaced_artifact_and_refuses_a_broken_one(artifacts, tmp_path):
    from sparse_kd.compress import artifact as A

    d = copy_artifact(artifacts.a, tmp_path / "watched")
    svc = Service(d, watch_interval=0.05)
    user = artifacts.ds.user_ids[0]
    with running_server(svc) as url:
        status, doc = post(url, "/rank", {"user": user, "items": ["fresh-item"]})
        assert doc["unknown_items"] == [0]
        old_id = doc["artifact"]
        A.add_items(d, ["fresh-item"], torch.randn(1, artifacts.text_dim, generator=torch.Generator().manual_seed(0)))
        doc = _wait_for(lambda: (lambda r: r if r["artifact"] != old_id else None)(
            post(url, "/rank", {"user": user, "items": ["fresh-item", "ghost"]})[1]))
        assert doc["unknown_items"] == [1]  # the new item has a row now; "ghost" still gets the fallback
        assert doc["scores"][0] != doc["scores"][1]
        new_id = doc["artifact"]
        # a broken manifest: refused once, the artifact loaded before keeps serving
        (d / "manifest.json").write_text("{ truncated")
        m = _wait_for(lambda: (lambda m: m if m['sparse_kd_reloads_total{result="refused"}'] == 1 else None)(
            prometheus(get(url, "/metrics")[1].decode())))
        assert m['sparse_kd_reloads_total{result="ok"}'] == 1
        time.sleep(0.3)  # several more watch intervals: the same broken manifest is not retried
        m = prometheus(get(url, "/metrics")[1].decode())
        assert m['sparse_kd_reloads_total{result="refused"}'] == 1
        status, doc = post(url, "/rank", {"user": user, "items": ["fresh-item"]})
        assert status == 200 and doc["artifact"] == new_id and doc["unknown_items"] == []


def test_scoring_on_the_event_loop_gives_the_same_answers(artifacts):
    svc = Service(artifacts.a, workers=0)
    users, items = _ids(artifacts)
    with running_server(svc) as url:
        status, doc = post(url, "/rank", {"user": users[4], "items": items[:7] + ["ghost"]})
        health = json.loads(get(url, "/health")[1])
    assert status == 200 and doc["unknown_items"] == [7] and health["workers"] == 0
    np.testing.assert_array_equal(np.asarray(doc["scores"], np.float32),
                                  Predictor.load(artifacts.a).score([users[4]] * 8, items[:7] + ["ghost"]))


def test_default_implementations_are_the_c_ones_pinned():
    from sparse_kd.serve.server import implementations

    assert implementations() == ("httptools", "uvloop")  # both in requirements.lock


def test_a_non_finite_score_is_refused_not_sent_as_null():
    from sparse_kd.serve.loaded import dumps as _dumps

    assert json.loads(_dumps({"scores": [0.25, 0.5]}, np.array([0.25, 0.5], np.float32))) == {"scores": [0.25, 0.5]}
    for bad in (np.nan, np.inf):
        with pytest.raises(RuntimeError, match="non-finite score"):
            _dumps({"scores": [0.25, bad]}, np.array([0.25, bad], np.float32))


def test_listening_socket_is_tcp_so_connections_get_nodelay():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a proto-0 socket would leave
    Nagle on and stall every response behind the client's delayed ACK."""
    from sparse_kd.serve.server import bind

    with bind("127.0.0.1", 0) as s:
        assert s.proto == socket.IPPROTO_TCP and s.getsockname()[1] > 0


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_candidates"):
        Limits(max_candidates=0)
    with pytest.raises(ValueError, match="max_pending"):
        Limits(max_pending=True)


def test_cli_defaults_match_the_service_limits():
    from sparse_kd.cli import SERVE_LIMITS, build_parser

    assert SERVE_LIMITS == {k: getattr(Limits(), k) for k in SERVE_LIMITS}
    args = build_parser().parse_args(["serve", "ART", "--port", "0"])
    assert Limits(args.max_candidates, args.max_pairs, args.max_body_bytes, args.max_pending) == Limits()
