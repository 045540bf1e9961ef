"""llamabind: llama.cpp's C API bound directly with Cython."""

from llamabind.errors import *  # noqa: F403
from llamabind._llama import (
    Batch,
    Context,
    LoraAdapter,
    Model,
    Sampler,
    TokenGenerator,
    Vocab,
    backend_init,
    backends,
    builtin_chat_templates,
    cpu_features,
    default_threads,
    devices,
    system_info,
)

__version__ = "0.1.0"
