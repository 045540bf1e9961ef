"""Config classes validate at construction and are immutable (no model needed)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from llamabind import (
    ContextConfig,
    GenerationConfig,
    InvalidArgumentError,
    ModelConfig,
    SamplingConfig,
)
from llamabind._llama import StopMatcher


def test_defaults() -> None:
    assert ContextConfig().context_length == 2048
    s = SamplingConfig()
    assert s.seed is None and not s.greedy
    assert SamplingConfig(temperature=0).greedy
    assert GenerationConfig().max_tokens == 256
    assert ModelConfig("m.gguf").n_gpu_layers is None


@pytest.mark.parametrize("cls, kwargs, field", [
    (SamplingConfig, {"temperature": -1}, "temperature"),
    (SamplingConfig, {"temperature": math.nan}, "temperature"),
    (SamplingConfig, {"top_k": -3}, "top_k"),
    (SamplingConfig, {"top_p": 2.0}, "top_p"),
    (SamplingConfig, {"top_p": 0.0}, "top_p"),
    (SamplingConfig, {"min_p": 1.5}, "min_p"),
    (SamplingConfig, {"typical_p": 0}, "typical_p"),
    (SamplingConfig, {"repeat_penalty": 0}, "repeat_penalty"),
    (SamplingConfig, {"penalty_last_n": -1}, "penalty_last_n"),
    (SamplingConfig, {"seed": -1}, "seed"),
    (SamplingConfig, {"seed": 2**32}, "seed"),
    (SamplingConfig, {"seed": 1.5}, "seed"),
    (SamplingConfig, {"logit_bias": {-1: 1.0}}, "logit_bias"),
    (SamplingConfig, {"logit_bias": {1: math.nan}}, "logit_bias"),
    (SamplingConfig, {"logit_bias": [1, 2]}, "logit_bias"),
    (SamplingConfig, {"grammar": "  "}, "grammar"),
    (SamplingConfig, {"top_k": True}, "top_k"),
    (ContextConfig, {"context_length": 0}, "context_length"),
    (ContextConfig, {"context_length": 1.5}, "context_length"),
    (ContextConfig, {"threads": -7}, "threads"),
    (ContextConfig, {"batch_size": 0}, "batch_size"),
    (ContextConfig, {"ubatch_size": 1024}, "ubatch_size"),
    (ContextConfig, {"flash_attention": "yes"}, "flash_attention"),
    (ContextConfig, {"kv_cache_type": "q9"}, "kv_cache_type"),
    (GenerationConfig, {"max_tokens": -1}, "max_tokens"),
    (GenerationConfig, {"stop": [1]}, "stop"),
    (GenerationConfig, {"stop": [""]}, "stop"),
    (GenerationConfig, {"stop": {"a": 1}}, "stop"),
    (GenerationConfig, {"stop": ["\ud800"]}, "stop"),
    (GenerationConfig, {"add_bos": "yes"}, "add_bos"),
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
                                    {"path": "m", "split_mode": "diagonal"}])
def test_model_config_invalid(kwargs) -> None:
    with pytest.raises(InvalidArgumentError):
        ModelConfig(**kwargs)


def test_immutable_and_with() -> None:
    s = SamplingConfig(seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 2  # type: ignore[misc]
    t = s.with_(temperature=0.0)
    assert t.greedy and s.temperature == 0.8
    with pytest.raises(InvalidArgumentError):
        s.with_(temperature=-5)
    with pytest.raises(InvalidArgumentError, match="no field"):
        s.with_(tempreature=1)
    bias = {5: 1.0}
    cfg = SamplingConfig(logit_bias=bias)
    bias[6] = 2.0  # the caller's dict is not shared
    assert dict(cfg.logit_bias) == {5: 1.0}
    assert hash(cfg) == hash(SamplingConfig(logit_bias={5: 1.0}))
    assert GenerationConfig(stop="x").stop == ("x",)


def test_stop_matcher_holds_back_prefixes() -> None:
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello <") == ("hello ", None)
    assert m.feed("/e") == ("", None)
    assert m.feed("nd> more") == ("", "</end>")
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", None)
    assert m.feed("ART") == ("START", None)
    assert m.feed("xS") == ("x", None)
    assert m.flush() == "S"
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", None)
    m = StopMatcher(["ab", "b"])
    assert m.feed("xab") == ("x", "ab")
    # the earliest match wins; at the same place, the first listed
    assert StopMatcher(["abc", "ab"]).feed("xabcd") == ("x", "abc")
    assert StopMatcher(["bc", "ab"]).feed("xabcd") == ("x", "ab")
    m = StopMatcher(["\u00e9t\u00e9", "\u65e5"])
    assert m.byte_stops == ("\u00e9t\u00e9".encode(), "\u65e5".encode())
    assert m.feed("l'\u00e9") == ("l'", None)
    assert m.feed("t") == ("", None)
    assert m.flush() == "\u00e9t"
    assert StopMatcher(["a\ufffd"]).byte_stops is None
    for bad in ("x", [""], ["ok", b"bytes"], [None], 3):
        with pytest.raises(InvalidArgumentError, match="stops"):
            StopMatcher(bad)
    with pytest.raises(InvalidArgumentError, match="lone surrogates"):
        StopMatcher(["\ud800"])
    with pytest.raises(InvalidArgumentError, match="got None"):
        StopMatcher([]).feed(None)  # type: ignore[arg-type]
