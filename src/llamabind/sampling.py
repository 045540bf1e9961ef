"""Options to configs, configs to llama.cpp sampler chains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llamabind import _llama
from llamabind.config import GenerationConfig, SamplingConfig
from llamabind.errors import InvalidArgumentError
from llamabind.structured import STRUCTURED_OPTIONS

if TYPE_CHECKING:
    from llamabind.structured import GenerationPlan

__all__ = ["build_sampler", "configs_from", "split_structured"]

_SAMPLING = SamplingConfig.names()
_GENERATION = GenerationConfig.names()


def configs_from(options: dict[str, Any]) -> tuple[SamplingConfig, GenerationConfig]:
    """SamplingConfig and GenerationConfig from keyword options: their fields by name,
    and/or whole configs as ``sampling=``/``generation=``."""
    sampling = options.pop("sampling", None)
    generation = options.pop("generation", None)
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InvalidArgumentError(f"sampling must be a SamplingConfig, got {sampling!r}")
    if generation is not None and not isinstance(generation, GenerationConfig):
        raise InvalidArgumentError(f"generation must be a GenerationConfig, got {generation!r}")
    unknown = sorted(set(options) - _SAMPLING - _GENERATION)
    if unknown:
        raise InvalidArgumentError(
            f"unknown generation option {unknown[0]!r}; options: "
            f"{sorted(_SAMPLING | _GENERATION)}")
    s_over = {k: v for k, v in options.items() if k in _SAMPLING}
    g_over = {k: v for k, v in options.items() if k in _GENERATION}
    s = sampling or SamplingConfig()
    g = generation or GenerationConfig()
    if s_over:
        s = s.with_(**s_over)
    if g_over:
        g = g.with_(**g_over)
    return s, g


def split_structured(options: dict[str, Any]) -> dict[str, Any]:
    """Take the structured-output options (llamabind.structured.STRUCTURED_OPTIONS:
    json_schema, response_format, schema, tools, tool_choice...) out of ``options``."""
    return {k: options.pop(k) for k in STRUCTURED_OPTIONS if k in options}


def build_sampler(model: _llama.Model, s: SamplingConfig, n_ctx: int,
                  plan: GenerationPlan | None = None) -> _llama.Sampler | None:
    """The llama.cpp sampler chain for ``s`` (and the grammar of a structured-output
    ``plan``), in llama.cpp's own order (its common_sampler): logit bias, grammar,
    penalties, DRY, top-n-sigma, top-k, typical-p, top-p, min-p, XTC, temperature, then
    the draw (or mirostat). None means plain greedy decoding (argmax in C)."""
    bias = dict(s.logit_bias)
    if s.ignore_eos and not s.greedy:
        for tok in _eog_tokens(model):
            bias[tok] = float("-inf")
    planned = plan is not None and plan.grammar is not None
    if (s.greedy and not bias and s.grammar is None and not s.has_penalties
            and s.dry_multiplier == 0.0 and not planned):
        return None
    chain = _llama.Sampler()
    try:
        if bias:
            chain.add_logit_bias(model, bias)
        if s.grammar is not None:
            chain.add_grammar(model, s.grammar)
        elif plan is not None:
            plan.add_to_sampler(chain, model)
        if s.has_penalties:
            chain.add_penalties(model.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                s.frequency_penalty, s.presence_penalty, n_ctx=n_ctx)
        if s.dry_multiplier != 0.0:
            chain.add_dry(model, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                          s.dry_penalty_last_n, s.dry_sequence_breakers, n_ctx=n_ctx)
        if s.greedy:
            chain.add_greedy()
            return chain
        if s.mirostat == 1:
            chain.add_temperature(s.temperature)
            chain.add_mirostat(model.n_vocab, s.mirostat_tau, s.mirostat_eta, seed=s.seed)
            return chain
        if s.mirostat == 2:
            chain.add_temperature(s.temperature)
            chain.add_mirostat_v2(s.mirostat_tau, s.mirostat_eta, seed=s.seed)
            return chain
        if s.top_n_sigma > 0:
            chain.add_top_n_sigma(s.top_n_sigma)
        if s.top_k > 0:
            chain.add_top_k(s.top_k)
        if s.typical_p < 1.0:
            chain.add_typical(s.typical_p, s.min_keep)
        if s.top_p < 1.0:
            chain.add_top_p(s.top_p, s.min_keep)
        if s.min_p > 0.0:
            chain.add_min_p(s.min_p, s.min_keep)
        if s.xtc_probability > 0.0:
            chain.add_xtc(s.xtc_probability, s.xtc_threshold, s.min_keep, seed=s.seed)
        if s.dynatemp_range > 0.0:
            chain.add_temperature_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent)
        else:
            chain.add_temperature(s.temperature)
        chain.add_dist(s.seed)
        return chain
    except BaseException:
        chain.close()
        raise


def _eog_tokens(model: _llama.Model) -> list[int]:
    vocab = model.vocab
    return [t for t in range(model.n_vocab) if vocab.is_eog(t)]
