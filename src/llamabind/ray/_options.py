"""What the Ray helpers check before anything is sent to the cluster: the model's
options, split into how to load it and how to generate, each checked by its rule here
(on the driver), so a typo fails at once and not in every replica."""

from __future__ import annotations

import importlib
import os
from typing import Any

from llamabind.config import (
    ContextConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    SamplingConfig,
    check_option,
)
from llamabind.errors import InvalidArgumentError
from llamabind.structured import STRUCTURED_OPTIONS

__all__ = ["Resources", "load_options", "require", "resolve_model_path", "split_options"]

_LOAD = (ModelConfig, ContextConfig, EngineConfig)
_GENERATE = (SamplingConfig, GenerationConfig)


def require(module: str) -> Any:
    """Import ``module`` of Ray, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"llamabind.ray needs the 'ray' extra ({exc.name or module} is "
                          "missing): pip install 'llamabind[ray]'", name=exc.name) from exc


def resolve_model_path(path: str | os.PathLike[str] | None) -> str:
    """The model file as every worker should open it: a path that exists here is made
    absolute (workers do not share the driver's working directory); any other path is
    taken as a path on the workers' machines. None is the default small model."""
    if path is None:
        from llamabind.api import default_model_path

        return default_model_path()
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"model_path must be a str or a path, got {path!r}")
    text = os.fspath(path)
    if not text:
        raise InvalidArgumentError("model_path is empty")
    return os.path.abspath(text) if os.path.exists(text) else text


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (load options, generation options), checked by their rules (and
    their configs' rules between fields). Load options are ModelConfig, ContextConfig
    and EngineConfig fields (``path`` excepted: it is the helpers' first argument);
    generation options are SamplingConfig and GenerationConfig fields and the
    structured-output options."""
    groups: dict[type, dict[str, Any]] = {cls: {} for cls in _LOAD + _GENERATE}
    structured: dict[str, Any] = {}
    for name, value in options.items():
        if name in STRUCTURED_OPTIONS:
            structured[name] = value
            continue
        owner = next((cls for cls in groups if name in cls.names()), None)  # type: ignore[attr-defined]
        if owner is None or name == "path":
            known = set().union(*(cls.names() for cls in groups)) | set(STRUCTURED_OPTIONS)  # type: ignore[attr-defined]
            raise InvalidArgumentError(
                f"unknown option {name!r}; options: {sorted(known - {'path'})}")
        groups[owner][name] = value
    for name, value in groups[ModelConfig].items():
        check_option(ModelConfig, name, value)
    for cls in (ContextConfig, EngineConfig, SamplingConfig, GenerationConfig):
        cls(**groups[cls])  # its rules, between fields too
    load = {k: v for cls in _LOAD for k, v in groups[cls].items()}
    generate = {k: v for cls in _GENERATE for k, v in groups[cls].items()}
    return load, {**generate, **structured}


class Resources:
    """What one replica or actor reserves of a Ray node: CPUs and GPUs."""

    def __init__(self, num_cpus: float, num_gpus: float) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value < 1e6):
                raise InvalidArgumentError(f"{name} must be a number >= 0, got {value!r}")
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def load_options(load: dict[str, Any], resources: Resources) -> dict[str, Any]:
    """The load options a worker uses: ``n_threads`` defaults to the CPUs the worker
    reserved (at least 1), not to all the machine's cores, which other workers share."""
    out = dict(load)
    if out.get("n_threads") is None:
        out["n_threads"] = max(1, int(resources.num_cpus))
    return out
