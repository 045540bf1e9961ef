// See structured_shim.h. Everything crosses the boundary as strings (JSON text where it
// has structure); every exception stops here and becomes `error`.

#include "structured_shim.h"

#include "chat.h"
#include "common_shim.h"
#include "json-schema-to-grammar.h"
#include "json.h"

#include <exception>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

using json = common_json;

namespace llamabind {

namespace {

// Runs fn; any exception becomes `error` and false.
template <typename F>
bool guarded(std::string & error, F && fn) noexcept {
    try {
        fn();
        return true;
    } catch (const std::bad_alloc &) {
        error = "out of memory";
    } catch (const std::exception & e) {
        error = e.what();
        if (error.empty()) {
            error = "unknown error";
        }
    } catch (...) {
        error = "unknown C++ exception";
    }
    return false;
}

const char * trigger_type_name(common_grammar_trigger_type type) {
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

// An OpenAI-style tool call id: "call_" and 24 letters and digits.
std::string new_tool_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937_64 rng{std::random_device{}()};
    std::uniform_int_distribution<size_t> pick(0, sizeof(alphabet) - 2);
    std::string id = "call_";
    for (int i = 0; i < 24; i++) {
        id += alphabet[pick(rng)];
    }
    return id;
}

}  // namespace

// --- JSON schema -----------------------------------------------------------------------

bool schema_to_grammar(const std::string & schema, std::string & grammar, std::string & warnings,
                       std::string & error) noexcept {
    return guarded(error, [&] {
        LogCapture capture;
        // force_gbnf: llama.cpp's own GBNF converter even in a build with llguidance
        grammar  = json_schema_to_grammar(json::parse(schema), /* force_gbnf = */ true);
        warnings = capture.text();
    });
}

// --- chat templates --------------------------------------------------------------------

struct ChatTemplates {
    common_chat_templates_ptr tmpls;
};

ChatTemplates * chat_templates_new(const llama_model * model, const std::string & override_src,
                                   std::string & error) noexcept {
    ChatTemplates * out = nullptr;
    bool ok = guarded(error, [&] {
        if (model == nullptr && override_src.empty()) {
            throw std::invalid_argument("no model and no template source");
        }
        auto tmpls = common_chat_templates_init(model, override_src);
        if (!tmpls) {
            throw std::runtime_error("llama.cpp could not load the chat template");
        }
        out = new ChatTemplates{std::move(tmpls)};
    });
    return ok ? out : nullptr;
}

void chat_templates_free(ChatTemplates * tmpls) noexcept {
    delete tmpls;
}

bool chat_templates_caps(const ChatTemplates * tmpls, std::string & caps, std::string & error) noexcept {
    return guarded(error, [&] {
        json out = json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(tmpls->tmpls.get())) {
            out[name] = value;
        }
        caps = out.dump();
    });
}

bool chat_apply(const ChatTemplates * tmpls, const std::string & request, std::string & result,
                std::string & error) noexcept {
    return guarded(error, [&] {
        const json req = json::parse(request);
        if (!req.is_object()) {
            throw std::invalid_argument("the request must be a JSON object");
        }

        common_chat_templates_inputs inputs;
        inputs.use_jinja           = true;
        inputs.messages            = common_chat_msgs_parse_oaicompat(req.at("messages"));
        inputs.tools               = common_chat_tools_parse_oaicompat(req.value("tools", json()));
        inputs.tool_choice         = common_chat_tool_choice_parse_oaicompat(req.value("tool_choice", "auto"));
        inputs.parallel_tool_calls = req.value("parallel_tool_calls", false);
        inputs.add_generation_prompt = req.value("add_generation_prompt", true);
        inputs.enable_thinking     = req.value("enable_thinking", true);
        inputs.reasoning_format    = common_reasoning_format_from_name(req.value("reasoning_format", "none"));
        if (req.contains("json_schema") && !req.at("json_schema").is_null()) {
            inputs.json_schema = req.at("json_schema").dump();
        }
        if (req.contains("chat_template_kwargs")) {
            for (const auto & [key, value] : req.at("chat_template_kwargs").items()) {
                inputs.chat_template_kwargs[key] = value.dump();
            }
        }

        common_chat_params params;
        {
            LogCapture capture;  // the converter's warnings must not go unnoticed either
            params = common_chat_templates_apply(tmpls->tmpls.get(), inputs);
        }

        json out = json::object();
        out["prompt"]            = params.prompt;
        out["grammar"]           = params.grammar;
        out["grammar_lazy"]      = params.grammar_lazy;
        out["generation_prompt"] = params.generation_prompt;
        out["parser"]            = params.parser;
        out["format"]            = (int) params.format;
        out["format_name"]       = common_chat_format_name(params.format);
        out["supports_thinking"] = params.supports_thinking;
        out["thinking_start_tag"] = params.thinking_start_tag;
        out["thinking_end_tags"] = params.thinking_end_tags;
        out["preserved_tokens"]  = params.preserved_tokens;
        out["additional_stops"]  = params.additional_stops;
        json triggers = json::array();
        for (const auto & trigger : params.grammar_triggers) {
            json t = json::object();
            t["type"]  = trigger_type_name(trigger.type);
            t["value"] = trigger.value;
            t["token"] = (int) trigger.token;
            triggers.push_back(t);
        }
        out["grammar_triggers"] = triggers;
        result = out.dump();
    });
}

// --- output parser ---------------------------------------------------------------------

struct ChatParser {
    common_chat_parser_params params;
    // streaming state
    std::string              text;
    common_chat_msg          last;
    std::vector<std::string> ids;
};

ChatParser * chat_parser_new(const std::string & parser, int format,
                             const std::string & generation_prompt,
                             const std::string & reasoning_format, bool parse_tool_calls,
                             std::string & error) noexcept {
    ChatParser * out = nullptr;
    bool ok = guarded(error, [&] {
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            throw std::invalid_argument("unknown chat format " + std::to_string(format));
        }
        auto p = std::make_unique<ChatParser>();
        p->params.format            = (common_chat_format) format;
        p->params.generation_prompt = generation_prompt;
        p->params.reasoning_format  = common_reasoning_format_from_name(reasoning_format);
        p->params.parse_tool_calls  = parse_tool_calls;
        if (!parser.empty()) {
            p->params.parser.load(parser);
        }
        out = p.release();
    });
    return ok ? out : nullptr;
}

void chat_parser_free(ChatParser * parser) noexcept {
    delete parser;
}

static std::string message_json(const common_chat_msg & msg) {
    return msg.to_json_oaicompat().dump();
}

bool chat_parser_parse(ChatParser * parser, const std::string & text, bool partial,
                       std::string & message, std::string & error) noexcept {
    return guarded(error, [&] {
        common_chat_msg msg = common_chat_parse(text, partial, parser->params);
        std::vector<std::string> ids;
        msg.set_tool_call_ids(ids, new_tool_call_id);
        message = message_json(msg);
    });
}

bool chat_parser_feed(ChatParser * parser, const std::string & text, bool partial,
                      std::string & diffs, std::string & message, std::string & error) noexcept {
    return guarded(error, [&] {
        parser->text += text;
        common_chat_msg msg = common_chat_parse(parser->text, partial, parser->params);
        json out = json::array();
        if (!msg.empty()) {
            // as llama-server: ids are given when a call first appears and kept after
            msg.set_tool_call_ids(parser->ids, new_tool_call_id);
            for (const auto & diff : common_chat_msg_diff::compute_diffs(parser->last, msg)) {
                json d = json::object();
                if (!diff.reasoning_content_delta.empty()) {
                    d["reasoning_content"] = diff.reasoning_content_delta;
                } else if (!diff.content_delta.empty()) {
                    d["content"] = diff.content_delta;
                } else if (diff.tool_call_index != std::string::npos) {
                    d["index"] = (int) diff.tool_call_index;
                    if (!diff.tool_call_delta.id.empty()) {
                        d["id"] = diff.tool_call_delta.id;
                    }
                    if (!diff.tool_call_delta.name.empty()) {
                        d["name"] = diff.tool_call_delta.name;
                    }
                    d["arguments"] = diff.tool_call_delta.arguments;
                } else {
                    continue;
                }
                out.push_back(d);
            }
            parser->last = std::move(msg);
        }
        diffs   = out.dump();
        message = message_json(parser->last);
    });
}

}  // namespace llamabind
