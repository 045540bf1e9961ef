"""``create_app``: the OpenAI-compatible HTTP API over a loaded model, as an ASGI app.

    app = llamabind.server.create_app(model, api_key="secret", alias="smollm2")
    # serve it with any ASGI server, or mount it in another Starlette/FastAPI app

Every generation goes through the model's batching engine: requests from many clients
are decoded together, a client that disconnects has its generation cancelled, a full
queue answers 429 with Retry-After. Responses follow the OpenAI API's schema (ids,
``created``, exact ``usage``, ``finish_reason``, ``system_fingerprint`` carrying the
llama.cpp commit, server-sent events ending in ``data: [DONE]``).

``tools`` and ``response_format`` go to the library as they are (it plans the prompt,
the grammar and the reading of the output with llama.cpp's template handlers); the
request's plan reads each choice on its own: ``message.tool_calls`` and finish_reason
"tool_calls", or streamed ``delta.tool_calls``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llamabind.errors import InvalidArgumentError, LlamaError, OutputParseError
from llamabind.results import is_partial
from llamabind.server import _engine
from llamabind.server.asgi import (
    DONE,
    EventStream,
    Guard,
    error_response,
    json_bytes,
    not_found,
    sse,
    watch_disconnect,
)
from llamabind.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RequestError,
    TokenizeRequest,
    parse_body,
)
from llamabind.server.state import ServerState
from llamabind.structured import GenerationPlan, StreamParser

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
log = logging.getLogger("llamabind.server")

_Gen = TypeVar("_Gen", ChatRequest, CompletionRequest)


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

    def _generation_body(self, raw: bytes, model: type[_Gen]) -> _Gen:
        """The request body read as ``model``, its fields checked: what this server does
        not do refused, the model name the served one."""
        body = parse_body(model, raw)
        body.refuse_unsupported()
        self.state.check_model(body.model)
        return body

    def endpoint(self, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                response: Response = await fn(request)
                return response
            except RequestError as exc:
                if exc.status >= 500:
                    log.warning("%s %s: %s", request.method, request.url.path, exc.message)
                return error_response(exc)
            except Exception as exc:
                log.exception("error answering %s %s", request.method, request.url.path)
                return error_response(RequestError(
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
        except (GeneratorExit, asyncio.CancelledError):
            # closed before the end: the client went away (the requests are cancelled)
            cancelled = cancelled or any(c.finish_reason is None for c in choices)
            raise
        finally:
            await events.aclose()
            metrics.count_tokens(sum(r.prompt_tokens for r in reqs),
                                 sum(c.completion_tokens for c in choices))
            metrics.observe_duration(time.perf_counter() - t0)
            if cancelled:
                metrics.count_cancelled()
            for r in reqs:
                self.state.finished(r)

    def _finished(self, reqs: Sequence[_engine.EngineRequest]) -> Callable[[], None]:
        """Stop counting the requests as in flight (once the response is done with)."""
        def finished() -> None:
            for r in reqs:
                self.state.finished(r)
        return finished

    def _cancel_all(self, reqs: Sequence[_engine.EngineRequest]) -> Callable[[], None]:
        def cancel() -> None:
            for r in reqs:
                r.cancel()
        return cancel

    async def _collect(self, request: Request, reqs: list[_engine.EngineRequest], n: int,
                       t0: float, what: str) -> list[_Choice]:
        """Run the requests to the end (non-streaming), cancelling them if the client
        disconnects; raises _Cancelled when they were cancelled."""
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(
            watch_disconnect(request.receive, self._cancel_all(reqs), gone))
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
        except OutputParseError:
            pass  # raised after the last events: the output is all here (see _replies)
        except LlamaError as exc:
            self._cancel_all(reqs)()
            raise self.state.engine_error(exc, what) from None
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
            return error_response(RequestError(
                "the server is shutting down; the generation was cancelled", status=503,
                type="server_error"))
        # the client has gone: nobody reads this
        return error_response(RequestError("the request was cancelled", status=499,
                                            type="server_error"))

    def _stream_error(self, message: str, status: int = 500) -> bytes:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return sse({"error": {"message": message, "type": kind, "param": None,
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
        engine = self.state.engine

        def work() -> list[Any]:
            tokens = engine.tokenize(body.content, add_special=body.add_special,
                                     parse_special=body.parse_special)
            if not body.with_pieces:
                return tokens
            return [{"id": t, "piece": engine.detokenize([t])} for t in tokens]

        try:  # a long text takes a while: off the event loop
            return JSONResponse({"tokens": await asyncio.to_thread(work)})
        except LlamaError as exc:
            raise RequestError(str(exc), param="content") from None

    async def detokenize(self, request: Request) -> Response:
        body = parse_body(DetokenizeRequest, await self.body(request))
        try:
            text = await asyncio.to_thread(self.state.engine.detokenize, body.tokens)
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
            n_tokens = await asyncio.to_thread(
                lambda: sum(len(st.engine.tokenize(t)) for t in texts))
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
        return Response(json_bytes({"object": "list", "data": data, "model": st.model_id,
                               "usage": {"prompt_tokens": n_tokens,
                                         "total_tokens": n_tokens}}),
                        media_type="application/json")

    async def chat_completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        raw = await self.body(request)
        st = self.state
        # announced while read and submitted: an idle engine waits for it (requests
        # that arrive together start in one step)
        with st.engine.arriving():
            body = self._generation_body(raw, ChatRequest)
            k = body.logprobs_k()
            messages = body.engine_messages()
            n = self._check_n(body.n)
            options = body.engine_options(st.engine.n_ctx)
            # the tools' and response_format's schemas compile here: in the submit thread
            req = await st.submit(lambda: st.engine.submit_chat(
                messages, n=n, logprobs=k, queue_timeout=0, **options,
                **body.structured_options()), "messages")
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created,
                "model": st.model_id, "system_fingerprint": st.fingerprint}
        if body.stream:
            return EventStream(self._chat_stream(req, n, head, body.include_usage, t0, k),
                               self._cancel_all([req]), self._finished([req]))
        try:
            choices = await self._collect(request, [req], n, t0, "messages")
        except _Cancelled:
            return self._cancelled_response()
        out = []
        for c, (message, finish) in zip(choices, await self._replies(req, choices),
                                        strict=True):
            logprobs = None
            if k is not None:
                logprobs = {"content": [self._logprob_entry(lp) for lp in c.logprobs]}
            out.append({"index": c.index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish})
        usage = self._usage(req.prompt_tokens, sum(c.completion_tokens for c in choices))
        return Response(json_bytes({**head, "choices": out, "usage": usage}),
                        media_type="application/json")

    async def _replies(self, req: _engine.EngineRequest, choices: list[_Choice]
                       ) -> list[tuple[dict[str, Any], str | None]]:
        """Each choice's assistant message and finish_reason: its text, or for a
        structured request the message its result read (tool calls, finish_reason
        "tool_calls"). A choice the library could not read is sent as its text."""
        plan = req.plan
        if plan is None:
            return [({"role": "assistant", "content": "".join(c.text)}, c.finish_reason)
                    for c in choices]
        try:
            results = await req.aresult()
            messages = [results[c.index].message for c in choices]
        except OutputParseError as exc:
            log.warning("a reply could not be read as the request asked: %s", exc)
            messages = [_read_alone(plan, c) for c in choices]
        return [(m, "tool_calls" if c.finish_reason == "stop" and m.get("tool_calls")
                 else c.finish_reason) for m, c in zip(messages, choices, strict=True)]

    async def _stream(self, reqs: list[_engine.EngineRequest], n: int, t0: float,
                      what: str, head: dict[str, Any], include_usage: bool,
                      opening: list[dict[str, Any]],
                      piece: Callable[[_Choice, Any], list[dict[str, Any]]],
                      finish: Callable[[_Choice, str], list[dict[str, Any]]],
                      ) -> AsyncGenerator[bytes, None]:
        """The server-sent events of a generation: ``opening`` choice objects, the
        choice objects ``piece(choice, event)`` makes of each event and
        ``finish(choice, reason)`` of each choice's end, the usage chunk when asked for,
        ``[DONE]``. A generation cancelled by a stopping server or failing in the engine
        ends with an error event instead."""
        extra = {"usage": None} if include_usage else {}
        completion = 0
        # the opening chunks go out with the first event (see EventStream)
        pending = [sse({**head, "choices": [first], **extra}) for first in opening]
        try:
            async with aclosing(self._run(reqs, n, t0)) as events:
                async for choice, ev in events:
                    if pending:
                        yield b"".join(pending)
                        pending = []
                    if ev.finish_reason == "cancelled":
                        self._cancel_all(reqs)()
                        if self.state.draining:
                            yield self._stream_error("the server is shutting down; the "
                                                     "generation was cancelled", 503)
                        return  # else the client has gone: nobody reads on
                    completion += len(ev.tokens)
                    for chunk in piece(choice, ev):
                        yield sse({**head, "choices": [chunk], **extra})
                    if ev.finish_reason is not None:
                        for chunk in finish(choice, ev.finish_reason):
                            yield sse({**head, "choices": [chunk], **extra})
        except OutputParseError as exc:
            # raised after the last events: all was streamed, as text where unreadable
            log.warning("a streamed reply could not be read as the request asked: %s", exc)
        except LlamaError as exc:
            self._cancel_all(reqs)()
            err = self.state.engine_error(exc, what)
            yield self._stream_error(err.message, err.status)
            return
        except Exception:
            self._cancel_all(reqs)()
            log.exception("error while streaming a generation")
            yield self._stream_error("internal server error")
            return
        finally:
            self._cancel_all(reqs)()  # a no-op for requests that ended
        if pending:
            yield b"".join(pending)
        if include_usage:
            usage = self._usage(sum(r.prompt_tokens for r in reqs), completion)
            yield sse({**head, "choices": [], "usage": usage})
        yield DONE

    def _chat_stream(self, req: _engine.EngineRequest, n: int, head: dict[str, Any],
                     include_usage: bool, t0: float,
                     k: int | None) -> AsyncGenerator[bytes, None]:
        plan = req.plan
        parsers: dict[int, StreamParser] = {}   # each choice's reader of its plan's output
        ended: list[tuple[int, str]] = []

        def piece(choice: _Choice, ev: Any) -> list[dict[str, Any]]:
            lp = k is not None and bool(ev.logprobs)
            if plan is None:
                deltas = [{"content": ev.text}] if ev.text or lp else []
            else:
                if choice.index not in parsers:
                    parsers[choice.index] = plan.stream_parser()
                deltas = parsers[choice.index].feed(ev.text) if ev.text else []
                if not deltas and lp:
                    deltas = [{}]   # tokens of markup whose delta comes later
            chunks = [{"index": choice.index, "delta": d, "logprobs": None,
                       "finish_reason": None} for d in deltas]
            if chunks and k is not None:
                chunks[0]["logprobs"] = {
                    "content": [self._logprob_entry(x) for x in ev.logprobs or ()]}
            return chunks

        def finish(choice: _Choice, reason: str) -> list[dict[str, Any]]:
            if plan is None:
                return [{"index": choice.index, "delta": {}, "logprobs": None,
                         "finish_reason": reason}]
            # a choice's last deltas depend on how its output ended, which its result
            # tells; with n > 1 the results come when the last choice ends
            ended.append((choice.index, reason))
            if not req.done:
                return []
            chunks: list[dict[str, Any]] = []
            for index, why in ended:
                parser = parsers.get(index) or plan.stream_parser()
                chunks += self._end_chunks(req, plan, parser, index, why)
            ended.clear()
            return chunks

        first = {"role": "assistant",
                 "content": None if plan is not None and plan.kind == "tools" else ""}
        opening = [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}
                   for i in range(n)]
        head = {**head, "object": "chat.completion.chunk"}
        return self._stream([req], n, t0, "messages", head, include_usage, opening, piece,
                            finish)

    def _end_chunks(self, req: _engine.EngineRequest, plan: GenerationPlan,
                    parser: StreamParser, index: int, reason: str) -> list[dict[str, Any]]:
        """The last deltas of a streamed choice and its finish chunk (finish_reason
        "tool_calls" when it called tools), read as the library reads the output."""
        try:
            result = req.result()[index]    # the request is done: at once
        except OutputParseError:
            result = None                   # one of its choices is unreadable
        partial = is_partial(result, plan) if result is not None else reason != "stop"
        try:
            deltas = parser.finish(partial=partial)
        except OutputParseError as exc:
            log.warning("a streamed reply could not be read as the request asked: %s", exc)
            deltas = []
        if result is not None:
            calls = bool(result.message.get("tool_calls"))
        else:
            calls = parser.result is not None and bool(parser.result.tool_calls)
        chunks: list[dict[str, Any]] = [
            {"index": index, "delta": d, "logprobs": None, "finish_reason": None}
            for d in deltas]
        chunks.append({"index": index, "delta": {}, "logprobs": None,
                       "finish_reason": "tool_calls" if reason == "stop" and calls
                       else reason})
        return chunks

    def _completion_stream(self, reqs: list[_engine.EngineRequest], n: int,
                           head: dict[str, Any], include_usage: bool, t0: float,
                           want_lp: bool, echo: list[str]) -> AsyncGenerator[bytes, None]:
        offsets: dict[int, int] = {}

        def piece(choice: _Choice, ev: Any) -> list[dict[str, Any]]:
            if not ev.text and not (want_lp and ev.logprobs):
                return []
            logprobs = None
            if want_lp:
                start = offsets.get(choice.index, 0)
                logprobs = self._legacy_logprobs(ev.logprobs or (), start)
                offsets[choice.index] = start + sum(len(lp.text) for lp in ev.logprobs or ())
            return [{"index": choice.index, "text": ev.text, "logprobs": logprobs,
                     "finish_reason": None}]

        def finish(choice: _Choice, reason: str) -> list[dict[str, Any]]:
            return [{"index": choice.index, "text": "", "logprobs": None,
                     "finish_reason": reason}]

        opening = [{"index": p * n + i, "text": text, "logprobs": None, "finish_reason": None}
                   for p, text in enumerate(echo) for i in range(n)]
        return self._stream(reqs, n, t0, "prompt", head, include_usage, opening, piece, finish)

    def _check_n(self, n: int) -> int:
        limit = self.state.engine.n_parallel
        if n > limit:
            raise RequestError(f"invalid value for 'n': at most {limit} choices (the "
                               f"server's --parallel), got {n}", param="n")
        return n

    async def completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        raw = await self.body(request)
        st = self.state
        reqs: list[_engine.EngineRequest] = []
        try:
            with st.engine.arriving():   # as in chat_completions
                body = self._generation_body(raw, CompletionRequest)
                n = self._check_n(body.n)
                options = body.engine_options(st.engine.n_ctx)
                for prompt in body.prompts:
                    reqs.append(await st.submit(
                        lambda p=prompt: st.engine.submit(  # type: ignore[misc]
                            p, n=n, logprobs=body.logprobs, queue_timeout=0, **options,
                            **body.structured_options()),
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
            return EventStream(self._completion_stream(reqs, n, head, body.include_usage,
                                                       t0, want_lp, echo),
                               self._cancel_all(reqs), self._finished(reqs))
        try:
            choices = await self._collect(request, reqs, n, t0, "prompt")
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
        return Response(json_bytes({**head, "choices": out, "usage": usage}),
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

def _read_alone(plan: GenerationPlan, choice: _Choice) -> dict[str, Any]:
    """One choice's message as the plan reads its text; its text when it cannot."""
    text = "".join(choice.text)
    try:
        return plan.parse(text, partial=choice.finish_reason != "stop").message
    except OutputParseError:
        return {"role": "assistant", "content": text}


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
    # (path, endpoint, method, also under /v1): the OpenAI paths answer with and
    # without the /v1 prefix, as llama-server's do
    table = [("/health", api.health, "GET", True), ("/models", api.models, "GET", True),
             ("/completions", api.completions, "POST", True),
             ("/chat/completions", api.chat_completions, "POST", True),
             ("/embeddings", api.embeddings, "POST", True),
             ("/metrics", api.metrics, "GET", False), ("/tokenize", api.tokenize, "POST", False),
             ("/detokenize", api.detokenize, "POST", False)]
    routes = [Route(prefix + path, api.endpoint(fn), methods=[method])
              for path, fn, method, v1 in table for prefix in (("/v1", "") if v1 else ("",))]
    middleware = [Middleware(Guard, state=state)]
    if cors_origins:
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: not_found})
    app.state.llamabind = state
    return app
