# NumPy views of a context's outputs (logits, embeddings) without copying.

@cython.final
@cython.no_gc_clear  # __releasebuffer__ uses self._ctx
cdef class _OutputView:
    """Exports a slice of a context's output buffer to NumPy without copying, and
    keeps the context (and so the buffer) alive while any array uses it."""

    cdef Context _ctx
    cdef float * _data
    cdef Py_ssize_t _shape[2]
    cdef Py_ssize_t _strides[2]
    cdef int _ndim

    @staticmethod
    cdef object _make(Context ctx, float * data, Py_ssize_t rows, Py_ssize_t cols, str what):
        cdef _OutputView v = _OutputView.__new__(_OutputView)
        v._ctx = ctx
        v._data = data
        v._ndim = 1 if rows == 1 else 2
        if v._ndim == 1:
            v._shape[0] = cols
            v._strides[0] = sizeof(float)
        else:
            v._shape[0] = rows
            v._shape[1] = cols
            v._strides[0] = cols * sizeof(float)
            v._strides[1] = sizeof(float)
        arr = _np().asarray(v)
        arr.flags.writeable = False
        return arr

    def __getbuffer__(self, Py_buffer * buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("llamabind output views are read-only")
        self._ctx._pin()  # the context's memory stays until the array goes
        buf.buf = self._data
        buf.obj = self
        buf.len = self._shape[0] * (self._shape[1] if self._ndim == 2 else 1) * sizeof(float)
        buf.readonly = 1
        buf.itemsize = sizeof(float)
        buf.format = "f"
        buf.ndim = self._ndim
        buf.shape = self._shape
        buf.strides = self._strides
        buf.suboffsets = NULL
        buf.internal = NULL

    def __releasebuffer__(self, Py_buffer * buf):
        self._ctx._unpin()
