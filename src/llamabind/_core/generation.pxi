# Generation: one sequence being generated, and the one token loop every way of
# generating goes through (TokenGenerator, Session.generate/stream, the batching engine).
#
# A decode leaves logits for the sequence; accept() picks the next token from them
# (greedy argmax in C, or a Sampler chain), ends the sequence at an end-of-generation
# token, a stop string, max_tokens or the end of its context, appends the token's bytes
# and holds back what could still become a stop string. take_text() turns the bytes
# that are safe into text as they come. Who decodes (one sequence on its own context,
# or many in one batch) is the caller's business.
#
# Stop strings are matched on the generated UTF-8 bytes: a stop matches where its UTF-8
# encoding occurs in what the model produced (as llama-server matches them), and the
# text before it is the output. For valid UTF-8 output this is the same as matching the
# text; where the model emits invalid bytes, they decode to U+FFFD in the text but are
# never matched by a U+FFFD in a stop string.

from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.math cimport INFINITY, exp, log


cdef extern from "string.h" nogil:
    void * memmem(const void * haystack, size_t haystacklen, const void * needle,
                  size_t needlelen)


cdef extern from "Python.h":
    str PyUnicode_DecodeUTF8Stateful(const char * s, Py_ssize_t size, const char * errors,
                                     Py_ssize_t * consumed)


def _argmax_floats(const float[::1] logits not None):
    """Test hook: the greedy argmax of a float32 array (-1 when it is empty): the first
    index of the largest value, NaNs never chosen (llama.cpp's greedy rule)."""
    cdef int32_t found = -1
    if logits.shape[0] > 2147483647:
        raise InvalidArgumentError(f"at most 2^31-1 logits, got {logits.shape[0]}")
    if logits.shape[0]:
        with nogil:
            found = llamabind_argmax(&logits[0], <int32_t>logits.shape[0])
    return found


cdef tuple _top_logprobs(const float * logits, int32_t n, llama_token chosen, int k):
    """(log-probability of ``chosen``, ((token, logprob), ...) of the k most likely
    tokens, most likely first) under the softmax of the raw logits."""
    cdef double mx = -1e300, total = 0.0, log_z
    cdef int32_t i, j
    cdef float v
    cdef int32_t best_tok[20]
    cdef float best_val[20]
    cdef int filled = 0
    k = min(k, 20)
    for i in range(n):
        v = logits[i]
        if v > mx:
            mx = v
    for i in range(n):
        total += exp(logits[i] - mx)
    log_z = mx + log(total)
    for i in range(n if k > 0 else 0):
        v = logits[i]
        if filled < k or v > best_val[filled - 1]:
            j = filled if filled < k else k - 1
            while j > 0 and best_val[j - 1] < v:
                best_val[j] = best_val[j - 1]
                best_tok[j] = best_tok[j - 1]
                j -= 1
            best_val[j] = v
            best_tok[j] = i
            if filled < k:
                filled += 1
    top = tuple([(best_tok[j], best_val[j] - log_z) for j in range(filled)])
    return logits[chosen] - log_z, top


cdef class Generation(_NativeObject):
    """One sequence being generated (the state of the one token loop).

    ``Generation(model, pos, sampler=None, *, max_tokens=256, stop=(), ignore_eos=False,
    logprobs=None, seq_id=0, n_ctx=..., render_special=False, preserved_tokens=())``:
    ``pos`` is where the first generated token will be decoded (the prompt's length),
    ``n_ctx`` the positions the sequence may use. ``sampler=None`` is greedy decoding.
    ``preserved_tokens``: special tokens rendered as their text (a tool-call marker a
    chat parser must see), as all are with ``render_special``.

    Speculative decoding: ``drafter`` (a Drafter) proposes up to ``draft_max`` tokens
    to follow the pending one from ``prompt`` (the prompt's token ids) and the output so
    far; they are decoded with it in one batch, and the sampler picks the next token
    from each row in turn for as long as it picks the drafted one (so it draws exactly
    as without a draft). The cells of the rows it did not reach are removed. Drafts
    shorter than ``draft_min`` are not tried; ``draft_p_min`` goes to a draft model.
    Drafting backs off while drafts are refused (see _adapt). ``n_drafted`` and
    ``n_draft_accepted`` count draft tokens tried and taken.

    After a decode that produced logits for this sequence, ``accept(ctx, row)`` picks
    the next token; ``step(ctx)`` decodes the pending token on ``ctx`` and accepts the
    next (one sequence on a context of its own); ``run(ctx)`` steps to the end. The
    generation ends with ``finish_reason`` "stop" (end-of-generation token or a stop
    string, named by ``stop_sequence``) or "length" (max_tokens or the context's end).
    ``take_text()`` returns the text that is safe to show since the last call: never
    any part of a stop string, never half a UTF-8 character; at the end, all the rest.
    """

    cdef Model _model
    cdef const llama_vocab * _vocab
    cdef int32_t _n_vocab
    cdef Sampler _sampler
    cdef readonly int max_tokens
    cdef readonly int n_generated
    cdef public int pos
    cdef public int seq_id
    cdef readonly int n_ctx
    cdef bint _ignore_eos
    cdef bint _render_special
    cdef tuple _stops
    cdef tuple _bstops
    cdef Py_ssize_t _longest
    cdef readonly list tokens
    cdef bytearray _out
    cdef Py_ssize_t _safe
    cdef Py_ssize_t _emitted
    cdef readonly object finish_reason
    cdef readonly object stop_sequence
    cdef readonly object last_piece
    cdef readonly object last_sampled
    cdef public object error
    cdef llama_token _next
    cdef bint _has_next
    cdef int _logprobs
    cdef readonly list logprobs
    cdef frozenset _preserved  # special tokens rendered as text (a tool-call marker)
    # speculative decoding (drafter not None)
    cdef Drafter _drafter
    cdef int32_t * _hist        # the prompt, then every token appended to ``tokens``
    cdef Py_ssize_t _n_hist
    cdef Py_ssize_t _hist_cap
    cdef int32_t * _draft       # the draft decoded after the pending token
    cdef int _n_draft
    cdef int _draft_max
    cdef int _draft_min
    cdef float _draft_p_min
    cdef int _spec_k            # the draft length tried now (adapted)
    cdef int _spec_skip         # steps left without drafting (backing off)
    cdef int _spec_misses       # drafts refused in a row
    cdef float _spec_rate       # the share of drafted tokens taken lately (see _adapt)
    cdef llama_batch _sbatch    # the pending token and its draft (own-context steps)
    cdef readonly int64_t n_drafted
    cdef readonly int64_t n_draft_accepted

    def __cinit__(self):
        self._hist = NULL
        self._draft = NULL
        self._drafter = None
        memset(&self._sbatch, 0, sizeof(llama_batch))

    cdef void _free_native(self) noexcept:
        free(self._hist)
        free(self._draft)
        self._hist = NULL
        self._draft = NULL
        _free_batch(&self._sbatch)

    def __init__(self, Model model not None, pos, Sampler sampler=None, *, max_tokens=256,
                 stop=(), ignore_eos=False, logprobs=None, seq_id=0, n_ctx=None,
                 render_special=False, preserved_tokens=(), Drafter drafter=None,
                 prompt=None, draft_max=16, draft_min=0, draft_p_min=0.75):
        self._check_new()
        model._check()
        self._preserved = frozenset()
        if preserved_tokens:
            self._preserved = frozenset(_token_array(list(preserved_tokens), model._n_vocab,
                                                     "preserved_tokens").tolist())
        self._ignore_eos = _bool_arg(ignore_eos, "ignore_eos")
        self._render_special = _bool_arg(render_special, "render_special")
        self.pos = _int_arg(pos, "pos", 0, 2147483646)
        self.max_tokens = _int_arg(max_tokens, "max_tokens", 0, 2147483647)
        self.seq_id = _int_arg(seq_id, "seq_id", 0, 2147483647)
        self.n_ctx = 2147483647 if n_ctx is None else _int_arg(n_ctx, "n_ctx", 1, 2147483647)
        self._logprobs = -1 if logprobs is None else _int_arg(logprobs, "logprobs", 0, 20)
        if sampler is not None:
            sampler._check()
            if not sampler._selects:
                raise SamplingError(
                    "the sampler chain does not end with a token-selecting sampler "
                    "(add_dist, add_greedy or add_mirostat)")
        if isinstance(stop, str) or not isinstance(stop, (tuple, list)):
            raise InvalidArgumentError(
                f"stop must be a tuple or list of str, got {type(stop).__name__}")
        stops = []
        for s in stop:
            if type(s) is not str or not s:
                raise InvalidArgumentError(f"stop strings must be non-empty str, got {s!r}")
            stops.append(_utf8(s, "stop string"))
        self._stops = tuple(stop)
        self._bstops = tuple(stops)
        self._longest = max([len(b) for b in stops], default=0)
        self._model = model
        self._vocab = model._vocab
        self._n_vocab = model._n_vocab
        self._sampler = sampler
        # (an object made once: the counters start at 0, finish_reason, stop_sequence,
        # last_piece, last_sampled and error at None)
        self.tokens = []
        self._out = bytearray()
        self.logprobs = [] if self._logprobs >= 0 else None
        self._draft_max = _option(_GenerationConfig, "draft_max", draft_max)
        self._draft_min = _option(_GenerationConfig, "draft_min", draft_min)
        self._draft_p_min = _option(_GenerationConfig, "draft_p_min", draft_p_min)
        if drafter is not None and self._draft_max > 0:
            try:
                self._start_drafting(drafter, prompt)
            except BaseException:
                self._free_native()
                raise
        self._opened(False)

    # --- lifetime (_NativeObject): busy while it steps (with its context) --------------

    cdef void _interrupt(self) noexcept:
        """close() while it steps: the generation ends after the token in progress."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self._has_next = False

    cdef int _start_drafting(self, Drafter drafter, object prompt) except -1:
        if prompt is None:
            raise InvalidArgumentError("a Generation with a drafter needs the prompt's tokens")
        if llama_model_is_recurrent(self._model._ptr) or llama_model_is_hybrid(self._model._ptr):
            raise InvalidArgumentError(
                f"speculative decoding needs a model whose KV cells can be removed from the "
                f"end of a sequence; {self._model.path!r} is a recurrent model")
        arr = _token_array(prompt, self._n_vocab, "prompt")
        cdef const int32_t[::1] view = arr
        cdef Py_ssize_t n = view.shape[0]
        if n != self.pos:
            raise InvalidArgumentError(
                f"the prompt has {n} tokens, but the generation starts at pos={self.pos}")
        self._hist_cap = max(n + 64, 256)
        self._hist = <int32_t *>malloc(self._hist_cap * sizeof(int32_t))
        self._draft = <int32_t *>malloc(self._draft_max * sizeof(int32_t))
        if self._hist == NULL or self._draft == NULL:
            raise MemoryError()
        _new_batch(&self._sbatch, self._draft_max + 1, 1)
        if n:
            memcpy(self._hist, &view[0], n * sizeof(int32_t))
        self._n_hist = n
        self._spec_k = min(4, self._draft_max)
        self._spec_skip = 0
        self._spec_misses = 0
        self._spec_rate = 1.0
        self._drafter = drafter
        return 0

    # --- state ---------------------------------------------------------------------

    @property
    def finished(self):
        return self.finish_reason is not None

    @property
    def has_next(self):
        """Whether a generated token waits to be decoded (at ``pos``)."""
        return self._has_next

    @property
    def next_token(self):
        return self._next if self._has_next else None

    @property
    def sampler(self):
        return self._sampler

    @property
    def last_token(self):
        """The newest generated token (None before the first)."""
        # (the module is compiled with wraparound=False: no negative indexes)
        cdef Py_ssize_t n = len(self.tokens)
        return self.tokens[n - 1] if n else None

    def finish(self, reason="stop"):
        """End the generation now with ``reason`` (e.g. "cancelled", or "stop" when the
        caller matched a stop string of its own)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self._has_next = False

    @property
    def text(self):
        """All the text generated (up to a stop string)."""
        end = len(self._out) if self.stop_sequence is None else self._safe
        return self._out[:end].decode("utf-8", "replace")

    @property
    def output_bytes(self):
        end = len(self._out) if self.stop_sequence is None else self._safe
        return bytes(self._out[:end])

    cpdef str take_text(self):
        """The text that became safe to show since the last call ("" if none)."""
        cdef Py_ssize_t end
        cdef Py_ssize_t used = 0
        cdef str text
        cdef const char * data = PyByteArray_AS_STRING(self._out)
        if self.finish_reason is not None:
            end = self._safe if self.stop_sequence is not None else len(self._out)
            if end <= self._emitted:
                return ""
            text = data[self._emitted:end].decode("utf-8", "replace")
            self._emitted = end
            return text
        end = self._safe
        if end <= self._emitted:
            return ""
        text = PyUnicode_DecodeUTF8Stateful(data + self._emitted, end - self._emitted,
                                            "replace", &used)
        self._emitted += used
        return text

    # --- the token loop --------------------------------------------------------------

    cdef int _accept(self, Context ctx, int32_t row) except -1:
        """Pick the next token from ``row`` of the context's last batch. Caller holds
        ctx._enter() (or owns the context, as the engine's thread does)."""
        cdef llama_token tok
        cdef const float * logits
        cdef Py_ssize_t old, start, hit, k
        cdef int i
        cdef bytes piece
        if self.finish_reason is not None:
            return 0
        if self.n_generated >= self.max_tokens or self.pos >= self.n_ctx:
            self.finish_reason = "length"
            return 0
        logits = llama_get_logits_ith(ctx._ptr, row)
        if logits == NULL:
            raise SamplingError(f"the context has no logits for row {row}")
        if self._sampler is None:
            with nogil:
                tok = llamabind_argmax(logits, self._n_vocab)
            if self._ignore_eos and llama_vocab_is_eog(self._vocab, tok):
                tok = self._argmax_not_eog(<float *>logits)
        else:
            tok = self._sampler._sample_row(ctx, row)
        self.last_sampled = tok
        if self._logprobs >= 0:
            lp, top = _top_logprobs(logits, self._n_vocab, tok, self._logprobs)
            self.logprobs.append((tok, lp, top))
        if not self._ignore_eos and llama_vocab_is_eog(self._vocab, tok):
            self.finish_reason = "stop"
            self.last_piece = None
            if self._logprobs >= 0:
                self.logprobs.pop()  # the end token is not part of the output
            return 0
        self.tokens.append(tok)
        self.n_generated += 1
        if self._drafter is not None:
            self._remember(tok)
        piece = _piece(self._vocab, tok, self._render_special or (
            bool(self._preserved) and tok in self._preserved), 0)
        self.last_piece = piece
        if self._add_bytes(piece):
            return 0
        if self.n_generated >= self.max_tokens or self.pos >= self.n_ctx:
            self.finish_reason = "length"
            return 0
        self._next = tok
        self._has_next = True
        return 0

    cdef llama_token _argmax_not_eog(self, float * logits) except -1:
        """The greedy choice among the tokens that do not end generation (ignore_eos):
        end tokens are masked in llama.cpp's buffer while looking, then restored."""
        cdef list masked = []
        cdef llama_token tok = llamabind_argmax(logits, self._n_vocab)
        try:
            while llama_vocab_is_eog(self._vocab, tok) and len(masked) < self._n_vocab - 1:
                masked.append((tok, logits[tok]))
                logits[tok] = -INFINITY
                tok = llamabind_argmax(logits, self._n_vocab)
        finally:
            for t, v in masked:
                logits[<llama_token>t] = v
        return tok

    cdef bint _add_bytes(self, bytes piece) except -1:
        """Append a token's bytes; True when they complete a stop string (the
        generation then ends with "stop")."""
        cdef Py_ssize_t old = len(self._out), hit
        self._out.extend(piece)
        if self._longest:
            hit = self._find_stop(old)
            if hit >= 0:
                self._safe = hit
                self.finish_reason = "stop"
                self._has_next = False
                return True
            self._safe = len(self._out) - self._held_back()
        else:
            self._safe = len(self._out)
        return False

    def _feed(self, data):
        """Test hook: take ``data`` (bytes) as if a token had rendered to it (stop
        strings, held-back text); returns the text now safe to show."""
        if type(data) is not bytes:
            raise InvalidArgumentError(f"data must be bytes, got {type(data).__name__}")
        if self.finish_reason is None:
            self._add_bytes(data)
        return self.take_text()

    cdef Py_ssize_t _find_stop(self, Py_ssize_t old) except -2:
        """Where the earliest stop string that ends in the newest bytes starts, or -1
        (the first listed wins a tie); sets stop_sequence."""
        cdef const char * data = PyByteArray_AS_STRING(self._out)
        cdef Py_ssize_t n = len(self._out)
        cdef Py_ssize_t start = old - self._longest + 1 if old >= self._longest else 0
        cdef Py_ssize_t best = -1
        cdef const char * found
        cdef bytes s
        for i, s in enumerate(self._bstops):
            found = <const char *>memmem(data + start, n - start, <const char *>s, len(s))
            if found != NULL and (best < 0 or found - data < best):
                best = found - data
                self.stop_sequence = self._stops[i]
        return best

    cdef Py_ssize_t _held_back(self) except -1:
        """How many bytes at the end could begin a stop string."""
        cdef const char * data = PyByteArray_AS_STRING(self._out)
        cdef Py_ssize_t n = len(self._out)
        cdef Py_ssize_t k
        cdef bytes s
        for k in range(min(self._longest - 1, n), 0, -1):
            for s in self._bstops:
                if len(s) > k and memcmp(<const char *>s, data + n - k, k) == 0:
                    return k
        return 0

    cdef int _step(self, Context ctx) except -1:
        """Decode the pending token on ``ctx`` (sequence ``seq_id``), with a draft when
        there is one, then accept the next token(s). Caller holds ctx._enter()."""
        cdef int i
        if self._has_next and self._drafter is not None \
                and self._plan(<int>ctx.n_batch - 1) > 0:
            self._sbatch.n_tokens = self._n_draft + 1
            for i in range(self._n_draft + 1):
                self._sbatch.token[i] = self._next if i == 0 else self._draft[i - 1]
                self._sbatch.pos[i] = self.pos + i
                self._sbatch.n_seq_id[i] = 1
                self._sbatch.seq_id[i][0] = self.seq_id
                self._sbatch.logits[i] = 1
            try:
                ctx._run(&self._sbatch, False, False)
            except BaseException:
                self._n_draft = 0
                raise
            if ctx._abort.cancel:
                ctx._abort.cancel = False
                self._n_draft = 0
                llama_memory_seq_rm(ctx._mem, self.seq_id, self.pos, -1)
                raise GenerationCancelled("generation was cancelled")
            self._verify(ctx, 0)
            return 0
        if self._has_next:
            self._has_next = False
            ctx._decode_one(self._next, self.pos, self.seq_id)
            self.pos += 1
        if ctx._abort.cancel:
            ctx._abort.cancel = False
            raise GenerationCancelled("generation was cancelled")
        self._accept(ctx, ctx._resolve_row(-1))
        return 0

    # --- speculative decoding ------------------------------------------------------

    cdef int _remember(self, llama_token tok) except -1:
        cdef int32_t * grown
        if self._n_hist == self._hist_cap:
            grown = <int32_t *>realloc(self._hist, 2 * self._hist_cap * sizeof(int32_t))
            if grown == NULL:
                raise MemoryError()
            self._hist = grown
            self._hist_cap *= 2
        self._hist[self._n_hist] = tok
        self._n_hist += 1
        return 0

    cdef int _plan(self, int limit) except -1:
        """Choose the draft to decode after the pending token, at most ``limit`` tokens
        (and never past max_tokens or the context's end, where no drafted token could
        be taken). Returns its length."""
        cdef Py_ssize_t k
        self._n_draft = 0
        if self._drafter is None or not self._has_next or self.finish_reason is not None:
            return 0
        if self._spec_skip > 0:
            self._spec_skip -= 1
            return 0
        k = min(self._spec_k, limit, self.max_tokens - self.n_generated - 1,
                self.n_ctx - self.pos - 1)
        if k < 1 or k < self._draft_min:
            return 0
        try:
            k = self._drafter._propose(self._hist, self._n_hist, self.seq_id, self._draft, k,
                                       self._draft_p_min)
        except (DecodeError, ContextCreationError) as exc:
            # the draft model's context failed: this step goes on without a draft
            _logger.debug("drafting failed: %s", exc)
            return 0
        if k < max(1, self._draft_min):
            return 0
        self._n_draft = <int>k
        return self._n_draft

    cdef int _verify(self, Context ctx, int32_t row) except -1:
        """After a decode whose row ``row`` holds the pending token and the rows after
        it its draft: accept the next token from each row in turn for as long as the
        sampler picks the drafted token (each row's input then is what the model would
        have decoded there), then remove the cells of the rows not reached."""
        cdef int i, n = self._n_draft, taken = 0
        self._n_draft = 0
        self._has_next = False
        self.pos += 1
        try:
            self._accept(ctx, row)
            for i in range(n):
                if not self._has_next or self._next != self._draft[i]:
                    break
                taken += 1
                self._has_next = False
                self.pos += 1
                self._accept(ctx, row + 1 + i)
        finally:
            if n:
                llama_memory_seq_rm(ctx._mem, self.seq_id, self.pos, -1)
                self.n_drafted += n
                self.n_draft_accepted += taken
        if n:
            self._adapt(n, taken)
        return 0

    cdef void _adapt(self, int n, int taken) noexcept:
        """The next draft's length, and when to try it.

        Each drafted row costs part of a one-token decode (measured on 2 CPU cores: 0.4
        to 0.6 of one for Qwen2.5-0.5B, 0.5 to 0.9 for SmolLM2-135M, the most for the
        short drafts of free text; on a GPU far less), so drafting pays only while most
        of what is drafted is taken. ``_spec_rate`` follows the share taken (each draft
        weighs half); while it stays at 0.7 or more drafting goes on, else it pauses for
        1, 3, 7... steps (up to 63), longer after each such draft in a row: text the
        history does not predict costs little, text it does (a copy, a quote) drafts on
        every step. The length doubles after a draft taken whole, becomes what was taken
        plus one after one taken in part, and halves after one refused at once."""
        self._spec_rate = 0.5 * self._spec_rate + 0.5 * taken / n
        if taken == n:
            self._spec_k = min(self._draft_max, 2 * self._spec_k)
        elif taken > 0:
            self._spec_k = min(self._draft_max, taken + 1)
        else:
            self._spec_k = max(1, self._spec_k // 2)
        if self._spec_rate >= 0.7:
            self._spec_misses = 0
        else:
            self._spec_misses = min(self._spec_misses + 1, 6)
            self._spec_skip = (1 << self._spec_misses) - 1

    def plan_draft(self, limit):
        """Choose the draft the next decode carries, at most ``limit`` tokens (the
        batching engine calls this before each step with the rows it can spare).
        Returns its length."""
        cdef int n = _int_arg(limit, "limit", 0, 2147483647)
        self._enter()
        try:
            return self._plan(n)
        finally:
            self._leave()

    def drop_draft(self):
        """Forget the planned draft (the next decode carries only the pending token)."""
        self._n_draft = 0

    @property
    def draft(self):
        """The planned draft (token ids)."""
        self._check()
        return [self._draft[i] for i in range(self._n_draft)]

    @property
    def speculative(self):
        """Whether this generation drafts."""
        return self._drafter is not None

    def accept(self, Context ctx not None, row=-1):
        """Pick the next token from ``row`` of ``ctx``'s last batch (after the prompt:
        its last row). Returns the token, or None when the generation ended without
        one (an end-of-generation token, or no room)."""
        return self._advance(ctx, _row_arg(row, "row"), False)

    def step(self, Context ctx not None):
        """Decode the pending token and pick the next. Returns the new token or None."""
        return self._advance(ctx, -1, True)

    cdef object _advance(self, Context ctx, int32_t row, bint decode):
        """One token: accepted from ``row`` of the last batch, or (``decode``) after
        decoding the pending one. Returns it, or None when none came."""
        cdef int n = self.n_generated
        self._enter_with(ctx)
        try:
            if decode:
                self._step(ctx)
            else:
                self._accept(ctx, ctx._resolve_row(row))
        finally:
            self._leave_with(ctx)
        if decode:
            PyErr_CheckSignals()
        return self.tokens[self.n_generated - 1] if self.n_generated > n else None

    def run(self, Context ctx not None):
        """Step to the end, with no Python code between tokens. Returns finish_reason.
        Cancelled (ctx.cancel()): GenerationCancelled, with the tokens made so far kept."""
        self._enter_with(ctx)
        try:
            while self.finish_reason is None:
                self._step(ctx)
                PyErr_CheckSignals()
        finally:
            self._leave_with(ctx)
        return self.finish_reason


cdef class TokenGenerator(Generation):
    """A Generation on a context that iterates ``(token, piece_bytes)``.

    ``TokenGenerator(ctx, pos, sampler=None, max_tokens=..., seq_id=0)``: the context
    must hold the prompt's KV cache up to ``pos - 1`` with logits for the last prompt
    token. ``sampler=None`` is greedy decoding. Iteration ends at an end-of-generation
    token (``finish_reason == "stop"``), at ``max_tokens`` or a full context
    (``"length"``). ``cancel()`` on the context raises GenerationCancelled from the
    next step; Ctrl+C raises KeyboardInterrupt. ``finish(reason)`` ends it early.
    """

    cdef Context _ctx

    def __init__(self, Context ctx not None, pos, Sampler sampler=None, *,
                 max_tokens=256, seq_id=0, render_special=False, preserved_tokens=()):
        ctx._check()
        pos = _int_arg(pos, "pos", 1, 2147483647)
        seq_id = ctx._check_seq(seq_id, False)
        Generation.__init__(self, ctx.model, pos, sampler, max_tokens=max_tokens,
                            seq_id=seq_id, n_ctx=ctx.n_ctx, render_special=render_special,
                            preserved_tokens=preserved_tokens)
        self._ctx = ctx

    @property
    def last_token(self):
        """The last token picked (an end-of-generation token included)."""
        return self.last_sampled

    def __iter__(self):
        return self

    def __next__(self):
        if self.finish_reason is not None:
            raise StopIteration
        # the first token comes from the prompt's logits, the next ones from a decode
        token = self._advance(self._ctx, -1, self.n_generated > 0)
        if token is None:
            raise StopIteration
        return token, self.last_piece


def common_prefix(a, b):
    """How many leading token ids two lists of ints share."""
    if type(a) is not list or type(b) is not list:
        raise InvalidArgumentError("common_prefix takes two lists of token ids")
    cdef list x = a
    cdef list y = b
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t n = min(len(x), len(y))
    while i < n and x[i] == y[i]:
        i += 1
    return i
