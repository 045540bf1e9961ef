# GGUFFile: a GGUF file's metadata and tensor infos, read by ggml's own GGUF reader
# (gguf.h) for the checks llamabind._gguf runs before llama.cpp loads a file. ggml
# refuses a structurally broken file itself (magic, version, counts, strings, types,
# shapes, offsets); llamabind._gguf checks what ggml accepts but llama.cpp would
# abort or hang on.

from libc.errno cimport EINTR, errno
from libc.stdio cimport snprintf
from libc.string cimport strcmp, strlen
from posix.types cimport off_t
from posix.unistd cimport pread

from gguf cimport *

import struct

# ggml asks for a few bytes at a time (a length, then a string): the reader serves
# them from a window of the file, refilled by one pread() when a read leaves it.
cdef enum:
    _GGUF_WINDOW = 1 << 20


cdef struct _FileWindow:
    int fd
    unsigned char * buf
    uint64_t start      # where buf[0] is in the file
    size_t filled       # bytes of buf that hold file data


cdef size_t _window_read(void * userdata, void * output, uint64_t offset,
                         size_t n) noexcept nogil:
    """gguf_reader_callback_t: ``n`` bytes of the file from ``offset`` into ``output``;
    fewer at the end of the file (ggml then refuses the file)."""
    cdef _FileWindow * w = <_FileWindow *>userdata
    cdef uint64_t rel = offset - w.start
    if offset >= w.start and rel + n <= w.filled:    # nearly every read
        memcpy(output, w.buf + rel, n)
        return n
    return _window_refill_read(w, <unsigned char *>output, offset, n)


cdef size_t _window_refill_read(_FileWindow * w, unsigned char * out, uint64_t offset,
                                size_t n) noexcept nogil:
    cdef size_t done = 0, take
    cdef uint64_t pos
    cdef ssize_t got
    while done < n:
        pos = offset + done
        if w.start <= pos < w.start + w.filled:
            take = min(n - done, <size_t>(w.start + w.filled - pos))
            memcpy(out + done, w.buf + (pos - w.start), take)
            done += take
            continue
        if n - done >= _GGUF_WINDOW:
            got = pread(w.fd, out + done, n - done, <off_t>pos)
        else:
            got = pread(w.fd, w.buf, _GGUF_WINDOW, <off_t>pos)
            if got > 0:
                w.start = pos
                w.filled = got
                continue
        if got < 0 and errno == EINTR:
            continue
        if got <= 0:
            break
        done += got
    return done


# gguf.h keeps numbers as these C types (struct module formats, native byte order)
cdef dict _GGUF_FORMATS = {
    GGUF_TYPE_UINT8: "B", GGUF_TYPE_INT8: "b", GGUF_TYPE_UINT16: "H", GGUF_TYPE_INT16: "h",
    GGUF_TYPE_UINT32: "I", GGUF_TYPE_INT32: "i", GGUF_TYPE_FLOAT32: "f", GGUF_TYPE_BOOL: "?",
    GGUF_TYPE_UINT64: "Q", GGUF_TYPE_INT64: "q", GGUF_TYPE_FLOAT64: "d",
}


cdef list _gguf_numbers(const void * data, gguf_type t, size_t n):
    """``n`` numbers of type ``t`` (not a string) from ``data``, as Python numbers."""
    fmt = _GGUF_FORMATS[t]
    raw = PyBytes_FromStringAndSize(<const char *>data, n * struct.calcsize(fmt))
    return memoryview(raw).cast(fmt).tolist()


cdef inline uint64_t _hash(const char * p, size_t n) noexcept nogil:
    """A string's hash, eight bytes at a time (tokens are short: a byte-at-a-time hash
    spent most of its time waiting on its own multiplications)."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ n
    cdef uint64_t word
    while n >= 8:
        memcpy(&word, p, 8)
        h = (h ^ word) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 32
        p += 8
        n -= 8
    word = 0
    memcpy(&word, p, n)
    h = (h ^ word) * 0xC4CEB9FE1A85EC53ULL
    return h ^ (h >> 29)


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define llamabind_prefetch(p) __builtin_prefetch(p)
    #else
    #define llamabind_prefetch(p) ((void)(p))
    #endif
    """
    void llamabind_prefetch(const void * p) noexcept nogil

cdef enum:
    _AHEAD = 32     # duplicate_string: strings whose slots are fetched ahead


cdef class GGUFFile(_NativeObject):
    """The header of a GGUF file as ggml reads it: ``GGUFFile(fd, size, path)`` reads
    the first ``size`` bytes of the open file descriptor ``fd`` with the GIL released
    (ggml refuses a header that needs more), or raises ModelFileError with what ggml
    found wrong. Values are read through gguf.h's accessors, each after checking the
    type it asserts on."""

    cdef gguf_context * _ctx
    cdef readonly str path

    def __cinit__(self):
        self._ctx = NULL

    def __init__(self, int fd, uint64_t size, str path):
        self._check_new()
        cdef _FileWindow w
        cdef gguf_init_params params
        params.no_alloc = True
        params.ctx = NULL
        self.path = path
        w.fd = fd
        w.start = 0
        w.filled = 0
        w.buf = <unsigned char *>malloc(_GGUF_WINDOW)
        if w.buf == NULL:
            raise MemoryError()
        _take_recent_errors()
        with nogil:
            self._ctx = gguf_init_from_callback(_window_read, &w, 0, size, params)
        free(w.buf)
        if self._ctx == NULL:
            # ggml's lines start with the name of its function
            problems = [line.partition(": ")[2] or line for line in _take_recent_errors()]
            raise ModelFileError(f"invalid GGUF file {path!r}: "
                                 + ("; ".join(problems) or "ggml cannot read it"), path)
        self._opened(False)

    cdef str _describe(self):
        return f"llamabind.GGUFFile {self.path!r}"

    cdef void _free_native(self) noexcept:
        gguf_free(self._ctx)
        self._ctx = NULL

    @property
    def data_offset(self):
        """Where the tensor data starts in the file."""
        self._check()
        return gguf_get_data_offset(self._ctx)

    @property
    def n_tensors(self):
        self._check()
        return gguf_get_n_tensors(self._ctx)

    def keys(self):
        """The metadata keys, in file order (not UTF-8: "surrogateescape")."""
        self._check()
        return [gguf_get_key(self._ctx, i).decode("utf-8", "surrogateescape")
                for i in range(gguf_get_n_kv(self._ctx))]

    cdef int64_t _find(self, str key) except -2:
        bkey = key.encode("utf-8", "surrogateescape")
        self._check()
        return gguf_find_key(self._ctx, bkey)

    def kind(self, str key):
        """A value's gguf type name ("u32", "str", "arr", ...); None if absent."""
        cdef int64_t i = self._find(key)
        return None if i < 0 else gguf_type_name(gguf_get_kv_type(self._ctx, i)).decode()

    def values(self, str prefix):
        """``{key: (type name, value)}`` of the keys that start with ``prefix``."""
        return {key: (self.kind(key), self.value(key))
                for key in self.keys() if key.startswith(prefix)}

    def value(self, str key, size_t max_items=512):
        """A scalar as a Python number or bool, a string as bytes, an array as
        ``(element type name, count, items)`` with the items (numbers, or bytes) when
        there are at most ``max_items``, else None. None if the key is absent. Strings
        are C strings, cut at a NUL byte, as llama.cpp reads them."""
        cdef int64_t i = self._find(key)
        cdef gguf_type t
        cdef size_t n, k
        if i < 0:
            return None
        t = gguf_get_kv_type(self._ctx, i)
        if t == GGUF_TYPE_STRING:
            return <bytes>gguf_get_val_str(self._ctx, i)
        if t != GGUF_TYPE_ARRAY:
            return _gguf_numbers(gguf_get_val_data(self._ctx, i), t, 1)[0]
        t = gguf_get_arr_type(self._ctx, i)
        n = gguf_get_arr_n(self._ctx, i)
        items = None
        if n <= max_items and t == GGUF_TYPE_STRING:
            items = [<bytes>gguf_get_arr_str(self._ctx, i, k) for k in range(n)]
        elif n <= max_items:
            items = _gguf_numbers(gguf_get_arr_data(self._ctx, i), t, n)
        return gguf_type_name(t).decode(), n, items

    def tensors(self):
        """``(name, (ne0, ne1, ne2, ne3), ggml type name, offset, size)`` per tensor."""
        cdef int64_t i
        cdef const int64_t * ne
        out = []
        self._check()
        for i in range(gguf_get_n_tensors(self._ctx)):
            ne = gguf_get_tensor_ne(self._ctx, i)
            out.append((gguf_get_tensor_name(self._ctx, i).decode("utf-8", "surrogateescape"),
                        (ne[0], ne[1], ne[2], ne[3]),
                        ggml_type_name(gguf_get_tensor_type(self._ctx, i)).decode(),
                        gguf_get_tensor_offset(self._ctx, i),
                        gguf_get_tensor_size(self._ctx, i)))
        return out

    def duplicate_string(self, str key):
        """For a string array that llama.cpp indexes by text (a vocabulary's tokens):
        the first text that appears twice, as ``(first index, second index, text)``, or
        None. Texts are compared as llama.cpp compares them: as C strings, an empty one
        read as "[EMPTY_<index>]"."""
        cdef int64_t i = self._find(key)
        cdef size_t n, k, cap = 16
        cdef uint64_t * table
        cdef uint64_t * hashes
        cdef const char * s
        cdef char renamed[32]
        cdef int64_t first = -1, second = -1
        if (i < 0 or gguf_get_kv_type(self._ctx, i) != GGUF_TYPE_ARRAY
                or gguf_get_arr_type(self._ctx, i) != GGUF_TYPE_STRING):
            return None
        n = gguf_get_arr_n(self._ctx, i)
        while cap < 2 * n:
            cap *= 2
        if n >= 0xFFFFFFFFULL:
            return None   # more strings than a vocabulary can index (llama_token is 32-bit)
        table = <uint64_t *>calloc(cap, sizeof(uint64_t))
        hashes = <uint64_t *>malloc(n * sizeof(uint64_t) + 1)
        if table == NULL or hashes == NULL:
            free(table)
            free(hashes)
            raise MemoryError()
        self._pin()  # (a close() meanwhile waits for the search)
        with nogil:
            for k in range(n):
                s = gguf_get_arr_str(self._ctx, i, k)
                hashes[k] = _hash(s, strlen(s))
            for k in range(n):
                # the table is larger than the caches: fetch the slot needed a few
                # strings later while this one is looked up (measured: 6.7 -> 4.1 ms
                # for Qwen2.5's 151,665 tokens)
                if k + _AHEAD < n:
                    llamabind_prefetch(&table[hashes[k + _AHEAD] & (cap - 1)])
                s = gguf_get_arr_str(self._ctx, i, k)
                if s[0] != 0:
                    first = _find_or_add(table, cap - 1, self._ctx, i, s, hashes[k], k)
                    if first >= 0:
                        second = k
                        break
            if second < 0:
                for k in range(n):
                    if gguf_get_arr_str(self._ctx, i, k)[0] == 0:
                        snprintf(renamed, sizeof(renamed), "[EMPTY_%zu]", k)
                        first = _find_or_add(table, cap - 1, self._ctx, i, renamed,
                                             _hash(renamed, strlen(renamed)), -1)
                        if first >= 0:
                            first, second = min(first, k), max(first, k)
                            break
        free(table)
        free(hashes)
        try:
            if second < 0:
                return None
            text = gguf_get_arr_str(self._ctx, i, second)
            return first, second, (<bytes>text if text[0] != 0 else b"[EMPTY_%d]" % second)
        finally:
            self._unpin()


cdef int64_t _find_or_add(uint64_t * table, size_t mask, const gguf_context * ctx,
                          int64_t kv, const char * text, uint64_t h,
                          int64_t index) noexcept nogil:
    """Look ``text`` (hash ``h``) up in an open-addressing ``table`` of strings of the
    string array ``kv`` (each slot: the upper half of the string's hash, and its index +
    1; 0: empty): the index of an equal string, or -1 after adding ``index`` (unless it
    is -1)."""
    cdef uint64_t tag = h & 0xFFFFFFFF00000000ULL
    cdef size_t slot = h & mask
    while table[slot] != 0:
        if ((table[slot] & 0xFFFFFFFF00000000ULL) == tag and strcmp(
                gguf_get_arr_str(ctx, kv, (table[slot] & 0xFFFFFFFFULL) - 1), text) == 0):
            return (table[slot] & 0xFFFFFFFFULL) - 1
        slot = (slot + 1) & mask
    if index >= 0:
        table[slot] = tag | <uint64_t>(index + 1)
    return -1
