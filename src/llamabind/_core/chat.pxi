# llama.cpp's built-in chat template formatter (llama_chat_apply_template). The
# high-level layer renders a model's own Jinja template with jinja2 and uses this only
# for templates llama.cpp knows by name.


def apply_builtin_chat_template(template, messages, add_assistant=True):
    """Format ``messages`` (dicts with "role" and "content") with llama.cpp's built-in
    implementation of ``template`` (a name from ``builtin_chat_templates()`` or a
    template source llama.cpp recognises)."""
    cdef bint add_ass = _bool_arg(add_assistant, "add_assistant")
    tmpl = _utf8(template, "template")
    msgs = list(messages)
    encoded = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidArgumentError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        encoded.append((_utf8(m["role"], f"messages[{i}]['role']"),
                        _utf8(m["content"], f"messages[{i}]['content']")))
    cdef Py_ssize_t n = len(encoded)
    cdef llama_chat_message * chat = <llama_chat_message *>malloc(max(n, 1) * sizeof(llama_chat_message))
    if chat == NULL:
        raise MemoryError()
    cdef int32_t cap = 256
    cdef int32_t got
    cdef char * buf = NULL
    cdef const char * ctmpl = tmpl
    try:
        for i, (role, content) in enumerate(encoded):
            chat[i].role = <const char *>role
            chat[i].content = <const char *>content
            cap += len(role) + len(content) + 64
        while True:
            free(buf)
            buf = <char *>malloc(cap)
            if buf == NULL:
                raise MemoryError()
            try:
                with nogil:
                    got = llama_chat_apply_template(ctmpl, chat, n, add_ass, buf, cap)
            except RuntimeError as exc:
                raise ChatTemplateError(f"chat template failed: {exc}") from None
            if got < 0:
                raise ChatTemplateError(
                    f"llama.cpp does not support the chat template {template[:60]!r}")
            if got < cap:
                return buf[:got].decode("utf-8", "replace")
            cap = got + 1
    finally:
        free(buf)
        free(chat)
