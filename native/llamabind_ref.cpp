// llamabind-ref: a native reference for llamabind's fidelity tests, written against
// llama.h only. It does what llamabind's core does, the plain C API way, and prints JSON.
//
//   llamabind-ref generate --model M --prompt-file F [--n-predict 64] [--n-ctx 2048]
//                 [--n-batch 512] [--n-ubatch 512] [--threads N] [--n-gpu-layers 0]
//                 [--add-special 1] [--parse-special 0] [--sampler greedy|chain] [--seed S]
//                 [--penalty-last-n 64] [--repeat 1.0] [--freq 0.0] [--present 0.0]
//                 [--top-k 40] [--top-p 0.95] [--temp 0.8]
//   llamabind-ref embed    --model M --prompt-file F [--n-ctx ...] [--n-batch ...] ...
//   llamabind-ref tokenize --model M --prompt-file F [--add-special 1] [--parse-special 0]
//                 [--vocab-only 1]
//   llamabind-ref replay   --model M --prompt-file SCHEDULE
//
// generate: tokenizes the prompt, decodes it in n_batch chunks with logits on the last
// prompt token only, then loops: sample (llama_sampler_sample, which also accepts the
// token) -> stop at an end-of-generation token -> decode that one token. Prompt tokens
// are never accepted into the sampler. The chain is penalties -> top_k -> top_p
// (min_keep 1) -> temperature -> dist(seed); "greedy" is llama.cpp's greedy sampler.
// embed: a context with embeddings on and mean pooling, the prompt in one batch with
// every token marked as an output; prints the pooled embedding of sequence 0.
// replay: does what a recorded schedule of llamabind's batching engine says, one line
// per operation (written by tests/_native.py):
//   context N_CTX N_SEQ_MAX N_BATCH N_UBATCH KV_UNIFIED THREADS
//   admit RID SEQ greedy | greedy-no-eog | chain TOP_K TOP_P MIN_P TEMP SEED
//   bind RID SEQ        rm SEQ P0 P1        cp SRC DST
//   step N, then N lines "row POS TOKEN KIND NSEQ SEQ..." (KIND g: the token the
//   sequence's choice picked last, p: TOKEN), then "picks K" and K lines "pick ROW SEQ"
// Every choice (RID) has its own sampler chain; at a pick it samples from the row's
// logits. Prints each choice's picked tokens.

#include "llama.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct options {
    std::string mode;
    std::string model;
    std::string prompt_file;
    int n_predict = 64;
    int n_ctx = 2048;
    int n_batch = 512;
    int n_ubatch = 512;
    int threads = 0;  // 0: llama.cpp's default
    int n_gpu_layers = 0;  // -1: all (the GPU tests, scripts/test_gpu.sh)
    bool add_special = true;
    bool parse_special = false;
    bool vocab_only = false;
    bool verbose = false;
    std::string sampler = "greedy";
    unsigned long seed = 0;
    int penalty_last_n = 64;
    float repeat = 1.0f;
    float freq = 0.0f;
    float present = 0.0f;
    int top_k = 40;
    float top_p = 0.95f;
    float temp = 0.8f;
};

[[noreturn]] void fail(const std::string & msg) {
    std::fprintf(stderr, "llamabind-ref: error: %s\n", msg.c_str());
    std::exit(2);
}

long parse_long(const std::string & name, const std::string & value) {
    char * end = nullptr;
    errno = 0;
    const long v = std::strtol(value.c_str(), &end, 10);
    if (errno != 0 || end == value.c_str() || *end != '\0') {
        fail("--" + name + " expects an integer, got '" + value + "'");
    }
    return v;
}

float parse_float(const std::string & name, const std::string & value) {
    char * end = nullptr;
    errno = 0;
    const float v = std::strtof(value.c_str(), &end);
    if (errno != 0 || end == value.c_str() || *end != '\0' || !std::isfinite(v)) {
        fail("--" + name + " expects a finite number, got '" + value + "'");
    }
    return v;
}

bool parse_bool(const std::string & name, const std::string & value) {
    if (value == "1" || value == "true") {
        return true;
    }
    if (value == "0" || value == "false") {
        return false;
    }
    fail("--" + name + " expects 0 or 1, got '" + value + "'");
}

options parse_args(int argc, char ** argv) {
    if (argc < 2) {
        fail("usage: llamabind-ref generate|embed|tokenize --model PATH --prompt-file PATH [options]");
    }
    options o;
    o.mode = argv[1];
    if (o.mode != "generate" && o.mode != "embed" && o.mode != "tokenize" &&
        o.mode != "replay") {
        fail("unknown mode '" + o.mode + "' (generate, embed, tokenize or replay)");
    }
    for (int i = 2; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--verbose") {
            o.verbose = true;
            continue;
        }
        if (arg.rfind("--", 0) != 0 || i + 1 >= argc) {
            fail("bad argument '" + arg + "' (options are --name value)");
        }
        const std::string name = arg.substr(2);
        const std::string value = argv[++i];
        if (name == "model") {
            o.model = value;
        } else if (name == "prompt-file") {
            o.prompt_file = value;
        } else if (name == "n-predict") {
            o.n_predict = (int) parse_long(name, value);
        } else if (name == "n-ctx") {
            o.n_ctx = (int) parse_long(name, value);
        } else if (name == "n-batch") {
            o.n_batch = (int) parse_long(name, value);
        } else if (name == "n-ubatch") {
            o.n_ubatch = (int) parse_long(name, value);
        } else if (name == "threads") {
            o.threads = (int) parse_long(name, value);
        } else if (name == "n-gpu-layers") {
            o.n_gpu_layers = (int) parse_long(name, value);
        } else if (name == "add-special") {
            o.add_special = parse_bool(name, value);
        } else if (name == "parse-special") {
            o.parse_special = parse_bool(name, value);
        } else if (name == "vocab-only") {
            o.vocab_only = parse_bool(name, value);
        } else if (name == "sampler") {
            if (value != "greedy" && value != "chain") {
                fail("--sampler is 'greedy' or 'chain', got '" + value + "'");
            }
            o.sampler = value;
        } else if (name == "seed") {
            const long s = parse_long(name, value);
            if (s < 0 || s > 0xFFFFFFFEL) {
                fail("--seed must be in [0, 2^32 - 2]");
            }
            o.seed = (unsigned long) s;
        } else if (name == "penalty-last-n") {
            o.penalty_last_n = (int) parse_long(name, value);
        } else if (name == "repeat") {
            o.repeat = parse_float(name, value);
        } else if (name == "freq") {
            o.freq = parse_float(name, value);
        } else if (name == "present") {
            o.present = parse_float(name, value);
        } else if (name == "top-k") {
            o.top_k = (int) parse_long(name, value);
        } else if (name == "top-p") {
            o.top_p = parse_float(name, value);
        } else if (name == "temp") {
            o.temp = parse_float(name, value);
        } else {
            fail("unknown option '--" + name + "'");
        }
    }
    if (o.model.empty() || o.prompt_file.empty()) {
        fail("--model and --prompt-file are required");
    }
    if (o.n_predict < 0 || o.n_ctx < 1 || o.n_batch < 1 || o.n_ubatch < 1 || o.threads < 0 ||
        o.n_gpu_layers < -1) {
        fail("n-predict must be >= 0; n-ctx, n-batch, n-ubatch >= 1; threads >= 0; "
             "n-gpu-layers >= -1");
    }
    return o;
}

std::string read_file(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        fail("cannot read '" + path + "'");
    }
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void log_quiet(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

void log_all(enum ggml_log_level /*level*/, const char * text, void * /*user_data*/) {
    std::fputs(text, stderr);
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text,
                                  bool add_special, bool parse_special) {
    if (text.size() > 0x7FFFFFF0u) {
        fail("prompt too long");
    }
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(),
                               (int32_t) out.size(), add_special, parse_special);
    if (n < 0) {
        if (n == INT32_MIN) {
            fail("tokenization overflow");
        }
        out.resize((size_t) -n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(),
                           (int32_t) out.size(), add_special, parse_special);
        if (n < 0) {
            fail("tokenization failed");
        }
    }
    out.resize((size_t) n);
    return out;
}

void print_tokens(const char * key, const std::vector<llama_token> & toks) {
    std::printf("\"%s\": [", key);
    for (size_t i = 0; i < toks.size(); ++i) {
        std::printf(i ? ", %d" : "%d", toks[i]);
    }
    std::printf("]");
}

// A batch of `n` tokens at consecutive positions of sequence 0.
struct owned_batch {
    llama_batch b;
    explicit owned_batch(int32_t capacity) : b(llama_batch_init(capacity, 0, 1)) {
        if (b.token == nullptr) {
            fail("llama_batch_init failed");
        }
    }
    ~owned_batch() { llama_batch_free(b); }
    owned_batch(const owned_batch &) = delete;
    owned_batch & operator=(const owned_batch &) = delete;

    void fill(const llama_token * toks, int32_t n, llama_pos pos0, bool all_outputs,
              bool last_output) {
        for (int32_t i = 0; i < n; ++i) {
            b.token[i] = toks[i];
            b.pos[i] = pos0 + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = all_outputs ? 1 : 0;
        }
        if (n > 0 && last_output) {
            b.logits[n - 1] = 1;
        }
        b.n_tokens = n;
    }
};

llama_context * make_context(llama_model * model, const options & o, bool embeddings) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) o.n_ctx;
    cp.n_batch = (uint32_t) o.n_batch;
    cp.n_ubatch = (uint32_t) o.n_ubatch;
    cp.n_seq_max = 1;
    if (o.threads > 0) {
        cp.n_threads = o.threads;
        cp.n_threads_batch = o.threads;
    }
    if (embeddings) {
        cp.embeddings = true;
        cp.pooling_type = LLAMA_POOLING_TYPE_MEAN;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fail("llama_init_from_model failed");
    }
    return ctx;
}

void decode_or_fail(llama_context * ctx, const llama_batch & b, const char * what) {
    const int32_t rc = llama_decode(ctx, b);
    if (rc != 0) {
        fail(std::string("llama_decode failed (") + what + ", code " + std::to_string(rc) + ")");
    }
}

llama_sampler * make_sampler(const llama_model * model, const options & o) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (o.sampler == "greedy") {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, o.penalty_last_n,
                                                                o.repeat, o.freq, o.present));
    llama_sampler_chain_add(chain, llama_sampler_init_top_k(o.top_k));
    llama_sampler_chain_add(chain, llama_sampler_init_top_p(o.top_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(o.temp));
    llama_sampler_chain_add(chain, llama_sampler_init_dist((uint32_t) o.seed));
    return chain;
}

int run_generate(llama_model * model, const options & o) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const std::vector<llama_token> prompt =
        tokenize(vocab, read_file(o.prompt_file), o.add_special, o.parse_special);
    if (prompt.empty()) {
        fail("the prompt has no tokens");
    }
    llama_context * ctx = make_context(model, o, false);
    const int32_t n_ctx = (int32_t) llama_n_ctx(ctx);
    const int32_t n_batch = (int32_t) llama_n_batch(ctx);
    if ((int32_t) prompt.size() > n_ctx) {
        fail("the prompt does not fit in the context");
    }

    // the prompt, in n_batch chunks; logits for the very last prompt token only
    {
        owned_batch batch(n_batch);
        const int32_t n = (int32_t) prompt.size();
        for (int32_t done = 0; done < n;) {
            const int32_t chunk = std::min(n - done, n_batch);
            batch.fill(prompt.data() + done, chunk, done, false, done + chunk == n);
            decode_or_fail(ctx, batch.b, "prompt");
            done += chunk;
        }
    }

    llama_sampler * smpl = make_sampler(model, o);
    std::vector<llama_token> generated;
    std::string finish = "length";
    llama_pos pos = (llama_pos) prompt.size();
    owned_batch one(1);
    while ((int) generated.size() < o.n_predict && pos < n_ctx) {
        const llama_token tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, tok)) {
            finish = "stop";
            break;
        }
        generated.push_back(tok);
        one.fill(&tok, 1, pos, false, true);
        decode_or_fail(ctx, one.b, "generation");
        pos += 1;
    }

    std::printf("{");
    print_tokens("prompt_tokens", prompt);
    std::printf(", ");
    print_tokens("tokens", generated);
    std::printf(", \"finish_reason\": \"%s\", \"n_ctx\": %d, \"n_batch\": %d, \"n_ubatch\": %u, "
                "\"n_threads\": %d, \"seed\": %u}\n",
                finish.c_str(), n_ctx, n_batch, llama_n_ubatch(ctx), llama_n_threads(ctx),
                llama_sampler_get_seed(smpl));
    llama_sampler_free(smpl);
    llama_free(ctx);
    return 0;
}

int run_embed(llama_model * model, const options & o) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const std::vector<llama_token> prompt =
        tokenize(vocab, read_file(o.prompt_file), o.add_special, o.parse_special);
    if (prompt.empty()) {
        fail("the prompt has no tokens");
    }
    llama_context * ctx = make_context(model, o, true);
    const int32_t n = (int32_t) prompt.size();
    // mean pooling is per micro-batch: the whole prompt must be one
    if (n > (int32_t) llama_n_batch(ctx) || n > (int32_t) llama_n_ubatch(ctx)) {
        fail("embed needs the whole prompt in one batch (raise --n-batch/--n-ubatch)");
    }
    {
        owned_batch batch(n);
        batch.fill(prompt.data(), n, 0, true, true);
        decode_or_fail(ctx, batch.b, "embed");
    }
    const float * emb = llama_get_embeddings_seq(ctx, 0);
    if (emb == nullptr) {
        fail("no pooled embedding for sequence 0");
    }
    const int32_t n_embd = llama_model_n_embd_out(model);
    std::printf("{");
    print_tokens("prompt_tokens", prompt);
    std::printf(", \"pooling\": %d, \"embedding\": [", (int) llama_pooling_type(ctx));
    for (int32_t i = 0; i < n_embd; ++i) {
        std::printf(i ? ", %.9g" : "%.9g", (double) emb[i]);
    }
    std::printf("]}\n");
    llama_free(ctx);
    return 0;
}

// --- replay --------------------------------------------------------------------------

struct replay_choice {
    llama_sampler * chain = nullptr;
    std::vector<llama_token> picked;
};

int run_replay(llama_model * model, const options & o) {
    std::ifstream in(o.prompt_file);
    if (!in) {
        fail("cannot read '" + o.prompt_file + "'");
    }
    std::string op;
    in >> op;
    if (op != "context") {
        fail("a schedule starts with its context line");
    }
    int n_ctx = 0, n_seq_max = 0, n_batch = 0, n_ubatch = 0, unified = 0, threads = 0;
    in >> n_ctx >> n_seq_max >> n_batch >> n_ubatch >> unified >> threads;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_seq_max = (uint32_t) n_seq_max;
    cp.n_batch = (uint32_t) n_batch;
    cp.n_ubatch = (uint32_t) n_ubatch;
    cp.kv_unified = unified != 0;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fail("llama_init_from_model failed");
    }
    llama_memory_t mem = llama_get_memory(ctx);
    std::vector<replay_choice> choices;        // by RID (1-based; [0] unused)
    std::vector<int> bound(n_seq_max, 0);       // sequence -> RID
    llama_batch b = llama_batch_init(n_batch, 0, n_seq_max);
    while (in >> op) {
        if (op == "admit" || op == "bind") {
            int rid = 0, seq = 0;
            in >> rid >> seq;
            if (rid < 1 || seq < 0 || seq >= n_seq_max) {
                fail("bad " + op + " line");
            }
            if ((int) choices.size() <= rid) {
                choices.resize(rid + 1);
            }
            bound[seq] = rid;
            if (op == "admit") {
                std::string kind;
                in >> kind;
                llama_sampler * chain =
                    llama_sampler_chain_init(llama_sampler_chain_default_params());
                if (kind == "greedy" || kind == "greedy-no-eog") {
                    if (kind == "greedy-no-eog") {
                        // ignore_eos: end-of-generation tokens are never picked
                        const llama_vocab * vocab = llama_model_get_vocab(model);
                        std::vector<llama_logit_bias> bias;
                        for (llama_token t = 0; t < llama_vocab_n_tokens(vocab); ++t) {
                            if (llama_vocab_is_eog(vocab, t)) {
                                bias.push_back({t, -INFINITY});
                            }
                        }
                        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(
                            llama_vocab_n_tokens(vocab), (int32_t) bias.size(), bias.data()));
                    }
                    llama_sampler_chain_add(chain, llama_sampler_init_greedy());
                } else if (kind == "chain") {
                    int top_k = 0;
                    float top_p = 1, min_p = 0, temp = 1;
                    unsigned long seed = 0;
                    in >> top_k >> top_p >> min_p >> temp >> seed;
                    if (top_k > 0) {
                        llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
                    }
                    if (top_p < 1.0f) {
                        llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 0));
                    }
                    if (min_p > 0.0f) {
                        llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 0));
                    }
                    llama_sampler_chain_add(chain, llama_sampler_init_temp(temp));
                    llama_sampler_chain_add(chain, llama_sampler_init_dist((uint32_t) seed));
                } else {
                    fail("unknown sampler '" + kind + "'");
                }
                choices[rid].chain = chain;
            }
        } else if (op == "rm") {
            int seq = 0, p0 = 0, p1 = 0;
            in >> seq >> p0 >> p1;
            llama_memory_seq_rm(mem, seq, p0, p1);
        } else if (op == "cp") {
            int src = 0, dst = 0;
            in >> src >> dst;
            llama_memory_seq_cp(mem, src, dst, -1, -1);
        } else if (op == "step") {
            int n = 0;
            in >> n;
            if (n < 1 || n > n_batch) {
                fail("bad step size");
            }
            for (int i = 0; i < n; ++i) {
                std::string row, kind;
                int pos = 0, token = 0, nseq = 0;
                in >> row >> pos >> token >> kind >> nseq;
                b.token[i] = token;
                b.pos[i] = pos;
                b.n_seq_id[i] = nseq;
                for (int k = 0; k < nseq; ++k) {
                    in >> b.seq_id[i][k];
                }
                b.logits[i] = 0;
                if (kind == "g") {
                    const std::vector<llama_token> & mine =
                        choices[bound[b.seq_id[i][0]]].picked;
                    if (mine.empty()) {
                        fail("a generated row of a choice that picked nothing");
                    }
                    b.token[i] = mine.back();
                }
            }
            std::string picks_word;
            int n_picks = 0;
            in >> picks_word >> n_picks;
            std::vector<std::pair<int, int>> picks(n_picks);
            for (auto & pk : picks) {
                std::string word;
                in >> word >> pk.first >> pk.second;
                b.logits[pk.first] = 1;
            }
            b.n_tokens = n;
            decode_or_fail(ctx, b, "replay step");
            for (const auto & pk : picks) {
                replay_choice & c = choices[bound[pk.second]];
                c.picked.push_back(llama_sampler_sample(c.chain, ctx, pk.first));
            }
        } else {
            fail("unknown schedule operation '" + op + "'");
        }
    }
    std::printf("{\"choices\": {");
    bool first = true;
    for (size_t rid = 1; rid < choices.size(); ++rid) {
        std::printf(first ? "\"%zu\": [" : ", \"%zu\": [", rid);
        first = false;
        for (size_t i = 0; i < choices[rid].picked.size(); ++i) {
            std::printf(i ? ", %d" : "%d", choices[rid].picked[i]);
        }
        std::printf("]");
        llama_sampler_free(choices[rid].chain);
    }
    std::printf("}}\n");
    llama_batch_free(b);
    llama_free(ctx);
    return 0;
}

int run_tokenize(llama_model * model, const options & o) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const std::vector<llama_token> toks =
        tokenize(vocab, read_file(o.prompt_file), o.add_special, o.parse_special);
    std::printf("{");
    print_tokens("tokens", toks);
    std::printf("}\n");
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    const options o = parse_args(argc, argv);
    llama_log_set(o.verbose ? log_all : log_quiet, nullptr);
    llama_backend_init();

    // the same model parameters as llamabind.Model's defaults
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = o.n_gpu_layers;
    mp.load_mode = LLAMA_LOAD_MODE_MMAP;
    mp.vocab_only = o.mode == "tokenize" && o.vocab_only;
    llama_model * model = llama_model_load_from_file(o.model.c_str(), mp);
    if (model == nullptr) {
        fail("could not load model '" + o.model + "'");
    }
    int rc = 0;
    if (o.mode == "generate") {
        rc = run_generate(model, o);
    } else if (o.mode == "embed") {
        rc = run_embed(model, o);
    } else if (o.mode == "replay") {
        rc = run_replay(model, o);
    } else {
        rc = run_tokenize(model, o);
    }
    std::fflush(stdout);
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
