/* ggml's RPC API (ggml-rpc.h) for llamabind's core, also in a build without the RPC
 * backend (GGML_RPC=OFF): there the functions are stubs, and rpc.pxi refuses
 * rpc_servers before reaching them, since llama_supports_rpc() is false. */
#pragma once

#if LLAMABIND_RPC
#include "ggml-rpc.h"
#else
#include <stddef.h>
#include <stdint.h>
#include "ggml-backend.h"

#define RPC_PROTO_MAJOR_VERSION 0
#define RPC_PROTO_MINOR_VERSION 0
#define RPC_PROTO_PATCH_VERSION 0
#define GGML_RPC_MAX_SERVERS    0

static inline ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint) {
    (void) endpoint;
    return NULL;
}

static inline void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
                                                 size_t n_threads, size_t n_devices,
                                                 ggml_backend_dev_t * devices) {
    (void) endpoint; (void) cache_dir; (void) n_threads; (void) n_devices; (void) devices;
}

static inline uint64_t ggml_backend_rpc_endpoint_failures(const char * endpoint) {
    (void) endpoint;
    return 0;
}
#endif
