# Model: a loaded GGUF model (llama_model). Thread-safe to share: every use pins it,
# and close() frees the native model only when nothing uses it any more.

cdef extern from "grammar_index.h" nogil:
    # A vocabulary's tokens grouped by their first code points, for asking a grammar
    # about the whole vocabulary through probe tokens (Sampler._apply_chain).
    ctypedef struct llamabind_grammar_index:
        pass
    llamabind_grammar_index * llamabind_grammar_index_new(const llama_vocab * vocab) except +
    void llamabind_grammar_index_free(llamabind_grammar_index * idx)
    int32_t llamabind_grammar_pending(const llama_vocab * vocab, int32_t pending,
                                      llama_token token) except +
    void llamabind_grammar_index_apply(const llamabind_grammar_index * idx,
                                       llama_sampler * grammar,
                                       llama_token_data_array * cur_p,
                                       cppbool use_lead) except +


cdef dict _SPLIT_MODES = {
    "none": LLAMA_SPLIT_MODE_NONE,
    "layer": LLAMA_SPLIT_MODE_LAYER,
    "row": LLAMA_SPLIT_MODE_ROW,
    "tensor": LLAMA_SPLIT_MODE_TENSOR,
}


cdef dict _LOAD_MODES = {  # (use_mmap, use_mlock): how llama.cpp reads the weights
    (True, True): LLAMA_LOAD_MODE_MMAP_MLOCK, (True, False): LLAMA_LOAD_MODE_MMAP,
    (False, True): LLAMA_LOAD_MODE_MLOCK, (False, False): LLAMA_LOAD_MODE_NONE,
}


cdef struct _LoadState:
    PyObject * model          # borrowed: the Model being loaded
    bint check_signals        # loading on the main thread: poll for Ctrl+C
    bint failed               # a Python callback raised; abort the load


cdef cppbool _progress_callback(float progress, void * data) noexcept nogil:
    cdef _LoadState * st = <_LoadState *>data
    with gil:
        try:
            if st.check_signals:
                PyErr_CheckSignals()
            cb = (<Model>st.model)._progress
            if cb is not None and cb(progress) is False:
                (<Model>st.model)._load_exc = GenerationCancelled(
                    "model loading was cancelled by the progress callback")
                st.failed = True
        except BaseException as exc:
            (<Model>st.model)._load_exc = exc
            st.failed = True
    return not st.failed


cdef enum _Meta:
    _META_KEY_AT           # the key of entry i
    _META_VALUE_AT         # the value of entry i
    _META_VALUE_OF         # the value of key


cdef int32_t _meta_call(_Meta what, const llama_model * model, int32_t i, const char * key,
                        char * buf, size_t size) noexcept nogil:
    if what == _META_KEY_AT:
        return llama_model_meta_key_by_index(model, i, buf, size)
    if what == _META_VALUE_AT:
        return llama_model_meta_val_str_by_index(model, i, buf, size)
    return llama_model_meta_val_str(model, key, buf, size)


cdef object _meta_string(_Meta what, const llama_model * model, int32_t i, const char * key):
    """A metadata text (see _Meta), or None where there is none."""
    cdef char small[256]
    cdef int32_t n = _meta_call(what, model, i, key, small, sizeof(small))
    if n < 0:
        return None
    if n < <int32_t>sizeof(small):
        return small[:n].decode("utf-8", "replace")
    cdef char * big = <char *>malloc(n + 1)
    if big == NULL:
        raise MemoryError()
    try:
        _meta_call(what, model, i, key, big, n + 1)
        return big[:n].decode("utf-8", "replace")
    finally:
        free(big)


cdef class Model(_NativeObject):
    """A GGUF model loaded by llama.cpp.

    ``Model(path, n_gpu_layers=0, ...)`` loads the file with the GIL released. One
    model can serve any number of contexts in any number of threads. ``close()`` (or
    a ``with`` block) frees its memory at once when nothing uses it; contexts still
    open keep it alive until they close.

    ``rpc_servers=["host:port", ...]`` offloads layers to ggml RPC workers
    (``llamabind rpc-server``) as devices placed before this machine's GPUs;
    ``n_gpu_layers`` layers go to those devices, split by ``tensor_split`` (one weight
    per device, the workers' first), the rest stay on this CPU. A worker that cannot be
    reached, or is from another build, raises BackendError; one that goes away later
    makes every use of the model raise BackendError.

    ``use_extra_bufts=False`` keeps the CPU's weights in ggml's plain layout (llama.cpp's
    ``--no-repack``): by default some quantised weights are repacked for faster CPU
    kernels, which sum in another order, so the logits differ slightly from a worker's
    (a worker never repacks) or from a build without those kernels.
    """

    cdef llama_model * _ptr
    cdef const llama_vocab * _vocab
    cdef int32_t _n_vocab
    cdef object _progress
    cdef object _load_exc
    cdef readonly str path
    cdef readonly bint vocab_only
    cdef readonly tuple rpc_servers   # the workers' endpoints, normalised
    cdef tuple _rpc_failures          # ggml's failure count per worker after the load
    cdef llamabind_grammar_index * _gindex  # built on first use (_grammar_index)

    def __cinit__(self):
        self._ptr = NULL
        self._vocab = NULL
        self._gindex = NULL
        self.rpc_servers = ()
        self._rpc_failures = ()

    def __init__(self, path, *, progress=None, **options):
        """``Model(path, n_gpu_layers=..., ...)``: the options are the fields of
        :class:`llamabind.ModelConfig` (``path`` may also be one), checked by their
        rules there. ``n_gpu_layers=None`` (the default) offloads every layer when a GPU
        device is present, and none otherwise."""
        self._check_new()
        if isinstance(path, _ModelConfig):
            cfg = path.with_(**options) if options else path
        else:
            cfg = _options_config(_ModelConfig, None, dict(options, path=path))
        fspath, cpath = _path_bytes(cfg.path, "path")
        self.path = fspath
        n_gpu_layers = cfg.n_gpu_layers
        endpoints = cfg.rpc_servers
        if n_gpu_layers is None:
            # RPC workers' devices count as GPUs (ggml gives them that type)
            n_gpu_layers = -1 if endpoints or _has_gpu_device() else 0
        elif endpoints and n_gpu_layers == 0:
            raise InvalidArgumentError(
                f"rpc_servers={list(endpoints)!r} with n_gpu_layers=0 would put no layer on "
                "the workers: give n_gpu_layers (-1: all; fewer keeps the first layers on "
                "this CPU)")
        tensor_split = cfg.tensor_split
        kv_overrides = cfg.kv_overrides
        if progress is not None and not callable(progress):
            raise InvalidArgumentError(f"progress must be callable or None, got {progress!r}")
        _ensure_backend()

        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = cfg.main_gpu
        params.split_mode = _SPLIT_MODES[cfg.split_mode]
        params.vocab_only = cfg.vocab_only
        params.check_tensors = cfg.check_tensors
        params.use_extra_bufts = cfg.use_extra_bufts
        params.load_mode = _LOAD_MODES[cfg.use_mmap, cfg.use_mlock]

        cdef size_t n_dev_max = llama_max_devices()
        cdef float * split = NULL
        cdef llama_model_kv_override * overrides = NULL
        cdef ggml_backend_dev_t * devs = NULL
        cdef _LoadState state
        cdef llama_model * ptr = NULL
        cdef const char * c_path = cpath
        try:
            if tensor_split is not None:
                values = [float(v) for v in tensor_split]
                if len(values) > n_dev_max or any(v < 0 or v != v for v in values):
                    raise InvalidArgumentError(
                        f"tensor_split must be at most {n_dev_max} non-negative numbers, "
                        f"got {tensor_split!r}")
                split = <float *>calloc(n_dev_max, sizeof(float))
                if split == NULL:
                    raise MemoryError()
                for i, v in enumerate(values):
                    split[i] = v
                params.tensor_split = split
            if kv_overrides:
                overrides = _make_kv_overrides(dict(kv_overrides))
                params.kv_overrides = overrides
            # what llama.cpp would abort on, with the overrides applied
            _check_model_file(fspath, cfg.vocab_only,
                              dict(kv_overrides) if kv_overrides else None)
            if endpoints:
                devs = _rpc_model_devices(endpoints, cfg.devices, n_dev_max, tensor_split)
                params.devices = devs
            elif cfg.devices is not None:
                devs = _device_list(cfg.devices)
                params.devices = devs
            failures = _rpc_failure_counts(endpoints)
            self._progress = progress
            self._load_exc = None
            state.model = <PyObject *>self
            state.check_signals = threading.current_thread() is threading.main_thread()
            state.failed = False
            params.progress_callback = _progress_callback
            params.progress_callback_user_data = &state
            _take_recent_errors()
            with nogil:
                ptr = llama_model_load_from_file(c_path, params)
            if endpoints:
                lost = _rpc_lost(endpoints, failures)
                if lost:
                    if ptr != NULL:
                        with nogil:
                            llama_model_free(ptr)
                        ptr = NULL
                    raise BackendError(
                        f"the connection to RPC worker {', '.join(lost)} failed while "
                        f"{fspath!r} was loading: start the worker again and reload")
                failures = _rpc_failure_counts(endpoints)
        finally:
            free(split)
            free(overrides)
            free(devs)
            self._progress = None
        if self._load_exc is not None:
            exc, self._load_exc = self._load_exc, None
            if ptr != NULL:
                with nogil:
                    llama_model_free(ptr)
            raise exc
        if ptr == NULL:
            raise _native_error(ModelLoadError, f"llama.cpp could not load model {fspath!r}",
                                "no details logged", fspath)
        self._ptr = ptr
        self._vocab = llama_model_get_vocab(ptr)
        self._n_vocab = llama_vocab_n_tokens(self._vocab)
        self.vocab_only = cfg.vocab_only
        self.rpc_servers = endpoints
        self._rpc_failures = failures
        if endpoints:
            _rpc_hold(endpoints, failures)
        self._opened(True)

    # --- lifetime (_NativeObject): contexts, adapters, samplers and tokenizing pin it

    cdef str _describe(self):
        return f"llamabind.Model {self.path!r}" if self.path else "llamabind.Model"

    cdef void _free_native(self) noexcept:
        cdef llama_model * ptr = self._ptr
        self._ptr = NULL
        self._vocab = NULL
        llamabind_grammar_index_free(self._gindex)
        self._gindex = NULL
        if ptr != NULL:
            with nogil:
                llama_model_free(ptr)
            if self.rpc_servers:
                _rpc_release(self.rpc_servers)

    def __dealloc__(self):
        self._finalize()

    cdef llamabind_grammar_index * _grammar_index(self) except NULL:
        """The vocabulary's probe index for grammars (grammar_index.h), built once, with
        the GIL released; the caller has the model pinned."""
        cdef llamabind_grammar_index * idx
        if self._gindex == NULL:
            with nogil:
                idx = llamabind_grammar_index_new(self._vocab)
            if self._gindex == NULL:   # another thread may have built it meanwhile
                self._gindex = idx
            else:
                llamabind_grammar_index_free(idx)
        return self._gindex

    cdef int _check_rpc(self) except -1:
        """BackendError when a connection to one of the model's RPC workers failed since
        the load: its layers there are gone (a restarted worker starts empty)."""
        if not self.rpc_servers:
            return 0
        lost = _rpc_lost(self.rpc_servers, self._rpc_failures)
        if lost:
            raise BackendError(
                f"the connection to RPC worker {', '.join(lost)} failed: the layers of "
                f"{self.path!r} there are lost; close the model and load it again once "
                "the worker is back")
        return 0

    def __repr__(self):
        state = "closed" if self.closed else "open"
        workers = f" rpc_servers={list(self.rpc_servers)!r}" if self.rpc_servers else ""
        return f"<llamabind.Model {self.path!r} {state}{workers}>"

    # --- information ---------------------------------------------------------------

    @property
    def vocab(self):
        """The model's vocabulary (a :class:`Vocab` that keeps this model alive)."""
        self._check()
        cdef Vocab vocab = Vocab.__new__(Vocab)
        vocab._model = self
        vocab._ptr = self._vocab
        vocab._n_vocab = self._n_vocab
        return vocab

    @property
    def n_vocab(self):
        self._check()
        return self._n_vocab

    @property
    def n_ctx_train(self):
        self._check()
        return llama_model_n_ctx_train(self._ptr)

    @property
    def n_embd(self):
        self._check()
        return llama_model_n_embd(self._ptr)

    @property
    def n_embd_out(self):
        self._check()
        return llama_model_n_embd_out(self._ptr)

    @property
    def n_layer(self):
        self._check()
        return llama_model_n_layer(self._ptr)

    @property
    def n_head(self):
        self._check()
        return llama_model_n_head(self._ptr)

    @property
    def n_head_kv(self):
        self._check()
        return llama_model_n_head_kv(self._ptr)

    @property
    def n_swa(self):
        self._check()
        return llama_model_n_swa(self._ptr)

    @property
    def n_params(self):
        self._check()
        return llama_model_n_params(self._ptr)

    @property
    def size(self):
        """Total size of the model's tensors in bytes."""
        self._check()
        return llama_model_size(self._ptr)

    @property
    def description(self):
        self._check()
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self._ptr, buf, sizeof(buf))
        return buf[:max(0, min(n, 255))].decode("utf-8", "replace")

    @property
    def ftype(self):
        """The quantisation, e.g. ``"Q4_K - Medium"``."""
        self._check()
        return llama_ftype_name(llama_model_ftype(self._ptr)).decode("utf-8", "replace")

    @property
    def has_encoder(self):
        self._check()
        return llama_model_has_encoder(self._ptr)

    @property
    def has_decoder(self):
        self._check()
        return llama_model_has_decoder(self._ptr)

    @property
    def decoder_start_token(self):
        self._check()
        return llama_model_decoder_start_token(self._ptr)

    @property
    def is_recurrent(self):
        self._check()
        return llama_model_is_recurrent(self._ptr)

    @property
    def is_hybrid(self):
        self._check()
        return llama_model_is_hybrid(self._ptr)

    @property
    def is_diffusion(self):
        self._check()
        return llama_model_is_diffusion(self._ptr)

    @property
    def n_cls_out(self):
        self._check()
        return llama_model_n_cls_out(self._ptr)

    def cls_label(self, i):
        i = _any_int_arg(i, "i")
        self._check()
        if i < 0 or <uint32_t>i >= llama_model_n_cls_out(self._ptr):
            raise InvalidArgumentError(f"classifier label index {i} out of range")
        cdef const char * label = llama_model_cls_label(self._ptr, i)
        return None if label == NULL else label.decode("utf-8", "replace")

    @property
    def metadata(self):
        """All GGUF metadata key/values as strings (arrays are summarised by llama.cpp)."""
        self._check()
        cdef int32_t i, n = llama_model_meta_count(self._ptr)
        out = {}
        for i in range(n):
            key = _meta_string(_META_KEY_AT, self._ptr, i, NULL)
            if key is not None:
                out[key] = _meta_string(_META_VALUE_AT, self._ptr, i, NULL)
        return out

    def meta(self, key, default=None):
        """One metadata value as a string, or ``default`` when the key is absent."""
        ckey = _utf8(key, "key")
        self._check()
        value = _meta_string(_META_VALUE_OF, self._ptr, -1, ckey)
        return default if value is None else value

    def chat_template(self, name=None):
        """The model's chat template (Jinja source) from its metadata, or None."""
        cdef const char * tmpl
        cdef const char * cname = NULL
        if name is not None:
            bname = _utf8(name, "name")
            cname = bname
        self._check()
        tmpl = llama_model_chat_template(self._ptr, cname)
        return None if tmpl == NULL else tmpl.decode("utf-8", "replace")


cdef llama_model_kv_override * _make_kv_overrides(object overrides) except NULL:
    if not isinstance(overrides, dict):
        raise InvalidArgumentError(
            f"kv_overrides must be a dict of key -> int/float/bool/str, got {overrides!r}")
    cdef Py_ssize_t n = len(overrides)
    cdef llama_model_kv_override * arr = <llama_model_kv_override *>malloc(
        (n + 1) * sizeof(llama_model_kv_override))
    if arr == NULL:
        raise MemoryError()
    memset(arr, 0, (n + 1) * sizeof(llama_model_kv_override))
    cdef Py_ssize_t i = 0
    try:
        for key, value in overrides.items():
            bkey = _utf8(key, "kv_overrides key")
            if len(bkey) == 0 or len(bkey) >= 128:
                raise InvalidArgumentError(
                    f"kv_overrides key must be 1..127 bytes, got {key!r}")
            memcpy(arr[i].key, <const char *>bkey, len(bkey))
            if isinstance(value, bool):
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL
                arr[i].val_bool = value
            elif isinstance(value, int):
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_INT
                if not -(2**63) <= value < 2**63:
                    raise InvalidArgumentError(f"kv_overrides[{key!r}] = {value} does not fit in int64")
                arr[i].val_i64 = value
            elif isinstance(value, float):
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT
                arr[i].val_f64 = value
            elif isinstance(value, str):
                bval = _utf8(value, f"kv_overrides[{key!r}]")
                if len(bval) >= 128:
                    raise InvalidArgumentError(
                        f"kv_overrides[{key!r}] string must be under 128 bytes")
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_STR
                memcpy(arr[i].val_str, <const char *>bval, len(bval))
            else:
                raise InvalidArgumentError(
                    f"kv_overrides[{key!r}] must be int, float, bool or str, got {value!r}")
            i += 1
    except BaseException:
        free(arr)
        raise
    return arr


cdef bint _has_gpu_device() except -1:
    _ensure_backend()
    return any(d["type"] in ("gpu", "igpu") for d in devices())


cdef list _device_addresses(object names):
    cdef list out = []
    cdef ggml_backend_dev_t dev
    for name in list(names):
        bname = _utf8(name, "devices item")
        dev = ggml_backend_dev_by_name(bname)
        if dev == NULL:
            known = [d["name"] for d in devices()]
            raise InvalidArgumentError(f"no device named {name!r}; devices: {known}")
        out.append(<uintptr_t>dev)
    return out


cdef ggml_backend_dev_t * _device_array(list addresses) except NULL:
    """A NULL-terminated, malloc'ed copy of the device addresses, for llama.cpp."""
    cdef Py_ssize_t i, n = len(addresses)
    cdef ggml_backend_dev_t * devs = <ggml_backend_dev_t *>malloc(
        (n + 1) * sizeof(ggml_backend_dev_t))
    if devs == NULL:
        raise MemoryError()
    for i in range(n):
        devs[i] = <ggml_backend_dev_t><uintptr_t>addresses[i]
    devs[n] = NULL
    return devs


cdef ggml_backend_dev_t * _device_list(object names) except NULL:
    return _device_array(_device_addresses(names))


cdef int _check_model_file(str path, bint vocab_only, dict overrides) except -1:
    from llamabind._gguf import check_model_file
    check_model_file(path, vocab_only=vocab_only, overrides=overrides)
    return 0
