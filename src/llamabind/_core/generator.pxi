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
    cdef readonly object finish_reason
    cdef readonly object last_token

    def __init__(self, Context ctx not None, pos, Sampler sampler=None, *,
                 max_tokens=256, seq_id=0, render_special=False):
        render_special = _bool_arg(render_special, "render_special")
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
        self.finish_reason = None
        self.last_token = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.finish_reason is not None:
            raise StopIteration
        cdef Context ctx = self._ctx
        cdef llama_token tok
        cdef int32_t row
        cdef const float * logits
        ctx._enter()
        try:
            if self._pending:
                self._pending = False
                ctx._decode_one(self._pending_token, self.pos, self._seq)
                self.pos += 1
            if ctx._abort.cancel:
                ctx._abort.cancel = False
                raise GenerationCancelled("generation was cancelled")
            if self.n_generated >= self.max_tokens:
                self.finish_reason = "length"
                raise StopIteration
            if <uint32_t>self.pos >= ctx._n_ctx:
                self.finish_reason = "length"
                raise StopIteration
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
                raise StopIteration
            self.n_generated += 1
            self._pending = True
            self._pending_token = tok
            self.last_token = tok
            piece = _piece(self._vocab, tok, self._render_special, 0)
        finally:
            ctx._leave()
        PyErr_CheckSignals()
        return tok, piece

    def finish(self, reason="stop"):
        """End iteration early (e.g. a stop string matched) with ``reason``."""
        self.finish_reason = reason
