"""llamabind on a Ray cluster: many engines behind one endpoint, or over one dataset.

Needs the ``ray`` extra (``pip install 'llamabind[ray]'``: Ray Serve and Ray Data).

* :func:`serve_openai` runs the OpenAI-compatible server (:mod:`llamabind.server`) as a
  Ray Serve application of N replicas, each a process with its own model and batching
  engine; :func:`openai_app` builds the application without running it.
* :func:`generate_dataset` adds generated columns (``text``, ``prompt_tokens``,
  ``completion_tokens``, ``finish_reason``) to a Ray dataset of prompts or chats, with
  one model per actor, each batch of rows decoded together by the actor's engine.

Ray finds its cluster the usual way (``ray.init()``: ``$RAY_ADDRESS``, else a cluster
started with ``ray start`` on this machine, else a new one in this process). The model
file must be at the same path on every machine that runs a replica or an actor.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
except ImportError as exc:  # the extra is missing: say which one
    raise ImportError(
        f"llamabind.ray needs the 'ray' extra ({exc.name or 'ray'} is missing): "
        "pip install 'llamabind[ray]'", name=exc.name) from exc

from llamabind.ray.data import generate_dataset
from llamabind.ray.serve import openai_app, serve_openai

__all__ = ["generate_dataset", "openai_app", "serve_openai"]
