"""What the Ray helpers check before anything is sent to the cluster: the model's
options, split into how to load it and how to generate, each checked by its rule here
(on the driver), so a typo fails at once and not in every replica."""

from __future__ import annotations

import importlib
import os
from typing import Any, NamedTuple

from llamabind.config import (
    GENERATE_CONFIGS,
    LOAD_CONFIGS,
    EngineConfig,
    ModelConfig,
    check_option,
    route_options,
)
from llamabind.errors import InvalidArgumentError
from llamabind.structured import STRUCTURED_OPTIONS

__all__ = ["Prepared", "Resources", "load_options", "prepare", "require",
           "resolve_model_path", "split_options"]


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
    groups, structured = route_options(options, LOAD_CONFIGS + GENERATE_CONFIGS,
                                       apart=STRUCTURED_OPTIONS, refused={"path"})
    for cls, given in groups.items():
        if cls is ModelConfig:   # (no path to build one with)
            for name, value in given.items():
                check_option(ModelConfig, name, value)
        else:
            cls(**given)  # its rules, between fields too
    load = {k: v for cls in LOAD_CONFIGS for k, v in groups[cls].items()}
    generate = {k: v for cls in GENERATE_CONFIGS for k, v in groups[cls].items()}
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


class Prepared(NamedTuple):
    """What a Ray helper sends to its workers, checked on the driver."""

    path: str                       # the model file, as the workers open it
    load: dict[str, Any]            # how each worker loads it (load_options)
    generation: dict[str, Any]      # how to generate (SamplingConfig, GenerationConfig...)
    resources: Resources            # what each worker reserves
    n_parallel: int                 # each worker's engine slots


def prepare(model_path: str | os.PathLike[str] | None, options: dict[str, Any],
            num_cpus: float, num_gpus: float) -> Prepared:
    """The steps every helper takes first: the model's path, ``options`` split and
    checked (split_options), each worker's resources and load options."""
    path = resolve_model_path(model_path)
    load, generation = split_options(options)
    resources = Resources(num_cpus, num_gpus)
    load = load_options(load, resources)
    engine = EngineConfig(**{k: v for k, v in load.items() if k in EngineConfig.names()})
    return Prepared(path, load, generation, resources, engine.n_parallel)
