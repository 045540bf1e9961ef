"""The ``llamabind serve`` command, and ``run()``: serve a model with uvicorn.

Flags follow llama-server's names (``-m``, ``-c/--ctx-size``, ``-np/--parallel``,
``-t/--threads``, ``--host``, ``--port``, ``--api-key``, ``--alias``). One difference:
``-c`` is the context of one request here (the engine gives every request up to
``n_ctx`` tokens), where llama-server divides ``-c`` among its slots.

On SIGINT or SIGTERM the server stops accepting connections, gives the generations in
flight ``shutdown_grace`` seconds to finish, cancels the rest (each ends within one
engine step; streams get an error event), and returns; the command then closes the
model and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["add_parser", "cmd_serve", "run"]

log = logging.getLogger("llamabind.server")

_HELP = "serve a model over an OpenAI-compatible HTTP API (needs the 'server' extra)"
_DESCRIPTION = """\
Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models, /health, /metrics, /tokenize, /detokenize).

Flags follow llama-server's names. One difference: -c is the context of each request
(llama-server divides -c among its slots). SIGINT/SIGTERM: stop taking requests, let
those in flight finish for a second, cancel the rest, exit 0."""


def add_parser(sub: Any) -> None:
    """Register ``serve`` on the ``llamabind`` command's subparsers."""
    p = sub.add_parser("serve", help=_HELP, description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file (default: $LLAMABIND_MODEL or the fetched SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free)")
    p.add_argument("-np", "--parallel", type=int, default=4, dest="parallel",
                   help="sequences decoded together (slots; default 4)")
    p.add_argument("-c", "--ctx-size", "--n-ctx", type=int, default=2048, dest="n_ctx",
                   help="context length of one request: prompt + completion (default 2048)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads (default: the physical cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None,
                   help="layers to offload (default: all with a GPU backend, else 0)")
    p.add_argument("-kvu", "--kv-unified", action=argparse.BooleanOptionalAction,
                   default=None, dest="kv_unified",
                   help="one KV buffer shared by all slots (default: one per slot, as "
                        "llama-server at -np > 1: each token attends to its own sequence)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it: 429 (default 64)")
    p.add_argument("--api-key", default=os.environ.get("LLAMABIND_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAMABIND_API_KEY, "
                        "else no key)")
    p.add_argument("--alias", default=None,
                   help="the model's name in the API (default: its file name)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable; off by default)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"),
                   help="level of the server's logs on stderr (default info)")
    p.set_defaults(func=cmd_serve)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    numeric = getattr(logging, level.upper())
    # the server's loggers (uvicorn's are routed into them by run()), and llama.cpp's
    for name, lvl in (("llamabind.server", numeric), ("llamabind", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(lvl)
        logger.propagate = False


class _ToServerLog(logging.Handler):
    """Hands uvicorn's records to the ``llamabind.server.uvicorn`` logger."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("llamabind.server.uvicorn")
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"llamabind serve needs the server extra ({exc.name} is missing): "
              "pip install 'llamabind[server]'", file=sys.stderr)
        return 2
    from llamabind.errors import InvalidArgumentError
    from llamabind.server._engine import load_model

    _setup_logging(args.log_level)
    for name in ("parallel", "n_ctx", "max_queue"):
        value = getattr(args, name)
        if value < (0 if name == "max_queue" else 1):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be positive, "
                                       f"got {value}")
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {args.port}")
    log.info("loading %s (n_ctx %d, %d slots)", args.model or "the default model",
             args.n_ctx, args.parallel)
    model = load_model(args.model, n_ctx=args.n_ctx, n_parallel=args.parallel,
                       n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                       max_queue=args.max_queue, kv_unified=args.kv_unified)
    try:
        run(model, host=args.host, port=args.port, api_key=args.api_key, alias=args.alias,
            cors_origins=args.cors)
    finally:
        model.close()
    log.info("stopped")
    return 0


def run(model: Any, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
        alias: str | None = None, cors_origins: Sequence[str] = (),
        shutdown_grace: float = 1.0, **app_options: Any) -> None:
    """Serve ``model`` until SIGINT/SIGTERM (then drain: see the module doc).

    Blocks; call it from the main thread for the signals to be caught. The server logs
    to ``llamabind.server`` (access lines to ``llamabind.server.access``), and uvicorn's
    records are routed to ``llamabind.server.uvicorn`` unless the ``uvicorn`` logger
    has handlers of its own; set up ``logging`` to see them. The model stays open.
    """
    import uvicorn

    from llamabind.server.app import create_app

    app = create_app(model, api_key=api_key, alias=alias, cors_origins=cors_origins,
                     **app_options)
    state = app.state.llamabind
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            server_header=False, lifespan="off",
                            timeout_graceful_shutdown=max(1, int(shutdown_grace + 1)),
                            timeout_keep_alive=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    log.info("signal %s: stopping (in-flight requests get %.1f s, then are "
                             "cancelled)", signal.Signals(sig).name, shutdown_grace)
                    loop.call_soon_threadsafe(
                        lambda: asyncio.ensure_future(state.drain(shutdown_grace)))
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            for server in getattr(self, "servers", ()):
                for sock in server.sockets:
                    name = sock.getsockname()
                    log.info("listening on http://%s:%d/v1 (model %s, %d slots, n_ctx %d)",
                             name[0] if ":" not in name[0] else f"[{name[0]}]", name[1],
                             state.model_id, state.engine.n_parallel, state.engine.n_ctx)

    server = Server(config)
    # uvicorn's loggers go to llamabind.server.uvicorn (unless the caller set them up):
    # nothing of theirs reaches stderr on its own
    uv = logging.getLogger("uvicorn")
    routed = not uv.handlers
    saved = (uv.level, uv.propagate)
    forward = _ToServerLog()
    if routed:
        uv.addHandler(forward)
        uv.setLevel(logging.DEBUG)
        uv.propagate = False
    main = threading_main()
    previous: dict[signal.Signals, Any] = {}
    if main:
        # uvicorn re-raises the signal it caught once it has stopped, under the handler
        # that was there before: make that one a no-op, so a stop is a clean return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _ignore)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if routed:
            uv.removeHandler(forward)
            uv.setLevel(saved[0])
            uv.propagate = saved[1]


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
