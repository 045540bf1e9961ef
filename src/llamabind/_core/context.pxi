# Context: one llama_context (KV cache, compute buffers, outputs) on a Model.
#
# Concurrency: a context is used by one thread at a time; a second thread entering
# while the first is inside gets ConcurrentUseError (the check and the flag are set
# while holding the GIL, so they are atomic). close() from another thread while an
# operation runs cancels it and defers the free to the end of that operation.
#
# Interruption: cancel() from any thread, and Ctrl+C on the main thread, abort a
# running decode through llama.cpp's abort callback (checked between graph nodes).

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_WRITABLE

import signal as _signal

# llama.cpp's enum values of the names ContextConfig allows (config.py lists the names)
cdef dict _FLASH_ATTN = {
    "auto": LLAMA_FLASH_ATTN_TYPE_AUTO, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
cdef dict _KV_TYPES = {
    "f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
    "q8_0": GGML_TYPE_Q8_0, "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1,
    "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1, "iq4_nl": GGML_TYPE_IQ4_NL,
}
cdef dict _POOLING = {
    None: LLAMA_POOLING_TYPE_UNSPECIFIED,
    "none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN,
    "cls": LLAMA_POOLING_TYPE_CLS, "last": LLAMA_POOLING_TYPE_LAST,
    "rank": LLAMA_POOLING_TYPE_RANK,
}
cdef dict _POOLING_NAMES = {v: k for k, v in _POOLING.items() if k is not None}

DEF _SIGNAL_POLL_NS = 20000000  # 20 ms


cdef int32_t _row_arg(object i, str name) except? -2147483648:
    """An output row index: negative counts from the last output row."""
    return <int32_t>_int_arg(i, name, -2147483647, 2147483647)


cdef tuple _pos_range(object p0, object p1):
    """Positions [p0, p1) of a KV-cache operation; -1 (any negative in llama.cpp) is an
    open end, so only -1 is taken."""
    return (_int_arg(p0, "p0", -1, 2147483647), _int_arg(p1, "p1", -1, 2147483647))


@cython.no_gc_clear  # __dealloc__ frees the llama_context, which needs self.model alive
cdef class Context(_NativeObject):
    """A llama.cpp context on a :class:`Model`: KV cache, decode, logits, state.

    One thread at a time may use a context (a second gets ``ConcurrentUseError``).
    Create one per thread or per request; they all share the model's weights.
    """

    cdef llama_context * _ptr
    cdef llama_memory_t _mem
    cdef readonly Model model
    cdef _AbortState _abort
    cdef readonly int32_t n_vocab
    cdef readonly uint32_t n_ctx, n_batch, n_ubatch, n_seq_max
    cdef int32_t _n_embd_out
    cdef bint _embeddings
    cdef bint _kv_unified
    cdef uint32_t _out_capacity
    # rows of the last decoded batch that produced outputs
    cdef int8_t * _out_rows
    cdef int32_t _last_n_tokens
    cdef uint64_t _decode_count
    cdef llama_batch _one          # a 1-token batch for the generation fast path
    cdef ggml_threadpool_t _pool         # the CPU threads of decodes
    cdef ggml_threadpool_t _pool_batch   # of batches, if they need more threads (or NULL)
    cdef int _pool_size, _pool_batch_size
    cdef list _retired_pools             # replaced pools (addresses), freed with the context
    cdef llama_seq_id _one_seq
    cdef int _threads, _threads_batch    # CPU gate units a decode takes
    cdef list _lora_refs                 # the LoRA adapters applied (pinned)

    def __cinit__(self):
        self._ptr = NULL
        self._out_rows = NULL
        self._last_n_tokens = 0
        self._decode_count = 0
        memset(&self._one, 0, sizeof(llama_batch))
        memset(&self._abort, 0, sizeof(_AbortState))

    def __init__(self, Model model not None, config=None, **options):
        """``Context(model, n_ctx=..., n_batch=..., ...)``: the options are the fields
        of :class:`llamabind.ContextConfig` (or pass one as ``config``), checked by
        their rules there."""
        self._check_new()
        cfg = _options_config(_ContextConfig, config, options)
        model._check()
        # llama.cpp aborts (output_reserve) when more sequences than batch rows exist
        effective = min(cfg.n_batch, cfg.n_ctx if cfg.n_ctx > 0 else model.n_ctx_train)
        if cfg.n_seq_max > effective:
            raise InvalidArgumentError(
                f"n_seq_max = {cfg.n_seq_max} must not exceed min(n_batch, n_ctx) = {effective}")
        threads = _default_threads() if cfg.n_threads is None else cfg.n_threads
        threads_batch = threads if cfg.n_threads_batch is None else cfg.n_threads_batch
        model._check()
        if model.vocab_only:
            raise InvalidArgumentError(
                f"model {model.path!r} was loaded with vocab_only=True: it has no weights "
                "to run a context on")
        model._check_rpc()
        model._pin()
        self.model = model
        cdef llama_context_params params = llama_context_default_params()
        params.n_ctx = cfg.n_ctx
        params.n_batch = cfg.n_batch
        params.n_ubatch = min(cfg.n_batch, 512) if cfg.n_ubatch is None else cfg.n_ubatch
        params.n_seq_max = cfg.n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.flash_attn_type = _FLASH_ATTN[cfg.flash_attn]
        params.type_k = _KV_TYPES[cfg.type_k]
        params.type_v = _KV_TYPES[cfg.type_v]
        params.embeddings = cfg.embeddings
        params.pooling_type = _POOLING[cfg.pooling]
        params.offload_kqv = cfg.offload_kqv
        params.no_perf = cfg.no_perf
        params.kv_unified = bool(cfg.kv_unified)
        params.swa_full = cfg.swa_full
        params.abort_callback = _abort_callback
        params.abort_callback_data = &self._abort
        cdef llama_context * ptr = NULL
        try:
            _take_recent_errors()
            with nogil:
                ptr = llama_init_from_model(model._ptr, params)
            model._check_rpc()
            if ptr == NULL:
                raise _native_error(
                    ContextCreationError,
                    f"llama.cpp could not create a context (n_ctx={cfg.n_ctx}, "
                    f"n_batch={cfg.n_batch}, n_seq_max={cfg.n_seq_max})")
            self._ptr = ptr
            _new_batch(&self._one, 1, 1)
            self._out_rows = <int8_t *>malloc(max(cfg.n_batch, 1))
            if self._out_rows == NULL:
                raise MemoryError()
            _attach_pools(self, threads, threads_batch)
            self._threads = threads
            self._threads_batch = max(threads, threads_batch)
        except BaseException:
            self._free_native()   # what was made, and the model's pin
            raise
        self._mem = llama_get_memory(ptr)
        self.n_vocab = model._n_vocab
        self.n_ctx = llama_n_ctx(ptr)
        self.n_batch = llama_n_batch(ptr)
        self.n_ubatch = llama_n_ubatch(ptr)
        self.n_seq_max = llama_n_seq_max(ptr)
        self._n_embd_out = llama_model_n_embd_out(model._ptr)
        self._embeddings = cfg.embeddings
        self._kv_unified = params.kv_unified
        self._out_capacity = self.n_seq_max
        self._opened(True)

    # --- lifetime (_NativeObject): NumPy views of the outputs pin it -----------------

    cdef void _free_native(self) noexcept:
        cdef llama_context * ptr = self._ptr
        self._ptr = NULL
        self._mem = NULL
        _free_batch(&self._one)
        free(self._out_rows)
        self._out_rows = NULL
        if ptr != NULL:
            with nogil:
                llama_free(ptr)
            _free_pools(self)
        refs, self._lora_refs = self._lora_refs, None
        _unpin_lora_adapters(refs)
        if self.model is not None:
            self.model._unpin()

    cdef void _interrupt(self) noexcept:
        self._abort.cancel = True

    def __dealloc__(self):
        self._finalize()

    def __repr__(self):
        if self._state != _OPEN:
            return "<llamabind.Context closed>"
        return f"<llamabind.Context n_ctx={self.n_ctx} n_batch={self.n_batch}>"

    # --- cancellation --------------------------------------------------------------

    def cancel(self):
        """Stop the running (or next) decode from any thread; raises GenerationCancelled
        in the thread that runs it. The context stays usable."""
        self._abort.cancel = True

    def reset_cancel(self):
        """Clear a pending cancel() that no operation consumed."""
        self._abort.cancel = False

    @property
    def cancel_requested(self):
        return self._abort.cancel

    def _was_cancelled(self):
        return self._abort.cancel or _exiting or (self._abort.watch_sigint and _sigint_seen)

    # --- information ---------------------------------------------------------------

    @property
    def n_ctx_seq(self):
        self._check()
        return llama_n_ctx_seq(self._ptr)

    @property
    def pooling(self):
        self._check()
        return _POOLING_NAMES.get(llama_get_pooling_type(self._ptr), "unspecified")

    @property
    def n_threads(self):
        self._check()
        return (llama_n_threads(self._ptr), llama_n_threads_batch(self._ptr))

    def set_n_threads(self, n_threads, n_threads_batch=None):
        self._check()
        n_threads = _int_arg(n_threads, "n_threads", 1, 1024)
        nb = n_threads if n_threads_batch is None else n_threads_batch
        nb = _int_arg(nb, "n_threads_batch", 1, 1024)
        self._enter()
        try:
            _attach_pools(self, n_threads, nb)
            llama_set_n_threads(self._ptr, n_threads, nb)
            self._threads = n_threads
            self._threads_batch = max(n_threads, nb)
        finally:
            self._leave()

    # (the two switches below hold the GIL throughout: checking is claiming enough)

    def set_embeddings(self, enabled):
        """Turn embedding output on or off for the next decodes."""
        enabled = _bool_arg(enabled, "enabled")
        self._check_idle()
        if enabled != self._embeddings and self._users > 0:
            raise ConcurrentUseError(
                "release the NumPy views of this context's outputs before switching "
                "embeddings (the output buffer may be reallocated)")
        llama_set_embeddings(self._ptr, enabled)
        self._embeddings = enabled

    def set_causal_attn(self, causal):
        causal = _bool_arg(causal, "causal")
        self._check_idle()
        llama_set_causal_attn(self._ptr, causal)

    # --- decode --------------------------------------------------------------------

    cdef int _validate_batch(self, llama_batch * b) except -1:
        cdef int32_t i, k, n = b.n_tokens
        cdef int32_t n_out = 0
        if n < 1:
            raise InvalidArgumentError("batch is empty")
        if <uint32_t>n > self.n_batch:
            raise InvalidArgumentError(
                f"batch has {n} tokens, more than the context's n_batch={self.n_batch}")
        for i in range(n):
            if b.token != NULL and (b.token[i] < 0 or b.token[i] >= self.n_vocab):
                raise InvalidArgumentError(
                    f"batch token[{i}] = {b.token[i]} is not a valid token id "
                    f"(vocabulary of {self.n_vocab})")
            if b.pos[i] < 0 or <uint32_t>b.pos[i] >= 2147483647:
                raise InvalidArgumentError(f"batch pos[{i}] = {b.pos[i]} must be >= 0")
            if b.n_seq_id[i] < 1 or <uint32_t>b.n_seq_id[i] > self.n_seq_max:
                raise InvalidArgumentError(
                    f"batch row {i} belongs to {b.n_seq_id[i]} sequences; must be 1.."
                    f"{self.n_seq_max}")
            for k in range(b.n_seq_id[i]):
                if b.seq_id[i][k] < 0 or <uint32_t>b.seq_id[i][k] >= self.n_seq_max:
                    raise InvalidArgumentError(
                        f"batch seq_id[{i}][{k}] = {b.seq_id[i][k]} out of range: this "
                        f"context has n_seq_max={self.n_seq_max} (ids 0..{self.n_seq_max - 1})")
            n_out += b.logits[i] != 0
        if n_out > <int32_t>self._out_capacity and self._users > 0:
            raise ConcurrentUseError(
                "release the NumPy views of this context's logits/embeddings before decoding "
                "a batch with more outputs than before (the output buffer will be reallocated)")
        return n_out

    cdef int _run(self, llama_batch * b, bint encode, bint long_running,
                  bint kv_full_ok=False) except -1:
        """Decode or encode a validated batch with the GIL released; owns the
        cancel/Ctrl+C protocol, the CPU gate and the error mapping. Caller holds
        _enter(). Returns 0; with ``kv_full_ok``, 1 when the KV cache had no room for
        the batch (nothing was decoded) instead of raising."""
        global _sigint_seen, _decodes_running
        cdef int32_t rc
        cdef bint remote
        cdef int32_t n_out = self._validate_batch(b)
        cdef bint relay = False
        cdef int want = self._threads if b.n_tokens == 1 else self._threads_batch
        cdef int taken = 0
        cdef sigaction_t ours
        if self._abort.cancel:
            self._abort.cancel = False
            raise GenerationCancelled("cancelled before the decode started")
        if _exiting:
            raise GenerationCancelled("the interpreter is exiting")
        remote = bool(self.model.rpc_servers)
        if remote:
            self.model._check_rpc()
        if (long_running and b.n_tokens > 1
                and threading.current_thread() is threading.main_thread()
                and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
            # a Ctrl+C that came while no relay was installed (between two chunks of
            # a long evaluation) would otherwise wait until the whole evaluation ends
            PyErr_CheckSignals()
            ours.sa_handler = _sigint_relay
            sigemptyset(&ours.sa_mask)
            ours.sa_flags = 0
            _sigint_seen = 0
            relay = sigaction(SIGINT, &ours, &_python_sigint) == 0
        self._abort.watch_sigint = relay
        _decodes_running += 1
        _log_state.cancelled = self._was_cancelled
        try:
            with nogil:
                taken = llamabind_gate_enter(want)
                if encode:
                    rc = llama_encode(self._ptr, b[0])
                else:
                    rc = llama_decode(self._ptr, b[0])
                if remote and rc == 0:
                    # results computed on a worker arrive asynchronously: wait for
                    # them here, so that a worker lost on the way is seen below
                    llama_synchronize(self._ptr)
                llamabind_gate_leave(taken)
        finally:
            _decodes_running -= 1
            _log_state.cancelled = None
            if relay:
                sigaction(SIGINT, &_python_sigint, NULL)
                self._abort.watch_sigint = False
        if remote:
            try:
                self.model._check_rpc()
            except BackendError:
                self._last_n_tokens = 0
                raise
        if rc == 2 or (rc != 0 and self._abort.cancel):
            self._last_n_tokens = 0
            if self._abort.cancel:
                self._abort.cancel = False
                raise GenerationCancelled("decode was cancelled")
            if _exiting:
                raise GenerationCancelled("the interpreter is exiting")
            PyErr_CheckSignals()
            raise KeyboardInterrupt()
        if rc == 1 and kv_full_ok and not encode:
            self._last_n_tokens = 0
            return 1
        if rc != 0:
            self._last_n_tokens = 0
            _raise_for_decode(rc, "llama_encode" if encode else "llama_decode")
        # Remember which rows produced outputs, to validate later logits requests.
        memcpy(self._out_rows, b.logits, b.n_tokens)
        self._last_n_tokens = b.n_tokens
        if n_out > <int32_t>self._out_capacity:
            self._out_capacity = n_out
        self._decode_count += 1
        return 0

    def decode(self, Batch batch not None):
        """Run the model on ``batch`` (GIL released). Raises DecodeError with llama.cpp's
        code, GenerationCancelled after cancel(), KeyboardInterrupt on Ctrl+C."""
        self._run_batch(batch, False)

    def encode(self, Batch batch not None):
        """Run the encoder of an encoder-decoder model on ``batch``."""
        self._run_batch(batch, True)

    cdef int _run_batch(self, Batch batch, bint encode) except -1:
        """decode/encode: the batch too is claimed while it is read (closing it from
        another thread meanwhile frees it afterwards)."""
        batch._enter_with(self)
        try:
            if encode and not llama_model_has_encoder(self.model._ptr):
                raise InvalidArgumentError("this model has no encoder; use decode()")
            self._run(&batch._b, encode, True)
        finally:
            batch._leave_with(self)
        return 0

    def eval(self, tokens, pos0=None, seq_id=0, logits="last"):
        """Decode ``tokens`` for one sequence, in n_batch-sized chunks.

        ``pos0`` defaults to the position after the sequence's last cached token.
        ``logits``: ``"last"`` (output for the last token only) or ``"all"``.
        Returns the number of tokens decoded.
        """
        if logits not in ("last", "all"):
            raise InvalidArgumentError(f"logits must be 'last' or 'all', got {logits!r}")
        self._check()
        arr = _token_array(tokens, self.n_vocab, "tokens")
        seq_id = self._check_seq(seq_id, False)
        if pos0 is not None:
            pos0 = _int_arg(pos0, "pos0", 0, 2147483647)
        if logits == "all" and len(arr) > self.n_batch:
            raise InvalidArgumentError(
                f"logits='all' needs all {len(arr)} tokens in one batch; n_batch is {self.n_batch}")
        self._enter()
        try:
            return self._eval_array(arr, -1 if pos0 is None else pos0, seq_id,
                                    2 if logits == "all" else 1)
        finally:
            self._leave()

    cdef int32_t _eval_array(self, object arr, int64_t pos0, llama_seq_id seq,
                             int logits_mode) except -1:
        """Caller holds _enter(). Decodes arr in chunks; returns tokens decoded."""
        cdef const int32_t[::1] view = arr
        cdef int32_t n = <int32_t>view.shape[0]
        cdef int32_t done = 0, chunk
        if n == 0:
            raise InvalidArgumentError("tokens is empty")
        if pos0 < 0:
            pos0 = llama_memory_seq_pos_max(self._mem, seq) + 1
        if pos0 > 2147483647 - n:
            raise InvalidArgumentError(f"pos0 = {pos0} is too large")
        cdef Batch batch = Batch(min(n, <int32_t>self.n_batch), 1)
        try:
            while done < n:
                chunk = min(n - done, <int32_t>self.n_batch)
                _fill_batch(&batch._b, &view[done], chunk, <llama_pos>(pos0 + done), seq,
                            logits_mode if done + chunk == n else (2 if logits_mode == 2 else 0))
                self._run(&batch._b, False, True)
                done += chunk
        finally:
            batch.close()
        return done

    cdef int _decode_one(self, llama_token token, llama_pos pos, llama_seq_id seq) except -1:
        """The generation fast path: one token, logits on. Caller holds _enter() and
        has validated token and seq."""
        self._one.n_tokens = 1
        self._one.token[0] = token
        self._one.pos[0] = pos
        self._one.n_seq_id[0] = 1
        self._one.seq_id[0][0] = seq
        self._one.logits[0] = 1
        return self._run(&self._one, False, False)

    # --- outputs -------------------------------------------------------------------

    cdef int32_t _resolve_row(self, int32_t i) except? -2147483648:
        cdef int32_t n = self._last_n_tokens
        cdef int32_t j, k
        if n == 0:
            raise InvalidArgumentError("no outputs: decode a batch first")
        if i < 0:
            # -1 is the last row that produced an output
            k = i
            for j in range(n - 1, -1, -1):
                if self._out_rows[j]:
                    k += 1
                    if k == 0:
                        return j
            raise InvalidArgumentError(f"output index {i} out of range for the last batch")
        if i >= n:
            raise InvalidArgumentError(
                f"row {i} out of range: the last batch had {n} tokens")
        if not self._out_rows[i]:
            raise InvalidArgumentError(
                f"row {i} of the last batch did not request logits (set logits for it)")
        return i

    def logits(self, i=-1):
        """Logits of row ``i`` of the last batch (negative: counted from the last
        output row), as a zero-copy float32 NumPy array of n_vocab values.

        The array views llama.cpp's buffer: the next decode overwrites it (copy it
        to keep it). The context stays alive while the array does.
        """
        self._check()
        cdef int32_t row = self._resolve_row(_row_arg(i, "i"))
        cdef float * p = llama_get_logits_ith(self._ptr, row)
        if p == NULL:
            raise InvalidArgumentError(f"no logits for row {row}")
        return _OutputView._make(self, p, 1, self.n_vocab, "logits")

    def embeddings(self, i=-1):
        """Embedding of row ``i`` of the last batch (context created with
        embeddings=True), as a zero-copy float32 array."""
        self._check()
        if not self._embeddings:
            raise InvalidArgumentError("embeddings are off: create the context with embeddings=True")
        cdef int32_t row = self._resolve_row(_row_arg(i, "i"))
        cdef float * p = llama_get_embeddings_ith(self._ptr, row)
        if p == NULL:
            raise InvalidArgumentError(f"no embeddings for row {row}")
        return _OutputView._make(self, p, 1, self._n_embd_out, "embeddings")

    def sequence_embeddings(self, seq_id=0):
        """Pooled embedding of a sequence (pooling other than 'none'), zero-copy."""
        self._check()
        if not self._embeddings:
            raise InvalidArgumentError("embeddings are off: create the context with embeddings=True")
        seq_id = self._check_seq(seq_id, False)
        if self._last_n_tokens == 0:
            raise InvalidArgumentError("no outputs: decode a batch first")
        cdef float * p = llama_get_embeddings_seq(self._ptr, seq_id)
        if p == NULL:
            raise InvalidArgumentError(
                f"no pooled embedding for sequence {seq_id} (pooling is {self.pooling!r})")
        cdef int32_t n = self._n_embd_out
        if llama_get_pooling_type(self._ptr) == LLAMA_POOLING_TYPE_RANK:
            n = max(1, llama_model_n_cls_out(self.model._ptr))
        return _OutputView._make(self, p, 1, n, "embeddings")

    # --- memory (KV cache) ---------------------------------------------------------

    cdef llama_seq_id _check_seq(self, object seq_id, bint allow_all,
                                 str name="seq_id") except? -2:
        """A sequence id of this context (or -1, all sequences, where allowed)."""
        cdef int64_t v = _any_int_arg(seq_id, name)
        if allow_all and v == -1:
            return -1
        if v < 0 or v >= self.n_seq_max:
            raise InvalidArgumentError(
                f"{name} must be in [0, {self.n_seq_max - 1}]{' or -1 (all)' if allow_all else ''}, "
                f"got {v}")
        return <llama_seq_id>v

    # (these hold the GIL throughout: checking that no call is inside is claiming enough)

    def memory_clear(self, data=True):
        """Empty the KV cache (all sequences)."""
        data = _bool_arg(data, "data")
        self._check_idle()
        llama_memory_clear(self._mem, data)
        self._last_n_tokens = 0

    def seq_rm(self, seq_id, p0=-1, p1=-1):
        """Remove positions [p0, p1) of a sequence (-1: all sequences / open ends).
        Returns False if llama.cpp cannot remove a partial range (recurrent models)."""
        seq_id = self._check_seq(seq_id, True)
        p0, p1 = _pos_range(p0, p1)
        self._check_idle()
        return llama_memory_seq_rm(self._mem, seq_id, p0, p1)

    def seq_cp(self, src, dst, p0=-1, p1=-1):
        """Make positions [p0, p1) of sequence ``src`` also belong to ``dst``."""
        src = self._check_seq(src, False, "src")
        dst = self._check_seq(dst, False, "dst")
        p0, p1 = _pos_range(p0, p1)
        if (src != dst and self.n_seq_max > 1 and not self._kv_unified
                and (p0 > 0 or p1 >= 0)):
            # each sequence has its own KV stream: llama.cpp can copy only whole ones
            raise InvalidArgumentError(
                f"seq_cp of a partial range (p0={p0}, p1={p1}) between sequences needs a "
                "context created with kv_unified=True; copy the whole sequence (p0=-1, p1=-1)")
        self._check_idle()
        llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_keep(self, seq_id):
        """Remove every sequence but ``seq_id``."""
        seq_id = self._check_seq(seq_id, False)
        self._check_idle()
        llama_memory_seq_keep(self._mem, seq_id)

    def seq_add(self, seq_id, p0, p1, delta):
        """Shift positions [p0, p1) of a sequence by ``delta`` (needs can_shift)."""
        self._shift(seq_id, p0, p1, _int_arg(delta, "delta", -2147483647, 2147483647), False)

    def seq_div(self, seq_id, p0, p1, d):
        """Integer-divide positions [p0, p1) of a sequence by ``d`` (> 0)."""
        self._shift(seq_id, p0, p1, _int_arg(d, "d", 1, 2147483647), True)

    cdef int _shift(self, object seq_id, object p0, object p1, llama_pos by,
                    bint divide) except -1:
        cdef llama_seq_id seq = self._check_seq(seq_id, True)
        start, end = _pos_range(p0, p1)
        self._check_idle()
        if not llama_memory_can_shift(self._mem):
            raise InvalidArgumentError("this model's memory cannot shift positions")
        if divide:
            llama_memory_seq_div(self._mem, seq, start, end, by)
        else:
            llama_memory_seq_add(self._mem, seq, start, end, by)
        return 0

    def seq_pos_min(self, seq_id=0):
        """Smallest cached position of a sequence, -1 if empty."""
        seq_id = self._check_seq(seq_id, False)
        self._check()
        return llama_memory_seq_pos_min(self._mem, seq_id)

    def seq_pos_max(self, seq_id=0):
        """Largest cached position of a sequence, -1 if empty."""
        seq_id = self._check_seq(seq_id, False)
        self._check()
        return llama_memory_seq_pos_max(self._mem, seq_id)

    @property
    def can_shift(self):
        self._check()
        return llama_memory_can_shift(self._mem)

    # --- state (_core/state.pxi) ---------------------------------------------------

    def state_size(self, seq_id=None):
        """Bytes the whole state (or one sequence's) takes."""
        return _state_size(self, seq_id)

    def save_state(self, seq_id=None):
        """The whole context state (or one sequence's) as bytes."""
        return _save_state(self, seq_id)

    def load_state(self, data, seq_id=None):
        """Restore state saved by ``save_state`` (into sequence ``seq_id`` if given)."""
        _load_state(self, data, seq_id)

    def save_state_file(self, path, tokens=(), seq_id=None):
        """Write the state (and the tokens it holds) to a file."""
        _save_state_file(self, path, tokens, seq_id)

    def load_state_file(self, path, seq_id=None, max_tokens=-1):
        """Restore state from a file; returns the tokens saved with it (at most
        ``max_tokens``; -1: the context size)."""
        return _load_state_file(self, path, seq_id, max_tokens)

    # --- LoRA (_core/lora.pxi) -----------------------------------------------------

    def set_lora_adapters(self, adapters=()):
        """Apply LoRA adapters: a sequence of (LoraAdapter, scale); empty removes all."""
        _set_lora_adapters(self, adapters)

    # --- perf ----------------------------------------------------------------------

    def perf(self):
        """llama.cpp's timing counters for this context (milliseconds, counts)."""
        self._check()
        cdef llama_perf_context_data d = llama_perf_context(self._ptr)
        return {"t_start_ms": d.t_start_ms, "t_load_ms": d.t_load_ms,
                "t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "n_reused": d.n_reused}

    def perf_reset(self):
        self._check_idle()
        llama_perf_context_reset(self._ptr)
