# The hot loops of llamabind._gguf, the GGUF file check that runs before llama.cpp
# loads a file: walking the length-prefixed strings of a tokenizer (150k tokens and
# as many merges in a Qwen vocabulary) costs ~100 ms in Python and ~1 ms here.


cdef inline uint64_t _le_u64(const unsigned char * p) noexcept nogil:
    """A little-endian u64 (GGUF's byte order) on any host."""
    return ((<uint64_t>p[0]) | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


def _gguf_skip_strings(const unsigned char[::1] data not None, Py_ssize_t rel,
                       Py_ssize_t count, uint64_t limit):
    """Skip up to ``count`` GGUF strings (u64 length, then the bytes) in ``data`` from
    index ``rel``. Returns ``(rel, skipped, bad)``: where it stopped, how many strings
    it skipped, and whether it stopped at a length over ``limit``. It also stops at a
    string that is not wholly in ``data``."""
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t i = 0
    cdef uint64_t length
    cdef bint bad = False
    if rel < 0 or rel > n or count < 0:
        raise InvalidArgumentError(f"rel = {rel} and count = {count} do not fit {n} bytes")
    with nogil:
        while i < count and n - rel >= 8:
            length = _le_u64(&data[rel])
            if length > limit:
                bad = True
                break
            if length > <uint64_t>(n - rel - 8):
                break
            rel += 8 + <Py_ssize_t>length
            i += 1
    return rel, i, bad


def _gguf_collect_strings(const unsigned char[::1] data not None, Py_ssize_t rel,
                          Py_ssize_t count, Py_ssize_t end):
    """The ``count`` GGUF strings in ``data`` from index ``rel`` as a list of bytes,
    and the index after them; None if one of them is not wholly in ``data[:end]``."""
    cdef Py_ssize_t n = min(data.shape[0], max(end, 0))
    cdef Py_ssize_t i
    cdef uint64_t length
    if rel < 0 or rel > n or count < 0:
        raise InvalidArgumentError(f"rel = {rel} and count = {count} do not fit {n} bytes")
    if count > (n - rel) // 8:
        return None  # each string needs at least its 8-byte length
    out = [None] * count
    for i in range(count):
        if n - rel < 8:
            return None
        length = _le_u64(&data[rel])
        if length > <uint64_t>(n - rel - 8):
            return None
        out[i] = PyBytes_FromStringAndSize(<const char *>&data[rel + 8], <Py_ssize_t>length)
        rel += 8 + <Py_ssize_t>length
    return out, rel


cdef inline uint64_t _fnv1a(const unsigned char * p, uint64_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef uint64_t k
    for k in range(n):
        h = (h ^ p[k]) * 1099511628211ULL
    return h


def _gguf_strings_unique(const unsigned char[::1] data not None, Py_ssize_t rel,
                         Py_ssize_t count, Py_ssize_t end):
    """Whether the ``count`` GGUF strings in ``data`` from index ``rel`` are all
    different and none is empty (a tokenizer's token list that llama.cpp can index),
    without making a Python object per string. Returns ``(index after them, unique)``,
    or None if one of them is not wholly in ``data[:end]``."""
    cdef Py_ssize_t n = min(data.shape[0], max(end, 0))
    cdef Py_ssize_t i
    cdef uint64_t length, other_len, slot, mask
    cdef int64_t other
    cdef bint unique = True
    cdef bint whole = True
    cdef size_t cap = 16
    cdef int64_t * table   # open addressing: index of a string's length field + 1, 0 empty
    if rel < 0 or rel > n or count < 0:
        raise InvalidArgumentError(f"rel = {rel} and count = {count} do not fit {n} bytes")
    if count > (n - rel) // 8:
        return None  # each string needs at least its 8-byte length
    while cap < <size_t>count * 2:
        cap *= 2
    mask = cap - 1
    table = <int64_t *>calloc(cap, sizeof(int64_t))
    if table == NULL:
        raise MemoryError()
    try:
        with nogil:
            for i in range(count):
                if n - rel < 8:
                    whole = False
                    break
                length = _le_u64(&data[rel])
                if length > <uint64_t>(n - rel - 8):
                    whole = False
                    break
                if unique:
                    if length == 0:
                        unique = False
                    else:
                        slot = _fnv1a(&data[rel + 8], length) & mask
                        while table[slot] != 0:
                            other = table[slot] - 1
                            other_len = _le_u64(&data[other])
                            if (other_len == length
                                    and memcmp(&data[other + 8], &data[rel + 8], length) == 0):
                                unique = False
                                break
                            slot = (slot + 1) & mask
                        table[slot] = rel + 1
                rel += 8 + <Py_ssize_t>length
    finally:
        free(table)
    if not whole:
        return None
    return rel, unique
