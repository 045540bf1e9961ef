// llamabind's bridge to llama.cpp's structured-output code (common/json-schema-to-grammar,
// common/chat): plain std::string in and out, so that Cython needs no C++ class of
// llama.cpp's. No function here lets an exception escape: each catches everything and
// reports it in `error`, returning false (or NULL).
#pragma once

#include <string>

struct llama_model;

namespace llamabind {

// JSON schema (JSON text) -> GBNF grammar (root rule "root"). `warnings` receives what
// the converter reported as skipped (e.g. a regex it cannot translate, accepted as any
// string); empty when the conversion was complete.
bool schema_to_grammar(const std::string & schema, std::string & grammar, std::string & warnings,
                       std::string & error) noexcept;

// The chat templates of a model (its default and "tool_use" templates), or of the
// Jinja source `override_src` when it is not empty, parsed by llama.cpp's Jinja engine.
struct ChatTemplates;

ChatTemplates * chat_templates_new(const llama_model * model, const std::string & override_src,
                                   std::string & error) noexcept;
void chat_templates_free(ChatTemplates * tmpls) noexcept;

// The template's capabilities, as a JSON object of booleans.
bool chat_templates_caps(const ChatTemplates * tmpls, std::string & caps, std::string & error) noexcept;

// common_chat_templates_apply, as llama-server calls it. `request` is a JSON object:
// messages (OpenAI shape), tools, tool_choice ("auto" | "required" | "none"),
// parallel_tool_calls, json_schema (object or null), add_generation_prompt,
// enable_thinking, reasoning_format, chat_template_kwargs (object: name -> value).
// `result` is a JSON object: prompt, grammar, grammar_lazy, grammar_triggers
// ([{type: "word" | "pattern" | "pattern_full" | "token", value, token}]),
// preserved_tokens, additional_stops, generation_prompt, parser, format, format_name,
// supports_thinking, thinking_start_tag, thinking_end_tags.
bool chat_apply(const ChatTemplates * tmpls, const std::string & request, std::string & result,
                std::string & error) noexcept;

// llama.cpp's output parser for one request (common_chat_parse with the parser a
// chat_apply returned). It also keeps the streaming state: the text so far, the last
// parsed message, and the ids given to tool calls.
struct ChatParser;

ChatParser * chat_parser_new(const std::string & parser, int format,
                             const std::string & generation_prompt,
                             const std::string & reasoning_format, bool parse_tool_calls,
                             std::string & error) noexcept;
void chat_parser_free(ChatParser * parser) noexcept;

// Parse `text` (the whole output) into an OpenAI-shaped assistant message (JSON text);
// `partial` for output that was cut short. Tool calls without an id get one.
bool chat_parser_parse(ChatParser * parser, const std::string & text, bool partial,
                       std::string & message, std::string & error) noexcept;

// Streaming: add `text` to the output so far and parse it (`partial` until the end).
// `diffs` is a JSON array of what changed since the last call, in llama-server's order:
// {"reasoning_content": s}, {"content": s}, or {"index": i, "id": s, "name": s,
// "arguments": s} for a tool call (id and name only when they are new). `message` is
// the whole message parsed so far.
bool chat_parser_feed(ChatParser * parser, const std::string & text, bool partial,
                      std::string & diffs, std::string & message, std::string & error) noexcept;

}  // namespace llamabind
