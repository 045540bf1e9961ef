# cython: language_level=3
# Declarations from ggml-rpc.h (ggml's RPC backend), through ggml_rpc_shim.h, which
# stands in for it when the build leaves the backend out (GGML_RPC=OFF).

from libc.stdint cimport uint64_t

from ggml cimport ggml_backend_dev_t, ggml_backend_reg_t

cdef extern from "ggml_rpc_shim.h" nogil:
    int RPC_PROTO_MAJOR_VERSION
    int RPC_PROTO_MINOR_VERSION
    int RPC_PROTO_PATCH_VERSION
    int GGML_RPC_MAX_SERVERS

    ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
    void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
                                       size_t n_threads, size_t n_devices,
                                       ggml_backend_dev_t * devices)
    # added by vendor/llama-cpp-patches.json: failed connections to an endpoint so far
    uint64_t ggml_backend_rpc_endpoint_failures(const char * endpoint)
