# cython: language_level=3
# Declarations from ggml.h, ggml-cpu.h and ggml-backend.h that llamabind uses.
# Enum values are extern names: the C headers stay the single source of truth.

from libc.stdint cimport int64_t, uint32_t
from libcpp cimport bool as cppbool

cdef extern from "ggml.h" nogil:
    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    cdef enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_IQ4_NL
        GGML_TYPE_BF16
        GGML_TYPE_COUNT

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text,
                                       void * user_data) noexcept
    ctypedef cppbool (*ggml_abort_callback)(void * data) noexcept

    const char * ggml_version()
    const char * ggml_commit()
    const char * ggml_type_name(ggml_type type)
    void ggml_log_set(ggml_log_callback log_callback, void * user_data)

    struct ggml_tensor
    struct gguf_context
    ctypedef void * ggml_backend_sched_eval_callback
    ctypedef void * ggml_threadpool_t
    ctypedef struct ggml_threadpool_params:
        int n_threads
        uint32_t poll
        bint paused

    ggml_threadpool_params ggml_threadpool_params_default(int n_threads)


cdef extern from "ggml-cpu.h" nogil:
    cdef enum ggml_numa_strategy:
        GGML_NUMA_STRATEGY_DISABLED
        GGML_NUMA_STRATEGY_DISTRIBUTE
        GGML_NUMA_STRATEGY_ISOLATE
        GGML_NUMA_STRATEGY_NUMACTL
        GGML_NUMA_STRATEGY_MIRROR

    bint ggml_is_numa()
    ggml_threadpool_t ggml_threadpool_new(ggml_threadpool_params * params)
    void ggml_threadpool_free(ggml_threadpool_t threadpool)
    int ggml_cpu_has_sse3()
    int ggml_cpu_has_ssse3()
    int ggml_cpu_has_avx()
    int ggml_cpu_has_avx_vnni()
    int ggml_cpu_has_avx2()
    int ggml_cpu_has_bmi2()
    int ggml_cpu_has_f16c()
    int ggml_cpu_has_fma()
    int ggml_cpu_has_avx512()
    int ggml_cpu_has_avx512_vbmi()
    int ggml_cpu_has_avx512_vnni()
    int ggml_cpu_has_avx512_bf16()
    int ggml_cpu_has_amx_int8()
    int ggml_cpu_has_neon()
    int ggml_cpu_has_arm_fma()
    int ggml_cpu_has_fp16_va()
    int ggml_cpu_has_dotprod()
    int ggml_cpu_has_matmul_int8()
    int ggml_cpu_has_sve()
    int ggml_cpu_has_sme()
    int ggml_cpu_has_riscv_v()
    int ggml_cpu_has_vsx()
    int ggml_cpu_has_wasm_simd()
    int ggml_cpu_has_llamafile()


cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    ctypedef void * ggml_backend_buffer_type_t

    cdef enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL
        GGML_BACKEND_DEVICE_TYPE_META

    struct ggml_backend_dev_props:
        const char * name
        const char * description
        size_t memory_free
        size_t memory_total
        ggml_backend_dev_type type
        const char * device_id

    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_type ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_count()
    ggml_backend_reg_t ggml_backend_reg_get(size_t index)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    ggml_backend_dev_t ggml_backend_dev_by_name(const char * name)
    void ggml_backend_dev_get_props(ggml_backend_dev_t device, ggml_backend_dev_props * props)
    ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    void ggml_backend_load_all()
