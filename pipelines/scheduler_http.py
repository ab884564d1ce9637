"""The HTTP port of ``forecaster schedule``: Prometheus's ``/metrics`` and ``POST /retrain``.

One WSGI server (wsgiref, a thread per request) on the metrics port. ``/retrain`` is this
module's; every other path is prometheus-client's exposition app, as before.

``POST /retrain`` asks the scheduler for a race now (``TrainingScheduler.request_run``): the
cron job's own run, so that at most one race runs at a time. Answers, as JSON:

- 202 ``{"started": true}``: the race is starting;
- 202 ``{"started": false, "coalesced": true, "reason": ...}``: a race is already running or
  about to; this request is folded into it (an alert that fires while the race it caused runs
  must not queue a second one);
- 401 ``{"error": ..., "detail": []}`` with ``WWW-Authenticate: Bearer`` when
  ``FORECASTER_API_TOKEN`` is set and the request lacks it (:mod:`pipelines.api_token`);
- 405 for another method, 413 for a body over 1 MiB, 503 while the scheduler is not running.

The body is read and ignored: Alertmanager's webhook POSTs its notification as JSON, and the
endpoint does the same whatever the alert says. Each request is counted in
``forecaster_training_retrain_requests_total{outcome}`` (started, coalesced, unauthorized).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from pipelines.api_token import authorization_problem

logger = logging.getLogger(__name__)

RETRAIN_PATH = "/retrain"
RETRAIN_OUTCOMES = ("started", "coalesced", "unauthorized")
# an Alertmanager notification is a few KiB even with many alerts grouped
MAX_BODY_BYTES = 1 << 20
COALESCED_REASON = "a race is already running or about to start"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class SchedulerNotRunning(RuntimeError):
    """The scheduler is starting or shutting down: nothing can be run now."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # a scrape is never held up by a slow client; daemon threads do not block the exit
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        # the family of the address to bind: an IPv6 one ("::") needs an IPv6 socket
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        super().__init__(address, handler)


class _LoggingHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # every scrape would otherwise print an access line on stderr
        logger.debug("%s %s", self.address_string(), format % args)


def _json(start_response: StartResponse, status: HTTPStatus, body: dict[str, Any],
          headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(f"{status.value} {status.phrase}",
                   [("Content-Type", "application/json"),
                    ("Content-Length", str(len(payload))), *headers])
    return [payload]


def _error(start_response: StartResponse, status: HTTPStatus, message: str,
           headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    # the same error body as the service's
    return _json(start_response, status, {"error": message, "detail": []}, headers)


def _drain_body(environ: dict[str, Any]) -> tuple[HTTPStatus, str] | None:
    """Read the request body and drop it (closing a socket with unread data resets the
    connection, and the client could lose the answer); why it is refused, or None."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return HTTPStatus.BAD_REQUEST, "Content-Length is not a number"
    if length > MAX_BODY_BYTES:
        return (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes, over the {MAX_BODY_BYTES} accepted")
    if length > 0:
        environ["wsgi.input"].read(length)
    return None


def scheduler_app(registry: CollectorRegistry, request_run: Callable[[], bool],
                  requests: Counter, token: str | None) -> WSGIApp:
    """The WSGI app: ``POST /retrain`` calls ``request_run`` (True: started, False: coalesced;
    :class:`SchedulerNotRunning`: 503) behind the bearer ``token`` (None: no token asked);
    anything else is ``registry``'s exposition. ``requests`` counts /retrain by outcome."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != RETRAIN_PATH:
            return metrics_app(environ, start_response)
        client = environ.get("REMOTE_ADDR", "?")
        if environ["REQUEST_METHOD"] != "POST":
            return _error(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                          f"{RETRAIN_PATH} takes POST (it starts a race)", [("Allow", "POST")])
        problem = authorization_problem(environ.get("HTTP_AUTHORIZATION"), token)
        if problem is not None:
            requests.labels(outcome="unauthorized").inc()
            logger.warning("POST %s from %s refused: %s", RETRAIN_PATH, client, problem)
            return _error(start_response, HTTPStatus.UNAUTHORIZED, problem,
                          [("WWW-Authenticate", "Bearer")])
        refused = _drain_body(environ)
        if refused is not None:
            return _error(start_response, *refused)
        try:
            started = request_run()
        except SchedulerNotRunning as error:
            return _error(start_response, HTTPStatus.SERVICE_UNAVAILABLE, str(error),
                          [("Retry-After", "10")])
        requests.labels(outcome="started" if started else "coalesced").inc()
        if started:
            logger.info("POST %s from %s: a race starts now", RETRAIN_PATH, client)
            return _json(start_response, HTTPStatus.ACCEPTED, {"started": True})
        logger.info("POST %s from %s: coalesced, %s", RETRAIN_PATH, client, COALESCED_REASON)
        return _json(start_response, HTTPStatus.ACCEPTED,
                     {"started": False, "coalesced": True, "reason": COALESCED_REASON})

    return app


def start_server(app: WSGIApp, port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``app`` on ``addr:port`` from a daemon thread (port 0: a free one, read it from
    ``server.server_port``); stop it with ``shutdown()`` and ``server_close()``."""
    server = make_server(addr, port, app, server_class=_ThreadingWSGIServer,
                         handler_class=_LoggingHandler)
    threading.Thread(target=server.serve_forever, name="scheduler-http", daemon=True).start()
    return server
