# cython: language_level=3, cdivision=True
# cython: embedsignature=True
# Bounds checks and negative indices stay on (Cython's defaults): a function turns
# them off with @cython.boundscheck(False) / @cython.wraparound(False) only where a
# measurement shows a difference, and says so in a comment. Off for the whole module,
# obj[-1] on a list silently read the memory before it.
"""llamabind's compiled core: llama.cpp's C API, one class per llama.cpp object.

The module is built from one file per object or job (uvloop's layout): each ``.pxi``
under ``_core/`` holds one class or one job, and they are included here so that they share one
extension module and one statically linked copy of llama.cpp. Extern declarations
live only in ``_core/llama.pxd``, ``_core/ggml.pxd`` and ``_core/ggml_rpc.pxd``.
"""

include "_core/common.pxi"
include "_core/lifetime.pxi"
include "_core/log.pxi"
include "_core/backend.pxi"
include "_core/rpc.pxi"
include "_core/model.pxi"
include "_core/vocab.pxi"
include "_core/batch.pxi"
include "_core/threads.pxi"
include "_core/interrupt.pxi"
include "_core/context.pxi"
include "_core/state.pxi"
include "_core/views.pxi"
include "_core/sampler.pxi"
include "_core/lora.pxi"
include "_core/chat.pxi"
include "_core/structured.pxi"
include "_core/speculative.pxi"
include "_core/generation.pxi"
include "_core/engine.pxi"
include "_core/gguf.pxi"
