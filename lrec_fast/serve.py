"""An HTTP/JSON front for a model: ``lrec-fast serve`` (``make_server`` to embed it).

It serves a learning ``Recommender`` (from a checkpoint) or a read-only ONNX ``Deployment``
with the standard library's threading HTTP server: one thread per connection, keep-alive,
so answers run while feedback learns (the Recommender's two locks; README, API). Endpoints,
JSON in and out:

    GET  /health     {"status": "ok", "users", "items", "kind", "backend"}   (no token needed)
    GET  /stats      the model's counters, and per endpoint: requests, errors, latency p50 /
                     p99 over the last LATENCY_WINDOW requests (ms)
    POST /recommend  {"users": [...], "k": 10, "exclude_seen": true}
                     -> {"items": [[...]], "scores": [[...]]}  (padding: id -1 or "", score null)
    POST /predict    {"users": [...], "items": [...]} -> {"ratings": [...]}
    POST /feedback   {"users", "items", "ratings", "texts": {"<item id>": "text", ...}}
                     -> {"loss": float}   (Recommender only)
    POST /items      {"items": [...], "texts": [...]} -> {"added": n}
    POST /save       -> {"saved": DIR}   (Recommender, with a save directory)
    POST /export     {"precision": "int8"} -> {"exported": DIR, "precision", "seconds"}
                     (Recommender, with an export directory: the ONNX deployment of the model
                     as it is now, replaced atomically; its encoder reused when it has one)
    POST /reload     -> {"reloaded": DIR, "items"}   (Deployment: load its directory again,
                     e.g. after the learner's /export; answers in flight finish on the old one)

Ids are JSON ints or strings, as the model knows them (a ``texts`` key is the id as text).
Bad input is 400 with {"error": message} and changes nothing (the model's own checks); a
feedback batch refused as divergent is 422, also unchanged. With a token, every endpoint but
/health needs ``Authorization: Bearer <token>`` (401 otherwise; compared in constant time).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .online import DivergenceError

log = logging.getLogger(__name__)

MAX_BODY = 16 << 20  # bytes of one request body
LATENCY_WINDOW = 10_000  # the newest requests per endpoint that /stats summarises


Route = Callable[[dict[str, Any]], dict[str, Any]]  # a JSON body -> the JSON answer


class BadRequest(ValueError):
    """A request the server refuses before the model sees it (400)."""


def _ids(body: dict[str, Any], key: str) -> list[Any]:
    v = body.get(key)
    if not isinstance(v, list):
        raise BadRequest(f'"{key}" must be a JSON list of ids')
    return v


def _scores(a: np.ndarray) -> list[list[float | None]]:
    """Scores as JSON numbers, -inf (padding) as null."""
    return [[float(x) if math.isfinite(x) else None for x in row] for row in a.tolist()]


class Service:
    """What the HTTP handlers call: the model, its endpoints and their latency records."""

    def __init__(self, model: Any, token: str | None = None, save_to: str | Path | None = None,
                 export_to: str | Path | None = None) -> None:  # fmt: skip
        self.model, self.token, self.save_to, self.export_to = model, token, save_to, export_to
        self.learns = hasattr(model, "feedback")
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/health"): self.health,
            ("GET", "/stats"): self.stats,
            ("POST", "/recommend"): self.recommend,
            ("POST", "/predict"): self.predict,
            ("POST", "/items"): self.items,
        }
        if self.learns:
            self.routes[("POST", "/feedback")] = self.feedback
            if save_to is not None:
                self.routes[("POST", "/save")] = self.save
            if export_to is not None:
                self.routes[("POST", "/export")] = self.export
        else:
            self.routes[("POST", "/reload")] = self.reload
        self._latency: dict[str, deque[float]] = {p: deque(maxlen=LATENCY_WINDOW)
                                                  for _, p in self.routes}  # fmt: skip
        self._errors: dict[str, int] = dict.fromkeys(self._latency, 0)
        self._count: dict[str, int] = dict.fromkeys(self._latency, 0)
        self._record_lock = threading.Lock()
        self._saved = self._mark()

    def _mark(self) -> tuple[int, ...]:
        """What changes when the model learns (its counters and sizes)."""
        m = self.model
        return (*m.stats().values(), m.n_users, m.n_items) if self.learns else ()

    def save_if_changed(self) -> bool:
        """Save to ``save_to`` if the model learned since the last save (a periodic or final
        save; each is atomic). True if it saved."""
        if self.save_to is None or not self.learns:
            return False
        mark = self._mark()  # (before: what learns meanwhile is saved the next time)
        if mark == self._saved:
            return False
        self.model.save(self.save_to)
        self._saved = mark
        return True

    def record(self, path: str, seconds: float, ok: bool) -> None:
        with self._record_lock:
            self._latency[path].append(1e3 * seconds)
            self._count[path] += 1
            self._errors[path] += not ok

    # -- endpoints ---------------------------------------------------------------------------
    def health(self, _: dict[str, Any]) -> dict[str, Any]:
        m = self.model
        return {"status": "ok", "users": int(m.n_users), "items": int(m.n_items),
                "kind": type(m).__name__,
                "backend": str(getattr(m, "backend", getattr(m, "provider", "")))}  # fmt: skip

    def stats(self, _: dict[str, Any]) -> dict[str, Any]:
        with self._record_lock:
            lat = {p: list(d) for p, d in self._latency.items()}
            count, errors = dict(self._count), dict(self._errors)
        endpoints = {}
        for p, xs in lat.items():
            q = np.percentile(xs, [50, 99]).tolist() if xs else [None, None]
            endpoints[p] = {"requests": count[p], "errors": errors[p], "p50_ms": q[0],
                            "p99_ms": q[1]}  # fmt: skip
        model = self.model.stats() if self.learns else {}
        return {"model": model, "endpoints": endpoints}

    def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        k, exclude = body.get("k", 10), body.get("exclude_seen", True)
        if not isinstance(k, int) or isinstance(k, bool) or not isinstance(exclude, bool):
            raise BadRequest('"k" must be an integer and "exclude_seen" true or false')
        items, scores = self.model.recommend(_ids(body, "users"), k, exclude)
        return {"items": items.tolist(), "scores": _scores(scores)}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        p = self.model.predict(_ids(body, "users"), _ids(body, "items"))
        return {"ratings": [float(x) for x in p.tolist()]}

    def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        items, ratings = _ids(body, "items"), body.get("ratings")
        if not isinstance(ratings, list):
            raise BadRequest('"ratings" must be a JSON list of numbers')
        given = body.get("texts") or {}
        if not isinstance(given, dict):
            raise BadRequest('"texts" must be a JSON object: item id (as text) -> text')
        # JSON keys are strings: each item's text under its id as text
        texts = {j: given[str(j)] for j in items if str(j) in given} or None
        return {"loss": float(self.model.feedback(_ids(body, "users"), items, ratings,
                                                  texts=texts))}  # fmt: skip

    def items(self, body: dict[str, Any]) -> dict[str, Any]:
        ids, texts = _ids(body, "items"), body.get("texts")
        if not isinstance(texts, list):
            raise BadRequest('"texts" must be a JSON list with one string per item')
        self.model.add_items(ids, texts)
        return {"added": len(ids)}

    def save(self, _: dict[str, Any]) -> dict[str, Any]:
        assert self.save_to is not None
        mark = self._mark()
        self.model.save(self.save_to)
        self._saved = mark
        return {"saved": str(self.save_to)}

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        from .export import export, load_manifest

        assert self.export_to is not None
        precision = body.get("precision", "int8")
        target, t0 = Path(self.export_to), time.perf_counter()
        reuse = None  # the encoder of the deployment there, when it has the precision asked
        if (target / "manifest.json").exists():
            try:
                if load_manifest(target)["precision"] == precision:
                    reuse = target
            except ValueError:  # (unreadable: exported again)
                pass
        export(self.model, target, precision, encoder_from=reuse, overwrite=True)
        return {"exported": str(target), "precision": precision,
                "seconds": time.perf_counter() - t0}  # fmt: skip

    def reload(self, _: dict[str, Any]) -> dict[str, Any]:
        from .export import load_deployment

        old = self.model
        self.model = load_deployment(old.directory, providers=[old.provider])  # checked whole
        return {"reloaded": str(old.directory), "items": int(self.model.n_items)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a connection per client, not per request
    # the headers and the body go out as two writes: with Nagle's algorithm the second waits
    # for the client's delayed ACK (40 ms a request)
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:  # (through logging, not stderr)
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        try:
            data = json.dumps(payload, allow_nan=False).encode()
        except ValueError:  # (a NaN in an answer: a bug, not the client's)
            log.exception("an answer that is not JSON: %r", payload)
            status, data = HTTPStatus.INTERNAL_SERVER_ERROR, b'{"error": "internal error"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise BadRequest("a bad Content-Length")
        if size > MAX_BODY:
            self.close_connection = True  # (the unread body would be read as a request)
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(size) if size else b"{}"
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0]
        route = service.routes.get((method, path))
        t0 = time.perf_counter()
        status, payload = self._answer(method, path, route)
        if route is not None:  # (before the reply: a client may ask /stats right after it)
            service.record(path, time.perf_counter() - t0, status == HTTPStatus.OK)
        self._reply(status, payload)

    def _answer(self, method: str, path: str, route: Route | None) -> tuple[int, dict[str, Any]]:
        service = self.server.service
        try:
            if route is None:
                known = any(p == path for _, p in service.routes)
                raise _Refused(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                               f"no {method} {path}")  # fmt: skip
            if path != "/health" and service.token is not None:
                got = self.headers.get("Authorization", "")
                want = f"Bearer {service.token}"
                if not hmac.compare_digest(got.encode(), want.encode()):
                    raise _Refused(HTTPStatus.UNAUTHORIZED, "a valid bearer token is needed")
            return HTTPStatus.OK, route(self._body() if method == "POST" else {})
        except _Refused as exc:
            return exc.status, {"error": exc.message}
        except DivergenceError as exc:  # the batch was refused as divergent: nothing changed
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
        except (ValueError, TypeError) as exc:  # bad input: the model changed nothing
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except Exception:
            log.exception("%s %s failed", method, path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (logged)"}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        super().__init__(address, _Handler)
        self.service = service


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8000, *,
                token: str | None = None, save_to: str | Path | None = None,
                export_to: str | Path | None = None) -> ThreadingHTTPServer:  # fmt: skip
    """An HTTP server for ``model`` (a ``Recommender`` or a ``Deployment``) on ``host:port``
    (port 0: any free one, see ``server.server_address``); run it with ``serve_forever()``
    and stop it with ``shutdown()``. ``token``: the bearer token every endpoint but /health
    needs (None: none); ``save_to``: the checkpoint directory of POST /save; ``export_to``:
    the deployment directory of POST /export."""
    if token is not None and not token.strip():
        raise ValueError("an empty token would let anyone in")
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who reaches it can write", host)
    return _Server((host, port), Service(model, token, save_to, export_to))


__all__ = ["Service", "make_server"]
