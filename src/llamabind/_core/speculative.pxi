# Speculative decoding's drafters: they propose tokens that may follow a generation's
# history (its prompt, then its output). The target model checks the pending token and
# the whole draft in one decode; its own sampler picks every token from those rows
# (Generation._verify), so the output is the one it makes without a draft, only with
# fewer passes over the weights when drafts are right.
#
# NgramDrafter is prompt lookup: the last n tokens are looked for earlier in the
# history and what followed them there is the draft (code edits, quoting answers and
# chat turns repeat their input). ModelDrafter runs a small model of the same
# vocabulary greedily on a context of its own.

# llama.cpp's rules for a draft model's vocabulary (common/speculative.cpp): the same
# kind, the same BOS/EOS use, sizes within 128 tokens, and the same text for every
# token from id 5 on (the first few are control tokens that may be named differently).
cdef enum:
    _VOCAB_MAX_SIZE_DIFFERENCE = 128
    _VOCAB_CHECK_START = 5

from libc.math cimport exp
from libc.string cimport strcmp


cdef Py_ssize_t _ngram_draft(const int32_t * hist, Py_ssize_t n, int size_max, int size_min,
                             int32_t * out, Py_ssize_t k) noexcept nogil:
    """Prompt lookup: the longest suffix of ``hist`` (``size_max`` tokens down to
    ``size_min``) that also occurs earlier; its latest earlier occurrence is followed by
    the draft (up to ``k`` tokens, never past the end of the history). Returns its
    length (0: no match)."""
    cdef Py_ssize_t size, j, m, avail
    cdef const int32_t * pattern
    if k <= 0:
        return 0
    size = min(<Py_ssize_t>size_max, n - 1)
    while size >= size_min and size >= 1:
        pattern = hist + n - size
        j = n - size - 1
        while j >= 0:
            if hist[j] == pattern[0] and memcmp(hist + j, pattern, size * sizeof(int32_t)) == 0:
                avail = n - (j + size)
                m = min(k, avail)
                memcpy(out, hist + j + size, m * sizeof(int32_t))
                return m
            j -= 1
        size -= 1
    return 0


def check_draft_vocab(Model target not None, Model draft not None):
    """Raise InvalidArgumentError unless ``draft`` can draft for ``target``: token ids
    must mean the same text in both (llama.cpp's rule, see above)."""
    target._check()
    draft._check()
    cdef const llama_vocab * vt = target._vocab
    cdef const llama_vocab * vd = draft._vocab
    cdef int32_t i, n_t = target._n_vocab, n_d = draft._n_vocab
    cdef const char * a
    cdef const char * b
    where = f"the draft model {draft.path!r} cannot draft for {target.path!r}"
    if llama_vocab_type_of(vt) != llama_vocab_type_of(vd):
        raise InvalidArgumentError(
            f"{where}: their vocabularies are of different kinds "
            f"({_VOCAB_TYPES.get(llama_vocab_type_of(vd), 'unknown')} against "
            f"{_VOCAB_TYPES.get(llama_vocab_type_of(vt), 'unknown')})")
    if (llama_vocab_get_add_bos(vt) != llama_vocab_get_add_bos(vd)
            or (llama_vocab_get_add_bos(vt) and llama_vocab_bos(vt) != llama_vocab_bos(vd))):
        raise InvalidArgumentError(
            f"{where}: their BOS tokens differ (draft {llama_vocab_bos(vd)}, target "
            f"{llama_vocab_bos(vt)})")
    if (llama_vocab_get_add_eos(vt) != llama_vocab_get_add_eos(vd)
            or (llama_vocab_get_add_eos(vt) and llama_vocab_eos(vt) != llama_vocab_eos(vd))):
        raise InvalidArgumentError(
            f"{where}: their EOS tokens differ (draft {llama_vocab_eos(vd)}, target "
            f"{llama_vocab_eos(vt)})")
    if abs(n_t - n_d) > _VOCAB_MAX_SIZE_DIFFERENCE:
        raise InvalidArgumentError(
            f"{where}: their vocabularies have {n_d} and {n_t} tokens (at most "
            f"{_VOCAB_MAX_SIZE_DIFFERENCE} apart)")
    for i in range(_VOCAB_CHECK_START, min(n_t, n_d)):
        a = llama_vocab_get_text(vt, i)
        b = llama_vocab_get_text(vd, i)
        if (a == NULL) != (b == NULL) or (a != NULL and strcmp(a, b) != 0):
            raise InvalidArgumentError(
                f"{where}: token {i} is {_c_text(b)!r} in the draft model's vocabulary and "
                f"{_c_text(a)!r} in the target's")


cdef str _c_text(const char * s):
    return "" if s == NULL else (<bytes>s).decode("utf-8", "replace")


cdef class Drafter(_NativeObject):
    """Proposes draft tokens for speculative decoding (NgramDrafter, ModelDrafter).

    ``draft(history, k, seq_id=0, p_min=0.0)``: up to ``k`` tokens that may follow the
    token ids of ``history``."""

    def __init__(self):
        self._check_new()
        self._opened(False)

    cdef Py_ssize_t _propose(self, const int32_t * hist, Py_ssize_t n, int seq_id,
                             int32_t * out, Py_ssize_t k, float p_min) except -1:
        return 0

    def draft(self, history, k, seq_id=0, p_min=0.0):
        arr = _token_array(history, 2147483647, "history")
        k = _int_arg(k, "k", 0, 1 << 16)
        seq_id = _int_arg(seq_id, "seq_id", 0, 255)
        p = _float_arg(p_min, "p_min", 0.0, 1.0)
        self._check()
        cdef const int32_t[::1] view = arr
        if view.shape[0] == 0 or k == 0:
            return []
        cdef int32_t * out = <int32_t *>malloc(k * sizeof(int32_t))
        if out == NULL:
            raise MemoryError()
        try:
            m = self._propose(&view[0], view.shape[0], seq_id, out, k, p)
            return [out[i] for i in range(m)]
        finally:
            free(out)


@cython.final
cdef class NgramDrafter(Drafter):
    """Prompt lookup decoding: the draft is what followed the latest earlier
    occurrence of the history's last ``size_n`` tokens (or, with ``size_min``, of a
    shorter suffix, down to ``size_min`` tokens; None: ``size_n`` only)."""

    cdef readonly int size_n
    cdef readonly int size_min

    def __init__(self, size_n=8, size_min=None):
        self._check_new()
        self.size_n = _int_arg(size_n, "size_n", 1, 1024)
        self.size_min = self.size_n if size_min is None else \
            _int_arg(size_min, "size_min", 1, self.size_n)
        self._opened(False)

    cdef Py_ssize_t _propose(self, const int32_t * hist, Py_ssize_t n, int seq_id,
                             int32_t * out, Py_ssize_t k, float p_min) except -1:
        cdef Py_ssize_t m
        with nogil:
            m = _ngram_draft(hist, n, self.size_n, self.size_min, out, k)
        return m

    def __repr__(self):
        return f"NgramDrafter(size_n={self.size_n}, size_min={self.size_min})"


@cython.final
@cython.no_gc_clear  # __dealloc__ closes self.context
cdef class ModelDrafter(Drafter):
    """A draft model on a context of its own: ``ModelDrafter(target, draft, n_ctx=...,
    n_seq_max=1, n_batch=512, n_threads=None)``. It keeps each sequence's history in
    its KV cells (what two calls share is not decoded again) and drafts greedily,
    stopping at a token it gives a probability under ``p_min``. The vocabularies are
    checked (check_draft_vocab)."""

    cdef readonly Context context
    cdef readonly Model model
    cdef int32_t _target_n_vocab
    cdef list _cached      # per sequence: the tokens whose cells the context holds
    cdef llama_batch _b
    cdef int32_t _cap

    def __cinit__(self):
        memset(&self._b, 0, sizeof(llama_batch))

    def __init__(self, Model target not None, Model draft not None, *, n_ctx=2048,
                 n_seq_max=1, n_batch=512, n_threads=None):
        self._check_new()
        check_draft_vocab(target, draft)
        self.context = Context(draft, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch,
                               n_threads=n_threads, kv_unified=True)
        self.model = draft
        self._target_n_vocab = target._n_vocab
        self._cached = [[] for _ in range(self.context.n_seq_max)]
        self._cap = self.context.n_batch
        try:
            _new_batch(&self._b, self._cap, 1)
        except BaseException:
            self.context.close()
            raise
        self._opened(True)

    # --- lifetime (_NativeObject): busy while it drafts (the context is its own) ------

    cdef void _free_native(self) noexcept:
        try:
            self.context.close()
        except BaseException:
            pass
        _free_batch(&self._b)

    def __dealloc__(self):
        self._finalize()

    cdef int _decode(self, const int32_t * tokens, Py_ssize_t n, llama_pos pos0,
                     int seq_id) except -1:
        """Decode ``tokens`` into ``seq_id`` (logits of the last one). Returns 1 when
        the KV cache has no room even after the other sequences' cells are dropped."""
        cdef Context ctx = self.context
        cdef Py_ssize_t done = 0, chunk, i
        cdef int rc
        cdef bint retried = False
        while done < n:
            chunk = min(n - done, <Py_ssize_t>self._cap)
            for i in range(chunk):
                self._b.token[i] = tokens[done + i]
                self._b.pos[i] = pos0 + done + i
                self._b.n_seq_id[i] = 1
                self._b.seq_id[i][0] = seq_id
                self._b.logits[i] = done + i == n - 1
            self._b.n_tokens = <int32_t>chunk
            rc = ctx._run(&self._b, False, False, True)
            if rc == 1:
                if retried:
                    return 1
                # the cells other sequences keep for reuse make room
                retried = True
                for s in range(len(self._cached)):
                    if s != seq_id and self._cached[s]:
                        llama_memory_seq_rm(ctx._mem, s, -1, -1)
                        self._cached[s] = []
                continue
            done += chunk
        return 0

    cdef Py_ssize_t _propose(self, const int32_t * hist, Py_ssize_t n, int seq_id,
                             int32_t * out, Py_ssize_t k, float p_min) except -1:
        cdef Context ctx = self.context
        cdef list cached
        cdef Py_ssize_t keep = 0, m = 0, i
        cdef const float * logits
        cdef llama_token tok
        cdef double mx, total
        cdef int32_t n_vocab, j
        if seq_id >= len(self._cached) or n < 1 or k < 1:
            return 0
        if n >= <Py_ssize_t>ctx.n_ctx - 1:
            return 0
        n_vocab = ctx.n_vocab
        for i in range(n):
            if hist[i] >= n_vocab:
                return 0  # a token the draft model does not have
        cached = self._cached[seq_id]
        while keep < len(cached) and keep < n and <int32_t>cached[keep] == hist[keep]:
            keep += 1
        if keep == n:
            keep -= 1  # the last token is decoded again for its logits
        self._enter_with(ctx)
        try:
            llama_memory_seq_rm(ctx._mem, seq_id, keep, -1)
            self._cached[seq_id] = cached = [hist[i] for i in range(keep)]
            if self._decode(hist + keep, n - keep, keep, seq_id):
                llama_memory_seq_rm(ctx._mem, seq_id, -1, -1)
                self._cached[seq_id] = []
                return 0
            cached.extend([hist[i] for i in range(keep, n)])
            k = min(k, <Py_ssize_t>ctx.n_ctx - 1 - n)
            while m < k:
                logits = llama_get_logits_ith(ctx._ptr, -1)
                if logits == NULL:
                    break
                with nogil:
                    tok = _argmax(logits, n_vocab)
                    mx = logits[tok]
                    total = 0.0
                    for j in range(n_vocab):
                        total += exp(logits[j] - mx)
                if 1.0 / total < p_min or tok >= self._target_n_vocab:
                    break
                out[m] = tok
                m += 1
                if m == k:
                    break
                if self._decode(&out[m - 1], 1, n + m - 1, seq_id):
                    break
                cached.append(tok)
        finally:
            self._leave_with(ctx)
        return m

    def __repr__(self):
        return f"ModelDrafter({self.model.path!r}, n_seq_max={len(self._cached)})"
