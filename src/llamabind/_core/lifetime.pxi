# The one lifetime every native object shares (uvloop's UVHandle is the model): a
# cdef base class, _NativeObject, holds the state and the rules; each subclass says
# only how to free what it holds (_free_native) and how to stop a call in progress
# (_interrupt). The rules:
#
# * Use after close() raises ClosedError naming the object; use in a process forked
#   after the object was made raises ForkError (its threads, mutexes and device
#   handles do not exist in the child). Both are one inline check of C fields.
# * One thread at a time may be inside an object's native call (_enter/_leave); a
#   second gets ConcurrentUseError.
# * close() is idempotent and never raises. While a call is inside the object (in
#   another thread) or something still uses its memory (a context on a model, a NumPy
#   view of a context's logits), close() only marks it closed, asks the call to stop
#   (_interrupt) and the memory is freed when the last of them ends: never under a
#   running call.
# * In a forked child, closing frees nothing: the memory is the parent's copy, and
#   llama.cpp's free functions may join threads or take locks that do not exist there.
# * __dealloc__ frees what close() did not; an object the user opens and closes
#   (Model, Context, Batch, Sampler, LoraAdapter, ModelDrafter) warns with
#   ResourceWarning when it is collected still open, as Python's files do. The objects
#   the library makes and drops for itself (Generation, EngineCore, ChatTemplates,
#   ChatParser, GGUFFile) are freed silently.
#
# Cython runs a subclass's __dealloc__ before the base's, and clears the subclass's
# object fields in between (to NULL: reading one then crashes). The base's __dealloc__
# finalizes the objects whose _free_native and _describe read only C fields; a class
# whose _free_native reads an object field (Model, Context, Sampler, LoraAdapter,
# ModelDrafter) calls _finalize() from a __dealloc__ of its own, while it is still set.

# --- fork generations ----------------------------------------------------------------
# Each object records the fork generation it was made in; the child of os.fork() is a
# new generation.
cdef int _fork_generation = 0


def _bump_fork_generation():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_bump_fork_generation)


cdef void _warn_unclosed(str what) noexcept:
    """ResourceWarning for an object freed while still open; called from __dealloc__.

    The object is never passed as the warning's ``source``: it is being destroyed, and
    a warning kept by catch_warnings(record=True) (pytest records every warning) would
    hold a dangling pointer to it. Under ``-W error::ResourceWarning`` the error is
    reported through sys.unraisablehook, as CPython does for unclosed files; at
    interpreter exit, when the warnings machinery may be gone, nothing is said."""
    try:
        warnings.warn(f"unclosed {what}", ResourceWarning, stacklevel=2)
    except Warning:
        raise  # a noexcept function hands it to sys.unraisablehook
    except BaseException:
        pass


cdef enum _State:
    _NEW = 0        # __init__ has not finished: nothing is held yet
    _OPEN = 1
    _CLOSED = 2     # close() was called; the memory is held until the last use ends


cdef class _NativeObject:
    """What every object of the compiled core that owns llama.cpp memory shares:
    ``close()`` (idempotent; with ``with``), ``closed``, and the rules above."""

    cdef _State _state
    cdef bint _held         # native memory is held (set by _opened, cleared by _release)
    cdef bint _busy         # a call is inside the object (_enter .. _leave)
    cdef bint _warn_open    # ResourceWarning when collected open
    cdef int _users         # uses that keep the memory alive after close() (_pin/_unpin)
    cdef int _fork_gen      # the fork generation the object was made in

    def __cinit__(self):
        self._fork_gen = _fork_generation

    cdef int _check_new(self) except -1:
        """The start of __init__: an object is initialised once."""
        if self._state != _NEW:
            raise InvalidArgumentError(f"{self._describe()} is already initialised")
        return 0

    cdef inline void _opened(self, bint warn_open):
        """The end of a successful __init__: the native memory is held from now on."""
        self._state = _OPEN
        self._held = True
        self._warn_open = warn_open
        self._fork_gen = _fork_generation

    # --- the checks (the hot path: C fields only) -------------------------------------

    cdef inline int _check(self) except -1:
        """Open, and in the process that made it."""
        if self._state != _OPEN or self._fork_gen != _fork_generation:
            self._refuse(False)
        return 0

    cdef inline int _check_idle(self) except -1:
        """Open, in this process, and no call inside: for a change made under the GIL
        with no Python code between this check and the change."""
        if self._state != _OPEN or self._fork_gen != _fork_generation or self._busy:
            self._refuse(True)
        return 0

    cdef inline int _enter(self) except -1:
        """Begin a call: checks, then claims the object for this thread (the check and
        the claim happen under the GIL with no Python code between, so atomically)."""
        if self._state != _OPEN or self._fork_gen != _fork_generation or self._busy:
            self._refuse(True)
        self._busy = True
        return 0

    cdef inline void _leave(self) noexcept:
        """End a call; frees the memory if close() came meanwhile."""
        self._busy = False
        if self._state == _CLOSED and self._users == 0:
            self._release()

    cdef int _enter_with(self, _NativeObject other) except -1:
        """Claim this object and ``other`` for one call (both, or neither)."""
        self._enter()
        try:
            other._enter()
        except BaseException:
            self._leave()
            raise
        return 0

    cdef void _leave_with(self, _NativeObject other) noexcept:
        other._leave()
        self._leave()

    cdef inline int _pin(self) except -1:
        """Something keeps using the memory (and may outlive an explicit close())."""
        self._check()
        self._users += 1
        return 0

    cdef inline void _unpin(self) noexcept:
        self._users -= 1
        if self._users == 0 and not self._busy and self._state == _CLOSED:
            self._release()

    cdef int _refuse(self, bint claiming) except -1:
        what = self._describe()
        if self._state == _CLOSED:
            raise ClosedError(f"{what} is closed")
        if self._state == _NEW:
            raise ClosedError(f"{what} is not initialised (its __init__ failed or was not called)")
        if self._fork_gen != _fork_generation:
            raise ForkError(
                f"this {what} was created before os.fork() and cannot be used in the child "
                "process; load the model again in the child (or use the 'spawn' start method)")
        if claiming and self._busy:
            raise ConcurrentUseError(
                f"this {what} is being used by another thread; one thread at a time may use "
                "it (make one per thread)")
        return 0

    # --- what the subclasses say --------------------------------------------------------

    cdef str _describe(self):
        """The object in messages."""
        return f"llamabind.{type(self).__name__}"

    cdef void _free_native(self) noexcept:
        """Free what the object holds (once, in the process that made it)."""
        pass

    cdef void _interrupt(self) noexcept:
        """close() came while a call is inside: ask it to stop early (if it can)."""
        pass

    # --- closing ------------------------------------------------------------------------

    cdef void _release(self) noexcept:
        if not self._held:
            return
        self._held = False
        if self._fork_gen == _fork_generation:
            self._free_native()

    cdef void _finalize(self) noexcept:
        """Free what close() did not, warning if it was left open (once)."""
        if not self._held:
            return
        if self._state == _OPEN and self._warn_open:
            _warn_unclosed(self._describe())
        self._state = _CLOSED
        if self._users == 0:
            self._release()
        # else: something that pinned the object lost its reference without unpinning:
        # leak rather than free memory that may still be in use

    def __dealloc__(self):
        self._finalize()

    def close(self):
        """Free the native memory; idempotent. When another thread is inside a call
        (its call is asked to stop) or something still uses the memory, it is freed as
        soon as the last of them ends. Later use raises ClosedError."""
        self._state = _CLOSED
        if not self._held:
            return
        if self._busy:
            self._interrupt()
        elif self._users == 0:
            self._release()

    @property
    def closed(self):
        return self._state != _OPEN

    @property
    def _native_held(self):
        """Whether the native memory is still held (after a close() during a call or a
        use: until that ends). For tests."""
        return self._held

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc_info):
        self.close()
