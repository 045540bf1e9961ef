# Batch: the input of llama_decode/llama_encode (llama_batch), owned and freed here.
# Filled from arrays in C; each token can belong to several sequences.

cdef class Batch(_NativeObject):
    """Tokens to decode, with positions, sequence ids and which rows output logits.

    ``Batch(capacity, n_seq_max=1)``. Fill it with ``add()`` for single tokens or
    ``set_tokens()`` for a whole array in one C loop.
    """

    cdef llama_batch _b
    cdef readonly int32_t capacity
    cdef readonly int32_t n_seq_max

    def __cinit__(self):
        memset(&self._b, 0, sizeof(llama_batch))

    def __init__(self, capacity=512, n_seq_max=1):
        self._check_new()
        capacity = _int_arg(capacity, "capacity", 1, 1 << 24)
        n_seq_max = _int_arg(n_seq_max, "n_seq_max", 1, llama_max_parallel_sequences())
        _new_batch(&self._b, capacity, n_seq_max)
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._opened(True)

    cdef void _free_native(self) noexcept:
        _free_batch(&self._b)

    @property
    def n_tokens(self):
        return self._b.n_tokens

    def __len__(self):
        return self._b.n_tokens

    # Each change checks the batch (open, and not being decoded by another thread) after
    # its arguments are read, right before it writes: no Python code runs in between.

    def clear(self):
        """Empty the batch (keeps its memory)."""
        self._check_idle()
        self._b.n_tokens = 0

    def add(self, token, pos, seq_ids=(0,), logits=False):
        """Append one token at position ``pos`` belonging to ``seq_ids``."""
        cdef bint out = _bool_arg(logits, "logits")
        cdef llama_token tok = _int_arg(token, "token", 0, 2147483647)
        cdef llama_pos p = _int_arg(pos, "pos", 0, 2147483647)
        if isinstance(seq_ids, int):
            seq_ids = (seq_ids,)
        seqs = list(seq_ids)
        if not 1 <= len(seqs) <= self.n_seq_max:
            raise InvalidArgumentError(
                f"seq_ids must hold 1..{self.n_seq_max} ids, got {seq_ids!r}")
        for k, s in enumerate(seqs):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0 or s >= (1 << 30):
                raise InvalidArgumentError(f"seq_ids[{k}] must be an int >= 0, got {s!r}")
        self._check_idle()
        cdef int32_t i = self._b.n_tokens
        if i >= self.capacity:
            raise InvalidArgumentError(f"batch is full ({self.capacity} tokens)")
        for k, s in enumerate(seqs):    # checked ints: no Python code runs here
            self._b.seq_id[i][k] = s
        self._b.token[i] = tok
        self._b.pos[i] = p
        self._b.n_seq_id[i] = len(seqs)
        self._b.logits[i] = out
        self._b.n_tokens = i + 1

    def set_tokens(self, tokens, pos0=0, seq_id=0, logits="last"):
        """Replace the contents with ``tokens`` at positions ``pos0, pos0+1, ...``.

        ``logits``: ``"last"`` (only the last row outputs), ``"all"``, or ``"none"``.
        """
        self._check()
        arr = _token_array(tokens, 2147483647, "tokens")
        cdef const int32_t[::1] view = arr
        cdef int32_t n = <int32_t>view.shape[0]
        if n > self.capacity:
            raise InvalidArgumentError(
                f"{n} tokens do not fit in a batch of capacity {self.capacity}")
        pos0 = _int_arg(pos0, "pos0", 0, 2147483647 - n)
        seq_id = _int_arg(seq_id, "seq_id", 0, (1 << 30) - 1)
        if logits not in ("last", "all", "none"):
            raise InvalidArgumentError(
                f"logits must be 'last', 'all' or 'none', got {logits!r}")
        cdef int mode = 2 if logits == "all" else (1 if logits == "last" else 0)
        self._check_idle()
        _fill_batch(&self._b, &view[0] if n else NULL, n, pos0, seq_id, mode)

    def add_sequence(self, tokens, seq_id=0, pos0=0, logits=True):
        """Append ``tokens`` at positions ``pos0, pos0 + 1, ...`` of sequence ``seq_id``
        (one C loop); ``logits`` marks every appended row as an output."""
        cdef bint out = _bool_arg(logits, "logits")
        self._check()
        arr = _token_array(tokens, 2147483647, "tokens")
        cdef const int32_t[::1] view = arr
        cdef int32_t n = <int32_t>view.shape[0]
        cdef llama_pos p0 = _int_arg(pos0, "pos0", 0, 2147483647 - n)
        cdef llama_seq_id seq = _int_arg(seq_id, "seq_id", 0, (1 << 30) - 1)
        self._check_idle()
        cdef int32_t i, at = self._b.n_tokens
        if at + n > self.capacity:
            raise InvalidArgumentError(
                f"{n} more tokens do not fit in a batch of capacity {self.capacity} "
                f"holding {at}")
        for i in range(n):
            self._b.token[at + i] = view[i]
            self._b.pos[at + i] = p0 + i
            self._b.n_seq_id[at + i] = 1
            self._b.seq_id[at + i][0] = seq
            self._b.logits[at + i] = out
        self._b.n_tokens = at + n

    def set_logits(self, i, value=True):
        """Choose whether row ``i`` outputs logits."""
        cdef bint out = _bool_arg(value, "value")
        cdef int64_t row = _any_int_arg(i, "i")
        self._check_idle()
        if row < 0 or row >= self._b.n_tokens:
            raise InvalidArgumentError(f"row {row} out of range (batch has {self._b.n_tokens})")
        self._b.logits[row] = out

    def tokens(self):
        self._check()
        return [self._b.token[i] for i in range(self._b.n_tokens)]

    def positions(self):
        self._check()
        return [self._b.pos[i] for i in range(self._b.n_tokens)]

    def output_rows(self):
        """Rows whose logits will be output."""
        self._check()
        return [i for i in range(self._b.n_tokens) if self._b.logits[i]]


cdef int _new_batch(llama_batch * b, int32_t n_tokens, int32_t n_seq_max) except -1:
    """Allocate ``b`` (token ids, no embeddings) for the objects that own a batch."""
    b[0] = llama_batch_init(n_tokens, 0, n_seq_max)
    if b.token == NULL:
        raise MemoryError()
    return 0


cdef void _free_batch(llama_batch * b) noexcept:
    """Free a batch made by _new_batch (or never made: all zero), once."""
    if b.token != NULL:
        llama_batch_free(b[0])
    memset(b, 0, sizeof(llama_batch))


cdef void _fill_batch(llama_batch * b, const llama_token * tokens, int32_t n, llama_pos pos0,
                      llama_seq_id seq, int logits_mode) noexcept nogil:
    """logits_mode: 0 none, 1 last row, 2 all rows."""
    cdef int32_t i
    for i in range(n):
        b.token[i] = tokens[i]
        b.pos[i] = pos0 + i
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits_mode == 2
    if n > 0 and logits_mode == 1:
        b.logits[n - 1] = 1
    b.n_tokens = n
