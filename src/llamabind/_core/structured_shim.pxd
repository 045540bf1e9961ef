# cython: language_level=3
# Declarations from structured_shim.h: llamabind's C++ bridge to llama.cpp's JSON-schema
# converter and chat templates/parsers (common/). Strings in and out; no function
# throws (each reports errors in `error`), and each is also declared `except +` so
# that a C++ exception could never cross into Python unconverted.

from libcpp cimport bool as cppbool
from libcpp.string cimport string

from llama cimport llama_model

cdef extern from "structured_shim.h" namespace "llamabind" nogil:
    cppclass ChatTemplates:
        pass

    cppclass ChatParser:
        pass

    cppbool schema_to_grammar(const string & schema, string & grammar, string & warnings,
                              string & error) except +
    ChatTemplates * chat_templates_new(const llama_model * model, const string & override_src,
                                       string & error) except +
    void chat_templates_free(ChatTemplates * tmpls)
    cppbool chat_templates_caps(const ChatTemplates * tmpls, string & caps,
                                string & error) except +
    cppbool chat_apply(const ChatTemplates * tmpls, const string & request, string & result,
                       string & error) except +
    ChatParser * chat_parser_new(const string & parser, int format,
                                 const string & generation_prompt,
                                 const string & reasoning_format, cppbool parse_tool_calls,
                                 string & error) except +
    void chat_parser_free(ChatParser * parser)
    cppbool chat_parser_parse(ChatParser * parser, const string & text, cppbool partial,
                              string & message, string & error) except +
    cppbool chat_parser_feed(ChatParser * parser, const string & text, cppbool partial,
                             string & diffs, string & message, string & error) except +
