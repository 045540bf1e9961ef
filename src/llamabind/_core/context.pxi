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
from posix.signal cimport sigaction, sigaction_t, sigemptyset
from libc.signal cimport SIGINT

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


cdef extern from "cpu_gate.h" nogil:
    void llamabind_gate_init(int capacity)
    int llamabind_gate_enter(int want)
    void llamabind_gate_leave(int taken)
    int llamabind_gate_capacity()
    int llamabind_gate_available()
    uint64_t llamabind_gate_waits()


def cpu_budget():
    """The CPU budget every decode in this process shares: ``(capacity, available,
    waits)``: threads in all (the physical cores by default; 0 when the gate is off),
    threads free now, and how many decodes had to wait for their turn."""
    return (llamabind_gate_capacity(), llamabind_gate_available(), llamabind_gate_waits())


def set_cpu_budget(threads):
    """Set the threads all decodes of this process may use at once (0 turns the gate
    off: contexts decode at the same time whatever their threads add up to, which on
    a machine with fewer cores than that is many times slower)."""
    threads = _int_arg(threads, "threads", 0, 1 << 16)
    llamabind_gate_init(threads)


# --- Ctrl+C during a long decode --------------------------------------------------
# While a multi-token decode runs on the main thread with Python's default SIGINT
# handler, a tiny C handler is chained in front of Python's: it records the signal
# (async-signal-safe) and calls Python's own handler, so the abort callback can stop
# llama.cpp without taking the GIL. The previous handler is restored right after.

ctypedef void (*_sighandler_t)(int) noexcept nogil

cdef volatile int _sigint_seen = 0
cdef volatile bint _exiting = False     # see "interpreter exit" below
cdef int _decodes_running = 0           # decodes in progress (changed with the GIL held)
cdef sigaction_t _python_sigint


cdef void _sigint_relay(int signum) noexcept nogil:
    global _sigint_seen
    _sigint_seen = 1
    cdef _sighandler_t previous = <_sighandler_t>_python_sigint.sa_handler
    # SIG_DFL (0) and SIG_IGN (1) are not functions to call
    if <size_t>previous > 1:
        previous(signum)


cdef struct _AbortState:
    bint cancel          # cancel() was called
    bint watch_sigint    # the relay handler is installed for this decode


cdef cppbool _abort_callback(void * data) noexcept nogil:
    cdef _AbortState * st = <_AbortState *>data
    return st.cancel or _exiting or (st.watch_sigint and _sigint_seen)


# --- interpreter exit ---------------------------------------------------------------
# After Python's atexit handlers, the C library runs llama.cpp's and ggml's static
# destructors, while daemon threads may still be computing inside llama_decode (they
# stop only when they next want the GIL): they would run on destroyed objects and
# crash the exiting process. So at exit every running decode is aborted, new ones are
# refused, and the exit waits (briefly) until no thread is inside a decode.

def _stop_decodes_at_exit():
    global _exiting
    _exiting = True
    deadline = time.monotonic() + 5.0
    while _decodes_running > 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the decoding threads take the GIL and leave


atexit.register(_stop_decodes_at_exit)


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


cdef int32_t _row_arg(object i, str name) except? -2147483648:
    """An output row index: negative counts from the last output row."""
    return <int32_t>_int_arg(i, name, -2147483647, 2147483647)


cdef tuple _pos_range(object p0, object p1):
    """Positions [p0, p1) of a KV-cache operation; -1 (any negative in llama.cpp) is an
    open end, so only -1 is taken."""
    return (_int_arg(p0, "p0", -1, 2147483647), _int_arg(p1, "p1", -1, 2147483647))


# ggml's workers poll for the next graph before sleeping; at its default level (50, as
# llama.cpp's tools use) that is ~100 ms of spinning after every decode, taken from the
# host's other threads and from other contexts. 0: they sleep at once. Generation
# speed measured the same either way (within this machine's noise).
cdef uint32_t _POOL_POLL = 0


cdef ggml_threadpool_t _new_pool(int n_threads) except NULL:
    cdef ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads)
    cdef ggml_threadpool_t pool
    tpp.poll = _POOL_POLL
    with nogil:
        pool = ggml_threadpool_new(&tpp)
    if pool == NULL:
        raise ContextCreationError(f"ggml could not start a pool of {n_threads} threads")
    return pool


cdef void _free_pool(ggml_threadpool_t pool) noexcept:
    if pool != NULL:
        with nogil:
            ggml_threadpool_free(pool)


@cython.no_gc_clear  # __dealloc__ frees the llama_context, which needs self.model alive
cdef class Context:
    """A llama.cpp context on a :class:`Model`: KV cache, decode, logits, state.

    One thread at a time may use a context (a second gets ``ConcurrentUseError``).
    Create one per thread or per request; they all share the model's weights.
    """

    cdef llama_context * _ptr
    cdef llama_memory_t _mem
    cdef readonly Model model
    cdef _AbortState _abort
    cdef bint _busy
    cdef bint _closed
    cdef bint _close_requested
    cdef int _fork_gen
    cdef int _exports
    cdef int32_t _n_vocab
    cdef uint32_t _n_ctx, _n_batch, _n_ubatch, _n_seq_max
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

    def __cinit__(self):
        self._ptr = NULL
        self._busy = False
        self._closed = True
        self._close_requested = False
        self._exports = 0
        self._out_rows = NULL
        self._last_n_tokens = 0
        self._decode_count = 0
        memset(&self._one, 0, sizeof(llama_batch))
        memset(&self._abort, 0, sizeof(_AbortState))
        self._fork_gen = _fork_generation

    def __init__(self, Model model not None, config=None, **options):
        """``Context(model, n_ctx=..., n_batch=..., ...)``: the options are the fields
        of :class:`llamabind.ContextConfig` (or pass one as ``config``), checked by
        their rules there."""
        if self._ptr != NULL:
            raise InvalidArgumentError("Context is already initialised")
        cfg = _options_config(_ContextConfig, config, options)
        n_ctx = cfg.n_ctx
        n_batch = cfg.n_batch
        n_ubatch = min(n_batch, 512) if cfg.n_ubatch is None else cfg.n_ubatch
        n_seq_max = cfg.n_seq_max
        flash_attn = cfg.flash_attn
        type_k = cfg.type_k
        type_v = cfg.type_v
        embeddings = cfg.embeddings
        pooling = cfg.pooling
        offload_kqv = cfg.offload_kqv
        no_perf = cfg.no_perf
        kv_unified = bool(cfg.kv_unified)
        swa_full = cfg.swa_full
        model._check_open()
        # llama.cpp aborts (output_reserve) when more sequences than batch rows exist
        effective = min(n_batch, n_ctx if n_ctx > 0 else model.n_ctx_train)
        if n_seq_max > effective:
            raise InvalidArgumentError(
                f"n_seq_max = {n_seq_max} must not exceed min(n_batch, n_ctx) = {effective}")
        threads = _default_threads() if cfg.n_threads is None else cfg.n_threads
        threads_batch = threads if cfg.n_threads_batch is None else cfg.n_threads_batch
        model._check_open()
        if model.vocab_only:
            raise InvalidArgumentError(
                f"model {model.path!r} was loaded with vocab_only=True: it has no weights "
                "to run a context on")
        model._check_rpc()
        model._pin()
        cdef llama_context_params params = llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        params.type_k = _KV_TYPES[type_k]
        params.type_v = _KV_TYPES[type_v]
        params.embeddings = embeddings
        params.pooling_type = _POOLING[pooling]
        params.offload_kqv = offload_kqv
        params.no_perf = no_perf
        params.kv_unified = kv_unified
        params.swa_full = swa_full
        params.abort_callback = _abort_callback
        params.abort_callback_data = &self._abort
        cdef llama_context * ptr = NULL
        try:
            _take_recent_errors()
            with nogil:
                ptr = llama_init_from_model(model._ptr, params)
            model._check_rpc()
            if ptr == NULL:
                details = "; ".join(_take_recent_errors()) or "no details logged"
                raise ContextCreationError(
                    f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}, "
                    f"n_seq_max={n_seq_max}): {details}")
            self._one = llama_batch_init(1, 0, 1)
            self._out_rows = <int8_t *>malloc(max(n_batch, 1))
            if self._one.token == NULL or self._out_rows == NULL:
                raise MemoryError()
            self._ptr = ptr
            self._attach_pools(threads, threads_batch)
            self._threads = threads
            self._threads_batch = max(threads, threads_batch)
        except BaseException:
            self._ptr = NULL
            if ptr != NULL:
                with nogil:
                    llama_free(ptr)
            if self._one.token != NULL:
                llama_batch_free(self._one)
                memset(&self._one, 0, sizeof(llama_batch))
            free(self._out_rows)
            self._out_rows = NULL
            model._unpin()
            raise
        self._ptr = ptr
        self._mem = llama_get_memory(ptr)
        self.model = model
        self._closed = False
        self._fork_gen = _fork_generation
        self._n_vocab = model._n_vocab
        self._n_ctx = llama_n_ctx(ptr)
        self._n_batch = llama_n_batch(ptr)
        self._n_ubatch = llama_n_ubatch(ptr)
        self._n_seq_max = llama_n_seq_max(ptr)
        self._n_embd_out = llama_model_n_embd_out(model._ptr)
        self._embeddings = embeddings
        self._kv_unified = kv_unified
        self._out_capacity = self._n_seq_max

    # --- lifetime ------------------------------------------------------------------

    cdef int _enter(self) except -1:
        """Begin an operation: check state, claim the context for this thread."""
        if self._closed:
            raise ClosedError("context is closed")
        if self._fork_gen != _fork_generation:
            _check_fork(self._fork_gen, "context")
        if self._busy:
            raise ConcurrentUseError(
                "this context is being used by another thread; use one context per thread")
        self._busy = True
        return 0

    cdef void _leave(self) noexcept:
        self._busy = False
        if self._close_requested:
            self._free()

    cdef void _free(self) noexcept:
        if self._exports > 0:
            # NumPy views of the outputs are alive: free when the last one goes.
            self._closed = True
            self._close_requested = True
            return
        cdef llama_context * ptr = self._ptr
        self._ptr = NULL
        self._mem = NULL
        self._closed = True
        self._close_requested = False
        if self._one.token != NULL:
            llama_batch_free(self._one)
            memset(&self._one, 0, sizeof(llama_batch))
        free(self._out_rows)
        self._out_rows = NULL
        if ptr != NULL:
            if self._fork_gen == _fork_generation:
                with nogil:
                    llama_free(ptr)
                self._free_pools()
            # (in a forked child the pools' threads do not exist: nothing to join)
            self._pool = self._pool_batch = NULL
            self._retired_pools = None
            if self.model is not None:
                self.model._unpin()

    cdef int _attach_pools(self, int n_threads, int n_threads_batch) except -1:
        """Give the context thread pools of its own (llama.cpp's tools do the same).
        Without them ggml starts and joins its worker threads on every decode, and a
        worker that starts late gets little of the work: with 2 threads, perf showed the
        main thread doing ~97% of the compute.

        A pool with at least the threads asked for is kept (ggml runs a graph on as many
        of its threads as the context's thread count says); batches share it unless they
        need more. A pool that is replaced cannot be freed yet: ggml's CPU backend keeps
        a pointer to the pool it last ran on and pauses it when the next decode switches
        pools (AddressSanitizer caught that use after free), so it is retired and freed
        with the context."""
        cdef ggml_threadpool_t pool = self._pool
        cdef ggml_threadpool_t pool_batch = NULL
        cdef int size = self._pool_size
        cdef int batch_size = 0
        if pool == NULL or n_threads > size:
            pool = _new_pool(n_threads)
            size = n_threads
        if n_threads_batch > size:
            if self._pool_batch != NULL and self._pool_batch_size >= n_threads_batch:
                pool_batch = self._pool_batch
                batch_size = self._pool_batch_size
            else:
                try:
                    pool_batch = _new_pool(n_threads_batch)
                except BaseException:
                    if pool != self._pool:
                        _free_pool(pool)
                    raise
                batch_size = n_threads_batch
        llama_attach_threadpool(self._ptr, pool, pool_batch)
        self._retire(self._pool, pool, pool_batch)
        self._retire(self._pool_batch, pool, pool_batch)
        self._pool = pool
        self._pool_size = size
        self._pool_batch = pool_batch
        self._pool_batch_size = batch_size
        return 0

    cdef int _retire(self, ggml_threadpool_t old, ggml_threadpool_t pool,
                     ggml_threadpool_t pool_batch) except -1:
        if old != NULL and old != pool and old != pool_batch:
            if self._retired_pools is None:
                self._retired_pools = []
            self._retired_pools.append(<size_t>old)
        return 0

    cdef void _free_pools(self) noexcept:
        """After llama_free: nothing refers to the pools any more."""
        _free_pool(self._pool_batch)
        _free_pool(self._pool)
        self._pool = self._pool_batch = NULL
        if self._retired_pools is not None:
            for old in self._retired_pools:
                _free_pool(<ggml_threadpool_t><size_t>old)
            self._retired_pools = None

    def close(self):
        """Free the context. If another thread is inside it, that operation is
        cancelled and the context is freed when it returns."""
        if self._ptr == NULL:
            self._closed = True
            return
        if self._busy:
            self._abort.cancel = True
            self._close_requested = True
            self._closed = True
            return
        self._free()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        if self._closed:
            raise ClosedError("context is closed")
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __dealloc__(self):
        if self._ptr != NULL:
            if not self._closed:
                _warn_unclosed("llamabind.Context")
            self._exports = 0
            self._free()

    def __repr__(self):
        if self._closed:
            return "<llamabind.Context closed>"
        return f"<llamabind.Context n_ctx={self._n_ctx} n_batch={self._n_batch}>"

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
    def n_ctx(self):
        return self._n_ctx

    @property
    def n_batch(self):
        return self._n_batch

    @property
    def n_ubatch(self):
        return self._n_ubatch

    @property
    def n_seq_max(self):
        return self._n_seq_max

    @property
    def n_ctx_seq(self):
        self._check()
        return llama_n_ctx_seq(self._ptr)

    @property
    def n_vocab(self):
        return self._n_vocab

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
            self._attach_pools(n_threads, nb)
            llama_set_n_threads(self._ptr, n_threads, nb)
            self._threads = n_threads
            self._threads_batch = max(n_threads, nb)
        finally:
            self._leave()

    def set_embeddings(self, enabled):
        """Turn embedding output on or off for the next decodes."""
        enabled = _bool_arg(enabled, "enabled")
        self._enter()
        try:
            if enabled != self._embeddings and self._exports > 0:
                raise ConcurrentUseError(
                    "release the NumPy views of this context's outputs before switching "
                    "embeddings (the output buffer may be reallocated)")
            llama_set_embeddings(self._ptr, enabled)
            self._embeddings = enabled
        finally:
            self._leave()

    def set_causal_attn(self, causal):
        causal = _bool_arg(causal, "causal")
        self._enter()
        try:
            llama_set_causal_attn(self._ptr, causal)
        finally:
            self._leave()

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError("context is closed")
        if self._fork_gen != _fork_generation:
            _check_fork(self._fork_gen, "context")
        return 0

    # --- decode --------------------------------------------------------------------

    cdef int _validate_batch(self, llama_batch * b) except -1:
        cdef int32_t i, k, n = b.n_tokens
        cdef int32_t n_out = 0
        if n < 1:
            raise InvalidArgumentError("batch is empty")
        if <uint32_t>n > self._n_batch:
            raise InvalidArgumentError(
                f"batch has {n} tokens, more than the context's n_batch={self._n_batch}")
        for i in range(n):
            if b.token != NULL and (b.token[i] < 0 or b.token[i] >= self._n_vocab):
                raise InvalidArgumentError(
                    f"batch token[{i}] = {b.token[i]} is not a valid token id "
                    f"(vocabulary of {self._n_vocab})")
            if b.pos[i] < 0 or <uint32_t>b.pos[i] >= 2147483647:
                raise InvalidArgumentError(f"batch pos[{i}] = {b.pos[i]} must be >= 0")
            if b.n_seq_id[i] < 1 or <uint32_t>b.n_seq_id[i] > self._n_seq_max:
                raise InvalidArgumentError(
                    f"batch row {i} belongs to {b.n_seq_id[i]} sequences; must be 1.."
                    f"{self._n_seq_max}")
            for k in range(b.n_seq_id[i]):
                if b.seq_id[i][k] < 0 or <uint32_t>b.seq_id[i][k] >= self._n_seq_max:
                    raise InvalidArgumentError(
                        f"batch seq_id[{i}][{k}] = {b.seq_id[i][k]} out of range: this "
                        f"context has n_seq_max={self._n_seq_max} (ids 0..{self._n_seq_max - 1})")
            n_out += b.logits[i] != 0
        if n_out > <int32_t>self._out_capacity and self._exports > 0:
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
        batch._check()
        self._enter()
        try:
            self._run(&batch._b, False, True)
        finally:
            self._leave()

    def encode(self, Batch batch not None):
        """Run the encoder of an encoder-decoder model on ``batch``."""
        batch._check()
        self._enter()
        try:
            if not llama_model_has_encoder(self.model._ptr):
                raise InvalidArgumentError("this model has no encoder; use decode()")
            self._run(&batch._b, True, True)
        finally:
            self._leave()

    def eval(self, tokens, pos0=None, seq_id=0, logits="last"):
        """Decode ``tokens`` for one sequence, in n_batch-sized chunks.

        ``pos0`` defaults to the position after the sequence's last cached token.
        ``logits``: ``"last"`` (output for the last token only) or ``"all"``.
        Returns the number of tokens decoded.
        """
        if logits not in ("last", "all"):
            raise InvalidArgumentError(f"logits must be 'last' or 'all', got {logits!r}")
        self._check()
        arr = _token_array(tokens, self._n_vocab, "tokens")
        seq_id = self._check_seq(seq_id, False)
        if pos0 is not None:
            pos0 = _int_arg(pos0, "pos0", 0, 2147483647)
        if logits == "all" and len(arr) > self._n_batch:
            raise InvalidArgumentError(
                f"logits='all' needs all {len(arr)} tokens in one batch; n_batch is {self._n_batch}")
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
        cdef Batch batch = Batch(min(n, <int32_t>self._n_batch), 1)
        while done < n:
            chunk = min(n - done, <int32_t>self._n_batch)
            _fill_batch(&batch._b, &view[done], chunk, <llama_pos>(pos0 + done), seq,
                        logits_mode if done + chunk == n else (2 if logits_mode == 2 else 0))
            self._run(&batch._b, False, True)
            done += chunk
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
        return _OutputView._make(self, p, 1, self._n_vocab, "logits")

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
        if v < 0 or v >= self._n_seq_max:
            raise InvalidArgumentError(
                f"{name} must be in [0, {self._n_seq_max - 1}]{' or -1 (all)' if allow_all else ''}, "
                f"got {v}")
        return <llama_seq_id>v

    def memory_clear(self, data=True):
        """Empty the KV cache (all sequences)."""
        data = _bool_arg(data, "data")
        self._enter()
        try:
            llama_memory_clear(self._mem, data)
            self._last_n_tokens = 0
        finally:
            self._leave()

    def seq_rm(self, seq_id, p0=-1, p1=-1):
        """Remove positions [p0, p1) of a sequence (-1: all sequences / open ends).
        Returns False if llama.cpp cannot remove a partial range (recurrent models)."""
        seq_id = self._check_seq(seq_id, True)
        p0, p1 = _pos_range(p0, p1)
        self._enter()
        try:
            return llama_memory_seq_rm(self._mem, seq_id, p0, p1)
        finally:
            self._leave()

    def seq_cp(self, src, dst, p0=-1, p1=-1):
        """Make positions [p0, p1) of sequence ``src`` also belong to ``dst``."""
        src = self._check_seq(src, False, "src")
        dst = self._check_seq(dst, False, "dst")
        p0, p1 = _pos_range(p0, p1)
        if (src != dst and self._n_seq_max > 1 and not self._kv_unified
                and (p0 > 0 or p1 >= 0)):
            # each sequence has its own KV stream: llama.cpp can copy only whole ones
            raise InvalidArgumentError(
                f"seq_cp of a partial range (p0={p0}, p1={p1}) between sequences needs a "
                "context created with kv_unified=True; copy the whole sequence (p0=-1, p1=-1)")
        self._enter()
        try:
            llama_memory_seq_cp(self._mem, src, dst, p0, p1)
        finally:
            self._leave()

    def seq_keep(self, seq_id):
        """Remove every sequence but ``seq_id``."""
        seq_id = self._check_seq(seq_id, False)
        self._enter()
        try:
            llama_memory_seq_keep(self._mem, seq_id)
        finally:
            self._leave()

    def seq_add(self, seq_id, p0, p1, delta):
        """Shift positions [p0, p1) of a sequence by ``delta`` (needs can_shift)."""
        seq_id = self._check_seq(seq_id, True)
        p0, p1 = _pos_range(p0, p1)
        delta = _int_arg(delta, "delta", -2147483647, 2147483647)
        self._enter()
        try:
            if not llama_memory_can_shift(self._mem):
                raise InvalidArgumentError("this model's memory cannot shift positions")
            llama_memory_seq_add(self._mem, seq_id, p0, p1, delta)
        finally:
            self._leave()

    def seq_div(self, seq_id, p0, p1, d):
        """Integer-divide positions [p0, p1) of a sequence by ``d`` (> 0)."""
        seq_id = self._check_seq(seq_id, True)
        p0, p1 = _pos_range(p0, p1)
        d = _int_arg(d, "d", 1, 2147483647)
        self._enter()
        try:
            if not llama_memory_can_shift(self._mem):
                raise InvalidArgumentError("this model's memory cannot shift positions")
            llama_memory_seq_div(self._mem, seq_id, p0, p1, d)
        finally:
            self._leave()

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

    # --- state ---------------------------------------------------------------------

    def state_size(self, seq_id=None):
        self._enter()
        try:
            if seq_id is None:
                return llama_state_get_size(self._ptr)
            self._check_seq(seq_id, False)
            return llama_state_seq_get_size(self._ptr, seq_id)
        finally:
            self._leave()

    def save_state(self, seq_id=None):
        """The whole context state (or one sequence's) as bytes."""
        self._enter()
        cdef size_t size, got
        cdef uint8_t * dst
        cdef llama_seq_id seq = 0
        cdef bint whole = seq_id is None
        try:
            if not whole:
                seq = self._check_seq(seq_id, False)
            with nogil:
                size = llama_state_get_size(self._ptr) if whole else llama_state_seq_get_size(self._ptr, seq)
            out = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(out)
            with nogil:
                if whole:
                    got = llama_state_get_data(self._ptr, dst, size)
                else:
                    got = llama_state_seq_get_data(self._ptr, dst, size, seq)
            if got != size:
                raise StateError(f"llama.cpp wrote {got} state bytes, expected {size}")
            return out
        finally:
            self._leave()

    def load_state(self, data, seq_id=None):
        """Restore state saved by ``save_state`` (into sequence ``seq_id`` if given)."""
        cdef const uint8_t[::1] view
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"data must be a bytes-like object, got {type(data).__name__}") from None
        cdef size_t n = view.shape[0]
        cdef size_t got
        cdef llama_seq_id seq = 0
        cdef bint whole = seq_id is None
        if n == 0:
            raise InvalidArgumentError("state data is empty")
        if whole:
            _check_state_arch_length(bytes(view[:4]), n - 4, "state data")
        self._enter()
        try:
            if not whole:
                seq = self._check_seq(seq_id, False)
            if self._exports > 0:
                raise ConcurrentUseError(
                    "release the NumPy views of this context's outputs before loading state")
            _take_recent_errors()
            with nogil:
                if whole:
                    got = llama_state_set_data(self._ptr, &view[0], n)
                else:
                    got = llama_state_seq_set_data(self._ptr, &view[0], n, seq)
            if got == 0:
                details = "; ".join(_take_recent_errors()) or "invalid or incompatible state"
                raise StateError(f"could not restore state ({n} bytes): {details}")
            self._last_n_tokens = 0
            self._out_capacity = max(self._out_capacity, 1 << 30) if whole else self._out_capacity
        finally:
            self._leave()

    def save_state_file(self, path, tokens=(), seq_id=None):
        """Write the state (and the tokens it holds) to a file."""
        fspath, cpath = _path_bytes(path, "path")
        arr = _token_array(tokens, self._n_vocab, "tokens")
        cdef const int32_t[::1] view = arr
        cdef const llama_token * toks = &view[0] if view.shape[0] else NULL
        cdef size_t n = view.shape[0]
        cdef const char * c = cpath
        cdef bint ok
        cdef llama_seq_id seq = 0
        cdef bint whole = seq_id is None
        self._enter()
        try:
            if not whole:
                seq = self._check_seq(seq_id, False)
            with nogil:
                if whole:
                    ok = llama_state_save_file(self._ptr, c, toks, n)
                else:
                    ok = llama_state_seq_save_file(self._ptr, c, seq, toks, n) != 0
            if not ok:
                raise StateError(f"could not write state file {fspath!r}")
        finally:
            self._leave()

    def load_state_file(self, path, seq_id=None, max_tokens=-1):
        """Restore state from a file; returns the tokens saved with it (at most
        ``max_tokens``; -1: the context size)."""
        fspath, cpath = _path_bytes(path, "path")
        max_tokens = _int_arg(max_tokens, "max_tokens", -1, 1 << 30)
        if not os.path.isfile(fspath):
            raise StateFileNotFoundError(f"state file not found: {fspath!r}", fspath)
        if seq_id is None:
            _check_state_file(fspath)
        cdef size_t cap = self._n_ctx if max_tokens < 0 else max_tokens
        out = _np().empty(max(cap, 1), dtype=_np().int32)
        cdef int32_t[::1] view = out
        cdef size_t count = 0
        cdef const char * c = cpath
        cdef bint ok
        cdef llama_seq_id seq = 0
        cdef bint whole = seq_id is None
        self._enter()
        try:
            if not whole:
                seq = self._check_seq(seq_id, False)
            if self._exports > 0:
                raise ConcurrentUseError(
                    "release the NumPy views of this context's outputs before loading state")
            _take_recent_errors()
            with nogil:
                if whole:
                    ok = llama_state_load_file(self._ptr, c, &view[0], cap, &count)
                else:
                    ok = llama_state_seq_load_file(self._ptr, c, seq, &view[0], cap, &count) != 0
            if not ok:
                details = "; ".join(_take_recent_errors()) or "invalid or incompatible file"
                raise StateError(f"could not load state file {fspath!r}: {details}")
            self._last_n_tokens = 0
            self._out_capacity = 1 << 30
            return out[:count].tolist()
        finally:
            self._leave()

    # --- LoRA ----------------------------------------------------------------------

    def set_lora_adapters(self, adapters=()):
        """Apply LoRA adapters: a sequence of (LoraAdapter, scale); empty removes all."""
        items = list(adapters)
        cdef Py_ssize_t n = len(items)
        cdef llama_adapter_lora ** ptrs = <llama_adapter_lora **>malloc(max(n, 1) * sizeof(void *))
        cdef float * scales = <float *>malloc(max(n, 1) * sizeof(float))
        cdef int32_t rc
        cdef LoraAdapter ad
        try:
            if ptrs == NULL or scales == NULL:
                raise MemoryError()
            for k, item in enumerate(items):
                try:
                    adapter, scale = item
                except (TypeError, ValueError):
                    raise InvalidArgumentError(
                        f"adapters[{k}] must be a (LoraAdapter, scale) pair, got {item!r}") from None
                if not isinstance(adapter, LoraAdapter):
                    raise InvalidArgumentError(f"adapters[{k}][0] must be a LoraAdapter")
                ad = adapter
                ad._check()
                if ad.model is not self.model:
                    raise InvalidArgumentError(f"adapters[{k}] was loaded for another model")
                ptrs[k] = ad._ptr
                scales[k] = _float_arg(scale, f"adapters[{k}] scale", -1e6, 1e6)
            self._enter()
            try:
                rc = llama_set_adapters_lora(self._ptr, ptrs, n, scales)
            finally:
                self._leave()
            if rc != 0:
                raise InvalidArgumentError(f"llama.cpp refused the LoRA adapters (code {rc})")
            self._lora_refs = items
        finally:
            free(ptrs)
            free(scales)

    cdef public object _lora_refs

    # --- perf ----------------------------------------------------------------------

    def perf(self):
        """llama.cpp's timing counters for this context (milliseconds, counts)."""
        self._check()
        cdef llama_perf_context_data d = llama_perf_context(self._ptr)
        return {"t_start_ms": d.t_start_ms, "t_load_ms": d.t_load_ms,
                "t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "n_reused": d.n_reused}

    def perf_reset(self):
        self._enter()
        try:
            llama_perf_context_reset(self._ptr)
        finally:
            self._leave()


cdef int _default_threads():
    """Physical cores, as llama.cpp's tools default to (logical cores / SMT width)."""
    try:
        siblings = set()
        for cpu in os.sched_getaffinity(0):
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            with open(path) as fh:
                siblings.add(fh.read().strip())
        if siblings:
            return len(siblings)
    except (OSError, AttributeError):
        pass
    return max(1, os.cpu_count() or 1)


def default_threads():
    """The default number of threads: the physical cores this process may run on."""
    return _default_threads()


llamabind_gate_init(_default_threads())


@cython.final
@cython.no_gc_clear  # __releasebuffer__ uses self._ctx
cdef class _OutputView:
    """Exports a slice of a context's output buffer to NumPy without copying, and
    keeps the context (and so the buffer) alive while any array uses it."""

    cdef Context _ctx
    cdef float * _data
    cdef Py_ssize_t _shape[2]
    cdef Py_ssize_t _strides[2]
    cdef int _ndim

    @staticmethod
    cdef object _make(Context ctx, float * data, Py_ssize_t rows, Py_ssize_t cols, str what):
        cdef _OutputView v = _OutputView.__new__(_OutputView)
        v._ctx = ctx
        v._data = data
        v._ndim = 1 if rows == 1 else 2
        if v._ndim == 1:
            v._shape[0] = cols
            v._strides[0] = sizeof(float)
        else:
            v._shape[0] = rows
            v._shape[1] = cols
            v._strides[0] = cols * sizeof(float)
            v._strides[1] = sizeof(float)
        arr = _np().asarray(v)
        arr.flags.writeable = False
        return arr

    def __getbuffer__(self, Py_buffer * buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("llamabind output views are read-only")
        if self._ctx._ptr == NULL:
            raise BufferError("context is closed")
        buf.buf = self._data
        buf.obj = self
        buf.len = self._shape[0] * (self._shape[1] if self._ndim == 2 else 1) * sizeof(float)
        buf.readonly = 1
        buf.itemsize = sizeof(float)
        buf.format = "f"
        buf.ndim = self._ndim
        buf.shape = self._shape
        buf.strides = self._strides
        buf.suboffsets = NULL
        buf.internal = NULL
        self._ctx._exports += 1

    def __releasebuffer__(self, Py_buffer * buf):
        self._ctx._exports -= 1
        if self._ctx._exports == 0 and self._ctx._close_requested and not self._ctx._busy:
            self._ctx._free()
