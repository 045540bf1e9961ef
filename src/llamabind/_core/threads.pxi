# The CPU threads of decodes: the process-wide CPU budget (cpu_gate.h), each context's
# ggml thread pools, and the default thread count.

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


cdef int _attach_pools(Context self, int n_threads, int n_threads_batch) except -1:
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
    _retire_pool(self, self._pool, pool, pool_batch)
    _retire_pool(self, self._pool_batch, pool, pool_batch)
    self._pool = pool
    self._pool_size = size
    self._pool_batch = pool_batch
    self._pool_batch_size = batch_size
    return 0


cdef int _retire_pool(Context self, ggml_threadpool_t old, ggml_threadpool_t pool,
                      ggml_threadpool_t pool_batch) except -1:
    if old != NULL and old != pool and old != pool_batch:
        if self._retired_pools is None:
            self._retired_pools = []
        self._retired_pools.append(<size_t>old)
    return 0


cdef void _free_pools(Context self) noexcept:
    """After llama_free: nothing refers to the pools any more."""
    _free_pool(self._pool_batch)
    _free_pool(self._pool)
    self._pool = self._pool_batch = NULL
    if self._retired_pools is not None:
        for old in self._retired_pools:
            _free_pool(<ggml_threadpool_t><size_t>old)
        self._retired_pools = None


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
