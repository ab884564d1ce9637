"""The service's ASGI middlewares: request bodies over a size limit get a 413, /readyz says why
no model is served, and the routes that need the API token get a 401 without it. Middlewares
leave BentoML's own routes (/metrics, /livez, the docs) as they are."""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.api_token import authorization_problem


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if int(length) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        # a chunked body has no declared length: read it up to the limit, then replay it
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        response = JSONResponse({"error": f"request body over the limit of {self.max_bytes} "
                                          "bytes", "detail": [{"loc": ["body"],
                                                               "msg": "too large",
                                                               "type": "body_too_large"}]},
                                status_code=413)
        await response(scope, receive, send)


class ExplainNotReady:
    """Answers ``path`` (/readyz) with a 503 naming ``reason()`` while it is not None. BentoML's
    own answer says only that ``__is_ready__()`` returned False."""

    def __init__(self, app: ASGIApp, path: str, reason: Callable[[], str | None]):
        self.app, self.path, self.reason = app, path, reason

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            why = self.reason()
            if why is not None:
                response = JSONResponse({"error": f"not ready: {why}", "detail": []},
                                        status_code=503)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerToken:
    """Answers a request to one of ``paths`` with a 401 (and ``WWW-Authenticate: Bearer``)
    unless it carries ``Authorization: Bearer <token>`` (pipelines.api_token); with ``token``
    None, every request passes."""

    def __init__(self, app: ASGIApp, token: str | None, paths: Collection[str]):
        self.app, self.token, self.paths = app, token, frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is not None and scope["type"] == "http" and \
                scope["path"].rstrip("/") in self.paths:
            header = dict(scope["headers"]).get(b"authorization")
            problem = authorization_problem(
                header.decode("latin-1") if header is not None else None, self.token)
            if problem is not None:
                response = JSONResponse({"error": problem, "detail": []}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
