"""llamabind's exceptions: one tree rooted at :class:`LlamaError`.

Each class is named for what the caller did wrong or what failed, and also inherits
the built-in exception a Python programmer would catch for it (``ValueError`` for bad
arguments, ``FileNotFoundError`` for a missing model, ...).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ChatTemplateError",
    "ClosedError",
    "ConcurrentUseError",
    "ContextCreationError",
    "ContextLengthExceededError",
    "DecodeError",
    "ForkError",
    "GenerationCancelled",
    "GrammarError",
    "InvalidArgumentError",
    "LlamaError",
    "ModelFileError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QueueFullError",
    "SamplingError",
    "StateError",
    "StateFileNotFoundError",
    "TokenizationError",
]


class LlamaError(Exception):
    """Base class of every error llamabind raises on purpose."""


class InvalidArgumentError(LlamaError, ValueError):
    """An argument is outside its domain; the message names the parameter and value."""


class ModelLoadError(LlamaError, RuntimeError):
    """A model file could not be loaded."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelFileError(ModelLoadError, ValueError):
    """The file is not a valid GGUF model (bad magic, truncated, corrupt header...)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist."""

    def __init__(self, message: str, path: str | None = None) -> None:
        # FileNotFoundError's own constructor would reinterpret the arguments.
        LlamaError.__init__(self, message)
        self.path = path
        self.filename = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ClosedError(LlamaError, RuntimeError):
    """The object (model, context, sampler...) was closed and cannot be used."""


class ConcurrentUseError(LlamaError, RuntimeError):
    """Two threads tried to use the same context (or sampler) at the same time."""


class ForkError(LlamaError, RuntimeError):
    """A native object created before ``os.fork()`` was used in the child process."""


class BackendError(LlamaError, RuntimeError):
    """The ggml backend could not be initialised or used."""


class ContextCreationError(LlamaError, RuntimeError):
    """llama.cpp could not create a context (usually: not enough memory)."""


class TokenizationError(LlamaError, ValueError):
    """Text could not be tokenized or tokens could not be turned back into text."""


class DecodeError(LlamaError, RuntimeError):
    """``llama_decode``/``llama_encode`` failed; ``code`` is llama.cpp's return value."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class SamplingError(LlamaError, RuntimeError):
    """A sampler could not be created or could not pick a token."""


class GrammarError(InvalidArgumentError):
    """A GBNF grammar could not be parsed."""


class ChatTemplateError(LlamaError, ValueError):
    """A chat template could not be rendered for the given messages."""


class StateError(LlamaError, RuntimeError):
    """Saving or restoring context state failed."""


class StateFileNotFoundError(StateError, FileNotFoundError):
    """The state file to load does not exist."""

    def __init__(self, message: str, path: str | None = None) -> None:
        LlamaError.__init__(self, message)
        self.filename = path


class ContextLengthExceededError(LlamaError, ValueError):
    """The prompt (plus at least one generated token) does not fit in the context."""

    def __init__(self, message: str, n_prompt_tokens: int = 0, n_ctx: int = 0) -> None:
        super().__init__(message)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class GenerationCancelled(LlamaError):
    """Work was stopped by ``cancel()`` before it finished."""


class QueueFullError(LlamaError, RuntimeError):
    """The model's request queue is full (or stayed full for the time the caller was
    willing to wait); ``queued`` is how many requests were waiting, ``limit`` the
    queue's size. Retry later."""

    def __init__(self, message: str, queued: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.queued = queued
        self.limit = limit
