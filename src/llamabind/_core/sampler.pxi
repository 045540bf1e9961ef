# Sampler: a llama.cpp sampler chain (llama_sampler). Each add_* appends one of
# llama.cpp's samplers after checking its parameters; sampling and accepting run in
# C with the GIL released. Samplers that read the vocabulary (grammar, DRY, infill,
# logit bias) pin their model so it cannot be freed under them.

# How many of the best tokens a refused choice is picked again from, first and then,
# before the whole vocabulary is masked (Sampler._resample); and the fewest candidates
# worth asking a grammar about through the model's probe index (Sampler._apply_chain).
cdef enum:
    _WINDOW_SMALL = 64
    _WINDOW = 512
    _INDEX_MIN = 4096


cdef enum:  # what _grammar_scan finds in a GBNF grammar
    _GRAMMAR_TOKENS = 1         # token-id elements are possible
    _GRAMMAR_NEGATED_WIDE = 2   # a negated class may list a non-ASCII character


cdef int _hex_value(const unsigned char * p, Py_ssize_t i, Py_ssize_t n, int digits):
    """The value of up to ``digits`` hex digits at ``p[i:]`` (escapes in a class)."""
    cdef int v = 0, d, c
    for d in range(digits):
        if i + d >= n:
            break
        c = p[i + d]
        if 48 <= c <= 57:
            v = v * 16 + c - 48
        elif 97 <= c <= 102:
            v = v * 16 + c - 87
        elif 65 <= c <= 70:
            v = v * 16 + c - 55
        else:
            break
    return v


cdef int _grammar_scan(bytes grammar):
    """What limits the probe index (grammar_index.h) for a GBNF grammar: a ``<`` outside
    string literals, character classes and comments (token-id elements: ``<[id]>``,
    ``<name>``, ``!<...>`` decide tokens by id, so no probe stands for them), and a
    negated class (``[^...]``) listing a character beyond ASCII, by byte or escape
    (llama.cpp's test of a lone lead byte against it is not exact). Either may be a
    false alarm; that only costs speed."""
    cdef const unsigned char * p = grammar
    cdef Py_ssize_t n = len(grammar), i = 0
    cdef unsigned char c, close
    cdef bint negated
    cdef int found = 0
    while i < n:
        c = p[i]
        if c == 34 or c == 91:   # '"' or '['
            close = 34 if c == 34 else 93
            negated = c == 91 and i + 1 < n and p[i + 1] == 94   # "[^"
            i += 1
            while i < n and p[i] != close:
                if negated and p[i] >= 0x80:
                    found |= _GRAMMAR_NEGATED_WIDE
                if p[i] == 92 and i + 1 < n:   # a backslash escape
                    if negated and (
                            (p[i + 1] == 120 and _hex_value(p, i + 2, n, 2) >= 0x80)
                            or (p[i + 1] == 117 and _hex_value(p, i + 2, n, 4) >= 0x80)
                            or (p[i + 1] == 85 and _hex_value(p, i + 2, n, 8) >= 0x80)):
                        found |= _GRAMMAR_NEGATED_WIDE
                    i += 2
                else:
                    i += 1
        elif c == 35:   # '#': a comment to the end of the line
            while i < n and p[i] != 10:
                i += 1
        elif c == 60:   # '<'
            found |= _GRAMMAR_TOKENS
        i += 1
    return found


cdef uint32_t _resolve_seed(object seed) except? 0xFFFFFFFF:
    if seed is None:
        return LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed
    return <uint32_t>_option(_SamplingConfig, "seed", seed)


cdef int32_t _last_n(object last_n, str name, object n_ctx) except? -2:
    """A look-back length: -1 means the context (llama.cpp's tools resolve it so too;
    its samplers take -1 as 0, "off")."""
    if last_n != -1:
        return last_n
    if n_ctx is None:
        raise InvalidArgumentError(f"{name}=-1 (the whole context) needs n_ctx")
    return _int_arg(n_ctx, "n_ctx", 1, 1 << 24)


cdef llama_token _selected(const llama_token_data_array * arr) except -1:
    """The token a chain selected in ``arr``."""
    if arr.selected < 0 or arr.selected >= <int64_t>arr.size:
        raise SamplingError(f"the sampler chain selected no token (index {arr.selected})")
    return arr.data[arr.selected].id


@cython.no_gc_clear  # __dealloc__ frees samplers that read the models in self._models
cdef class Sampler(_NativeObject):
    """A chain of llama.cpp samplers, built with ``add_*`` methods (each returns
    the sampler, so calls chain)::

        s = Sampler().add_top_k(40).add_top_p(0.95).add_temperature(0.8).add_dist(seed=1)
        token = s.sample(ctx)

    The chain must end with a sampler that selects a token (``add_dist``,
    ``add_greedy``, ``add_mirostat*``).
    """

    cdef llama_sampler * _ptr
    cdef list _names
    cdef list _models      # models pinned by vocabulary-reading samplers
    cdef bint _selects      # the chain ends with a selecting sampler
    cdef int _grammar_index  # position of a grammar sampler in the chain, or -1
    cdef int32_t _grammar_n_vocab  # the vocabulary size of the grammar's model
    cdef int64_t _grammar_picks     # tokens picked with a grammar in the chain
    cdef int64_t _grammar_resamples  # of which the grammar refused the first choice
    cdef int64_t _grammar_full_masks  # of which the whole vocabulary had to be masked
    cdef int32_t _top_k             # k of the chain's top_k sampler (0: none)
    cdef float _min_p               # p of the chain's first min_p sampler (0: none)
    cdef size_t _min_keep           # the largest min_keep of its top_p/min_p samplers
    cdef llama_sampler * _window    # top-k over _WINDOW tokens, for narrow resampling
    cdef llama_sampler * _window_small  # top-k over _WINDOW_SMALL tokens, tried first
    cdef Model _grammar_model       # the grammar's model (pinned in _models)
    cdef bint _grammar_indexed      # its grammar may be asked through the probe index
    cdef bint _grammar_lead_ok      # ... with its lead-byte probes too
    cdef bint _index_off            # test hook: never use the probe index
    cdef int32_t _grammar_pending   # UTF-8 continuation bytes the grammar still owes
    cdef bint _narrow               # resample over the window first (see _resample)
    cdef llama_token_data * _cur  # candidates buffer for sampling with a grammar
    cdef size_t _cur_cap

    def __cinit__(self):
        self._ptr = NULL
        self._cur = NULL
        self._cur_cap = 0
        self._names = []
        self._models = []
        self._selects = False
        self._grammar_index = -1
        self._window = NULL
        self._window_small = NULL
        self._narrow = True
        self._grammar_model = None

    def __init__(self, *, perf=False):
        perf = _bool_arg(perf, "perf")
        self._check_new()
        cdef llama_sampler_chain_params params = llama_sampler_chain_default_params()
        params.no_perf = not perf
        self._ptr = llama_sampler_chain_init(params)
        if self._ptr == NULL:
            raise SamplingError("llama.cpp could not create a sampler chain")
        self._opened(True)

    cdef object _add(self, llama_sampler * smpl, str name, bint selects, Model model=None):
        """Append ``smpl`` (made by the caller; freed here if it cannot be added)."""
        if smpl == NULL:
            raise _native_error(SamplingError, f"llama.cpp could not create the {name} sampler")
        try:
            self._check_idle()
            if model is not None:
                model._pin()
        except BaseException:
            llama_sampler_free(smpl)
            raise
        llama_sampler_chain_add(self._ptr, smpl)
        self._names.append(name)
        self._selects = selects
        if model is not None:
            self._models.append(model)
        return self

    # --- lifetime (_NativeObject): busy while it samples ------------------------------

    cdef void _free_native(self) noexcept:
        if self._ptr != NULL:
            llama_sampler_free(self._ptr)
            self._ptr = NULL
        if self._window != NULL:
            llama_sampler_free(self._window)
            self._window = NULL
        if self._window_small != NULL:
            llama_sampler_free(self._window_small)
            self._window_small = NULL
        free(self._cur)
        self._cur = NULL
        self._cur_cap = 0
        models, self._models = self._models, []
        for m in models:
            (<Model>m)._unpin()

    def __dealloc__(self):
        self._finalize()

    @property
    def names(self):
        """The samplers in the chain, in order."""
        return list(self._names)

    def __len__(self):
        return len(self._names)

    def __repr__(self):
        return f"<llamabind.Sampler {' -> '.join(self._names) or '(empty)'}>"

    @property
    def seed(self):
        """The seed actually used by the chain's random sampler (drawn if None)."""
        self._check()
        return llama_sampler_get_seed(self._ptr)

    # --- the samplers --------------------------------------------------------------

    # Every value is checked by the rule of the SamplingConfig option of the same
    # meaning (llamabind.config); an argument left as None takes that option's default.

    def add_greedy(self):
        """Pick the most likely token."""
        self._check()
        return self._add(llama_sampler_init_greedy(), "greedy", True)

    def add_dist(self, seed=None):
        """Draw a token from the distribution; ``seed=None`` draws a random seed."""
        self._check()
        return self._add(llama_sampler_init_dist(_resolve_seed(seed)), "dist", True)

    def add_top_k(self, k):
        """Keep the ``k`` most likely tokens (0: all)."""
        self._check()
        cdef int32_t kk = _option(_SamplingConfig, "top_k", k)
        self._add(llama_sampler_init_top_k(kk), "top_k", False)
        if self._top_k == 0 and kk > 0:
            self._top_k = kk
        return self

    def add_top_p(self, p, min_keep=None):
        """Nucleus sampling: keep the smallest set with cumulative probability >= p."""
        self._check()
        cdef float pp = _option(_SamplingConfig, "top_p", p)
        cdef size_t mk = _option(_SamplingConfig, "min_keep", min_keep)
        self._min_keep = max(self._min_keep, mk)
        return self._add(llama_sampler_init_top_p(pp, mk), "top_p", False)

    def add_min_p(self, p, min_keep=None):
        """Drop tokens less likely than ``p`` times the most likely one."""
        self._check()
        cdef float pp = _option(_SamplingConfig, "min_p", p)
        cdef size_t mk = _option(_SamplingConfig, "min_keep", min_keep)
        self._add(llama_sampler_init_min_p(pp, mk), "min_p", False)
        if self._min_p == 0 and pp > 0:
            self._min_p = pp
        self._min_keep = max(self._min_keep, mk)
        return self

    def add_typical(self, p, min_keep=None):
        """Locally typical sampling with mass ``p`` (1.0 disables)."""
        self._check()
        cdef float pp = _option(_SamplingConfig, "typical_p", p)
        cdef size_t mk = _option(_SamplingConfig, "min_keep", min_keep)
        return self._add(llama_sampler_init_typical(pp, mk), "typical", False)

    def add_temperature(self, t):
        """Divide logits by ``t`` (0 keeps only the most likely token)."""
        self._check()
        cdef float tt = _option(_SamplingConfig, "temperature", t)
        return self._add(llama_sampler_init_temp(tt), "temperature", False)

    def add_temperature_ext(self, t, delta=None, exponent=None):
        """Dynamic temperature in [t - delta, t + delta] by entropy, with ``exponent``."""
        self._check()
        cdef float tt = _option(_SamplingConfig, "temperature", t)
        cdef float dd = _option(_SamplingConfig, "dynatemp_range", delta)
        cdef float ee = _option(_SamplingConfig, "dynatemp_exponent", exponent)
        return self._add(llama_sampler_init_temp_ext(tt, dd, ee), "temperature_ext", False)

    def add_xtc(self, probability, threshold=None, min_keep=None, seed=None):
        """Exclude Top Choices: with ``probability``, drop all but the least likely of
        the tokens above ``threshold``."""
        self._check()
        cdef float pp = _option(_SamplingConfig, "xtc_probability", probability)
        cdef float tt = _option(_SamplingConfig, "xtc_threshold", threshold)
        cdef size_t mk = _option(_SamplingConfig, "min_keep", min_keep)
        return self._add(llama_sampler_init_xtc(pp, tt, mk, _resolve_seed(seed)), "xtc", False)

    def add_top_n_sigma(self, n):
        """Keep tokens within ``n`` standard deviations of the top logit (<= 0: all)."""
        self._check()
        cdef float nn = _option(_SamplingConfig, "top_n_sigma", n)
        return self._add(llama_sampler_init_top_n_sigma(nn), "top_n_sigma", False)

    def add_mirostat(self, n_vocab, tau=None, eta=None, m=100, seed=None):
        """Mirostat v1 (selects the token): target surprise ``tau``, rate ``eta``."""
        self._check()
        n_vocab = _int_arg(n_vocab, "n_vocab", 1, 2147483647)
        m = _int_arg(m, "m", 1, 2147483647)
        cdef float t = _option(_SamplingConfig, "mirostat_tau", tau)
        cdef float e = _option(_SamplingConfig, "mirostat_eta", eta)
        return self._add(llama_sampler_init_mirostat(n_vocab, _resolve_seed(seed), t, e, m),
                         "mirostat", True)

    def add_mirostat_v2(self, tau=None, eta=None, seed=None):
        """Mirostat v2 (selects the token)."""
        self._check()
        cdef float t = _option(_SamplingConfig, "mirostat_tau", tau)
        cdef float e = _option(_SamplingConfig, "mirostat_eta", eta)
        return self._add(llama_sampler_init_mirostat_v2(_resolve_seed(seed), t, e),
                         "mirostat_v2", True)

    def add_penalties(self, n_vocab, last_n=None, repeat=None, frequency=None,
                      presence=None, n_ctx=None):
        """Repetition penalties over the last ``last_n`` accepted tokens (0 disables,
        -1: the context, which then needs ``n_ctx``); ``n_vocab`` is the model's
        vocabulary size (``model.n_vocab``)."""
        self._check()
        n_vocab = _int_arg(n_vocab, "n_vocab", 1, 2147483647)
        cdef int32_t ln = _last_n(_option(_SamplingConfig, "penalty_last_n", last_n),
                                  "penalty_last_n", n_ctx)
        cdef float r = _option(_SamplingConfig, "repeat_penalty", repeat)
        cdef float f = _option(_SamplingConfig, "frequency_penalty", frequency)
        cdef float p = _option(_SamplingConfig, "presence_penalty", presence)
        return self._add(llama_sampler_init_penalties(n_vocab, ln, r, f, p), "penalties", False)

    def add_dry(self, Model model not None, multiplier, base=None, allowed_length=None,
                last_n=None, seq_breakers=None, n_ctx=None):
        """DRY ("don't repeat yourself") penalty; ``last_n=-1`` covers the context
        (then ``n_ctx`` is needed)."""
        self._check()
        model._check()
        cdef float mult = _option(_SamplingConfig, "dry_multiplier", multiplier)
        cdef float b = _option(_SamplingConfig, "dry_base", base)
        cdef int32_t al = _option(_SamplingConfig, "dry_allowed_length", allowed_length)
        cdef int32_t ln = _last_n(_option(_SamplingConfig, "dry_penalty_last_n", last_n),
                                  "dry_penalty_last_n", n_ctx)
        breakers = _option(_SamplingConfig, "dry_sequence_breakers", seq_breakers)
        encoded = [_utf8(s, f"seq_breakers[{i}]") for i, s in enumerate(breakers)]
        cdef const char ** arr = <const char **>malloc(max(len(encoded), 1) * sizeof(char *))
        if arr == NULL:
            raise MemoryError()
        try:
            for i, e in enumerate(encoded):
                arr[i] = <const char *>e
            smpl = self._add(llama_sampler_init_dry(model._vocab, mult, b, al, ln, arr,
                                                    len(encoded)), "dry", False, model)
        finally:
            free(arr)
        return smpl

    def add_logit_bias(self, Model model not None, bias):
        """Add ``bias[token]`` to the logit of each token (a dict token -> float;
        ``float('-inf')`` bans a token)."""
        self._check()
        model._check()
        checked = _option(_SamplingConfig, "logit_bias", bias)
        cdef Py_ssize_t n = len(checked)
        cdef llama_logit_bias * arr = <llama_logit_bias *>malloc(max(n, 1) * sizeof(llama_logit_bias))
        if arr == NULL:
            raise MemoryError()
        try:
            for i, (tok, value) in enumerate(checked.items()):
                if tok >= model._n_vocab:
                    raise InvalidArgumentError(
                        f"logit_bias token {tok} is not in the vocabulary ({model._n_vocab} "
                        f"tokens: 0..{model._n_vocab - 1})")
                arr[i].token = tok
                arr[i].bias = value
            return self._add(llama_sampler_init_logit_bias(model._n_vocab, n, arr),
                             "logit_bias", False, model)
        finally:
            free(arr)

    def add_grammar(self, Model model not None, grammar, root="root", trigger_patterns=None,
                    trigger_tokens=None):
        """Constrain output to a GBNF grammar. With ``trigger_patterns`` (regexes) or
        ``trigger_tokens`` the grammar is lazy: it applies from the first trigger on."""
        self._check()
        model._check()
        g = _utf8(grammar, "grammar")
        r = _utf8(root, "root")
        if not g.strip():
            raise GrammarError("grammar is empty")
        cdef llama_sampler * smpl
        cdef const char ** pats = NULL
        cdef llama_token * toks = NULL
        lazy = trigger_patterns is not None or trigger_tokens is not None
        _take_recent_errors()
        if not lazy:
            smpl = llama_sampler_init_grammar(model._vocab, g, r)
        else:
            if isinstance(trigger_patterns, str):
                raise InvalidArgumentError("trigger_patterns must be a sequence of str")
            pat_bytes = [_utf8(p, f"trigger_patterns[{i}]")
                         for i, p in enumerate(trigger_patterns or ())]
            tok_arr = _token_array(list(trigger_tokens or ()), model._n_vocab, "trigger_tokens")
            pats = <const char **>malloc(max(len(pat_bytes), 1) * sizeof(char *))
            toks = <llama_token *>malloc(max(len(tok_arr), 1) * sizeof(llama_token))
            try:
                if pats == NULL or toks == NULL:
                    raise MemoryError()
                for i, p in enumerate(pat_bytes):
                    pats[i] = <const char *>p
                for i, t in enumerate(tok_arr):
                    toks[i] = t
                smpl = llama_sampler_init_grammar_lazy_patterns(
                    model._vocab, g, r, pats, len(pat_bytes), toks, len(tok_arr))
            finally:
                free(pats)
                free(toks)
        if smpl == NULL:
            raise _native_error(GrammarError, "invalid grammar", "parse error")
        if self._grammar_index >= 0:
            llama_sampler_free(smpl)
            raise InvalidArgumentError("this sampler chain already has a grammar")
        self._add(smpl, "grammar", False, model)
        self._grammar_index = len(self._names) - 1
        self._grammar_n_vocab = model._n_vocab
        self._grammar_model = model
        # a lazy grammar starts from the trigger's text, whose UTF-8 state is not tracked
        found = _grammar_scan(g)
        self._grammar_indexed = not lazy and not (found & _GRAMMAR_TOKENS)
        self._grammar_lead_ok = not (found & _GRAMMAR_NEGATED_WIDE)
        self._grammar_pending = 0
        if self._grammar_indexed:
            model._grammar_index()   # built once per model, here rather than mid-output
        return self

    def add_infill(self, Model model not None):
        """Fill-in-the-middle helper sampler (for FIM models). It needs a ``top_k``
        earlier in the chain, as llama.cpp's own sampler setup has: the infill sampler
        compares every candidate with every other, O(n^2) over the whole vocabulary
        (minutes per token for 150k tokens)."""
        self._check()
        model._check()
        if "top_k" not in self._names:
            raise InvalidArgumentError(
                "add_infill needs add_top_k(...) earlier in the chain: over the whole "
                f"vocabulary ({model._n_vocab} tokens) the infill sampler is O(n^2)")
        return self._add(llama_sampler_init_infill(model._vocab), "infill", False, model)

    # --- use -----------------------------------------------------------------------

    def sample(self, Context ctx not None, idx=-1):
        """Sample a token from row ``idx`` of the context's last batch and accept it."""
        self._check()
        if not self._selects:
            raise SamplingError(
                "the sampler chain does not end with a token-selecting sampler "
                "(add_dist, add_greedy or add_mirostat)")
        ctx._enter()
        cdef llama_token tok
        cdef int32_t row
        try:
            row = ctx._resolve_row(_row_arg(idx, "idx"))
            tok = self._sample_row(ctx, row)
        finally:
            ctx._leave()
        return tok

    cdef llama_token _sample_row(self, Context ctx, int32_t row) except -1:
        """Caller holds ctx._enter(); row is validated. The sampler is claimed while it
        samples (a close() from another thread meanwhile frees it afterwards)."""
        cdef llama_token tok
        self._enter()
        try:
            if self._grammar_index >= 0:
                tok = self._sample_row_grammar(ctx, row)
            else:
                tok = self._sample_chain(ctx, row)
        finally:
            self._leave()
        return tok

    cdef llama_token _sample_chain(self, Context ctx, int32_t row) except -1:
        cdef llama_token tok
        try:
            with nogil:
                tok = llama_sampler_sample(self._ptr, ctx._ptr, row)
        except RuntimeError as exc:
            raise SamplingError(f"sampling failed: {exc}") from None
        if tok < 0 or tok >= ctx.n_vocab:
            raise SamplingError(
                f"no token could be sampled (got {tok}); a grammar may allow no token here")
        return tok

    cdef llama_token _sample_row_grammar(self, Context ctx, int32_t row) except -1:
        """Sampling with a grammar, as llama.cpp's common sampler does it (rejection
        sampling): the chain without the grammar picks a token, and the grammar is asked
        about that one token; only when it refuses is the grammar applied to the whole
        vocabulary and the token picked again. Masking 50k-150k tokens on every step is
        what makes grammars slow; most steps the model's own choice is allowed.

        A greedy chain (grammar, greedy) picks with the C argmax. The grammar is always
        asked before a token is accepted: llama.cpp aborts the process when a grammar
        is fed a token it does not allow (the chain picks one when the grammar allows
        no token at all: every logit is -inf)."""
        cdef int32_t n = ctx.n_vocab
        cdef const float * logits = llama_get_logits_ith(ctx._ptr, row)
        cdef llama_token tok
        if logits == NULL:
            raise SamplingError(f"the context has no logits for row {row}")
        self._grammar_picks += 1
        if self._grammar_index == 0 and len(self._names) == 2 and self._names[1] == "greedy":
            with nogil:
                tok = _argmax(logits, n)
        else:
            tok = self._apply_chain(logits, n, False)
        if not self._grammar_allows(tok):
            self._grammar_resamples += 1
            tok = self._resample(logits, n)
            if not self._grammar_allows(tok):
                raise GrammarError(
                    f"the chain chose token {tok}, which the grammar does not allow here: "
                    "the grammar allows no token at this point")
        self._accept(tok)
        return tok

    cdef llama_token _resample(self, const float * logits, int32_t n) except -1:
        """The grammar refused the chain's choice: pick again among the tokens it
        allows. llama.cpp masks the whole vocabulary and runs the chain again. The same
        result costs far less when the chain keeps only its ``k`` best tokens (a greedy
        chain: k = 1; else its top_k sampler, with only logit-changing samplers before
        it): the grammar is applied to the best tokens only (the _WINDOW_SMALL best,
        then the _WINDOW best, unless the probe index serves this grammar and none of
        the first were allowed), and when at least ``k`` of them are allowed, those are
        the ``k`` best allowed tokens of the whole vocabulary (every other token has a
        lower logit), so the rest of the chain sees what it would have seen.

        Fewer than ``k`` allowed (a JSON grammar between two values allows a handful of
        tokens) still serves a chain whose top_k is followed by top_p samplers and a
        min_p: the whole-vocabulary run would add allowed tokens from outside the window,
        all with logits at most the window's lowest; top_p may keep more tokens there
        (they add to its sum), but min_p drops every token below the best one's logit +
        log(p). So when the token after those the window run keeps (the next allowed
        one, else the window's lowest logit, a bound on every token outside it) is below
        that line, the whole-vocabulary run keeps the very same tokens, and the samplers
        after min_p see what they would have seen. Otherwise: the whole-vocabulary
        mask (through the model's probe index, grammar_index.h)."""
        cdef int32_t tail = -1
        cdef int32_t k = 0
        cdef int32_t i, size
        cdef int32_t upto = -1      # the min_p sampler that proves a short window exact
        cdef int32_t allowed = -1   # tokens the last window tried allowed (-1: none tried)
        cdef llama_token tok
        if self._narrow:
            for i, name in enumerate(self._names):
                if name == "top_k" or name == "greedy":
                    tail = i
                    k = self._top_k if name == "top_k" else 1
                    break
                if name not in ("logit_bias", "grammar", "penalties"):
                    break
        if tail >= 0 and k > 0:
            if self._names[tail] == "top_k" and self._min_p > 0 and self._min_keep <= 1:
                for i in range(tail + 1, len(self._names)):
                    if self._names[i] == "min_p":
                        upto = i
                        break
                    if self._names[i] != "top_p":
                        break
            for size in (_WINDOW_SMALL, _WINDOW):
                if n <= size:
                    break
                if size == _WINDOW and self._indexed_for(n) and allowed == 0:
                    # nothing allowed among the best: the allowed tokens are few, and the
                    # probe index finds them for less than a wider window would cost
                    break
                if k > size // 2 and upto < 0:
                    continue
                tok = self._resample_window(logits, n, size, tail, k, upto, &allowed)
                if tok >= 0:
                    return tok
        self._grammar_full_masks += 1
        return self._apply_chain(logits, n, True)

    cdef inline bint _indexed_for(self, int32_t n):
        """Whether the grammar is asked about ``n`` candidates through the probe index
        (grammar_index.h): enough of them, and a grammar the index serves exactly."""
        return (self._grammar_indexed and self._grammar_pending == 0 and n >= _INDEX_MIN
                and not self._index_off)

    cdef llama_token _resample_window(self, const float * logits, int32_t n, int32_t size,
                                      int32_t tail, int32_t k, int32_t upto,
                                      int32_t * n_allowed) except -2:
        """One window of _resample: the token, or -1 when this window cannot decide;
        ``n_allowed``: how many of its tokens the grammar allowed."""
        cdef int32_t i, j, allowed = 0
        cdef float lowest = 0, next_logit = 0
        cdef int32_t n_samplers = llama_sampler_chain_n(self._ptr)
        cdef llama_token_data_array arr
        cdef llama_sampler * grammar
        cdef llama_sampler * window = self._window_small if size == _WINDOW_SMALL \
            else self._window
        if window == NULL:
            window = llama_sampler_init_top_k(size)
            if window == NULL:
                raise MemoryError()
            if size == _WINDOW_SMALL:
                self._window_small = window
            else:
                self._window = window
        self._fill(logits, n, &arr)
        grammar = llama_sampler_chain_get(self._ptr, self._grammar_index)
        try:
            with nogil:
                for i in range(tail):
                    if i != self._grammar_index:
                        llama_sampler_apply(llama_sampler_chain_get(self._ptr, i), &arr)
                llama_sampler_apply(window, &arr)
                lowest = arr.data[arr.size - 1].logit   # the window is sorted
                llama_sampler_apply(grammar, &arr)
                # keep the allowed tokens, in their order: the window is sorted by
                # logit, and samplers trust that flag (greedy takes the first token)
                for j in range(<int32_t>arr.size):
                    if isfinite(arr.data[j].logit):
                        arr.data[allowed] = arr.data[j]
                        allowed += 1
                arr.size = allowed
                arr.selected = -1
                if allowed >= k:
                    for i in range(tail, n_samplers):
                        llama_sampler_apply(llama_sampler_chain_get(self._ptr, i), &arr)
                elif allowed > 0 and upto > 0:
                    for i in range(tail, upto + 1):
                        llama_sampler_apply(llama_sampler_chain_get(self._ptr, i), &arr)
                    # top_p and min_p keep a prefix of the sorted tokens, in place
                    next_logit = arr.data[arr.size].logit if <int32_t>arr.size < allowed \
                        else lowest
                    if next_logit < arr.data[0].logit + logf(self._min_p):
                        k = 0   # proved: the rest of the chain sees what it would have
                        for i in range(upto + 1, n_samplers):
                            llama_sampler_apply(llama_sampler_chain_get(self._ptr, i), &arr)
        except RuntimeError as exc:
            raise SamplingError(f"sampling failed: {exc}") from None
        n_allowed[0] = allowed
        if allowed < k or allowed == 0:
            return -1
        return _selected(&arr)

    cdef int _fill(self, const float * logits, int32_t n,
                   llama_token_data_array * arr) except -1:
        """``arr``: every token with its logit, in the sampler's candidates buffer."""
        cdef llama_token_data * cur
        cdef int32_t i
        if self._cur_cap < <size_t>n:
            cur = <llama_token_data *>realloc(self._cur, n * sizeof(llama_token_data))
            if cur == NULL:
                raise MemoryError()
            self._cur = cur
            self._cur_cap = n
        cur = self._cur
        with nogil:
            for i in range(n):
                cur[i].id = i
                cur[i].logit = logits[i]
                cur[i].p = 0.0
        arr.data = cur
        arr.size = n
        arr.selected = -1
        arr.sorted = False
        return 0

    def _resample_over_window(self, bint on):
        """Test and benchmark hook: with False, a refused choice is always picked again
        over the whole vocabulary, as llama.cpp does."""
        self._narrow = on

    def _use_grammar_index(self, bint on):
        """Test and benchmark hook: with False, the whole vocabulary is asked about
        token by token (llama.cpp's way), never through the probe index."""
        self._index_off = not on

    def _grammar_mask(self, bint indexed=True):
        """Test hook: the token ids the chain's grammar allows next, asked about the
        whole vocabulary through the probe index (when ``indexed`` and it serves this
        grammar now) or token by token, and which way: "index", "index+lead" (with the
        lead-byte probes too) or "plain"."""
        self._check()
        if self._grammar_index < 0:
            raise InvalidArgumentError("this sampler chain has no grammar")
        cdef int32_t n = self._grammar_n_vocab
        cdef llama_token_data_array arr
        cdef llamabind_grammar_index * index = NULL
        cdef llama_sampler * grammar = llama_sampler_chain_get(self._ptr, self._grammar_index)
        cdef float * zeros = <float *>calloc(max(n, 1), sizeof(float))
        if zeros == NULL:
            raise MemoryError()
        self._enter()
        try:
            if indexed and self._indexed_for(n):
                index = self._grammar_model._grammar_index()
            self._fill(zeros, n, &arr)
            try:
                if index != NULL:
                    llamabind_grammar_index_apply(index, grammar, &arr, self._grammar_lead_ok)
                else:
                    llama_sampler_apply(grammar, &arr)
            except RuntimeError as exc:
                raise SamplingError(f"the grammar failed: {exc}") from None
            allowed = [arr.data[i].id for i in range(n) if isfinite(arr.data[i].logit)]
        finally:
            free(zeros)
            self._leave()
        how = "plain" if index == NULL else ("index+lead" if self._grammar_lead_ok else "index")
        return allowed, how

    cdef llama_token _apply_chain(self, const float * logits, int32_t n,
                                  bint with_grammar) except -1:
        """Run the chain over all ``n`` logits (skipping the grammar unless
        ``with_grammar``) and return the token it selects."""
        cdef int32_t i, k
        cdef int32_t n_samplers = llama_sampler_chain_n(self._ptr)
        cdef int32_t skip = -1 if with_grammar else self._grammar_index
        cdef llama_token_data_array arr
        cdef llamabind_grammar_index * index = NULL
        if with_grammar and self._indexed_for(n):
            index = self._grammar_model._grammar_index()
        self._fill(logits, n, &arr)
        try:
            with nogil:
                for k in range(n_samplers):
                    if k == skip:
                        continue
                    if k == self._grammar_index and index != NULL:
                        llamabind_grammar_index_apply(
                            index, llama_sampler_chain_get(self._ptr, k), &arr,
                            self._grammar_lead_ok)
                    else:
                        llama_sampler_apply(llama_sampler_chain_get(self._ptr, k), &arr)
        except RuntimeError as exc:
            raise SamplingError(f"sampling failed: {exc}") from None
        return _selected(&arr)

    cdef int _accept(self, llama_token token) except -1:
        try:
            llama_sampler_accept(self._ptr, token)
        except RuntimeError as exc:
            raise SamplingError(f"accepting token {token} failed: {exc}") from None
        self._grammar_accepted(token)
        return 0

    cdef int _grammar_accepted(self, llama_token token) except -1:
        """Follow the grammar's pending UTF-8 bytes (the probe index needs none)."""
        if self._grammar_indexed:
            self._grammar_pending = llamabind_grammar_pending(
                self._grammar_model._vocab, self._grammar_pending, token)
        return 0

    cdef bint _grammar_allows(self, llama_token token) except -1:
        """Whether the chain's grammar sampler allows ``token`` next (one-token apply)."""
        cdef llama_token_data data
        cdef llama_token_data_array arr
        data.id = token
        data.logit = 0.0
        data.p = 0.0
        arr.data = &data
        arr.size = 1
        arr.selected = -1
        arr.sorted = False
        try:
            llama_sampler_apply(llama_sampler_chain_get(self._ptr, self._grammar_index), &arr)
        except RuntimeError as exc:
            raise SamplingError(f"the grammar failed on token {token}: {exc}") from None
        return isfinite(data.logit)

    def accept(self, token):
        """Tell stateful samplers (penalties, grammar...) that ``token`` was chosen.
        (``sample`` already does this for the token it returns.)"""
        self._check()
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 or token >= 2**31:
            raise InvalidArgumentError(f"token must be a non-negative int token id, got {token!r}")
        for m in self._models:
            if token >= (<Model>m)._n_vocab:
                raise InvalidArgumentError(
                    f"token {token} is not in the vocabulary ({(<Model>m)._n_vocab} tokens)")
        # llama.cpp aborts the process when a grammar is fed a token it forbids:
        # ask the grammar about this one token first.
        self._enter()
        try:
            if self._grammar_index >= 0 and not self._grammar_allows(token):
                raise GrammarError(f"token {token} is not allowed by the grammar at this point")
            self._accept(token)
        finally:
            self._leave()

    def accept_grammar(self, tokens):
        """Feed ``tokens`` to the chain's grammar only (the other samplers do not see
        them): text the grammar starts with that is already in the prompt, such as a
        chat template's assistant header."""
        self._check()
        if self._grammar_index < 0:
            raise InvalidArgumentError("this sampler chain has no grammar")
        arr = _token_array(list(tokens), self._grammar_n_vocab, "tokens")
        cdef llama_sampler * grammar
        self._enter()
        try:
            grammar = llama_sampler_chain_get(self._ptr, self._grammar_index)
            for tok in arr:
                if not self._grammar_allows(tok):
                    raise GrammarError(f"token {tok} is not allowed by the grammar at this point")
                try:
                    llama_sampler_accept(grammar, tok)
                except RuntimeError as exc:
                    raise SamplingError(f"the grammar failed on token {tok}: {exc}") from None
                self._grammar_accepted(tok)
        finally:
            self._leave()

    def reset(self):
        """Forget accepted tokens (and reseed nothing: the RNG keeps its state)."""
        self._check_idle()
        llama_sampler_reset(self._ptr)
        self._grammar_pending = 0

    def clone(self):
        """An independent copy of the chain with the same state."""
        cdef Sampler other = Sampler.__new__(Sampler)
        self._check_idle()
        other._ptr = llama_sampler_clone(self._ptr)
        if other._ptr == NULL:
            raise SamplingError("llama.cpp could not clone this sampler chain")
        other._opened(True)
        other._names = list(self._names)
        other._selects = self._selects
        other._grammar_index = self._grammar_index
        other._grammar_n_vocab = self._grammar_n_vocab
        other._top_k = self._top_k
        other._min_p = self._min_p
        other._min_keep = self._min_keep
        other._narrow = self._narrow
        other._grammar_model = self._grammar_model
        other._grammar_indexed = self._grammar_indexed
        other._grammar_lead_ok = self._grammar_lead_ok
        other._grammar_pending = self._grammar_pending
        try:
            for m in self._models:
                (<Model>m)._pin()
                other._models.append(m)
        except BaseException:
            other.close()
            raise
        return other

    def perf(self):
        self._check()
        cdef llama_perf_sampler_data d = llama_perf_sampler(self._ptr)
        return {"t_sample_ms": d.t_sample_ms, "n_sample": d.n_sample,
                "grammar_picks": self._grammar_picks,
                "grammar_resamples": self._grammar_resamples,
                "grammar_full_masks": self._grammar_full_masks}
