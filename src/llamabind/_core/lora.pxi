# LoraAdapter: a LoRA adapter file loaded for one model (llama_adapter_lora). It pins
# the model; apply it to contexts with Context.set_lora_adapters().

@cython.no_gc_clear  # __dealloc__ frees the adapter, which needs self.model alive
cdef class LoraAdapter(_NativeObject):
    """A LoRA adapter loaded from a GGUF file for ``model``."""

    cdef llama_adapter_lora * _ptr
    cdef readonly Model model
    cdef readonly str path

    def __cinit__(self):
        self._ptr = NULL

    def __init__(self, Model model not None, path):
        self._check_new()
        fspath, cpath = _path_bytes(path, "path")
        model._check()
        from llamabind._gguf import check_adapter_file
        check_adapter_file(fspath)  # missing, not GGUF, truncated: llama.cpp may abort
        model._pin()
        cdef const char * c = cpath
        cdef llama_adapter_lora * ptr = NULL
        try:
            _take_recent_errors()
            with nogil:
                ptr = llama_adapter_lora_init(model._ptr, c)
        except BaseException:
            model._unpin()
            raise
        if ptr == NULL:
            model._unpin()
            raise _native_error(ModelLoadError, f"could not load LoRA adapter {fspath!r}",
                                "no details logged", fspath)
        self._ptr = ptr
        self.model = model
        self.path = fspath
        self._opened(True)

    @property
    def metadata(self):
        self._check()
        cdef int32_t i, n = llama_adapter_meta_count(self._ptr)
        cdef char key[512]
        cdef char val[4096]
        out = {}
        for i in range(n):
            if llama_adapter_meta_key_by_index(self._ptr, i, key, sizeof(key)) >= 0:
                llama_adapter_meta_val_str_by_index(self._ptr, i, val, sizeof(val))
                out[key.decode("utf-8", "replace")] = val.decode("utf-8", "replace")
        return out

    # --- lifetime (_NativeObject): contexts that apply it pin it ----------------------
    # (llama.cpp frees the adapters still loaded with their model otherwise)

    cdef str _describe(self):
        return f"llamabind.LoraAdapter {self.path!r}" if self.path else "llamabind.LoraAdapter"

    cdef void _free_native(self) noexcept:
        llama_adapter_lora_free(self._ptr)
        self._ptr = NULL
        self.model._unpin()

    def __dealloc__(self):
        self._finalize()


cdef int _set_lora_adapters(Context self, object adapters) except -1:
    """Context.set_lora_adapters: apply a sequence of (LoraAdapter, scale). The context
    pins the adapters it applies (closing one meanwhile frees it when the context drops
    it or closes)."""
    items = list(adapters)
    cdef Py_ssize_t n = len(items)
    cdef llama_adapter_lora ** ptrs = <llama_adapter_lora **>malloc(max(n, 1) * sizeof(void *))
    cdef float * scales = <float *>malloc(max(n, 1) * sizeof(float))
    cdef int32_t rc
    cdef LoraAdapter ad
    cdef list pinned = []
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
            if ad.model is not self.model:
                raise InvalidArgumentError(f"adapters[{k}] was loaded for another model")
            scales[k] = _float_arg(scale, f"adapters[{k}] scale", -1e6, 1e6)
            ad._pin()
            pinned.append(ad)
            ptrs[k] = ad._ptr
        self._enter()
        try:
            rc = llama_set_adapters_lora(self._ptr, ptrs, n, scales)
        finally:
            self._leave()
        if rc != 0:
            raise InvalidArgumentError(f"llama.cpp refused the LoRA adapters (code {rc})")
        pinned, self._lora_refs = self._lora_refs, pinned
    finally:
        free(ptrs)
        free(scales)
        _unpin_lora_adapters(pinned)   # those replaced, or those not applied
    return 0


cdef void _unpin_lora_adapters(list adapters) noexcept:
    if adapters:
        for ad in adapters:
            (<LoraAdapter>ad)._unpin()
