// The few functions of llama.cpp's common/common.cpp and common/log.cpp that the
// structured-output sources (JSON-schema converter, chat templates and parsers) call,
// written for llamabind instead of compiling those two files: common.cpp would pull in
// most of common/ (sampling, speculative decoding, model fitting, downloads), and
// log.cpp runs a worker thread that prints to stdout/stderr. Here common/'s log lines go
// to llama.cpp's log callback, which llamabind routes to Python's logging.

#include "common_shim.h"

#include "common.h"
#include "log.h"

#include <cstdarg>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// --- log.h --------------------------------------------------------------------------

// LOG_TMPL formats a message only when its verbosity is at most this: info, warnings and
// errors, not debug lines (some of which dump whole parsers).
int common_log_get_verbosity_thold(void) {
    return LOG_LEVEL_INFO;
}

// common_log is opaque to its callers; they only pass common_log_main()'s result back.
struct common_log {
    int unused;
};

struct common_log * common_log_main() {
    static common_log instance = {0};
    return &instance;
}

bool common_log_get_jsonl(void) {
    return false;
}

void common_log_add(struct common_log * /* log */, enum ggml_log_level level, const char * fmt, ...) {
    char              small[512];
    std::vector<char> big;
    const char *      text = small;

    va_list args;
    va_start(args, fmt);
    va_list again;
    va_copy(again, args);
    int n = vsnprintf(small, sizeof(small), fmt, args);
    va_end(args);
    if (n >= (int) sizeof(small)) {
        big.resize((size_t) n + 1);
        vsnprintf(big.data(), big.size(), fmt, again);
        text = big.data();
    }
    va_end(again);
    if (n < 0) {
        return;
    }

    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        llamabind::LogCapture::add(text);
    }

    ggml_log_callback callback  = nullptr;
    void *            user_data = nullptr;
    llama_log_get(&callback, &user_data);
    if (callback != nullptr) {
        callback(level, text, user_data);
    }
}

// --- LogCapture -----------------------------------------------------------------------

namespace llamabind {

static thread_local LogCapture * g_capture = nullptr;

LogCapture::LogCapture() : outer_(g_capture) {
    g_capture = this;
}

LogCapture::~LogCapture() {
    g_capture = outer_;
}

void LogCapture::add(const char * line) {
    if (g_capture == nullptr) {
        return;
    }
    std::string & text = g_capture->text_;
    if (!text.empty() && text.back() != '\n') {
        text += '\n';
    }
    text += line;
}

}  // namespace llamabind

// --- common.h: strings ---------------------------------------------------------------

void string_replace_all(std::string & s, const std::string & search, const std::string & replace) {
    if (search.empty()) {
        return;
    }
    std::string out;
    out.reserve(s.size());
    size_t from = 0;
    for (size_t at = s.find(search); at != std::string::npos; at = s.find(search, from)) {
        out.append(s, from, at - from);
        out += replace;
        from = at + search.size();
    }
    out.append(s, from, std::string::npos);
    s.swap(out);
}

std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); i++) {
        if (i > 0) {
            out += separator;
        }
        out += values[i];
    }
    return out;
}

// Every piece between delimiters, empty ones included ("a//b" -> "a", "", "b"). An empty
// delimiter gives the whole string as one piece.
std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    std::vector<std::string> parts;
    if (delimiter.empty()) {
        parts.push_back(str);
        return parts;
    }
    size_t from = 0;
    for (size_t at = str.find(delimiter); at != std::string::npos; at = str.find(delimiter, from)) {
        parts.push_back(str.substr(from, at - from));
        from = at + delimiter.size();
    }
    parts.push_back(str.substr(from));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; i++) {
        out += str;
    }
    return out;
}

// --- common.h: tokens ----------------------------------------------------------------

std::vector<llama_token> common_tokenize(const struct llama_vocab * vocab, const std::string & text,
                                         bool add_special, bool parse_special) {
    if (text.size() > (size_t) std::numeric_limits<int32_t>::max() - 2) {
        throw std::runtime_error("text too long to tokenize");
    }
    std::vector<llama_token> tokens(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(),
                               (int32_t) tokens.size(), add_special, parse_special);
    if (n == std::numeric_limits<int32_t>::min()) {
        throw std::runtime_error("tokenization failed: too many tokens");
    }
    if (n < 0) {
        tokens.resize((size_t) -n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(),
                           (int32_t) tokens.size(), add_special, parse_special);
        if (n < 0) {
            throw std::runtime_error("tokenization failed");
        }
    }
    tokens.resize((size_t) n);
    return tokens;
}

std::string common_token_to_piece(const struct llama_vocab * vocab, llama_token token, bool special) {
    char    small[64];
    int32_t n = llama_token_to_piece(vocab, token, small, sizeof(small), 0, special);
    if (n >= 0) {
        return std::string(small, (size_t) n);
    }
    std::string piece((size_t) -n, '\0');
    n = llama_token_to_piece(vocab, token, &piece[0], (int32_t) piece.size(), 0, special);
    if (n < 0) {
        throw std::runtime_error("could not render token " + std::to_string(token));
    }
    piece.resize((size_t) n);
    return piece;
}
