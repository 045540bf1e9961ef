# cython: language_level=3
# Declarations from gguf.h (ggml's GGUF file reader) that llamabind uses.

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libcpp cimport bool as cppbool

from ggml cimport ggml_type

cdef extern from "gguf.h" nogil:
    cdef enum gguf_type:
        GGUF_TYPE_UINT8
        GGUF_TYPE_INT8
        GGUF_TYPE_UINT16
        GGUF_TYPE_INT16
        GGUF_TYPE_UINT32
        GGUF_TYPE_INT32
        GGUF_TYPE_FLOAT32
        GGUF_TYPE_BOOL
        GGUF_TYPE_STRING
        GGUF_TYPE_ARRAY
        GGUF_TYPE_UINT64
        GGUF_TYPE_INT64
        GGUF_TYPE_FLOAT64
        GGUF_TYPE_COUNT

    struct gguf_context
    struct ggml_context
    struct gguf_init_params:
        cppbool no_alloc
        ggml_context ** ctx

    ctypedef size_t (*gguf_reader_callback_t)(void * userdata, void * output, uint64_t offset,
                                              size_t len) noexcept nogil

    gguf_context * gguf_init_from_callback(gguf_reader_callback_t callback, void * userdata,
                                           size_t max_chunk_read, uint64_t max_expected_size,
                                           gguf_init_params params)
    void gguf_free(gguf_context * ctx)

    const char * gguf_type_name(gguf_type type)
    size_t gguf_get_data_offset(const gguf_context * ctx)

    int64_t gguf_get_n_kv(const gguf_context * ctx)
    int64_t gguf_find_key(const gguf_context * ctx, const char * key)
    const char * gguf_get_key(const gguf_context * ctx, int64_t key_id)
    gguf_type gguf_get_kv_type(const gguf_context * ctx, int64_t key_id)
    gguf_type gguf_get_arr_type(const gguf_context * ctx, int64_t key_id)
    const void * gguf_get_val_data(const gguf_context * ctx, int64_t key_id)
    const char * gguf_get_val_str(const gguf_context * ctx, int64_t key_id)
    size_t gguf_get_arr_n(const gguf_context * ctx, int64_t key_id)
    const void * gguf_get_arr_data(const gguf_context * ctx, int64_t key_id)
    const char * gguf_get_arr_str(const gguf_context * ctx, int64_t key_id, size_t i)

    int64_t gguf_get_n_tensors(const gguf_context * ctx)
    size_t gguf_get_tensor_offset(const gguf_context * ctx, int64_t tensor_id)
    const char * gguf_get_tensor_name(const gguf_context * ctx, int64_t tensor_id)
    const int64_t * gguf_get_tensor_ne(const gguf_context * ctx, int64_t tensor_id)
    ggml_type gguf_get_tensor_type(const gguf_context * ctx, int64_t tensor_id)
    size_t gguf_get_tensor_size(const gguf_context * ctx, int64_t tensor_id)
