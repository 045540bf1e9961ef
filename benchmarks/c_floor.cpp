// The floor for "time per token outside llama_decode": llamabind's greedy loop written
// in C++ against llama.h, with nothing else in it (no Python, no checks), so that the
// benchmark's outside-decode figures can be split into what llama.cpp itself spends
// outside its perf counters, what reading the logits costs, and what the binding adds.
//
//   g++ -O2 -std=c++17 benchmarks/c_floor.cpp -Isrc/llamabind/_core \
//       -Ivendor/llama.cpp/include -Ivendor/llama.cpp/ggml/include \
//       build/native/llama.cpp/src/libllama.a build/native/llama.cpp/ggml/src/libggml.a \
//       build/native/llama.cpp/ggml/src/libggml-cpu.a \
//       build/native/llama.cpp/ggml/src/libggml-base.a -lpthread -ldl -lm \
//       -o build/bench/c_floor
//   build/bench/c_floor MODEL.gguf THREADS [ROUNDS]
//
// Per round: the prompt "Once upon a time", then 128 greedy tokens, each step as
// llamabind's TokenGenerator takes it: llama_get_logits_ith (which synchronizes), the
// same argmax (argmax.h), llama_token_to_piece, llama_decode of one token with explicit
// position and sequence. A thread pool of THREADS is attached (poll 0), as llamabind
// does. Printed per token: wall time, llama.cpp's t_eval, their difference ("outside"),
// and its parts: the logits call, the argmax, the piece, and what llama_decode plus the
// synchronization cost beyond t_eval (llama.cpp's own work outside its counter).

#include "argmax.h"
#include "ggml-cpu.h"
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double us_between(clock_type::time_point a, clock_type::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
}

void quiet_log(ggml_log_level, const char *, void *) {}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf THREADS [ROUNDS]\n", argv[0]);
        return 2;
    }
    const int threads = std::atoi(argv[2]);
    const int rounds = argc > 3 ? std::atoi(argv[3]) : 3;
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 2048;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.no_perf = false;
    llama_context * ctx = llama_init_from_model(model, cp);
    ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    tpp.poll = 0;
    ggml_threadpool * pool = ggml_threadpool_new(&tpp);
    llama_attach_threadpool(ctx, pool, nullptr);

    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> prompt(32);
    const char * text = "Once upon a time";
    const int n_prompt = llama_tokenize(vocab, text, 16, prompt.data(), 32, true, false);
    prompt.resize(n_prompt);
    llama_batch one = llama_batch_init(1, 0, 1);
    char piece[256];
    const int n_gen = 128;

    for (int round = 0; round < rounds; ++round) {
        llama_memory_clear(llama_get_memory(ctx), false);
        llama_decode(ctx, llama_batch_get_one(prompt.data(), n_prompt));
        llama_perf_context_reset(ctx);
        double t_logits = 0, t_argmax = 0, t_piece = 0, t_decode = 0;
        const auto t0 = clock_type::now();
        for (int i = 0; i < n_gen; ++i) {
            const auto a = clock_type::now();
            const float * logits = llama_get_logits_ith(ctx, -1);
            const auto b = clock_type::now();
            const llama_token tok = llamabind_argmax(logits, n_vocab);
            const auto c = clock_type::now();
            llama_token_to_piece(vocab, tok, piece, sizeof piece, 0, false);
            const auto d = clock_type::now();
            t_logits += us_between(a, b);
            t_argmax += us_between(b, c);
            t_piece += us_between(c, d);
            if (i + 1 == n_gen) {
                break;   // the last token is not decoded (as in TokenGenerator)
            }
            one.n_tokens = 1;
            one.token[0] = tok;
            one.pos[0] = n_prompt + i;
            one.n_seq_id[0] = 1;
            one.seq_id[0][0] = 0;
            one.logits[0] = 1;
            if (llama_decode(ctx, one) != 0) {
                std::fprintf(stderr, "llama_decode failed\n");
                return 1;
            }
            t_decode += us_between(d, clock_type::now());
        }
        const double wall = us_between(t0, clock_type::now());
        const llama_perf_context_data perf = llama_perf_context(ctx);
        const double t_eval = perf.t_eval_ms * 1000.0;
        std::printf("n_vocab %d, %d tokens: %.1f us/token; outside llama.cpp's t_eval %.1f "
                    "= logits call %.1f + argmax %.1f + piece %.1f + llama_decode beyond "
                    "t_eval %.1f (+ loop)\n",
                    n_vocab, n_gen, wall / n_gen, (wall - t_eval) / n_gen, t_logits / n_gen,
                    t_argmax / n_gen, t_piece / n_gen,
                    (t_decode + t_logits - t_eval) / n_gen);
    }
    llama_batch_free(one);
    llama_free(ctx);
    ggml_threadpool_free(pool);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
