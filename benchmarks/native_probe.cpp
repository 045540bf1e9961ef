// native_probe: the native side of llamabind's benchmark, written against llama.h.
//
// It does in C++ what the Python workers of benchmarks/bench.py do through a binding,
// so each number has a native counterpart measured the same way: model load and
// context creation time, time to first token, and generation loops (decode, sample,
// render the piece) with llama.cpp's own greedy sampler or the full sampler chain.
//
// It reads one command per line on stdin and answers each with one JSON line on
// stdout (llama.cpp's log is silenced):
//
//   load model=PATH threads=T [n_ctx=2048] [threadpool=1] [poll=0]
//   ctx [n_ctx=2048]                      create and free a context, timed
//   pp n=512                              prompt processing of n random tokens
//   tg n=128                              n single-token decodes, no sampling
//   gen mode=greedy|chain n=128 prompt=FILE [seed=S] [ban_eog=0]
//   ttft prompt=FILE                      tokenize + decode + sample + render
//   rss                                   peak and current resident set size
//   quit
//
// "pp" and "tg" mirror llama-bench's tests (random tokens, BOS first; no sampling) on
// the one context every command uses (n_batch 512, n_ubatch 512: llama-bench's n_batch
// 2048 splits into the same 512-token ubatches, and the attended KV length does not
// depend on n_ctx, so the compute is the same); "gen"
// mirrors a binding's generate(): tokenize, decode the prompt with logits for its last
// token, then sample -> stop at end-of-generation -> render -> decode the token, for n
// tokens (the last generated token is not decoded, as no one asks for what follows).
// threadpool=1 attaches a ggml thread pool to each context, as llama-bench does, with
// polling off (poll=0) as llamabind's contexts have it: at ggml's default (50) the
// pool's workers spin for tens of milliseconds after each decode, so whatever the
// benchmark ran next, in another process, found a core taken (a short prompt's first
// token measured right after the probe took 47 ms instead of 25).

#include "ggml-cpu.h"
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

namespace {

using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

void quiet_log(ggml_log_level, const char *, void *) {}

std::map<std::string, std::string> parse_args(std::istringstream & in) {
    std::map<std::string, std::string> args;
    std::string word;
    while (in >> word) {
        const auto eq = word.find('=');
        if (eq == std::string::npos) {
            args[word] = "1";
        } else {
            args[word.substr(0, eq)] = word.substr(eq + 1);
        }
    }
    return args;
}

long get_int(const std::map<std::string, std::string> & a, const char * key, long def) {
    const auto it = a.find(key);
    return it == a.end() ? def : std::strtol(it->second.c_str(), nullptr, 10);
}

std::string get_str(const std::map<std::string, std::string> & a, const char * key) {
    const auto it = a.find(key);
    return it == a.end() ? std::string() : it->second;
}

std::string read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        throw std::runtime_error("cannot read " + path);
    }
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

long current_rss_kb() {
    long pages = 0, resident = 0;
    FILE * f = std::fopen("/proc/self/statm", "r");
    if (f) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) {
            resident = 0;
        }
        std::fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

long peak_rss_kb() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

struct probe {
    llama_model * model = nullptr;
    const llama_vocab * vocab = nullptr;
    llama_context * ctx = nullptr;                 // the generation context (n_ctx from load)
    ggml_threadpool * pool = nullptr;
    int threads = 1;
    int n_ctx = 2048;
    std::mt19937 rng{1234};

    ~probe() {
        if (ctx) {
            llama_free(ctx);
        }
        if (model) {
            llama_model_free(model);
        }
        if (pool) {
            ggml_threadpool_free(pool);
        }
    }

    llama_context * make_context(int ctx_size, int n_batch, int n_ubatch) {
        llama_context_params p = llama_context_default_params();
        p.n_ctx = ctx_size;
        p.n_batch = n_batch;
        p.n_ubatch = n_ubatch;
        p.n_threads = threads;
        p.n_threads_batch = threads;
        p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
        p.no_perf = false;
        llama_context * c = llama_init_from_model(model, p);
        if (!c) {
            throw std::runtime_error("llama_init_from_model failed");
        }
        if (pool) {
            llama_attach_threadpool(c, pool, nullptr);
        }
        return c;
    }

    std::vector<llama_token> tokenize(const std::string & text) {
        int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, true, false);
        std::vector<llama_token> toks(n);
        if (llama_tokenize(vocab, text.data(), (int32_t) text.size(), toks.data(), n, true, false) != n) {
            throw std::runtime_error("tokenize failed");
        }
        return toks;
    }

    // decode tokens in n_batch chunks, logits on the last token only
    void decode_prompt(llama_context * c, std::vector<llama_token> & toks) {
        const int n_batch = (int) llama_n_batch(c);
        for (int done = 0; done < (int) toks.size(); done += n_batch) {
            const int chunk = std::min(n_batch, (int) toks.size() - done);
            llama_batch b = llama_batch_init(chunk, 0, 1);
            for (int i = 0; i < chunk; ++i) {
                b.token[i] = toks[done + i];
                b.pos[i] = done + i;
                b.n_seq_id[i] = 1;
                b.seq_id[i][0] = 0;
                b.logits[i] = (done + i == (int) toks.size() - 1);
            }
            b.n_tokens = chunk;
            const int rc = llama_decode(c, b);
            llama_batch_free(b);
            if (rc != 0) {
                throw std::runtime_error("llama_decode failed on the prompt");
            }
        }
    }

    llama_sampler * make_sampler(const std::string & mode, uint32_t seed, bool ban_eog) {
        llama_sampler_chain_params sp = llama_sampler_chain_default_params();
        sp.no_perf = true;
        llama_sampler * s = llama_sampler_chain_init(sp);
        if (ban_eog) {
            std::vector<llama_logit_bias> bias;
            const int n_vocab = llama_vocab_n_tokens(vocab);
            for (int t = 0; t < n_vocab; ++t) {
                if (llama_vocab_is_eog(vocab, t)) {
                    bias.push_back({t, -INFINITY});
                }
            }
            llama_sampler_chain_add(s, llama_sampler_init_logit_bias(n_vocab, (int32_t) bias.size(),
                                                                      bias.data()));
        }
        if (mode == "greedy") {
            llama_sampler_chain_add(s, llama_sampler_init_greedy());
        } else {
            llama_sampler_chain_add(s, llama_sampler_init_penalties(llama_vocab_n_tokens(vocab), 64, 1.1f, 0.0f, 0.0f));
            llama_sampler_chain_add(s, llama_sampler_init_top_k(40));
            llama_sampler_chain_add(s, llama_sampler_init_top_p(0.95f, 1));
            llama_sampler_chain_add(s, llama_sampler_init_temp(0.8f));
            llama_sampler_chain_add(s, llama_sampler_init_dist(seed));
        }
        return s;
    }
};

void emit_perf(std::ostringstream & out, llama_context * c) {
    const llama_perf_context_data d = llama_perf_context(c);
    out << ", \"t_p_eval_ms\": " << d.t_p_eval_ms << ", \"t_eval_ms\": " << d.t_eval_ms
        << ", \"n_p_eval\": " << d.n_p_eval << ", \"n_eval\": " << d.n_eval;
}

std::string run_command(probe & pr, const std::string & cmd, const std::map<std::string, std::string> & a) {
    std::ostringstream out;
    out.precision(6);
    out << std::fixed;
    out << "{\"ok\": true";
    if (cmd == "load") {
        pr.threads = (int) get_int(a, "threads", 1);
        pr.n_ctx = (int) get_int(a, "n_ctx", 2048);
        if (get_int(a, "threadpool", 1)) {
            ggml_threadpool_params tpp = ggml_threadpool_params_default(pr.threads);
            tpp.poll = (uint32_t) get_int(a, "poll", 0);
            pr.pool = ggml_threadpool_new(&tpp);
        }
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = 0;
        const std::string path = get_str(a, "model");
        auto t0 = clock_type::now();
        pr.model = llama_model_load_from_file(path.c_str(), mp);
        const double load_ms = ms_since(t0);
        if (!pr.model) {
            throw std::runtime_error("cannot load " + path);
        }
        pr.vocab = llama_model_get_vocab(pr.model);
        t0 = clock_type::now();
        pr.ctx = pr.make_context(pr.n_ctx, 512, 512);
        const double ctx_ms = ms_since(t0);
        out << ", \"load_ms\": " << load_ms << ", \"ctx_ms\": " << ctx_ms
            << ", \"rss_kb\": " << current_rss_kb() << ", \"peak_rss_kb\": " << peak_rss_kb();
    } else if (cmd == "ctx") {
        const int size = (int) get_int(a, "n_ctx", pr.n_ctx);
        auto t0 = clock_type::now();
        llama_context * c = pr.make_context(size, 512, 512);
        const double ms = ms_since(t0);
        auto t1 = clock_type::now();
        llama_free(c);
        out << ", \"ctx_ms\": " << ms << ", \"free_ms\": " << ms_since(t1);
    } else if (cmd == "pp") {
        const int n = (int) get_int(a, "n", 512);
        llama_context * c = pr.ctx;
        llama_memory_clear(llama_get_memory(c), false);
        const int n_vocab = llama_vocab_n_tokens(pr.vocab);
        std::vector<llama_token> toks(n);
        for (int i = 0; i < n; ++i) {
            toks[i] = (int) (pr.rng() % n_vocab);
        }
        if (llama_vocab_get_add_bos(pr.vocab)) {
            toks[0] = llama_vocab_bos(pr.vocab);
        }
        llama_perf_context_reset(c);
        auto t0 = clock_type::now();
        pr.decode_prompt(c, toks);
        llama_synchronize(c);
        const double ms = ms_since(t0);
        out << ", \"ms\": " << ms << ", \"n\": " << n;
        emit_perf(out, c);
    } else if (cmd == "tg") {
        const int n = (int) get_int(a, "n", 128);
        llama_context * c = pr.ctx;
        llama_memory_clear(llama_get_memory(c), false);
        const int n_vocab = llama_vocab_n_tokens(pr.vocab);
        llama_token tok = llama_vocab_get_add_bos(pr.vocab) ? llama_vocab_bos(pr.vocab)
                                                            : (int) (pr.rng() % n_vocab);
        llama_batch b = llama_batch_init(1, 0, 1);
        llama_perf_context_reset(c);
        auto t0 = clock_type::now();
        for (int i = 0; i < n; ++i) {
            b.n_tokens = 1;
            b.token[0] = tok;
            b.pos[0] = i;
            b.n_seq_id[0] = 1;
            b.seq_id[0][0] = 0;
            b.logits[0] = 1;
            if (llama_decode(c, b) != 0) {
                llama_batch_free(b);
                throw std::runtime_error("llama_decode failed");
            }
            llama_synchronize(c);
            tok = (int) (pr.rng() % n_vocab);
        }
        const double ms = ms_since(t0);
        llama_batch_free(b);
        out << ", \"ms\": " << ms << ", \"n\": " << n;
        emit_perf(out, c);
    } else if (cmd == "gen" || cmd == "ttft") {
        const bool ttft_only = cmd == "ttft";
        const std::string mode = ttft_only ? "greedy" : get_str(a, "mode");
        const int n_max = ttft_only ? 1 : (int) get_int(a, "n", 128);
        const std::string text = read_file(get_str(a, "prompt"));
        llama_sampler * smpl = pr.make_sampler(mode, (uint32_t) get_int(a, "seed", 42),
                                               get_int(a, "ban_eog", 0) != 0);
        llama_context * c = pr.ctx;
        // as llama.cpp's tools do: the cells are emptied, their stale data is never read
        llama_memory_clear(llama_get_memory(c), false);
        llama_perf_context_reset(c);
        llama_batch b = llama_batch_init(1, 0, 1);
        std::string output;
        char buf[256];
        int n_gen = 0;
        const char * finish = "length";
        auto t0 = clock_type::now();
        std::vector<llama_token> toks = pr.tokenize(text);
        const int n_prompt = (int) toks.size();
        pr.decode_prompt(c, toks);
        const double prompt_ms = ms_since(t0);
        double ttft_ms = 0.0;
        int pos = n_prompt;
        while (true) {
            const llama_token tok = llama_sampler_sample(smpl, c, -1);
            if (llama_vocab_is_eog(pr.vocab, tok)) {
                finish = "stop";
                break;
            }
            const int len = llama_token_to_piece(pr.vocab, tok, buf, sizeof(buf), 0, false);
            if (len > 0) {
                output.append(buf, len);
            }
            ++n_gen;
            if (n_gen == 1) {
                ttft_ms = ms_since(t0);
            }
            if (n_gen >= n_max || pos >= (int) llama_n_ctx(c)) {
                break;
            }
            b.n_tokens = 1;
            b.token[0] = tok;
            b.pos[0] = pos++;
            b.n_seq_id[0] = 1;
            b.seq_id[0][0] = 0;
            b.logits[0] = 1;
            if (llama_decode(c, b) != 0) {
                llama_batch_free(b);
                llama_sampler_free(smpl);
                throw std::runtime_error("llama_decode failed");
            }
        }
        const double wall_ms = ms_since(t0);
        llama_batch_free(b);
        llama_sampler_free(smpl);
        out << ", \"wall_ms\": " << wall_ms << ", \"prompt_ms\": " << prompt_ms
            << ", \"gen_ms\": " << (wall_ms - prompt_ms) << ", \"ttft_ms\": " << ttft_ms
            << ", \"n_prompt\": " << n_prompt << ", \"n_gen\": " << n_gen
            << ", \"finish\": \"" << finish << "\", \"text_bytes\": " << output.size();
        emit_perf(out, c);
    } else if (cmd == "rss") {
        out << ", \"rss_kb\": " << current_rss_kb() << ", \"peak_rss_kb\": " << peak_rss_kb();
    } else {
        throw std::runtime_error("unknown command " + cmd);
    }
    out << "}";
    return out.str();
}

std::string json_escape(const std::string & s) {
    std::string o;
    for (char ch : s) {
        if (ch == '"' || ch == '\\') {
            o += '\\';
            o += ch;
        } else if ((unsigned char) ch < 0x20) {
            o += ' ';
        } else {
            o += ch;
        }
    }
    return o;
}

}  // namespace

int main() {
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    {
        probe pr;
        std::string line;
        while (std::getline(std::cin, line)) {
            std::istringstream in(line);
            std::string cmd;
            if (!(in >> cmd)) {
                continue;
            }
            if (cmd == "quit") {
                break;
            }
            const auto args = parse_args(in);
            std::string reply;
            try {
                reply = run_command(pr, cmd, args);
            } catch (const std::exception & e) {
                reply = std::string("{\"ok\": false, \"error\": \"") + json_escape(e.what()) + "\"}";
            }
            std::cout << reply << std::endl;
        }
    }
    llama_backend_free();
    return 0;
}
