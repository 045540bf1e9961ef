"""What one app keeps between requests: the engine, the model's names, metrics, the
generations in flight; and how the engine's errors become HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
from llamabind.server.schemas import RequestError

__all__ = ["ServerState", "fingerprint"]

log = logging.getLogger("llamabind.server")


def fingerprint() -> str:
    """``system_fingerprint``: llamabind's version and the llama.cpp commit it runs."""
    from llamabind import __version__, _llama

    commit = _llama.native_info()["llama_cpp_commit"]
    return f"llamabind-{__version__}-llama.cpp-{commit}"


class ServerState:
    """What one app keeps: the engine, the model's names, metrics, the generations in
    flight (so a stopping server can let them finish, then cancel them)."""

    def __init__(self, model: Any, *, api_key: str | None, alias: str | None,
                 max_body_bytes: int, retry_after: int) -> None:
        self.engine = _engine.engine_of(model)
        path = str(getattr(getattr(model, "config", None), "path", None) or "model")
        base = os.path.basename(path)
        self.model_id = alias or base
        names = {self.model_id, path, base}
        if base.endswith(".gguf"):
            names.add(base[:-5])
        self.model_names = frozenset(names)
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        self.fingerprint = fingerprint()
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
            return RequestError(str(exc), param=guess_param(str(exc), what))
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
# the library's errors about messages and tools start with where the problem is:
# "messages[1]['tool_calls'][0]['function']['name'] must be a str", "tool_choice names..."
_LEADING_PATH = re.compile(
    r"(messages|tools|tool_choice|parallel_tool_calls|response_format)((?:\[\d+\]|\['\w+'\])*)")


def guess_param(message: str, default: str) -> str:
    """The request field an engine error names, else ``default``."""
    lead = _LEADING_PATH.match(message)
    if lead:
        return lead.group(1) + re.sub(r"\['(\w+)'\]", r".\1", lead.group(2))
    found = _OPTION_NAMES.search(message)
    return found.group(1) if found else default
