"""The serving commands: ``serve`` (score pairs, or the HTTP ranking service) and ``add-items``.
They import neither the training code nor transformers (``add-items`` loads the teacher only)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("sparse_kd")

ADMIN_TOKEN_ENV = "SPARSE_KD_ADMIN_TOKEN"


def admin_token(args) -> Optional[str]:
    """The admin token from ``--admin-token-file`` or the environment (never from argv, where every
    user of the machine reads it in ``ps``); None when neither is given. Raises ValueError."""
    if getattr(args, "admin_token", None) is not None:
        raise ValueError(f"--admin-token is refused: a token on the command line is visible to every user in ps. "
                         f"Put it in a file (--admin-token-file PATH, readable by you only) or in {ADMIN_TOKEN_ENV}")
    if args.admin_token_file:
        try:
            token = Path(args.admin_token_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"--admin-token-file {args.admin_token_file}: cannot read a token from it ({e}). "
                             "Fix: write the token on the file's first line") from None
        if not token:
            raise ValueError(f"--admin-token-file {args.admin_token_file}: the first line is empty. "
                             "Fix: write the token on the file's first line")
        return token
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    """True for an address of this machine only: localhost, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

SERVE_EPILOG = """\
HTTP service (with --port); JSON in and out, details in docs/SERVING.md:
  POST /rank          {"user": "u1", "items": ["i1", "i2", ...], "top_k": 10}
                      -> {"scores": [...] (request order), "order": [indices, best first],
                          "unknown_user": bool, "unknown_items": [indices], "artifact": id}
  POST /score         {"pairs": [["u1", "i1"], ...]}
                      -> {"scores": [...], "unknown_users": [...], "unknown_items": [...], "artifact": id}
  GET  /health        the artifact served (id, path, tables, fallback for unknown ids), limits
  GET  /metrics       Prometheus text: requests by route/status, latency histograms, reloads
  POST /admin/reload  {"path": "DIR"} (default: ARTIFACT again): load, verify and swap in; requests
                      in flight finish on the old artifact; a corrupt one is refused (422) and the
                      old one keeps serving
Unknown ids get the artifact's fallback (empty embedding bags, zero dense features) and are
flagged. Bad requests get 4xx with {"error": message}; 503 only when --max-pending jobs wait.
Stop with Ctrl-C / SIGTERM (requests in flight finish first).

examples:
  sparse-kd serve runs/demo/artifact/distilled --user u00012 --item i00007
  sparse-kd serve runs/demo/artifact/distilled --port 8000
  curl -s localhost:8000/rank -d '{"user": "u00012", "items": ["i00007", "i00042"]}'
"""

ADD_ITEMS_EPILOG = """\
items.csv: header item_id,text; one row per new item; ids must be new to the artifact; text
non-empty (cut to the run's data.max_text_chars). Errors name the file, line and column.
The new artifact reaches a running service through --notify URL, or by itself when the service
watches the folder (serve --watch, on by default).

example:
  sparse-kd add-items runs/demo/artifact/distilled new_items.csv --notify http://127.0.0.1:8000
"""


def cmd_serve(args) -> int:
    from sparse_kd.serve.predictor import ArtifactError

    if args.port is not None:
        if args.pairs or args.user or args.item:
            print("error: --port starts the HTTP service; score pairs with --user/--item or --pairs without --port",
                  file=sys.stderr)
            return 2
        return _serve_http(args)
    if not (args.pairs or args.user or args.item):
        print("error: nothing to do: give --port P to start the HTTP service, or --user/--item or --pairs to "
              "score pairs (see `sparse-kd serve --help`)", file=sys.stderr)
        return 2
    from sparse_kd.serve.memory import keep_freed_memory
    from sparse_kd.serve.predictor import Predictor

    if not args.no_malloc_tuning:
        keep_freed_memory()
    try:
        p = Predictor.load(args.artifact, huge_pages=not args.no_huge_pages)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pairs:
        import csv

        with open(args.pairs, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("user_id", "item_id") if c not in (reader.fieldnames or [])]
            if missing:
                print(f"error: {args.pairs}, line 1: column(s) {missing} not found; found {reader.fieldnames}. "
                      "Fix: give the pairs file a header with user_id and item_id columns.", file=sys.stderr)
                return 2
            rows = list(reader)
        users, items = [r["user_id"] for r in rows], [r["item_id"] for r in rows]
    else:
        users, items = args.user, args.item
        if len(users) != len(items):
            print("error: give as many --user as --item values", file=sys.stderr)
            return 2
    scores = p.score(users, items)
    for u, i, s in zip(users, items, scores):
        print(f"{u}\t{i}\t{float(s):.6f}")
    return 0



def _serve_http(args) -> int:
    """The HTTP ranking service (sparse_kd.serve.server); imports neither transformers nor torchrec."""
    import torch

    from sparse_kd.serve.memory import keep_freed_memory
    from sparse_kd.serve.predictor import ArtifactError
    from sparse_kd.serve.server import implementations, run_server
    from sparse_kd.serve.requests import Limits
    from sparse_kd.serve.service import Service

    malloc_tuned = False if args.no_malloc_tuning else keep_freed_memory()

    try:
        limits = Limits(args.max_candidates, args.max_pairs, args.max_body_bytes, args.max_pending)
        if args.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0, got {args.torch_threads}")
        # unknown ids are counted in /metrics and flagged in every answer: no log line per request
        logging.getLogger("sparse_kd.serve.predictor").setLevel(logging.WARNING)
        token = admin_token(args)
        if token is None and not is_loopback(args.host) and not args.allow_open_admin:
            raise ValueError(f"--host {args.host} reaches beyond this machine, and without an admin token anyone who "
                             "can reach the port can swap the served artifact (POST /admin/reload). Fix: give a "
                             f"token (--admin-token-file PATH or {ADMIN_TOKEN_ENV}), or --allow-open-admin when a "
                             "proxy guards /admin")
        workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
        service = Service(args.artifact, limits, workers=workers, watch_interval=args.watch,
                          admin_token=token, huge_pages=not args.no_huge_pages)
    except (ValueError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    uv = logging.getLogger("uvicorn")
    uv.handlers[:] = logging.getLogger("sparse_kd").handlers
    uv.setLevel(logging.INFO if args.access_log else logging.WARNING)
    uv.propagate = False
    auto_http, auto_loop = implementations()
    impl = (auto_http if args.http == "auto" else args.http, auto_loop if args.loop == "auto" else args.loop)
    log.info("torch intra-op threads %d, scoring workers %d, malloc tuning %s, HTTP %s on %s",
             torch.get_num_threads(), workers, "on" if malloc_tuned else "off", *impl)
    try:
        run_server(service, args.host, args.port, access_log=args.access_log, impl=impl)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



def cmd_add_items(args) -> int:
    from sparse_kd.compress.new_items import add_items_from_csv, notify
    from sparse_kd.serve.predictor import ArtifactError

    try:
        token = admin_token(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = add_items_from_csv(args.artifact, args.items_csv, args.config, args.out)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if args.notify:
        try:
            answer = notify(args.notify, res["artifact"], token)
        except RuntimeError as e:
            print(f"error: the new artifact is in {res['artifact']}, but the service did not swap it in: {e}",
                  file=sys.stderr)
            return 1
        print(f"service {args.notify}: swapped={answer.get('swapped')} now serving "
              f"{answer.get('artifact', {}).get('id')} (was {answer.get('previous')})")
    return 0

