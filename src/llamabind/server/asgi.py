"""The ASGI pieces under the endpoints: JSON and error bodies, the server-sent-events
response that cancels a generation when its client goes away, and the guard in front of
every request (API key, body size, shutdown, access log, request counts)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamabind.server.schemas import RequestError
from llamabind.server.state import ServerState

__all__ = ["DONE", "EventStream", "Guard", "error_response", "json_bytes", "not_found", "sse",
           "watch_disconnect"]

access_log = logging.getLogger("llamabind.server.access")

# Paths answered without an API key (load balancers probe it).
PUBLIC = frozenset({"/health", "/v1/health"})
# The paths counted by name in the request metrics (any other path counts as "other").
ENDPOINTS = frozenset({
    "/health", "/v1/health", "/v1/models", "/models", "/v1/completions", "/completions",
    "/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings",
    "/metrics", "/tokenize", "/detokenize"})


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_body(exc: RequestError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}


def error_response(exc: RequestError) -> Response:
    return Response(json_bytes(error_body(exc)), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)



class EventStream(Response):
    """A server-sent-events response that watches for the client going away while it
    streams and then calls ``on_disconnect`` (which cancels the generation); ``on_close``
    runs last, once the body generator is closed (its bookkeeping done)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None],
                 on_disconnect: Callable[[], None], on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.body_iterator = body
        self.on_disconnect = on_disconnect
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.on_disconnect()
                    return

        watcher = asyncio.ensure_future(watch())
        complete = False
        try:
            # the response starts with its first event (after the prompt's prefill, as
            # llama-server's does): no HTTP work for this stream, here or in the client,
            # competes with the prefill for the cores
            first = await anext(self.body_iterator, None)
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except OSError:  # ASGI 2.4 servers raise it from send() once the client is gone
            pass
        finally:
            watcher.cancel()
            if not complete:
                # also when this task is cancelled before the body generator started
                # (its own cleanup would then never run)
                self.on_disconnect()
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


def sse(data: Any) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def watch_disconnect(receive: Receive, cancel: Callable[[], None],
                            gone: asyncio.Event) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            cancel()
            return



def route_path(scope: Scope) -> str:
    """The path within this app (without the prefix it is mounted under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class Guard:
    """Outer ASGI layer: API key, body size by Content-Length, 503 while stopping,
    access log and request counts."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = route_path(scope)
        status = 0

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.state.metrics.count_request(endpoint, status)
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1],
                            scope.get("method", "-"), path, status,
                            (time.perf_counter() - t0) * 1000)

    def _refusal(self, scope: Scope) -> RequestError | None:
        headers = dict(scope.get("headers") or ())
        path = route_path(scope)
        key = self.state.api_key
        if key is not None and path not in PUBLIC:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key):
                return RequestError("invalid or missing API key (send 'Authorization: "
                                    "Bearer KEY')", status=401, code="invalid_api_key",
                                    headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.state.max_body_bytes
            except ValueError:
                return RequestError("the Content-Length header is not a number")
            if too_big:
                return RequestError(f"the request body is larger than "
                                    f"{self.state.max_body_bytes} bytes", status=413)
        if self.state.draining and path not in PUBLIC and path != "/metrics":
            return RequestError("the server is shutting down", status=503, type="server_error")
        return None


async def not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(RequestError(
            f"method {request.method} is not allowed on {request.url.path}", status=405))
    return error_response(RequestError(f"no such endpoint: {request.method} "
                                        f"{request.url.path}", status=exc.status_code))
