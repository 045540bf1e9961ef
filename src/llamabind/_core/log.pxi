# llama.cpp and ggml log through one callback; it hands every line to the Python
# logger "llamabind" (nothing reaches stderr unless the application configures
# logging to show it). Error lines are also kept per thread, so that a failed load
# can say what llama.cpp complained about.

import atexit
import collections

cdef dict _LEVELS = {
    GGML_LOG_LEVEL_NONE: logging.DEBUG,
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}

# Per thread: the level and pieces of the line being assembled (llama.cpp sends lines
# in pieces, continuing with GGML_LOG_LEVEL_CONT).
cdef object _log_state = threading.local()
# Recent error lines, per thread id, for error messages.
cdef dict _recent_errors = {}


cdef void _log_line(int level, str line) noexcept:
    try:
        pylevel = _LEVELS.get(level, logging.INFO)
        if level == GGML_LOG_LEVEL_ERROR and getattr(_log_state, "cancelled", None) is not None:
            # a decode stopped on purpose (cancel(), Ctrl+C) makes llama.cpp report a
            # failed graph: expected, so not an error of the application's
            if _log_state.cancelled():
                pylevel = logging.DEBUG
        if level == GGML_LOG_LEVEL_ERROR or level == GGML_LOG_LEVEL_WARN:
            ident = threading.get_ident()
            recent = _recent_errors.get(ident)
            if recent is None:
                recent = _recent_errors[ident] = collections.deque(maxlen=8)
            recent.append(line)
        if _logger.isEnabledFor(pylevel):
            _logger.log(pylevel, "%s", line)
    except BaseException:
        pass


cdef void _log_text(int level, const char * text) noexcept:
    try:
        state = _log_state
        chunk = text.decode("utf-8", "replace")
        if level == GGML_LOG_LEVEL_CONT:
            level = getattr(state, "level", GGML_LOG_LEVEL_INFO)
            pending = getattr(state, "pending", "") + chunk
        else:
            previous = getattr(state, "pending", "")
            if previous:
                _log_line(getattr(state, "level", GGML_LOG_LEVEL_INFO), previous)
            pending = chunk
        state.level = level
        lines = pending.split("\n")
        for line in lines[:-1]:
            if line:
                _log_line(level, line)
        state.pending = lines[len(lines) - 1]
    except BaseException:
        pass


cdef void _log_callback(ggml_log_level level, const char * text,
                        void * user_data) noexcept nogil:
    if text == NULL:
        return
    with gil:
        _log_text(<int>level, text)


def _take_recent_errors():
    """Return and forget the warning/error lines llama.cpp logged on this thread."""
    recent = _recent_errors.pop(threading.get_ident(), None)
    return list(recent) if recent else []


cdef object _native_error(type cls, str what, str fallback="no details logged",
                          object extra=None):
    """The one mapping of a failed llama.cpp call (a NULL, a 0 or a false result) to a
    Python exception: ``cls("{what}: {details}")``, the details being the warning and
    error lines llama.cpp logged on this thread during the call (the caller forgets
    older ones with _take_recent_errors() before it), or ``fallback``. ``extra`` is the
    exception's second argument (the path, for ModelLoadError)."""
    details = "; ".join(_take_recent_errors()) or fallback
    if extra is None:
        return cls(f"{what}: {details}")
    return cls(f"{what}: {details}", extra)


cdef void _log_discard(ggml_log_level level, const char * text,
                       void * user_data) noexcept nogil:
    pass


def _stop_logging():
    """At interpreter exit, stop calling into Python: objects freed during shutdown
    (and C++ static destructors after it) may still log."""
    llama_log_set(_log_discard, NULL)


llama_log_set(_log_callback, NULL)
atexit.register(_stop_logging)
