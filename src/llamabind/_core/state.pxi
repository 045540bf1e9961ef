# Saving and restoring a context's state (whole, or one sequence's), in memory and in
# files; the checks that keep a damaged state from costing gigabytes.

# The whole-context state starts with the model's architecture name as a u32 length and
# the bytes. llama.cpp allocates (and zero-fills) that length before it checks that the
# data holds it, so 4 damaged bytes could cost 4 GiB: check the length first.
cdef int _check_state_arch_length(bytes head, size_t available, str what) except -1:
    if len(head) < 4:
        raise StateError(f"{what} is too short ({len(head)} bytes) to hold a state header")
    cdef uint32_t length = int.from_bytes(head, "little")
    if length > available:
        raise StateError(f"{what} is damaged: the architecture name's length ({length}) "
                         f"is more than the {available} bytes after it")
    return 0


cdef int _check_state_file(str path) except -1:
    """A session file is: magic, version, token count n (u32 each), n tokens, then the
    state. Checks the state's first length against the file's size before llama.cpp
    allocates it; a file too short or with other damage is left to llama.cpp."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12:
                return 0
            if int.from_bytes(head[:4], "little") != LLAMA_SESSION_MAGIC:
                return 0
            n_tokens = int.from_bytes(head[8:12], "little")
            start = 12 + 4 * n_tokens
            size = os.fstat(fh.fileno()).st_size
            if start + 4 > size:
                return 0
            fh.seek(start)
            _check_state_arch_length(fh.read(4), size - start - 4, f"state file {path!r}")
    except OSError as exc:
        raise StateError(f"could not read state file {path!r}: {exc}") from None
    return 0


cdef llama_seq_id _state_seq(Context self, object seq_id, bint loading) except? -2:
    """After self._enter(): the sequence (-1: the whole state). Loading is refused
    while NumPy views of the outputs exist (the output buffer may be reallocated)."""
    cdef llama_seq_id seq = -1 if seq_id is None else self._check_seq(seq_id, False)
    if loading:
        if self._users > 0:
            raise ConcurrentUseError(
                "release the NumPy views of this context's outputs before loading state")
        _take_recent_errors()
    return seq


cdef int _state_loaded(Context self, bint ok, llama_seq_id seq, str what) except -1:
    if not ok:
        raise _native_error(StateError, f"could not {what}", "invalid or incompatible state")
    self._last_n_tokens = 0
    if seq < 0:
        self._out_capacity = 1 << 30   # the outputs were restored too
    return 0


cdef object _state_size(Context self, object seq_id):
    self._enter()
    try:
        seq = _state_seq(self, seq_id, False)
        return llama_state_get_size(self._ptr) if seq < 0 else \
            llama_state_seq_get_size(self._ptr, seq)
    finally:
        self._leave()


cdef bytes _save_state(Context self, object seq_id):
    """Context.save_state."""
    cdef size_t size, got
    cdef uint8_t * dst
    cdef llama_seq_id seq
    self._enter()
    try:
        seq = _state_seq(self, seq_id, False)
        with nogil:
            size = llama_state_get_size(self._ptr) if seq < 0 else \
                llama_state_seq_get_size(self._ptr, seq)
        out = PyBytes_FromStringAndSize(NULL, size)
        dst = <uint8_t *>PyBytes_AS_STRING(out)
        with nogil:
            if seq < 0:
                got = llama_state_get_data(self._ptr, dst, size)
            else:
                got = llama_state_seq_get_data(self._ptr, dst, size, seq)
        if got != size:
            raise StateError(f"llama.cpp wrote {got} state bytes, expected {size}")
        return out
    finally:
        self._leave()


cdef int _load_state(Context self, object data, object seq_id) except -1:
    """Context.load_state."""
    cdef const uint8_t[::1] view
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"data must be a bytes-like object, got {type(data).__name__}") from None
    cdef size_t n = view.shape[0]
    cdef size_t got
    cdef llama_seq_id seq
    if n == 0:
        raise InvalidArgumentError("state data is empty")
    if seq_id is None:
        _check_state_arch_length(bytes(view[:4]), n - 4, "state data")
    self._enter()
    try:
        seq = _state_seq(self, seq_id, True)
        with nogil:
            if seq < 0:
                got = llama_state_set_data(self._ptr, &view[0], n)
            else:
                got = llama_state_seq_set_data(self._ptr, &view[0], n, seq)
        _state_loaded(self, got != 0, seq, f"restore state ({n} bytes)")
    finally:
        self._leave()
    return 0


cdef int _save_state_file(Context self, object path, object tokens,
                          object seq_id) except -1:
    """Context.save_state_file."""
    arr = _token_array(tokens, self.n_vocab, "tokens")
    cdef const int32_t[::1] view = arr
    # (read only: saving does not write to the tokens)
    _state_file(self, True, path, <llama_token *>&view[0] if view.shape[0] else NULL,
                view.shape[0], seq_id)
    return 0


cdef list _load_state_file(Context self, object path, object seq_id, object max_tokens):
    """Context.load_state_file."""
    max_tokens = _int_arg(max_tokens, "max_tokens", -1, 1 << 30)
    cdef size_t cap = self.n_ctx if max_tokens < 0 else max_tokens
    out = _np().empty(max(cap, 1), dtype=_np().int32)
    cdef int32_t[::1] view = out
    cdef size_t count = _state_file(self, False, path, &view[0], cap, seq_id)
    return out[:count].tolist()


cdef size_t _state_file(Context self, bint save, object path, llama_token * tokens, size_t n,
                        object seq_id) except? 0:
    """Write the state and ``n`` tokens to a file, or read the state and at most ``n``
    tokens into ``tokens`` (returns how many)."""
    fspath, cpath = _path_bytes(path, "path")
    if not save:
        if not os.path.isfile(fspath):
            raise StateFileNotFoundError(f"state file not found: {fspath!r}", fspath)
        if seq_id is None:
            _check_state_file(fspath)
    cdef const char * c = cpath
    cdef size_t count = 0
    cdef bint ok
    cdef llama_seq_id seq
    self._enter()
    try:
        seq = _state_seq(self, seq_id, not save)
        with nogil:
            if save and seq < 0:
                ok = llama_state_save_file(self._ptr, c, tokens, n)
            elif save:
                ok = llama_state_seq_save_file(self._ptr, c, seq, tokens, n) != 0
            elif seq < 0:
                ok = llama_state_load_file(self._ptr, c, tokens, n, &count)
            else:
                ok = llama_state_seq_load_file(self._ptr, c, seq, tokens, n, &count) != 0
        if save and not ok:
            raise StateError(f"could not write state file {fspath!r}")
        if not save:
            _state_loaded(self, ok, seq, f"load state file {fspath!r}")
    finally:
        self._leave()
    return count
