"""``create_app``: the OpenAI-compatible HTTP API over a loaded model, as an ASGI app.

    app = llamabind.server.create_app(model, api_key="secret", alias="smollm2")
    # serve it with any ASGI server, or mount it in another Starlette/FastAPI app

Every generation goes through the model's batching engine: requests from many clients
are decoded together, a client that disconnects has its generation cancelled, a full
queue answers 429 with Retry-After. Responses follow the OpenAI API's schema (ids,
``created``, exact ``usage``, ``finish_reason``, ``system_fingerprint`` carrying the
llama.cpp commit, server-sent events ending in ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamabind.errors import (
    ChatTemplateError,
    ClosedError,
    ContextLengthExceededError,
    InvalidArgumentError,
    LlamaError,
    QueueFullError,
    TokenizationError,
)
from llamabind.server import _engine
from llamabind.server.metrics import Metrics
from llamabind.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RequestError,
    TokenizeRequest,
    parse_body,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "create_app"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
log = logging.getLogger("llamabind.server")
access_log = logging.getLogger("llamabind.server.access")

# Paths answered without an API key (load balancers probe it).
_PUBLIC = frozenset({"/health", "/v1/health"})
_ENDPOINTS = frozenset({
    "/health", "/v1/health", "/v1/models", "/models", "/v1/completions", "/completions",
    "/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings",
    "/metrics", "/tokenize", "/detokenize"})


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_body(exc: RequestError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}


def _error_response(exc: RequestError) -> Response:
    return Response(_json(_error_body(exc)), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


def _fingerprint() -> str:
    from llamabind import __version__, _llama

    commit = _llama.native_info()["llama_cpp_commit"]
    return f"llamabind-{__version__}-llama.cpp-{commit}"


# --- generation bookkeeping ------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    last: float = 0.0


class _Cancelled(Exception):
    """The generation was cancelled: the client left or the server is stopping."""


class ServerState:
    """What one app keeps: the engine, the model's names, metrics, the generations in
    flight (so a stopping server can let them finish, then cancel them)."""

    def __init__(self, model: Any, *, api_key: str | None, alias: str | None,
                 max_body_bytes: int, retry_after: int) -> None:
        self.engine = _engine.engine_of(model)
        path = str(model.config.path)
        base = os.path.basename(path)
        self.model_id = alias or base
        names = {self.model_id, path, base}
        if base.endswith(".gguf"):
            names.add(base[:-5])
        self.model_names = frozenset(names)
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        self.fingerprint = _fingerprint()
        self.created = int(time.time())
        self.metrics = Metrics()
        self.in_flight: set[_engine.EngineRequest] = set()
        self.draining = False
        # submit() tokenizes and renders the chat template: off the event loop
        self.submitter = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llamabind-submit")

    # --- shutdown ------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop taking generation requests, give those in flight ``grace`` seconds to
        finish, then cancel the rest (they end within one engine step)."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for req in list(self.in_flight):
            req.cancel()
        self.submitter.shutdown(wait=False)

    # --- requests ------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise RequestError(f"the model {name!r} does not exist; this server serves "
                               f"{self.model_id!r}", param="model", code="model_not_found")

    async def submit(self, fn: Callable[[], _engine.EngineRequest],
                     what: str) -> _engine.EngineRequest:
        if self.draining:
            raise RequestError("the server is shutting down", status=503, type="server_error")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.submitter, fn)
        try:
            req = await asyncio.shield(future)
        except asyncio.CancelledError:
            # the handler went away while submit ran: do not leave the request running
            future.add_done_callback(_cancel_result)
            raise
        except LlamaError as exc:
            raise self.engine_error(exc, what) from None
        self.in_flight.add(req)
        return req

    def engine_error(self, exc: LlamaError, what: str) -> RequestError:
        if isinstance(exc, QueueFullError):
            return RequestError(
                f"the server is busy: {exc.queued} requests are waiting (limit {exc.limit}); "
                "retry later", status=429, type="rate_limit_error", code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after)})
        if isinstance(exc, ContextLengthExceededError):
            return RequestError(
                f"this model's context holds {exc.n_ctx} tokens, but the {what} has "
                f"{exc.n_prompt_tokens} (and at least one more is needed for the completion)",
                param=what, code="context_length_exceeded")
        if isinstance(exc, ClosedError):
            return RequestError("the model is closed (the server is shutting down)",
                                status=503, type="server_error")
        if isinstance(exc, (ChatTemplateError, TokenizationError)):
            return RequestError(str(exc), param=what)
        if isinstance(exc, InvalidArgumentError):
            return RequestError(str(exc), param=_guess_param(str(exc), what))
        log.error("engine error: %s: %s", type(exc).__name__, exc)
        return RequestError(f"{type(exc).__name__}: {exc}", status=500, type="server_error")

    def finished(self, req: _engine.EngineRequest) -> None:
        self.in_flight.discard(req)


def _cancel_result(future: Any) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


_OPTION_NAMES = re.compile(
    r"\b(logit_bias|temperature|top_p|min_p|top_k|seed|stop|max_tokens|presence_penalty|"
    r"frequency_penalty|repeat_penalty|logprobs|n)\b")


def _guess_param(message: str, default: str) -> str:
    """The request field an engine error names, else ``default``."""
    found = _OPTION_NAMES.search(message)
    return found.group(1) if found else default


# --- streaming ---------------------------------------------------------------------------


class _EventStream(Response):
    """A server-sent-events response that watches for the client going away while it
    streams and then calls ``on_disconnect`` (which cancels the generation)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None],
                 on_disconnect: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.body_iterator = body
        self.on_disconnect = on_disconnect

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
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
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
            await self.body_iterator.aclose()


def _sse(data: Any) -> bytes:
    return b"data: " + _json(data) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _watch_disconnect(receive: Receive, cancel: Callable[[], None],
                            gone: asyncio.Event) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            cancel()
            return


# --- the app -----------------------------------------------------------------------------


class _Api:
    """The endpoints; each returns a Response, errors included (nothing escapes)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    # --- helpers -------------------------------------------------------------------

    async def body(self, request: Request) -> bytes:
        limit = self.state.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body is larger than {limit} bytes",
                                   status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def endpoint(self, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                response: Response = await fn(request)
                return response
            except RequestError as exc:
                if exc.status >= 500:
                    log.warning("%s %s: %s", request.method, request.url.path, exc.message)
                return _error_response(exc)
            except Exception as exc:
                log.exception("error answering %s %s", request.method, request.url.path)
                return _error_response(RequestError(
                    f"internal server error: {type(exc).__name__}", status=500,
                    type="server_error"))
        return handle

    def _logprob_entry(self, lp: Any) -> dict[str, Any]:
        return {"id": lp.token, "token": lp.text, "logprob": lp.logprob,
                "bytes": list(lp.text.encode("utf-8")),
                "top_logprobs": [{"id": t, "token": s, "logprob": p,
                                  "bytes": list(s.encode("utf-8"))} for t, s, p in lp.top]}

    def _usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def _events(self, reqs: Sequence[_engine.EngineRequest]
                      ) -> AsyncGenerator[tuple[int, Any], None]:
        """(request number, event) from all ``reqs`` as they come."""
        if len(reqs) == 1:
            it = reqs[0].__aiter__()
            try:
                async for ev in it:
                    yield 0, ev
            finally:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    await aclose()
            return
        queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

        async def pump(k: int, req: _engine.EngineRequest) -> None:
            try:
                async for ev in req:
                    queue.put_nowait((k, ev, None))
                queue.put_nowait((k, None, None))
            except BaseException as exc:
                queue.put_nowait((k, None, exc))
                raise

        tasks = [asyncio.ensure_future(pump(k, r)) for k, r in enumerate(reqs)]
        try:
            open_reqs = len(reqs)
            while open_reqs:
                k, ev, error = await queue.get()
                if error is not None:
                    raise error
                if ev is None:
                    open_reqs -= 1
                else:
                    yield k, ev
        finally:
            for t in tasks:
                t.cancel()

    async def _run(self, reqs: list[_engine.EngineRequest], n: int, t0: float,
                   ) -> AsyncGenerator[tuple[_Choice, Any], None]:
        """Drive the requests, keep metrics and counts; yields (choice, event) with
        choice numbered across requests (request k's choice i is ``k * n + i``)."""
        metrics = self.state.metrics
        choices = [_Choice(k * n + i) for k in range(len(reqs)) for i in range(n)]
        first = True
        cancelled = False
        events = self._events(reqs)
        try:
            async for k, ev in events:
                choice = choices[k * n + ev.index]
                now = time.perf_counter()
                n_tok = len(ev.tokens)
                if n_tok:
                    if first:
                        metrics.observe_first_token(now - t0)
                        first = False
                    elif choice.last:
                        metrics.observe_tokens((now - choice.last) / n_tok, n_tok)
                    choice.last = now
                    choice.completion_tokens += n_tok
                if ev.finish_reason == "cancelled":
                    cancelled = True
                yield choice, ev
        finally:
            await events.aclose()
            metrics.count_tokens(sum(r.prompt_tokens for r in reqs),
                                 sum(c.completion_tokens for c in choices))
            metrics.observe_duration(time.perf_counter() - t0)
            if cancelled:
                metrics.count_cancelled()
            for r in reqs:
                self.state.finished(r)

    def _stop(self, reqs: Sequence[_engine.EngineRequest]) -> Callable[[], None]:
        """Cancel the requests and stop counting them as in flight."""
        def stop() -> None:
            for r in reqs:
                r.cancel()
                self.state.finished(r)
        return stop

    def _cancel_all(self, reqs: Sequence[_engine.EngineRequest]) -> Callable[[], None]:
        def cancel() -> None:
            for r in reqs:
                r.cancel()
        return cancel

    async def _collect(self, request: Request, reqs: list[_engine.EngineRequest], n: int,
                       t0: float) -> list[_Choice]:
        """Run the requests to the end (non-streaming), cancelling them if the client
        disconnects; raises _Cancelled when they were cancelled."""
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(
            _watch_disconnect(request.receive, self._cancel_all(reqs), gone))
        try:
            out: dict[int, _Choice] = {}
            async with aclosing(self._run(reqs, n, t0)) as events:
                async for choice, ev in events:
                    out[choice.index] = choice
                    if ev.text:
                        choice.text.append(ev.text)
                    if ev.logprobs:
                        choice.logprobs.extend(ev.logprobs)
                    if ev.finish_reason is not None:
                        choice.finish_reason = ev.finish_reason
                        if ev.finish_reason == "cancelled":
                            self._cancel_all(reqs)()
        except LlamaError as exc:
            self._cancel_all(reqs)()
            raise self.state.engine_error(exc, "prompt") from None
        except BaseException:
            self._cancel_all(reqs)()
            raise
        finally:
            watcher.cancel()
        if gone.is_set() or any(c.finish_reason == "cancelled" for c in out.values()):
            raise _Cancelled()
        return [out[i] for i in sorted(out)]

    def _cancelled_response(self) -> Response:
        if self.state.draining:
            return _error_response(RequestError(
                "the server is shutting down; the generation was cancelled", status=503,
                type="server_error"))
        # the client has gone: nobody reads this
        return _error_response(RequestError("the request was cancelled", status=499,
                                            type="server_error"))

    def _stream_error(self, message: str, status: int = 500) -> bytes:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return _sse({"error": {"message": message, "type": kind, "param": None,
                               "code": status}})

    # --- endpoints -----------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        st = self.state
        return JSONResponse({"object": "list", "data": [{
            "id": st.model_id, "object": "model", "created": st.created,
            "owned_by": "llamabind",
            "meta": {"n_ctx": st.engine.n_ctx, "n_parallel": st.engine.n_parallel}}]})

    async def metrics(self, request: Request) -> Response:
        st = self.state
        text = st.metrics.render(st.engine.stats(), len(st.in_flight))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenize(self, request: Request) -> Response:
        body = parse_body(TokenizeRequest, await self.body(request))
        try:
            tokens = self.state.engine.tokenize(body.content, add_special=body.add_special,
                                                parse_special=body.parse_special)
        except LlamaError as exc:
            raise RequestError(str(exc), param="content") from None
        if not body.with_pieces:
            return JSONResponse({"tokens": tokens})
        detok = self.state.engine.detokenize
        return JSONResponse({"tokens": [{"id": t, "piece": detok([t])} for t in tokens]})

    async def detokenize(self, request: Request) -> Response:
        body = parse_body(DetokenizeRequest, await self.body(request))
        try:
            text = self.state.engine.detokenize(body.tokens)
        except LlamaError as exc:
            raise RequestError(str(exc), param="tokens") from None
        return JSONResponse({"content": text})

    async def embeddings(self, request: Request) -> Response:
        body = parse_body(EmbeddingRequest, await self.body(request))
        st = self.state
        st.check_model(body.model)
        if st.draining:
            raise RequestError("the server is shutting down", status=503, type="server_error")
        texts = body.texts
        try:
            vectors = await st.engine.aembed(texts)
            n_tokens = sum(len(st.engine.tokenize(t)) for t in texts)
        except LlamaError as exc:
            raise st.engine_error(exc, "input") from None
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise RequestError(f"this model's embeddings have {vectors.shape[1]} dimensions; "
                               f"'dimensions' {body.dimensions} is not supported",
                               param="dimensions")
        data = []
        for i, vec in enumerate(np.asarray(vectors, dtype=np.float32)):
            value: Any
            if body.encoding_format == "base64":
                value = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        st.metrics.count_tokens(n_tokens, 0)
        return Response(_json({"object": "list", "data": data, "model": st.model_id,
                               "usage": {"prompt_tokens": n_tokens,
                                         "total_tokens": n_tokens}}),
                        media_type="application/json")

    async def chat_completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        body = parse_body(ChatRequest, await self.body(request))
        st = self.state
        body.refuse_unsupported()
        st.check_model(body.model)
        k = body.logprobs_k()
        messages = body.engine_messages()
        n = self._check_n(body.n)
        options = body.engine_options(st.engine.n_ctx)
        req = await st.submit(lambda: st.engine.submit_chat(
            messages, n=n, logprobs=k, queue_timeout=0, **options), "messages")
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created,
                "model": st.model_id, "system_fingerprint": st.fingerprint}
        if body.stream:
            return _EventStream(self._chat_stream(req, n, head, body.include_usage, t0,
                                                  k is not None), self._stop([req]))
        try:
            choices = await self._collect(request, [req], n, t0)
        except _Cancelled:
            return self._cancelled_response()
        out = []
        for c in choices:
            logprobs = None
            if k is not None:
                logprobs = {"content": [self._logprob_entry(lp) for lp in c.logprobs]}
            out.append({"index": c.index, "message": {"role": "assistant",
                                                      "content": "".join(c.text)},
                        "logprobs": logprobs, "finish_reason": c.finish_reason})
        usage = self._usage(req.prompt_tokens, sum(c.completion_tokens for c in choices))
        return Response(_json({**head, "choices": out, "usage": usage}),
                        media_type="application/json")

    async def _chat_stream(self, req: _engine.EngineRequest, n: int, head: dict[str, Any],
                           include_usage: bool, t0: float,
                           with_logprobs: bool) -> AsyncGenerator[bytes, None]:
        head = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        completion = 0
        try:
            for i in range(n):
                yield _sse({**head, "choices": [{
                    "index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}], **extra})
            async with aclosing(self._run([req], n, t0)) as events:
                async for choice, ev in events:
                    if ev.finish_reason == "cancelled":
                        req.cancel()
                        if self.state.draining:
                            yield self._stream_error("the server is shutting down; the "
                                                     "generation was cancelled", 503)
                        return
                    completion += len(ev.tokens)
                    if ev.text or (with_logprobs and ev.logprobs):
                        logprobs = None
                        if with_logprobs:
                            logprobs = {"content": [self._logprob_entry(lp)
                                                    for lp in ev.logprobs or ()]}
                        yield _sse({**head, "choices": [{
                            "index": choice.index, "delta": {"content": ev.text},
                            "logprobs": logprobs, "finish_reason": None}], **extra})
                    if ev.finish_reason is not None:
                        yield _sse({**head, "choices": [{
                            "index": choice.index, "delta": {}, "logprobs": None,
                            "finish_reason": ev.finish_reason}], **extra})
        except LlamaError as exc:
            req.cancel()
            err = self.state.engine_error(exc, "messages")
            yield self._stream_error(err.message, err.status)
            return
        finally:
            req.cancel()  # a no-op when it has ended; frees it when the stream was cut
            self.state.finished(req)
        if include_usage:
            yield _sse({**head, "choices": [],
                        "usage": self._usage(req.prompt_tokens, completion)})
        yield _DONE

    def _check_n(self, n: int) -> int:
        limit = self.state.engine.n_parallel
        if n > limit:
            raise RequestError(f"invalid value for 'n': at most {limit} choices (the "
                               f"server's --parallel), got {n}", param="n")
        return n

    async def completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        body = parse_body(CompletionRequest, await self.body(request))
        st = self.state
        body.refuse_unsupported()
        st.check_model(body.model)
        n = self._check_n(body.n)
        options = body.engine_options(st.engine.n_ctx)
        reqs: list[_engine.EngineRequest] = []
        try:
            for prompt in body.prompts:
                reqs.append(await st.submit(
                    lambda p=prompt: st.engine.submit(  # type: ignore[misc]
                        p, n=n, logprobs=body.logprobs, queue_timeout=0, **options),
                    "prompt"))
        except BaseException:
            for r in reqs:
                r.cancel()
                st.finished(r)
            raise
        echo: list[str] = []
        if body.echo:
            echo = [p if isinstance(p, str) else st.engine.detokenize(p)
                    for p in body.prompts]
        head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
                "created": int(time.time()), "model": st.model_id,
                "system_fingerprint": st.fingerprint}
        want_lp = body.logprobs is not None
        if body.stream:
            return _EventStream(self._completion_stream(reqs, n, head, body.include_usage,
                                                        t0, want_lp, echo), self._stop(reqs))
        try:
            choices = await self._collect(request, reqs, n, t0)
        except _Cancelled:
            return self._cancelled_response()
        out = []
        for c in choices:
            prefix = echo[c.index // n] if echo else ""
            out.append({"index": c.index, "text": prefix + "".join(c.text),
                        "logprobs": self._legacy_logprobs(c.logprobs, 0) if want_lp else None,
                        "finish_reason": c.finish_reason})
        usage = self._usage(sum(r.prompt_tokens for r in reqs),
                            sum(c.completion_tokens for c in choices))
        return Response(_json({**head, "choices": out, "usage": usage}),
                        media_type="application/json")

    def _legacy_logprobs(self, lps: Sequence[Any], offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            tokens.append(lp.text)
            token_lps.append(lp.logprob)
            tops.append({s: p for _, s, p in lp.top})
            offsets.append(offset)
            offset += len(lp.text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    async def _completion_stream(self, reqs: list[_engine.EngineRequest], n: int,
                                 head: dict[str, Any], include_usage: bool, t0: float,
                                 want_lp: bool, echo: list[str]) -> AsyncGenerator[bytes, None]:
        extra = {"usage": None} if include_usage else {}
        completion = 0
        offsets: dict[int, int] = {}
        try:
            for k, text in enumerate(echo):
                for i in range(n):
                    yield _sse({**head, "choices": [{"index": k * n + i, "text": text,
                                                     "logprobs": None, "finish_reason": None}],
                                **extra})
            async with aclosing(self._run(reqs, n, t0)) as events:
                async for choice, ev in events:
                    if ev.finish_reason == "cancelled":
                        self._cancel_all(reqs)()
                        if self.state.draining:
                            yield self._stream_error("the server is shutting down; the "
                                                     "generation was cancelled", 503)
                        return
                    completion += len(ev.tokens)
                    if ev.text or (want_lp and ev.logprobs):
                        logprobs = None
                        if want_lp:
                            start = offsets.get(choice.index, 0)
                            logprobs = self._legacy_logprobs(ev.logprobs or (), start)
                            offsets[choice.index] = start + sum(
                                len(lp.text) for lp in ev.logprobs or ())
                        yield _sse({**head, "choices": [{
                            "index": choice.index, "text": ev.text, "logprobs": logprobs,
                            "finish_reason": None}], **extra})
                    if ev.finish_reason is not None:
                        yield _sse({**head, "choices": [{
                            "index": choice.index, "text": "", "logprobs": None,
                            "finish_reason": ev.finish_reason}], **extra})
        except LlamaError as exc:
            self._cancel_all(reqs)()
            err = self.state.engine_error(exc, "prompt")
            yield self._stream_error(err.message, err.status)
            return
        finally:
            for r in reqs:
                r.cancel()
                self.state.finished(r)
        if include_usage:
            yield _sse({**head, "choices": [],
                        "usage": self._usage(sum(r.prompt_tokens for r in reqs), completion)})
        yield _DONE


def _route_path(scope: Scope) -> str:
    """The path within this app (without the prefix it is mounted under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class _Guard:
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
        path = _route_path(scope)
        status = 0

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            endpoint = path if path in _ENDPOINTS else "other"
            self.state.metrics.count_request(endpoint, status)
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1],
                            scope.get("method", "-"), path, status,
                            (time.perf_counter() - t0) * 1000)

    def _refusal(self, scope: Scope) -> RequestError | None:
        headers = dict(scope.get("headers") or ())
        path = _route_path(scope)
        key = self.state.api_key
        if key is not None and path not in _PUBLIC:
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
        if self.state.draining and path not in _PUBLIC and path != "/metrics":
            return RequestError("the server is shutting down", status=503, type="server_error")
        return None


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_response(RequestError(
            f"method {request.method} is not allowed on {request.url.path}", status=405))
    return _error_response(RequestError(f"no such endpoint: {request.method} "
                                        f"{request.url.path}", status=exc.status_code))


def create_app(model: Any, *, api_key: str | None = None, alias: str | None = None,
               cors_origins: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               retry_after: int = 1) -> Starlette:
    """The OpenAI-compatible API over ``model`` (a loaded llamabind model), as a
    Starlette app: serve it with uvicorn or mount it in another ASGI app.

    ``api_key``: requests must send ``Authorization: Bearer KEY`` (``/health`` excepted).
    ``alias``: the model's name in ``/v1/models`` and responses (default: the file name).
    ``cors_origins``: origins allowed by CORS (none by default: CORS off).
    ``max_body_bytes``: larger request bodies get 413. ``retry_after``: seconds sent in
    the Retry-After header of a 429 (full queue).

    The app does not own the model: close it yourself after the server stops.
    ``app.state.llamabind`` is the :class:`ServerState`; ``await state.drain(grace)``
    stops taking requests and cancels those still running after ``grace`` seconds.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise InvalidArgumentError("api_key must be a non-empty str or None")
    if isinstance(cors_origins, str):
        raise InvalidArgumentError("cors_origins must be a sequence of origins, not a str")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) \
            or max_body_bytes < 1024:
        raise InvalidArgumentError(f"max_body_bytes must be an int >= 1024, "
                                   f"got {max_body_bytes!r}")
    state = ServerState(model, api_key=api_key, alias=alias, max_body_bytes=max_body_bytes,
                        retry_after=retry_after)
    api = _Api(state)
    post, get = ["POST"], ["GET"]
    routes = [
        Route("/health", api.endpoint(api.health), methods=get),
        Route("/v1/health", api.endpoint(api.health), methods=get),
        Route("/v1/models", api.endpoint(api.models), methods=get),
        Route("/models", api.endpoint(api.models), methods=get),
        Route("/v1/completions", api.endpoint(api.completions), methods=post),
        Route("/completions", api.endpoint(api.completions), methods=post),
        Route("/v1/chat/completions", api.endpoint(api.chat_completions), methods=post),
        Route("/chat/completions", api.endpoint(api.chat_completions), methods=post),
        Route("/v1/embeddings", api.endpoint(api.embeddings), methods=post),
        Route("/embeddings", api.endpoint(api.embeddings), methods=post),
        Route("/metrics", api.endpoint(api.metrics), methods=get),
        Route("/tokenize", api.endpoint(api.tokenize), methods=post),
        Route("/detokenize", api.endpoint(api.detokenize), methods=post),
    ]
    middleware = [Middleware(_Guard, state=state)]
    if cors_origins:
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _not_found})
    app.state.llamabind = state
    return app
