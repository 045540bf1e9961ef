# Structured output: llama.cpp's JSON-schema converter (common/json-schema-to-grammar)
# and its chat templates, tool-call grammars and output parsers (common/chat), through
# the small C++ bridge in structured_shim.cpp. llamabind.structured and llamabind.tools
# build on these; the JSON crossing here is text, parsed on the Python side.

from libcpp.string cimport string

from structured_shim cimport (
    ChatParser as _CChatParser,
    ChatTemplates as _CChatTemplates,
    chat_apply,
    chat_parser_feed,
    chat_parser_free,
    chat_parser_new,
    chat_parser_parse,
    chat_templates_caps,
    chat_templates_free,
    chat_templates_new,
    schema_to_grammar,
)

from llamabind.errors import OutputParseError, SchemaError


cdef inline str _text(const string & s):
    return s.decode("utf-8", "replace")


cdef inline bytes _output_bytes(object text, str name):
    """Model output for the parser: any str (it may hold NULs; lone surrogates, which
    decoded output never has, become '?')."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(text).__name__}")
    return (<str>text).encode("utf-8", "replace")


def _schema_to_grammar(schema_json):
    """llama.cpp's converter: JSON schema text -> (GBNF grammar, warnings). Warnings
    name what the converter skipped (empty when nothing was); a schema it cannot
    convert raises SchemaError."""
    cdef string src = _utf8(schema_json, "schema")
    cdef string grammar, warns, error
    cdef bint ok
    with nogil:
        ok = schema_to_grammar(src, grammar, warns, error)
    if not ok:
        raise SchemaError(f"llama.cpp cannot convert this JSON schema: {_text(error).strip()}")
    return _text(grammar), _text(warns).strip()


cdef class ChatTemplates(_NativeObject):
    """A model's chat templates as llama.cpp's own Jinja engine reads them (the
    template llama-server uses), with its tool-call handlers.

    ``ChatTemplates(model)`` takes the model's templates (and its BOS/EOS text);
    ``ChatTemplates(model, source)`` uses the Jinja ``source`` instead. The model is
    read only here: the object does not keep it.
    """

    cdef _CChatTemplates * _ptr

    def __cinit__(self):
        self._ptr = NULL

    def __init__(self, Model model not None, source=None):
        self._check_new()
        model._check()
        cdef string src
        if source is not None:
            src = _utf8(source, "source")
            if src.empty():
                raise InvalidArgumentError("the chat template source is empty")
        cdef string error
        cdef _CChatTemplates * ptr
        with nogil:
            ptr = chat_templates_new(model._ptr, src, error)
        if ptr == NULL:
            raise ChatTemplateError(
                f"llama.cpp cannot read the chat template: {_text(error).strip()}")
        self._ptr = ptr
        self._opened(False)

    cdef void _free_native(self) noexcept:
        chat_templates_free(self._ptr)
        self._ptr = NULL

    def caps(self):
        """The template's capabilities (JSON text of an object of booleans)."""
        self._check()
        cdef string out, error
        if not chat_templates_caps(self._ptr, out, error):
            raise ChatTemplateError(f"llama.cpp cannot read the template: {_text(error)}")
        return _text(out)

    def apply(self, request):
        """common_chat_templates_apply for ``request`` (JSON text; see
        structured_shim.h): the prompt, grammar, triggers and parser, as JSON text."""
        cdef string req = _utf8(request, "request")
        cdef string out, error
        cdef bint ok
        self._pin()  # threads may apply one template at once; close() waits for them
        try:
            with nogil:
                ok = chat_apply(self._ptr, req, out, error)
        finally:
            self._unpin()
        if not ok:
            raise ChatTemplateError(f"llama.cpp's chat template handler failed: {_text(error).strip()}")
        return _text(out)


cdef class ChatParser(_NativeObject):
    """llama.cpp's parser of a model's chat output (content, reasoning, tool calls),
    as ``ChatTemplates.apply`` described it. One per request: ``feed`` keeps the
    streaming state. Not for two threads at once."""

    cdef _CChatParser * _ptr

    def __cinit__(self):
        self._ptr = NULL

    def __init__(self, parser, int format, generation_prompt="", reasoning_format="none",
                 parse_tool_calls=True):
        self._check_new()
        cdef string p = _utf8(parser, "parser")
        cdef string gp = _utf8(generation_prompt, "generation_prompt")
        cdef string rf = _utf8(reasoning_format, "reasoning_format")
        cdef bint tc = _bool_arg(parse_tool_calls, "parse_tool_calls")
        cdef string error
        cdef _CChatParser * ptr
        with nogil:
            ptr = chat_parser_new(p, format, gp, rf, tc, error)
        if ptr == NULL:
            raise InvalidArgumentError(f"llama.cpp cannot load the chat parser: {_text(error).strip()}")
        self._ptr = ptr
        self._opened(False)

    cdef void _free_native(self) noexcept:
        chat_parser_free(self._ptr)
        self._ptr = NULL

    def parse(self, text, partial=False):
        """The assistant message in ``text`` (the whole output), as OpenAI-shaped
        JSON text; ``partial`` for output cut short. Output that does not match the
        template's format raises OutputParseError."""
        cdef string t = _output_bytes(text, "text")
        cdef bint part = _bool_arg(partial, "partial")
        cdef string out, error
        cdef bint ok
        self._enter()
        try:
            with nogil:
                ok = chat_parser_parse(self._ptr, t, part, out, error)
        finally:
            self._leave()
        if not ok:
            raise OutputParseError(_text(error).strip(), text)
        return _text(out)

    def feed(self, text, partial=True):
        """Add ``text`` to the output so far: (JSON text of the changes since the last
        call, JSON text of the message so far)."""
        cdef string t = _output_bytes(text, "text")
        cdef bint part = _bool_arg(partial, "partial")
        cdef string diffs, msg, error
        cdef bint ok
        self._enter()
        try:
            with nogil:
                ok = chat_parser_feed(self._ptr, t, part, diffs, msg, error)
        finally:
            self._leave()
        if not ok:
            raise OutputParseError(_text(error).strip(), None)
        return _text(diffs), _text(msg)
