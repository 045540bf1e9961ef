# TokenGenerator: the per-token loop of generation, in C. After the prompt has been
# decoded, each step samples the next token (greedy argmax in C, or a Sampler chain),
# stops at end-of-generation, renders the token's bytes, and decodes it on the next
# step, so a streaming caller gets each piece before the model runs again.


cdef extern from "argmax.h" nogil:
    int32_t llamabind_argmax(const float * x, int32_t n)


cdef inline llama_token _argmax(const float * logits, int32_t n) noexcept nogil:
    """The first index of the largest logit: what llama.cpp's greedy sampler picks
    (``>`` comparisons, so NaNs are never picked; index 0 if logit 0 is NaN). In C
    (argmax.h): packed maxima over blocks, then one block scanned for the index."""
    return llamabind_argmax(logits, n)


def _argmax_floats(const float[::1] logits not None):
    """Test hook: the greedy argmax of a float32 array (-1 when it is empty)."""
    cdef int32_t found = -1
    if logits.shape[0] > 2147483647:
        raise InvalidArgumentError(f"at most 2^31-1 logits, got {logits.shape[0]}")
    if logits.shape[0]:
        with nogil:
            found = llamabind_argmax(&logits[0], <int32_t>logits.shape[0])
    return found


cdef bint _any_stop_in(bytearray text, Py_ssize_t start, tuple stops) noexcept:
    """Whether one of ``stops`` (non-empty bytes) occurs in ``text[start:]``."""
    cdef const char * h = text
    cdef Py_ssize_t n = len(text)
    cdef const char * p
    cdef const char * last
    cdef const char * needle
    cdef Py_ssize_t k
    for s in stops:
        needle = <bytes>s
        k = len(<bytes>s)
        p = h + start
        last = h + n - k
        while p <= last:
            p = <const char *>memchr(p, needle[0], last - p + 1)
            if p == NULL:
                break
            if memcmp(p, needle, k) == 0:
                return True
            p += 1
    return False


cdef class TokenGenerator:
    """Iterate ``(token, piece_bytes)`` for tokens generated on a context.

    ``TokenGenerator(ctx, pos, sampler=None, max_tokens=..., seq_id=0)``: the context
    must hold the prompt's KV cache up to ``pos - 1`` with logits for the last prompt
    token. ``sampler=None`` is greedy decoding. Iteration ends at an end-of-generation
    token (``finish_reason == "stop"``), at ``max_tokens`` or a full context
    (``"length"``). ``cancel()`` on the context raises GenerationCancelled from the
    next step; Ctrl+C raises KeyboardInterrupt.
    """

    cdef Context _ctx
    cdef Sampler _sampler
    cdef const llama_vocab * _vocab
    cdef readonly int pos
    cdef llama_seq_id _seq
    cdef readonly int max_tokens
    cdef readonly int n_generated
    cdef bint _pending
    cdef llama_token _pending_token
    cdef bint _render_special
    cdef frozenset _preserved  # tokens rendered as text although special
    cdef readonly object finish_reason
    cdef readonly object last_token

    def __init__(self, Context ctx not None, pos, Sampler sampler=None, *,
                 max_tokens=256, seq_id=0, render_special=False, preserved_tokens=()):
        render_special = _bool_arg(render_special, "render_special")
        preserved = frozenset()
        if preserved_tokens:
            preserved = frozenset(_token_array(list(preserved_tokens), ctx._n_vocab,
                                               "preserved_tokens").tolist())
        ctx._check()
        pos = _any_int_arg(pos, "pos")
        if pos < 1 or pos > 2147483647:
            raise InvalidArgumentError(f"pos must be >= 1 (after the prompt), got {pos}")
        max_tokens = _int_arg(max_tokens, "max_tokens", 0, 2147483647)
        seq_id = ctx._check_seq(seq_id, False)
        if sampler is not None:
            sampler._check()
            if not sampler._selects:
                raise SamplingError(
                    "the sampler chain does not end with a token-selecting sampler")
        self._ctx = ctx
        self._sampler = sampler
        self._vocab = ctx.model._vocab
        self.pos = pos
        self._seq = seq_id
        self.max_tokens = max_tokens
        self.n_generated = 0
        self._pending = False
        self._render_special = render_special
        self._preserved = preserved
        self.finish_reason = None
        self.last_token = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.finish_reason is not None:
            raise StopIteration
        cdef Context ctx = self._ctx
        cdef llama_token tok
        ctx._enter()
        try:
            tok = self._step(ctx)
            if tok < 0:
                raise StopIteration
            piece = _piece(self._vocab, tok, self._special(tok), 0)
        finally:
            ctx._leave()
        PyErr_CheckSignals()
        return tok, piece

    def run(self, tokens, text, stops=()):
        """Generate to the end in one call, with no Python code between tokens: each
        token is appended to ``tokens`` and its bytes to ``text`` as it comes (so both
        hold what was generated when an exception ends the run). Ends like iteration
        does, or, with ``finish_reason`` "stop", at the first token whose bytes complete
        one of ``stops`` (non-empty ``bytes``) in ``text``. Returns ``finish_reason``."""
        if type(tokens) is not list:
            raise InvalidArgumentError(f"tokens must be a list, got {type(tokens).__name__}")
        if type(text) is not bytearray:
            raise InvalidArgumentError(f"text must be a bytearray, got {type(text).__name__}")
        if isinstance(stops, (bytes, str)) or not isinstance(stops, (tuple, list)):
            raise InvalidArgumentError(
                f"stops must be a tuple or list of bytes, got {type(stops).__name__}")
        cdef tuple stop_list = tuple(stops)
        cdef Py_ssize_t longest = 0
        for s in stop_list:
            if not isinstance(s, bytes) or len(<bytes>s) == 0:
                raise InvalidArgumentError(f"stops must be non-empty bytes, got {s!r}")
            longest = max(longest, len(<bytes>s))
        if self.finish_reason is not None:
            return self.finish_reason
        cdef Context ctx = self._ctx
        cdef list out_tokens = tokens
        cdef bytearray out_text = text
        cdef llama_token tok
        cdef Py_ssize_t old, start
        ctx._enter()
        try:
            while True:
                tok = self._step(ctx)
                if tok < 0:
                    break
                out_tokens.append(tok)
                old = len(out_text)
                out_text.extend(_piece(self._vocab, tok, self._special(tok), 0))
                if longest:
                    # a stop that ends in this token's bytes starts at most
                    # len(stop) - 1 bytes before them
                    start = old - longest + 1 if old >= longest else 0
                    if _any_stop_in(out_text, start, stop_list):
                        self.finish_reason = "stop"
                        break
                PyErr_CheckSignals()
        finally:
            ctx._leave()
        return self.finish_reason

    cdef llama_token _step(self, Context ctx) except -2:
        """Decode the pending token, pick the next one: the token, or -1 when the
        generation ends here (finish_reason set). Caller holds ctx._enter()."""
        cdef llama_token tok
        cdef int32_t row
        cdef const float * logits
        if self._pending:
            self._pending = False
            ctx._decode_one(self._pending_token, self.pos, self._seq)
            self.pos += 1
        if ctx._abort.cancel:
            ctx._abort.cancel = False
            raise GenerationCancelled("generation was cancelled")
        if self.n_generated >= self.max_tokens:
            self.finish_reason = "length"
            return -1
        if <uint32_t>self.pos >= ctx._n_ctx:
            self.finish_reason = "length"
            return -1
        row = ctx._resolve_row(-1)
        if self._sampler is None:
            with nogil:
                logits = llama_get_logits_ith(ctx._ptr, row)
                tok = _argmax(logits, ctx._n_vocab) if logits != NULL else -1
            if tok < 0:
                raise SamplingError("no logits to sample from")
        else:
            self._sampler._check()
            tok = self._sampler._sample_row(ctx, row)
        if llama_vocab_is_eog(self._vocab, tok):
            self.last_token = tok
            self.finish_reason = "stop"
            return -1
        self.n_generated += 1
        self._pending = True
        self._pending_token = tok
        self.last_token = tok
        return tok

    cdef inline bint _special(self, llama_token tok):
        """Whether to render ``tok`` with its special text: all tokens with
        render_special, else only the preserved ones (a tool-call marker that a chat
        parser must see)."""
        return self._render_special or (bool(self._preserved) and tok in self._preserved)

    def finish(self, reason="stop"):
        """End iteration early (e.g. a stop string matched) with ``reason``."""
        self.finish_reason = reason


# --- text: UTF-8 assembly and stop strings ---------------------------------------------

cdef extern from "Python.h":
    str PyUnicode_DecodeUTF8Stateful(const char * s, Py_ssize_t size, const char * errors,
                                     Py_ssize_t * consumed)


cdef class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is
    never emitted, not even partly, even when it spans several tokens.

    ``feed(text)`` returns (text safe to emit, the stop string that matched or None):
    at a match, the text before the earliest match (the first listed stop wins a tie);
    otherwise all but the longest suffix that begins some stop string. ``flush()``
    returns what is held. ``byte_stops``: the stops as UTF-8, for matching on bytes
    (TokenGenerator.run), or None when one contains U+FFFD, which invalid bytes decode to.
    """

    cdef tuple _stops
    cdef Py_ssize_t _max
    cdef str _held
    cdef readonly object byte_stops

    def __init__(self, stops=()):
        if isinstance(stops, str) or not isinstance(stops, (tuple, list)):
            raise InvalidArgumentError(
                f"stops must be a tuple or list of str, got {type(stops).__name__}")
        for s in stops:
            if type(s) is not str or not s:
                raise InvalidArgumentError(f"stops must be non-empty str, got {s!r}")
        self._stops = tuple(stops)
        self._max = max([len(<str>s) for s in self._stops], default=0)
        self._held = ""
        try:
            self.byte_stops = (None if any(["\ufffd" in <str>s for s in self._stops])
                               else tuple([(<str>s).encode("utf-8") for s in self._stops]))
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"stops must be valid text (no lone surrogates), "
                                       f"got {self._stops!r}") from None

    cpdef tuple feed(self, str text):
        if text is None:
            raise InvalidArgumentError("text must be a str, got None")
        if not self._stops:
            return text, None
        cdef str buf = self._held + text
        cdef Py_ssize_t n = len(buf)
        cdef Py_ssize_t first = -1
        cdef Py_ssize_t i, k, keep = 0
        cdef object hit = None
        for s in self._stops:
            i = buf.find(<str>s)
            if i != -1 and (first == -1 or i < first):
                first = i
                hit = s
        if hit is not None:
            self._held = ""
            return buf[:first], hit
        for k in range(min(self._max - 1, n), 0, -1):
            tail = buf[n - k:]
            for s in self._stops:
                if (<str>s).startswith(tail):
                    keep = k
                    break
            if keep:
                break
        self._held = buf[n - keep:] if keep else ""
        return buf[:n - keep], None

    cpdef str flush(self):
        cdef str held = self._held
        self._held = ""
        return held


cdef class TextStream:
    """Iterate the text of a TokenGenerator's tokens as they come: each piece valid
    UTF-8 text (bytes of a character split across tokens wait for the rest; invalid
    bytes become U+FFFD, as ``bytes.decode(errors="replace")`` does), stop strings held
    back by ``matcher`` (a StopMatcher) and never emitted. Each token is appended to
    ``tokens`` as it is generated. Ends at the generator's end or at a stop string
    (``stop_hit`` names it)."""

    cdef TokenGenerator _gen
    cdef list _tokens
    cdef StopMatcher _matcher
    cdef bytes _pending
    cdef bint _done
    cdef readonly object stop_hit

    def __init__(self, TokenGenerator gen not None, tokens, StopMatcher matcher not None):
        if type(tokens) is not list:
            raise InvalidArgumentError(f"tokens must be a list, got {type(tokens).__name__}")
        self._gen = gen
        self._tokens = tokens
        self._matcher = matcher
        self._pending = b""
        self._done = False
        self.stop_hit = None

    def __iter__(self):
        return self

    def __next__(self):
        cdef TokenGenerator gen = self._gen
        cdef Context ctx = gen._ctx
        cdef llama_token tok
        cdef bytes data
        cdef str text, out
        cdef Py_ssize_t used
        while not self._done:
            if gen.finish_reason is not None:
                tok = -1
            else:
                ctx._enter()
                try:
                    tok = gen._step(ctx)
                    if tok >= 0:
                        self._tokens.append(tok)
                        data = self._pending + _piece(gen._vocab, tok, gen._special(tok), 0)
                finally:
                    ctx._leave()
                PyErr_CheckSignals()
            if tok < 0:
                # the end: what the decoder holds (replaced if incomplete), then all held
                self._done = True
                text = self._pending.decode("utf-8", "replace")
                self._pending = b""
                out = <str>self._matcher.feed(text)[0] + self._matcher.flush()
                if out:
                    return out
                break
            text = PyUnicode_DecodeUTF8Stateful(data, len(data), "replace", &used)
            self._pending = data[used:] if used < len(data) else b""
            if not text:
                continue
            out, hit = self._matcher.feed(text)
            if hit is not None:
                self._done = True
                self.stop_hit = hit
                if out:
                    return out
                break
            if out:
                return out
        raise StopIteration
