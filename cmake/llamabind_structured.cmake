# Structured output: llama.cpp's JSON-schema converter (common/json-schema-to-grammar)
# and its chat templates, tool-call handlers and output parsers (common/chat and what it
# needs: the Jinja engine, the PEG parser, common_json), built as one static library
# with llamabind's C++ bridge (src/llamabind/_core/structured_shim.cpp).
#
# Only these files of common/ are compiled, not llama.cpp's llama-common target: that
# one also holds sampling, speculative decoding, model fitting, downloads (HTTP) and a
# logger with a worker thread printing to stdout. The handful of its functions these
# sources call (string helpers, tokenize, the log entry points) are in common_shim.cpp.

function(llamabind_add_structured core_dir)
  set(common ${LLAMABIND_VENDOR}/common)
  include(${common}/parsers/sources.cmake)  # LLAMA_CHAT_PARSERS_SOURCES
  add_library(llamabind_structured STATIC
    ${LLAMA_CHAT_PARSERS_SOURCES}
    ${common}/chat.cpp
    ${common}/chat-auto-parser-generator.cpp
    ${common}/chat-auto-parser-helpers.cpp
    ${common}/chat-diff-analyzer.cpp
    ${common}/chat-peg-parser.cpp
    ${common}/peg-parser.cpp
    ${common}/json.cpp
    ${common}/json-schema.cpp
    ${common}/json-schema-to-grammar.cpp
    ${common}/trie.cpp
    ${common}/unicode.cpp
    ${common}/jinja/caps.cpp
    ${common}/jinja/lexer.cpp
    ${common}/jinja/parser.cpp
    ${common}/jinja/runtime.cpp
    ${common}/jinja/string.cpp
    ${common}/jinja/value.cpp
    ${core_dir}/common_shim.cpp
    ${core_dir}/structured_shim.cpp)
  target_include_directories(llamabind_structured PUBLIC ${core_dir} PRIVATE ${common})
  target_link_libraries(llamabind_structured PRIVATE llama vendor::nlohmann)
  target_compile_features(llamabind_structured PRIVATE cxx_std_17)
  set_target_properties(llamabind_structured PROPERTIES
    POSITION_INDEPENDENT_CODE ON
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
endfunction()
