# LoraAdapter: a LoRA adapter file loaded for one model (llama_adapter_lora). It pins
# the model; apply it to contexts with Context.set_lora_adapters().

@cython.no_gc_clear  # __dealloc__ frees the adapter, which needs self.model alive
cdef class LoraAdapter:
    """A LoRA adapter loaded from a GGUF file for ``model``."""

    cdef llama_adapter_lora * _ptr
    cdef readonly Model model
    cdef readonly str path

    def __cinit__(self):
        self._ptr = NULL

    def __init__(self, Model model not None, path):
        fspath, cpath = _path_bytes(path, "path")
        model._check_open()
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

    cdef int _check(self) except -1:
        if self._ptr == NULL:
            raise ClosedError("LoRA adapter is closed")
        return 0

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

    def close(self):
        """Free the adapter. Contexts that use it must drop it first
        (set_lora_adapters(())); llama.cpp frees adapters with their model otherwise."""
        cdef llama_adapter_lora * ptr = self._ptr
        self._ptr = NULL
        if ptr != NULL:
            llama_adapter_lora_free(ptr)
            self.model._unpin()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __dealloc__(self):
        if self._ptr != NULL:
            llama_adapter_lora_free(self._ptr)
            self._ptr = NULL
            if self.model is not None:
                self.model._unpin()


cdef int _set_lora_adapters(Context self, object adapters) except -1:
    """Context.set_lora_adapters: apply a sequence of (LoraAdapter, scale)."""
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
    return 0
