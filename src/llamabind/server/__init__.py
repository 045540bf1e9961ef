"""``llamabind serve``: an OpenAI-compatible HTTP server over the batching engine.

Needs the ``server`` extra (``pip install 'llamabind[server]'``: Starlette, uvicorn,
pydantic). ``create_app(model, ...)`` gives the ASGI app, to serve or to mount in
another application; ``run(model, ...)`` serves it with uvicorn until SIGINT/SIGTERM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamabind.server.app import create_app
    from llamabind.server.command import run
    from llamabind.server.state import ServerState

__all__ = ["ServerState", "create_app", "run"]


def __getattr__(name: str) -> Any:
    # The web libraries are imported on first use, so `llamabind --help` and the
    # command's registration work without the extra installed.
    if name == "create_app":
        from llamabind.server.app import create_app

        return create_app
    if name == "ServerState":
        from llamabind.server.state import ServerState

        return ServerState
    if name == "run":
        from llamabind.server.command import run

        return run
    raise AttributeError(f"module 'llamabind.server' has no attribute {name!r}")
