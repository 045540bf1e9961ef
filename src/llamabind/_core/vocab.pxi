# Vocab: the model's tokenizer (llama_vocab). It borrows from its model and keeps
# the model alive; every call checks that the model is still open.

cdef dict _VOCAB_TYPES = {
    LLAMA_VOCAB_TYPE_NONE: "none", LLAMA_VOCAB_TYPE_SPM: "spm", LLAMA_VOCAB_TYPE_BPE: "bpe",
    LLAMA_VOCAB_TYPE_WPM: "wpm", LLAMA_VOCAB_TYPE_UGM: "ugm", LLAMA_VOCAB_TYPE_RWKV: "rwkv",
    LLAMA_VOCAB_TYPE_PLAMO2: "plamo2",
}

# Below this many bytes, releasing the GIL costs more than it frees.
DEF _NOGIL_TEXT_BYTES = 4096


cdef class Vocab:
    """A model's vocabulary: tokenize, detokenize, special tokens.

    Obtain it as ``model.vocab``. Token ids are checked against the vocabulary before
    they reach llama.cpp.
    """

    cdef Model _model
    cdef const llama_vocab * _ptr
    cdef int32_t _n_vocab

    def __init__(self):
        raise TypeError("use model.vocab to get a Vocab")

    cdef inline int _check(self) except -1:
        self._model._check()
        return 0

    cdef inline int _check_token(self, object token, str name="token") except -1:
        """An open vocabulary, and one of its token ids."""
        self._check()
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidArgumentError(f"{name} must be an int token id, got {token!r}")
        if token < 0 or token >= self._n_vocab:
            raise InvalidArgumentError(
                f"{name} = {token} is not a valid token id (the vocabulary has "
                f"{self._n_vocab} tokens: 0..{self._n_vocab - 1})")
        return 0

    @property
    def model(self):
        return self._model

    @property
    def n_tokens(self):
        self._check()
        return self._n_vocab

    def __len__(self):
        self._check()
        return self._n_vocab

    @property
    def type(self):
        self._check()
        return _VOCAB_TYPES.get(llama_vocab_type_of(self._ptr), "unknown")

    # special tokens; -1 (LLAMA_TOKEN_NULL) where the model has none
    @property
    def bos(self):
        self._check()
        return llama_vocab_bos(self._ptr)

    @property
    def eos(self):
        self._check()
        return llama_vocab_eos(self._ptr)

    @property
    def eot(self):
        self._check()
        return llama_vocab_eot(self._ptr)

    @property
    def sep(self):
        self._check()
        return llama_vocab_sep(self._ptr)

    @property
    def nl(self):
        self._check()
        return llama_vocab_nl(self._ptr)

    @property
    def pad(self):
        self._check()
        return llama_vocab_pad(self._ptr)

    @property
    def mask(self):
        self._check()
        return llama_vocab_mask(self._ptr)

    @property
    def fim_tokens(self):
        """Fill-in-the-middle tokens (pre, suf, mid, pad, rep, sep); -1 where absent."""
        self._check()
        return {"pre": llama_vocab_fim_pre(self._ptr), "suf": llama_vocab_fim_suf(self._ptr),
                "mid": llama_vocab_fim_mid(self._ptr), "pad": llama_vocab_fim_pad(self._ptr),
                "rep": llama_vocab_fim_rep(self._ptr), "sep": llama_vocab_fim_sep(self._ptr)}

    @property
    def add_bos(self):
        self._check()
        return llama_vocab_get_add_bos(self._ptr)

    @property
    def add_eos(self):
        self._check()
        return llama_vocab_get_add_eos(self._ptr)

    @property
    def add_sep(self):
        self._check()
        return llama_vocab_get_add_sep(self._ptr)

    def is_eog(self, token):
        """True for end-of-generation tokens (EOS, EOT, and the model's others)."""
        self._check_token(token)
        return llama_vocab_is_eog(self._ptr, token)

    def is_control(self, token):
        self._check_token(token)
        return llama_vocab_is_control(self._ptr, token)

    def token_text(self, token):
        """The token's text as stored in the vocabulary (not detokenized)."""
        self._check_token(token)
        return llama_vocab_get_text(self._ptr, token).decode("utf-8", "replace")

    def token_score(self, token):
        self._check_token(token)
        return llama_vocab_get_score(self._ptr, token)

    def token_attr(self, token):
        """The token's attribute bit flags (``LLAMA_TOKEN_ATTR_*``)."""
        self._check_token(token)
        return <int>llama_vocab_get_attr(self._ptr, token)

    def tokenize(self, text, *, add_special=True, parse_special=False,
                 as_array=False):
        """Tokenize ``text`` (str). Returns a list of ids, or an int32 array.

        ``add_special`` adds BOS/EOS as the model asks; ``parse_special`` turns
        special-token text such as ``<|im_start|>`` into the special token.
        """
        add_special = _bool_arg(add_special, "add_special")
        parse_special = _bool_arg(parse_special, "parse_special")
        as_array = _bool_arg(as_array, "as_array")
        self._check()
        data = _utf8(text, "text")
        arr = _tokenize_bytes(self, data, add_special, parse_special)
        return arr if as_array else arr.tolist()

    def token_to_piece(self, token, *, special=False, lstrip=0):
        """The bytes one token renders to (may be part of a UTF-8 character)."""
        special = _bool_arg(special, "special")
        lstrip = _int_arg(lstrip, "lstrip", 0, 2147483647)
        self._check_token(token)
        return _piece(self._ptr, token, special, lstrip)

    def detokenize(self, tokens, *, remove_special=False, unparse_special=False,
                   errors="replace"):
        """Turn token ids back into text.

        Invalid UTF-8 (a token sequence cut inside a character) is decoded with
        ``errors`` (as ``bytes.decode``); use ``detokenize_bytes`` for the raw bytes.
        """
        remove_special = _bool_arg(remove_special, "remove_special")
        unparse_special = _bool_arg(unparse_special, "unparse_special")
        return self.detokenize_bytes(tokens, remove_special=remove_special,
                                     unparse_special=unparse_special).decode("utf-8", errors)

    def detokenize_bytes(self, tokens, *, remove_special=False,
                         unparse_special=False):
        cdef bint rm_special = _bool_arg(remove_special, "remove_special")
        cdef bint unparse = _bool_arg(unparse_special, "unparse_special")
        self._check()
        arr = _token_array(tokens, self._n_vocab, "tokens")
        cdef const int32_t[::1] view = arr
        cdef int32_t n = <int32_t>view.shape[0]
        if n == 0:
            return b""
        cdef int32_t cap = n * 8 + 16
        cdef int32_t got
        cdef char * buf
        cdef const llama_token * toks = &view[0]
        _check_tokenizer(self._ptr)
        self._model._pin()
        try:
            while True:
                buf = <char *>malloc(cap)
                if buf == NULL:
                    raise MemoryError()
                try:
                    try:
                        with nogil:
                            got = llama_detokenize(self._ptr, toks, n, buf, cap,
                                                   rm_special, unparse)
                    except (IndexError, ValueError, RuntimeError) as exc:
                        raise _tokenizer_failed("detokenize", exc) from None
                    if got >= 0:
                        return buf[:got]
                finally:
                    free(buf)
                if got == -2147483648:
                    raise TokenizationError("detokenized text is too long (over 2 GiB)")
                cap = -got + 1
        finally:
            self._model._unpin()


cdef int _check_tokenizer(const llama_vocab * vocab) except -1:
    """llama.cpp aborts the process (GGML_ASSERT) when a vocabulary of type "none",
    one without a tokenizer, is asked to tokenize or render tokens."""
    if llama_vocab_type_of(vocab) == LLAMA_VOCAB_TYPE_NONE:
        raise TokenizationError(
            "the model has no tokenizer (vocabulary type 'none'): it cannot tokenize or "
            "render tokens")
    return 0


cdef object _tokenizer_failed(str op, object exc):
    """A C++ exception from llama.cpp's tokenizer (Cython turns std::out_of_range into
    IndexError, others into RuntimeError/ValueError) as a TokenizationError."""
    return TokenizationError(f"llama.cpp failed to {op}: {type(exc).__name__}: {exc}")


cdef bytes _piece(const llama_vocab * vocab, llama_token token, bint special, int lstrip):
    cdef char small[64]
    cdef int32_t n
    _check_tokenizer(vocab)
    try:
        n = llama_token_to_piece(vocab, token, small, sizeof(small), lstrip, special)
    except (IndexError, ValueError, RuntimeError) as exc:
        raise _tokenizer_failed(f"render token {token}", exc) from None
    if n >= 0:
        return small[:n]
    cdef char * big = <char *>malloc(-n)
    if big == NULL:
        raise MemoryError()
    try:
        try:
            n = llama_token_to_piece(vocab, token, big, -n, lstrip, special)
        except (IndexError, ValueError, RuntimeError) as exc:
            raise _tokenizer_failed(f"render token {token}", exc) from None
        if n < 0:
            raise TokenizationError(f"token {token} could not be rendered")
        return big[:n]
    finally:
        free(big)


cdef object _tokenize_bytes(Vocab vocab, bytes data, bint add_special, bint parse_special):
    """Tokenize UTF-8 bytes into a fresh int32 array (GIL released for long texts)."""
    cdef Py_ssize_t nbytes = len(data)
    if nbytes > 2147483647 - 16:
        raise TokenizationError(f"text is too long to tokenize ({nbytes} bytes, limit 2 GiB)")
    cdef const char * text = data
    cdef int32_t text_len = <int32_t>nbytes
    # Every token covers at least one byte; special tokens add at most a few.
    cdef int32_t cap = text_len + 8
    cdef int32_t n
    out = _np().empty(cap, dtype=_np().int32)
    cdef int32_t[::1] view = out
    _check_tokenizer(vocab._ptr)
    vocab._model._pin()
    try:
        while True:
            try:
                if text_len >= _NOGIL_TEXT_BYTES:
                    with nogil:
                        n = llama_tokenize(vocab._ptr, text, text_len, &view[0], cap,
                                           add_special, parse_special)
                else:
                    n = llama_tokenize(vocab._ptr, text, text_len, &view[0], cap,
                                       add_special, parse_special)
            except (IndexError, ValueError, RuntimeError) as exc:
                raise _tokenizer_failed("tokenize", exc) from None
            if n >= 0:
                return out[:n]
            if n == -2147483648:
                raise TokenizationError("text produces too many tokens (over 2^31)")
            cap = -n
            out = _np().empty(cap, dtype=_np().int32)
            view = out
    finally:
        vocab._model._unpin()
