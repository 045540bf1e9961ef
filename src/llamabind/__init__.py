"""llamabind: llama.cpp's C API bound directly with Cython.

Two layers:

* the core (:class:`Model`, :class:`Vocab`, :class:`Context`, :class:`Batch`,
  :class:`Sampler`, :class:`TokenGenerator`...), one class per llama.cpp object;
* the high-level API (:class:`LoadedModel`, :class:`Session`, configs and results).
"""

from llamabind._llama import (
    Batch,
    Context,
    LoraAdapter,
    Model,
    Sampler,
    TokenGenerator,
    Vocab,
    apply_builtin_chat_template,
    backend_init,
    backends,
    builtin_chat_templates,
    cpu_features,
    default_threads,
    devices,
    system_info,
)
from llamabind.api import GenerationResult, LoadedModel, Session, default_model_path
from llamabind.buildinfo import build_info
from llamabind.chat import ChatMessage, ChatTemplate
from llamabind.config import ContextConfig, GenerationConfig, ModelConfig, SamplingConfig
from llamabind.errors import (
    BackendError,
    ChatTemplateError,
    ClosedError,
    ConcurrentUseError,
    ContextCreationError,
    ContextLengthExceededError,
    DecodeError,
    ForkError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    LlamaError,
    ModelFileError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    SamplingError,
    StateError,
    StateFileNotFoundError,
    TokenizationError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Batch",
    "ChatMessage",
    "ChatTemplate",
    "ChatTemplateError",
    "ClosedError",
    "ConcurrentUseError",
    "Context",
    "ContextConfig",
    "ContextCreationError",
    "ContextLengthExceededError",
    "DecodeError",
    "ForkError",
    "GenerationCancelled",
    "GenerationConfig",
    "GenerationResult",
    "GrammarError",
    "InvalidArgumentError",
    "LlamaError",
    "LoadedModel",
    "LoraAdapter",
    "Model",
    "ModelConfig",
    "ModelFileError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QueueFullError",
    "Sampler",
    "SamplingConfig",
    "SamplingError",
    "Session",
    "StateError",
    "StateFileNotFoundError",
    "TokenGenerator",
    "TokenizationError",
    "Vocab",
    "__version__",
    "apply_builtin_chat_template",
    "backend_init",
    "backends",
    "build_info",
    "builtin_chat_templates",
    "cpu_features",
    "default_model_path",
    "default_threads",
    "devices",
    "system_info",
]
