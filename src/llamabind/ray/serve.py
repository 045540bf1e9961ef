"""The OpenAI-compatible server as a Ray Serve application of N replicas.

    import llamabind.ray
    llamabind.ray.serve_openai("model.gguf", num_replicas=2, port=8000)
    # OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Each replica is a Ray actor that loads the model once, in its constructor, and serves
:func:`llamabind.server.create_app` over it: a batching engine per replica, Serve's
proxy in front spreading the requests over the replicas. Streaming, cancellation on
disconnect, 429 on a full queue and the error bodies are the server's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from llamabind.errors import InvalidArgumentError
from llamabind.ray._options import prepare, require

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

__all__ = ["openai_app", "serve_openai"]


class _ReplicaApp:
    """One replica's ASGI app: the server's app over the replica's model, and the
    model's owner: the ASGI lifespan's shutdown (Serve runs it when it stops the
    replica) cancels what is still running and closes the model."""

    def __init__(self, model: Any, app: Any) -> None:
        self.model = model
        self.app = app

    async def __call__(self, scope: Any, receive: Callable[[], Any],
                       send: Callable[[Any], Any]) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.app.state.llamabind.drain(0.0)
                self.model.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _app_builder(path: str, load: dict[str, Any], app_options: dict[str, Any]
                 ) -> Callable[[], _ReplicaApp]:
    # Serve calls a plain function given to serve.ingress in each replica's
    # constructor (Ray >= 2.47): the model is loaded there, once per replica.
    def build() -> _ReplicaApp:
        from llamabind.api import LoadedModel
        from llamabind.server import create_app

        model = LoadedModel.load(path, **load)
        try:
            return _ReplicaApp(model, create_app(model, **app_options))
        except BaseException:
            model.close()
            raise

    return build


def openai_app(model_path: str | os.PathLike[str] | None = None, *, num_replicas: int = 1,
               num_cpus: float = 1.0, num_gpus: float = 0.0,
               max_ongoing_requests: int | None = None, name: str = "llamabind",
               api_key: str | None = None, alias: str | None = None,
               cors_origins: Sequence[str] = (), **options: Any) -> Application:
    """The Serve application (not yet running): ``num_replicas`` replicas of the
    OpenAI-compatible app, each loading ``model_path`` with ``options`` (any
    ModelConfig, ContextConfig or EngineConfig field: ``n_ctx``, ``n_parallel``...).

    Each replica reserves ``num_cpus`` CPUs and ``num_gpus`` GPUs of its Ray node and,
    unless ``n_threads`` is given, runs that many threads (at least 1).
    ``max_ongoing_requests``: requests Serve hands one replica at once (default: its
    engine's ``n_parallel``, one per slot; the rest wait in Serve's queue, for the
    first replica with a free slot). ``name``: the deployment's name; ``api_key``,
    ``alias``, ``cors_origins``: as for :func:`llamabind.server.create_app`.

    Run it with ``ray.serve.run(app, route_prefix=...)``, or use :func:`serve_openai`.
    """
    serve = require("ray.serve")
    run = prepare(model_path, options, num_cpus, num_gpus)
    if run.generation:
        raise InvalidArgumentError(
            f"{sorted(run.generation)[0]!r} is a generation option: the server takes it from "
            "each request")
    for label, value, lo in (("num_replicas", num_replicas, 1),
                             ("max_ongoing_requests", max_ongoing_requests, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InvalidArgumentError(f"{label} must be an int >= {lo}, got {value!r}")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name must be a non-empty str, got {name!r}")
    if max_ongoing_requests is None:
        max_ongoing_requests = run.n_parallel
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise InvalidArgumentError("api_key must be a non-empty str or None")
    if alias is not None and (not isinstance(alias, str) or not alias):
        raise InvalidArgumentError(f"alias must be a non-empty str or None, got {alias!r}")
    if isinstance(cors_origins, str):
        raise InvalidArgumentError("cors_origins must be a sequence of origins, not a str")
    app_options = {"api_key": api_key, "alias": alias, "cors_origins": tuple(cors_origins)}
    ingress = serve.ingress(_app_builder(run.path, run.load, app_options))()
    deployment = serve.deployment(
        ingress, name=name, num_replicas=num_replicas,
        ray_actor_options=run.resources.actor_options(),
        max_ongoing_requests=max_ongoing_requests)
    application: Application = deployment.bind()
    return application


def serve_openai(model_path: str | os.PathLike[str] | None = None, *, num_replicas: int = 1,
                 host: str | None = None, port: int | None = None, route_prefix: str = "/",
                 app_name: str = "llamabind", blocking: bool = False,
                 **options: Any) -> DeploymentHandle:
    """Run :func:`openai_app` on the Ray cluster and return once every replica has
    loaded the model (``blocking=True``: then serve until Ctrl+C).

    The API is at ``http://HOST:PORT{route_prefix}/v1`` (``route_prefix="/llm"``:
    ``/llm/v1/chat/completions``), where HOST:PORT is Serve's HTTP proxy: 127.0.0.1:8000
    (this machine only) unless ``host``/``port`` say otherwise (``host="0.0.0.0"``:
    every interface; then set ``api_key``). They are applied when Serve starts on the
    cluster: a Serve already running keeps its own (Ray logs a warning that says so).
    ``options``: those of :func:`openai_app`. Stop it with
    ``ray.serve.delete(app_name)`` or ``ray.serve.shutdown()``.
    """
    serve = require("ray.serve")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port <= 65535):
        raise InvalidArgumentError(f"port must be in [1, 65535], got {port!r}")
    if host is not None and (not isinstance(host, str) or not host):
        raise InvalidArgumentError(f"host must be a non-empty str, got {host!r}")
    if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
        raise InvalidArgumentError(f"route_prefix must start with '/', got {route_prefix!r}")
    if not isinstance(app_name, str) or not app_name:
        raise InvalidArgumentError(f"app_name must be a non-empty str, got {app_name!r}")
    application = openai_app(model_path, num_replicas=num_replicas, **options)
    http = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if http:
        serve.start(http_options=http)
    handle: DeploymentHandle = serve.run(application, name=app_name,
                                         route_prefix=route_prefix, blocking=blocking)
    return handle
