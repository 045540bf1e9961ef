# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: embedsignature=True
"""llamabind's compiled core: llama.cpp's C API, one class per llama.cpp object.

The module is built from one file per object (uvloop's layout): each ``.pxi`` under
``_core/`` holds one class, and they are included here so that they share one
extension module and one statically linked copy of llama.cpp. Extern declarations
live only in ``_core/llama.pxd``, ``_core/ggml.pxd`` and ``_core/ggml_rpc.pxd``.
"""

include "_core/common.pxi"
include "_core/log.pxi"
include "_core/backend.pxi"
include "_core/rpc.pxi"
include "_core/model.pxi"
include "_core/vocab.pxi"
include "_core/batch.pxi"
include "_core/context.pxi"
include "_core/sampler.pxi"
include "_core/lora.pxi"
include "_core/chat.pxi"
include "_core/structured.pxi"
include "_core/speculative.pxi"
include "_core/generation.pxi"
include "_core/engine.pxi"
include "_core/gguf.pxi"
