"""The parameter table: configs validate at construction and are immutable; the core,
the configs and the command line apply the same rule to the same parameter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import llamabind
from llamabind import (
    ContextConfig,
    EngineConfig,
    GenerationConfig,
    InvalidArgumentError,
    ModelConfig,
    SamplingConfig,
)
from llamabind.config import check_option, default_option, spec_of

CONFIGS = (ModelConfig, ContextConfig, EngineConfig, SamplingConfig, GenerationConfig)


def test_defaults() -> None:
    assert ContextConfig().n_ctx == 2048
    s = SamplingConfig()
    assert s.seed is None and not s.greedy
    assert SamplingConfig(temperature=0).greedy
    assert GenerationConfig().max_tokens == 256
    assert ModelConfig("m.gguf").n_gpu_layers is None
    assert EngineConfig().n_parallel >= 1


def test_every_field_has_a_rule_and_one_name() -> None:
    names: dict[str, type] = {}
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert "spec" in f.metadata, f"{cls.__name__}.{f.name} has no rule"
            assert f.name not in names, f"{f.name} is in {names.get(f.name)} and {cls}"
            names[f.name] = cls
    # llama.cpp's names, not the old aliases
    for old in ("context_length", "batch_size", "threads", "kv_cache_type", "add_bos",
                "flash_attention", "ubatch_size"):
        assert old not in names


@pytest.mark.parametrize("cls, kwargs, field", [
    (SamplingConfig, {"temperature": -1}, "temperature"),
    (SamplingConfig, {"temperature": math.nan}, "temperature"),
    (SamplingConfig, {"top_k": -3}, "top_k"),
    (SamplingConfig, {"top_p": 2.0}, "top_p"),
    (SamplingConfig, {"top_p": 0.0}, "top_p"),
    (SamplingConfig, {"min_p": 1.5}, "min_p"),
    (SamplingConfig, {"typical_p": 0}, "typical_p"),
    (SamplingConfig, {"repeat_penalty": 0}, "repeat_penalty"),
    (SamplingConfig, {"penalty_last_n": -2}, "penalty_last_n"),
    (SamplingConfig, {"seed": -1}, "seed"),
    (SamplingConfig, {"seed": 2**32}, "seed"),
    (SamplingConfig, {"seed": 1.5}, "seed"),
    (SamplingConfig, {"mirostat": 3}, "mirostat"),
    (SamplingConfig, {"dry_base": 0.5}, "dry_base"),
    (SamplingConfig, {"xtc_probability": 1.5}, "xtc_probability"),
    (SamplingConfig, {"logit_bias": {-1: 1.0}}, "logit_bias"),
    (SamplingConfig, {"logit_bias": {1: math.nan}}, "logit_bias"),
    (SamplingConfig, {"logit_bias": [1, 2]}, "logit_bias"),
    (SamplingConfig, {"grammar": "  "}, "grammar"),
    (SamplingConfig, {"top_k": True}, "top_k"),
    (SamplingConfig, {"top_k": "40"}, "top_k"),
    (SamplingConfig, {"temperature": "0.5"}, "temperature"),
    (ContextConfig, {"n_ctx": -1}, "n_ctx"),
    (ContextConfig, {"n_ctx": 1.5}, "n_ctx"),
    (ContextConfig, {"n_threads": -7}, "n_threads"),
    (ContextConfig, {"n_batch": 0}, "n_batch"),
    (ContextConfig, {"n_ubatch": 1024}, "n_ubatch"),
    (ContextConfig, {"flash_attn": "yes"}, "flash_attn"),
    (ContextConfig, {"type_k": "q9"}, "type_k"),
    (ContextConfig, {"embeddings": 1}, "embeddings"),
    (ContextConfig, {"kv_unified": "no"}, "kv_unified"),
    (EngineConfig, {"n_parallel": 0}, "n_parallel"),
    (EngineConfig, {"max_queue": -1}, "max_queue"),
    (GenerationConfig, {"max_tokens": -1}, "max_tokens"),
    (GenerationConfig, {"stop": [1]}, "stop"),
    (GenerationConfig, {"stop": [""]}, "stop"),
    (GenerationConfig, {"stop": {"a": 1}}, "stop"),
    (GenerationConfig, {"stop": ["\ud800"]}, "stop"),
    (GenerationConfig, {"add_special": "yes"}, "add_special"),
    (GenerationConfig, {"logprobs": 21}, "logprobs"),
])
def test_invalid_values_name_field_and_value(cls, kwargs, field) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        cls(**kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert field in message
    value = next(iter(kwargs.values()))
    shown = [repr(value)[:10], str(value)[:10]]
    if isinstance(value, dict):
        shown += [repr(v) for v in value.values()]
    if isinstance(value, list):
        shown += [repr(v) for v in value]
    assert any(s in message for s in shown), message


@pytest.mark.parametrize("kwargs", [{"path": 3}, {"path": ""},
                                    {"path": "m", "n_gpu_layers": -2},
                                    {"path": "m", "tensor_split": (1, -1)},
                                    {"path": "m", "split_mode": "diagonal"},
                                    {"path": "m", "kv_overrides": {"k": [1]}},
                                    {"path": "m", "devices": "CPU\0"}])
def test_model_config_invalid(kwargs) -> None:
    with pytest.raises(InvalidArgumentError):
        ModelConfig(**kwargs)


def test_numpy_scalars_are_taken_by_value() -> None:
    c = ContextConfig(n_ctx=np.int64(4096), embeddings=np.bool_(True))
    assert c.n_ctx == 4096 and type(c.n_ctx) is int and c.embeddings is True
    s = SamplingConfig(temperature=np.float32(0.5), top_k=np.int32(7))
    assert s.top_k == 7 and type(s.top_k) is int and s.temperature == 0.5


def test_immutable_and_with() -> None:
    s = SamplingConfig(seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 2  # type: ignore[misc]
    t = s.with_(temperature=0.0)
    assert t.greedy and s.temperature == 0.8
    with pytest.raises(InvalidArgumentError):
        s.with_(temperature=-5)
    with pytest.raises(InvalidArgumentError, match="no option"):
        s.with_(tempreature=1)
    bias = {5: 1.0}
    cfg = SamplingConfig(logit_bias=bias)
    bias[6] = 2.0  # the caller's dict is not shared
    assert dict(cfg.logit_bias) == {5: 1.0}
    assert hash(cfg) == hash(SamplingConfig(logit_bias={5: 1.0}))
    assert GenerationConfig(stop="x").stop == ("x",)
    stops = ["a", "b"]
    g = GenerationConfig(stop=stops)
    stops.append("c")
    assert g.stop == ("a", "b")


@pytest.mark.parametrize("name, bad", [("top_k", -1), ("top_p", 0.0), ("min_p", 2.0),
                                       ("typical_p", 0.0), ("temperature", -0.5),
                                       ("top_n_sigma", -2.0), ("xtc_probability", 1.5),
                                       ("mirostat_eta", 0.0)])
def test_core_sampler_follows_the_same_rule(name: str, bad: float) -> None:
    """A value the config refuses, the core's Sampler refuses with the same message."""
    with pytest.raises(InvalidArgumentError) as from_config:
        SamplingConfig(**{name: bad})
    adders = {"top_k": "add_top_k", "top_p": "add_top_p", "min_p": "add_min_p",
              "typical_p": "add_typical", "temperature": "add_temperature",
              "top_n_sigma": "add_top_n_sigma", "xtc_probability": "add_xtc",
              "mirostat_eta": "add_mirostat_v2"}
    with llamabind.Sampler() as s, pytest.raises(InvalidArgumentError) as from_core:
        if name == "mirostat_eta":
            s.add_mirostat_v2(5.0, bad)
        else:
            getattr(s, adders[name])(bad)
    assert str(from_core.value) == str(from_config.value)
    # and the bound values the config takes, the core takes too
    good = default_option(SamplingConfig, name)
    with llamabind.Sampler() as s:
        if name == "mirostat_eta":
            s.add_mirostat_v2(5.0, good)
        else:
            getattr(s, adders[name])(good)


def test_flags_follow_one_rule() -> None:
    for value in (0, 1, "yes", None, 2.0):
        with pytest.raises(InvalidArgumentError):
            check_option(ContextConfig, "embeddings", value)
        with pytest.raises(InvalidArgumentError):
            llamabind.Sampler(perf=value)
    assert check_option(ContextConfig, "embeddings", np.bool_(False)) is False


def test_specs_describe_their_values() -> None:
    assert spec_of(ContextConfig, "n_ctx").cli == ("-c", "--ctx-size")
    assert spec_of(SamplingConfig, "temperature").cli == ("--temp",)
    assert "2^24" in spec_of(ContextConfig, "n_ctx").expected()
    assert default_option(ContextConfig, "type_k") == "f16"
