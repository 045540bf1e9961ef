# The ggml backend: a process-wide, thread-safe, idempotent one-time initialisation,
# and what the build and the machine offer (backends, devices, CPU features).

cdef object _backend_lock = threading.Lock()
cdef bint _backend_ready = False

cdef dict _NUMA = {
    "disabled": GGML_NUMA_STRATEGY_DISABLED,
    "distribute": GGML_NUMA_STRATEGY_DISTRIBUTE,
    "isolate": GGML_NUMA_STRATEGY_ISOLATE,
    "numactl": GGML_NUMA_STRATEGY_NUMACTL,
    "mirror": GGML_NUMA_STRATEGY_MIRROR,
}
cdef object _numa_chosen = None


def backend_init(numa=None):
    """Initialise llama.cpp's backends once per process (later calls do nothing).

    Every object that needs the backend calls this itself; call it directly only to
    choose a NUMA strategy (``"distribute"``, ``"isolate"``, ``"numactl"``,
    ``"mirror"``), which must happen before the first model is loaded.
    """
    global _backend_ready, _numa_chosen
    cdef ggml_numa_strategy strategy = GGML_NUMA_STRATEGY_DISABLED
    if numa is not None:
        if numa not in _NUMA:
            raise InvalidArgumentError(
                f"numa must be one of {sorted(_NUMA)} or None, got {numa!r}")
        strategy = _NUMA[numa]
    with _backend_lock:
        if _backend_ready:
            if numa is not None and numa != _numa_chosen:
                raise BackendError(
                    f"the backend is already initialised (numa={_numa_chosen!r}); "
                    f"numa={numa!r} must be chosen before the first model is loaded")
            return
        with nogil:
            llama_backend_init()
            if strategy != GGML_NUMA_STRATEGY_DISABLED:
                llama_numa_init(strategy)
        _numa_chosen = numa
        _backend_ready = True


cdef inline int _ensure_backend() except -1:
    if not _backend_ready:
        backend_init()
    return 0


cdef dict _DEVICE_TYPES = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
    GGML_BACKEND_DEVICE_TYPE_META: "meta",
}


def devices(rpc_servers=None):
    """The devices ggml found at run time: name, description, type, backend, memory.

    ``rpc_servers=["host:port", ...]`` adds the devices of those RPC workers (backend
    ``"RPC"``, the endpoint as description; ggml gives them the type ``"gpu"``),
    connecting to each; an unreachable worker raises BackendError.
    """
    endpoints = _rpc_parse_servers(rpc_servers)
    _ensure_backend()
    cdef size_t i, free_mem, total_mem
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        free_mem = total_mem = 0
        with nogil:
            ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append({
            "index": i,
            "name": ggml_backend_dev_name(dev).decode("utf-8", "replace"),
            "description": ggml_backend_dev_description(dev).decode("utf-8", "replace"),
            "type": _DEVICE_TYPES.get(ggml_backend_dev_get_type(dev), "unknown"),
            "backend": ggml_backend_reg_name(
                ggml_backend_dev_backend_reg(dev)).decode("utf-8", "replace"),
            "memory_free": free_mem,
            "memory_total": total_mem,
        })
    if endpoints:
        out.extend(_rpc_device_info(endpoints, len(out)))
    return out


def backends():
    """Names of the ggml backends compiled into this build (CPU, Vulkan, CUDA...)."""
    _ensure_backend()
    cdef size_t i
    return [ggml_backend_reg_name(ggml_backend_reg_get(i)).decode("utf-8", "replace")
            for i in range(ggml_backend_reg_count())]


def cpu_features():
    """The CPU features ggml's CPU backend was built to use on this machine."""
    return {
        "sse3": bool(ggml_cpu_has_sse3()), "ssse3": bool(ggml_cpu_has_ssse3()),
        "avx": bool(ggml_cpu_has_avx()), "avx_vnni": bool(ggml_cpu_has_avx_vnni()),
        "avx2": bool(ggml_cpu_has_avx2()), "bmi2": bool(ggml_cpu_has_bmi2()),
        "f16c": bool(ggml_cpu_has_f16c()), "fma": bool(ggml_cpu_has_fma()),
        "avx512": bool(ggml_cpu_has_avx512()),
        "avx512_vbmi": bool(ggml_cpu_has_avx512_vbmi()),
        "avx512_vnni": bool(ggml_cpu_has_avx512_vnni()),
        "avx512_bf16": bool(ggml_cpu_has_avx512_bf16()),
        "amx_int8": bool(ggml_cpu_has_amx_int8()), "neon": bool(ggml_cpu_has_neon()),
        "arm_fma": bool(ggml_cpu_has_arm_fma()), "fp16_va": bool(ggml_cpu_has_fp16_va()),
        "dotprod": bool(ggml_cpu_has_dotprod()),
        "matmul_int8": bool(ggml_cpu_has_matmul_int8()), "sve": bool(ggml_cpu_has_sve()),
        "sme": bool(ggml_cpu_has_sme()), "riscv_v": bool(ggml_cpu_has_riscv_v()),
        "vsx": bool(ggml_cpu_has_vsx()), "wasm_simd": bool(ggml_cpu_has_wasm_simd()),
        "llamafile": bool(ggml_cpu_has_llamafile()),
    }


def system_info():
    """llama.cpp's own one-line summary of the backends and CPU features."""
    _ensure_backend()
    cdef const char * info
    with nogil:
        info = llama_print_system_info()
    return info.decode("utf-8", "replace").strip()


def native_info():
    """Versions and capabilities of the compiled-in llama.cpp (see ``build_info()``)."""
    _ensure_backend()
    return {
        "llama_cpp_commit": LLAMABIND_LLAMA_COMMIT.decode(),
        "llama_cpp_version": LLAMABIND_LLAMA_VERSION.decode(),
        "llama_version": llama_version().decode("utf-8", "replace"),
        "ggml_version": ggml_version().decode("utf-8", "replace"),
        "ggml_commit": ggml_commit().decode("utf-8", "replace"),
        "supports_gpu_offload": bool(llama_supports_gpu_offload()),
        "supports_mmap": bool(llama_supports_mmap()),
        "supports_mlock": bool(llama_supports_mlock()),
        "supports_rpc": bool(llama_supports_rpc()),
        "max_devices": llama_max_devices(),
        "max_parallel_sequences": llama_max_parallel_sequences(),
    }


def builtin_chat_templates():
    """Names of the chat templates llama.cpp implements natively."""
    cdef int32_t n = llama_chat_builtin_templates(NULL, 0)
    cdef const char ** names = <const char **>malloc(max(n, 1) * sizeof(char *))
    if names == NULL:
        raise MemoryError()
    try:
        n = llama_chat_builtin_templates(names, n)
        return [names[i].decode("utf-8") for i in range(n)]
    finally:
        free(names)
