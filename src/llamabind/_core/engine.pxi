# EngineCore: one step of the batching engine, in C. The generated token of every
# running sequence and prompt chunks of newly admitted ones go into one llama_batch,
# decoded by one llama_decode (one pass over the weights for all of them); then each
# sequence picks its next token from its own output row through the one token loop
# (Generation.accept). Which sequences and chunks make a step is the scheduler's
# choice (llamabind.engine, in Python).


cdef class EngineCore(_NativeObject):
    """The decoding step of the batching engine, on a context with several sequences.

    ``step(gens, chunks)``: ``gens`` are Generations whose pending token is decoded now
    (one row each, at their ``pos``, in their ``seq_id``); ``chunks`` are prompt pieces
    ``(outputs, tokens, start, count, pos0, seq_ids)``: ``tokens[start:start + count]``
    (an int32 array) at positions ``pos0, pos0 + 1, ...`` in each sequence of
    ``seq_ids``; when ``outputs`` is a list of Generations, the chunk's last row outputs
    logits and each of them picks its first token from it (several choices of one
    prompt). Returns 0, or 1 when the KV cache had no room for the batch (then nothing
    was decoded or changed: free room and call again). An error while one Generation
    picks its token (a grammar that allows none...) is stored in its ``error`` and it is
    finished with "error"; the others go on. A failed decode raises (DecodeError,
    GenerationCancelled after ``ctx.cancel()``).

    A Generation with a planned draft (``plan_draft``) brings its draft tokens as rows
    after its pending token, each with logits; it verifies them after the decode
    (Generation._verify: as many tokens as the sampler takes, the cells of the rest
    removed). When the step returns 1 the drafts are kept: ``drop_draft()`` them to
    retry with less.

    ``record``: None, or a list to which each step appends what was decoded (for
    replaying the schedule natively): ``{"rows": [[seq_ids, pos, token, kind], ...],
    "picks": [[row, seq_id], ...]}``, kind "g" for a generated token, "p" for a prompt
    token or a draft token; after a step with drafts, ``{"op": "rm", "seq": seq_id,
    "p0": pos, "p1": -1}`` for each sequence whose draft was not taken whole.
    """

    cdef readonly Context context
    cdef readonly int32_t capacity    # tokens one step can hold (the context's n_batch)
    cdef llama_batch _b
    cdef int32_t _max_seq
    cdef public object record

    def __cinit__(self):
        memset(&self._b, 0, sizeof(llama_batch))

    def __init__(self, Context ctx not None):
        self._check_new()
        ctx._check()
        self.context = ctx
        self.capacity = ctx.n_batch
        self._max_seq = ctx.n_seq_max
        _new_batch(&self._b, self.capacity, self._max_seq)
        self.record = None
        self._opened(False)

    cdef void _free_native(self) noexcept:
        _free_batch(&self._b)

    def step(self, list gens not None, list chunks not None):
        cdef list claimed = []
        cdef Generation g
        self._enter()
        try:
            for g in gens:
                g._enter()
                claimed.append(g)
            for chunk in chunks:
                for g in chunk[0] or ():
                    g._enter()
                    claimed.append(g)
            return self._step(gens, chunks)
        finally:
            for g in claimed:
                g._leave()
            self._leave()

    cdef int _step(self, list gens, list chunks) except -1:
        cdef Context ctx = self.context
        cdef llama_batch * b = &self._b
        cdef int32_t n = 0, i, k, count, row
        cdef Generation g
        cdef const int32_t[::1] view
        cdef int64_t start, pos0
        cdef int rc, d
        cdef int32_t pos_before
        cdef list rows = [] if self.record is not None else None
        for g in gens:
            if not g._has_next:
                raise InvalidArgumentError("a Generation in gens has no token to decode")
            if n + 1 + g._n_draft > self.capacity:
                raise InvalidArgumentError(f"the step holds more than n_batch={self.capacity} tokens")
            for d in range(g._n_draft + 1):
                b.token[n] = g._next if d == 0 else g._draft[d - 1]
                b.pos[n] = g.pos + d
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = g.seq_id
                b.logits[n] = 1
                if rows is not None:
                    rows.append([[g.seq_id], g.pos + d, b.token[n], "g" if d == 0 else "p"])
                n += 1
        for outputs, tokens, start, count, pos0, seq_ids in chunks:
            view = tokens
            if count < 1 or start < 0 or start + count > view.shape[0]:
                raise InvalidArgumentError(
                    f"chunk [{start}, {start + count}) is outside its {view.shape[0]} tokens")
            if n + count > self.capacity:
                raise InvalidArgumentError(f"the step holds more than n_batch={self.capacity} tokens")
            if not 1 <= len(seq_ids) <= self._max_seq:
                raise InvalidArgumentError(f"a chunk belongs to 1..{self._max_seq} sequences")
            for i in range(count):
                b.token[n] = view[start + i]
                b.pos[n] = pos0 + i
                b.n_seq_id[n] = len(seq_ids)
                for k, s in enumerate(seq_ids):
                    b.seq_id[n][k] = s
                b.logits[n] = outputs is not None and i == count - 1
                if rows is not None:
                    rows.append([list(seq_ids), pos0 + i, view[start + i], "p"])
                n += 1
        if n == 0:
            return 0
        b.n_tokens = n
        ctx._enter()
        try:
            rc = ctx._run(b, False, False, True)
        finally:
            ctx._leave()
        if rc == 1:
            return 1
        cdef list picks = [] if rows is not None else None
        cdef list removed = [] if rows is not None else None
        row = 0
        for g in gens:
            d = g._n_draft
            pos_before = g.pos
            _accept_or_fail(g, ctx, row, True)
            if picks is not None:
                picks.extend([[row + i, g.seq_id] for i in range(g.pos - pos_before)])
                if d and g.pos < pos_before + 1 + d:
                    removed.append({"op": "rm", "seq": g.seq_id, "p0": g.pos, "p1": -1})
            row += 1 + d
        for outputs, tokens, start, count, pos0, seq_ids in chunks:
            row += count
            if outputs is not None:
                for g in outputs:
                    if picks is not None:
                        picks.append([row - 1, g.seq_id])
                    _accept_or_fail(g, ctx, row - 1, False)
        if rows is not None:
            self.record.append({"rows": rows, "picks": picks})
            self.record.extend(removed)
        return 0


cdef int _accept_or_fail(Generation g, Context ctx, int32_t row, bint decoded) except -1:
    """The next token(s) of a Generation from ``row``: after its pending token (and
    draft) were decoded there (``decoded``), or after its prompt. An error is stored in
    the Generation, which ends with "error"."""
    try:
        if decoded:
            g._verify(ctx, row)
        else:
            g._accept(ctx, row)
    except Exception as exc:
        g.error = exc
        g.finish_reason = "error"
        g._has_next = False
    return 0
