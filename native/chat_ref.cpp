// llamabind-chat-ref: the native reference for llamabind's tool-calling tests. One chat
// request through llama.cpp's common library the way llama-server runs a
// /v1/chat/completions request, and the parsed reply as JSON:
//
//   llamabind-chat-ref --model M --request F [--n-ctx 4096] [--threads N]
//
// The request file is OpenAI-shaped JSON: messages, tools, tool_choice ("auto" |
// "required" | "none"), parallel_tool_calls (default: the template's capability),
// max_tokens (default 128), logit_bias ({"token id": bias}). A last assistant message
// is continued (llama-server's assistant prefill). Sampling is greedy
// (temperature 0), as llama-server does it: common_sampler with llama-server's default
// sampler list.
//
// The steps are llama-server's (tools/server/server-common.cpp,
// oaicompat_chat_params_parse; server-schema.cpp for the sampling fields; the slot loop
// in server-context.cpp; task_result_state::update_chat_msg for the final parse):
// common_chat_templates_init from the model -> common_chat_templates_apply (jinja, the
// reasoning format "deepseek", the tools) -> prompt tokenized with add_special and
// parse_special -> a common_sampler with the handler's grammar (of type tool_calls),
// lazy triggers (a trigger word that is one preserved token becomes a token trigger),
// preserved tokens and generation prompt -> greedy decoding, each token rendered with
// its special text when it is a preserved token, stopping at end-of-generation, at the
// handler's additional stop strings or at max_tokens -> common_chat_parse of the text
// (partial when cut at max_tokens).
//
// Output: {"prompt", "text", "n_tokens", "finish", "message"} (message as llama-server's
// to_json_oaicompat writes it, without tool-call ids: the server draws those at random).

#include "chat.h"
#include "common.h"
#include "json.h"
#include "llama.h"
#include "log.h"
#include "sampling.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

using json = common_json;

namespace {

std::string read_file(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        throw std::runtime_error("cannot read " + path);
    }
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void quiet_log(ggml_log_level, const char *, void *) {}

int run(int argc, char ** argv) {
    std::string model_path;
    std::string request_path;
    int         n_ctx     = 4096;
    int         n_threads = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string key = argv[i];
        std::string val = argv[i + 1];
        if (key == "--model") {
            model_path = val;
        } else if (key == "--request") {
            request_path = val;
        } else if (key == "--n-ctx") {
            n_ctx = std::atoi(val.c_str());
        } else if (key == "--threads") {
            n_threads = std::atoi(val.c_str());
        } else {
            throw std::invalid_argument("unknown option " + key);
        }
    }
    if (model_path.empty() || request_path.empty()) {
        throw std::invalid_argument("usage: llamabind-chat-ref --model M --request F");
    }
    const json body = json::parse(read_file(request_path));

    llama_log_set(quiet_log, nullptr);
    common_log_pause(common_log_main());
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers       = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (!model) {
        throw std::runtime_error("cannot load " + model_path);
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    // --- oaicompat_chat_params_parse ---------------------------------------------------
    auto tmpls = common_chat_templates_init(model, "");
    auto caps  = common_chat_templates_get_caps(tmpls.get());

    common_chat_templates_inputs inputs;
    inputs.use_jinja           = true;
    inputs.messages            = common_chat_msgs_parse_oaicompat(body.at("messages"));
    inputs.tools               = common_chat_tools_parse_oaicompat(body.value("tools", json()));
    inputs.tool_choice         = common_chat_tool_choice_parse_oaicompat(body.value("tool_choice", "auto"));
    inputs.parallel_tool_calls = body.value("parallel_tool_calls", (bool) caps["supports_parallel_tool_calls"]);
    inputs.reasoning_format    = COMMON_REASONING_FORMAT_DEEPSEEK;
    inputs.enable_thinking     = true;
    inputs.add_generation_prompt = true;
    // llama-server's assistant prefill: a last assistant message is continued
    const bool continuation = !inputs.messages.empty() && inputs.messages.back().role == "assistant";
    if (continuation) {
        inputs.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
        inputs.add_generation_prompt  = false;
    }
    const common_chat_params chat = common_chat_templates_apply(tmpls.get(), inputs);

    // --- the sampling fields (server-schema.cpp) ---------------------------------------
    common_params_sampling sparams;
    sparams.temp = 0.0f;
    if (!chat.grammar.empty()) {
        sparams.grammar = common_grammar(COMMON_GRAMMAR_TYPE_TOOL_CALLS, chat.grammar);
    }
    sparams.grammar_lazy      = chat.grammar_lazy;
    sparams.generation_prompt = chat.generation_prompt;
    for (const auto & text : chat.preserved_tokens) {
        auto ids = common_tokenize(vocab, text, false, true);
        if (ids.size() == 1) {
            sparams.preserved_tokens.insert(ids[0]);
        }
    }
    for (const auto & trigger : chat.grammar_triggers) {
        if (trigger.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD) {
            auto ids = common_tokenize(vocab, trigger.value, false, true);
            if (ids.size() == 1 && sparams.preserved_tokens.count(ids[0])) {
                common_grammar_trigger t;
                t.type  = COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN;
                t.value = trigger.value;
                t.token = ids[0];
                sparams.grammar_triggers.push_back(t);
                continue;
            }
        }
        sparams.grammar_triggers.push_back(trigger);
    }
    if (body.contains("logit_bias")) {
        for (const auto & [key, value] : body.at("logit_bias").items()) {
            sparams.logit_bias.push_back({(llama_token) std::atoi(key.c_str()), value.get<float>()});
        }
    }
    const int max_tokens = body.value("max_tokens", 128);

    // --- the slot: prompt, then greedy decoding ------------------------------------------
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = n_ctx;
    cparams.n_batch         = 512;
    cparams.n_threads       = n_threads;
    cparams.n_threads_batch = n_threads;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        throw std::runtime_error("cannot create a context");
    }
    common_sampler * smpl = common_sampler_init(model, sparams);
    if (!smpl) {
        throw std::runtime_error("cannot create the sampler");
    }

    std::vector<llama_token> prompt = common_tokenize(vocab, chat.prompt, true, true);
    for (size_t i = 0; i < prompt.size(); i += 512) {
        int n = (int) std::min<size_t>(512, prompt.size() - i);
        if (llama_decode(ctx, llama_batch_get_one(prompt.data() + i, n)) != 0) {
            throw std::runtime_error("prompt decode failed");
        }
    }

    std::string text;
    std::string finish = "length";
    int         n_gen  = 0;
    while (n_gen < max_tokens) {
        llama_token id = common_sampler_sample(smpl, ctx, -1);
        common_sampler_accept(smpl, id, true);
        if (llama_vocab_is_eog(vocab, id)) {
            finish = "stop";
            break;
        }
        n_gen++;
        text += common_token_to_piece(vocab, id, sparams.preserved_tokens.count(id) > 0);
        bool stopped = false;
        for (const auto & stop : chat.additional_stops) {
            size_t at = text.find(stop);
            if (!stop.empty() && at != std::string::npos) {
                text.erase(at);
                stopped = true;
            }
        }
        if (stopped) {
            finish = "stop";
            break;
        }
        if (llama_decode(ctx, llama_batch_get_one(&id, 1)) != 0) {
            throw std::runtime_error("decode failed");
        }
    }

    // --- update_chat_msg -------------------------------------------------------------
    common_chat_parser_params pparams(chat);
    pparams.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
    pparams.is_continuation  = continuation;
    if (!chat.parser.empty()) {
        pparams.parser.load(chat.parser);
    }
    common_chat_msg msg = common_chat_parse(text, finish != "stop", pparams);

    json out = json::object();
    out["prompt"]   = chat.prompt;
    out["text"]     = text;
    out["n_tokens"] = n_gen;
    out["finish"]   = finish;
    out["message"]  = msg.to_json_oaicompat();
    std::string dumped = out.dump();
    fwrite(dumped.data(), 1, dumped.size(), stdout);
    fputc('\n', stdout);

    common_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception & e) {
        fprintf(stderr, "llamabind-chat-ref: %s\n", e.what());
        return 1;
    }
}
