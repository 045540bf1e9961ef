# Stopping a decode from outside: Ctrl+C on the main thread, cancel() from any thread
# (both through llama.cpp's abort callback), and the interpreter's exit.

from posix.signal cimport sigaction, sigaction_t, sigemptyset
from libc.signal cimport SIGINT

# --- Ctrl+C during a long decode --------------------------------------------------
# While a multi-token decode runs on the main thread with Python's default SIGINT
# handler, a tiny C handler is chained in front of Python's: it records the signal
# (async-signal-safe) and calls Python's own handler, so the abort callback can stop
# llama.cpp without taking the GIL. The previous handler is restored right after.

ctypedef void (*_sighandler_t)(int) noexcept nogil

cdef volatile int _sigint_seen = 0
cdef volatile bint _exiting = False     # see "interpreter exit" below
cdef int _decodes_running = 0           # decodes in progress (changed with the GIL held)
cdef sigaction_t _python_sigint


cdef void _sigint_relay(int signum) noexcept nogil:
    global _sigint_seen
    _sigint_seen = 1
    cdef _sighandler_t previous = <_sighandler_t>_python_sigint.sa_handler
    # SIG_DFL (0) and SIG_IGN (1) are not functions to call
    if <size_t>previous > 1:
        previous(signum)


cdef struct _AbortState:
    bint cancel          # cancel() was called
    bint watch_sigint    # the relay handler is installed for this decode


cdef cppbool _abort_callback(void * data) noexcept nogil:
    cdef _AbortState * st = <_AbortState *>data
    return st.cancel or _exiting or (st.watch_sigint and _sigint_seen)


# --- interpreter exit ---------------------------------------------------------------
# After Python's atexit handlers, the C library runs llama.cpp's and ggml's static
# destructors, while daemon threads may still be computing inside llama_decode (they
# stop only when they next want the GIL): they would run on destroyed objects and
# crash the exiting process. So at exit every running decode is aborted, new ones are
# refused, and the exit waits (briefly) until no thread is inside a decode.

def _stop_decodes_at_exit():
    global _exiting
    _exiting = True
    deadline = time.monotonic() + 5.0
    while _decodes_running > 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the decoding threads take the GIL and leave


atexit.register(_stop_decodes_at_exit)
