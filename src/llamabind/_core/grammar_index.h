/* Asking a grammar about a whole vocabulary through a few hundred "probe" tokens.
 *
 * llama.cpp's grammar sampler decides each candidate token by its piece alone (end of
 * generation tokens aside): it decodes the piece's code points and rejects the token
 * when no grammar stack can consume them all. So when a token whose piece is exactly
 * the code points P is rejected, every token whose piece starts with P is rejected as
 * well (a stack that consumed the longer piece would have consumed P first). This
 * holds while the grammar has no half-decoded UTF-8 character pending from the last
 * token (each piece is then decoded on its own) and has no token-id elements
 * (`<[id]>`, `<name>`: those match a token by id, not by text).
 *
 * The index groups a vocabulary's tokens in a tree of prefixes (llamabind_grammar_
 * index_new): a group exists only where a token's piece is exactly its prefix (its
 * probe). Masking a candidate array asks the grammar about the root probes, then
 * about the children of the allowed groups, level by level, then about the members of
 * the allowed groups only (tokens in no group are always asked). Every rejection
 * comes from llama.cpp's own grammar code, so the result equals llama_sampler_apply
 * on the whole array: at a point where JSON allows a few characters, a few hundred
 * probes and the tokens that can follow are asked about instead of 49k-152k tokens.
 *
 * Header-only: compiled into the extension module with the Cython code that calls it.
 */
#ifndef LLAMABIND_GRAMMAR_INDEX_H
#define LLAMABIND_GRAMMAR_INDEX_H

#include <cmath>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "llama.h"

/* A second-level group (a code point under a lead byte, two code points under one)
 * needs at least this many members to be worth a probe; a code point's group is split
 * by second code points only from LLAMABIND_GINDEX_SPLIT members on. */
#define LLAMABIND_GINDEX_MIN_CHILD 4
#define LLAMABIND_GINDEX_SPLIT 64

struct llamabind_grammar_index {
    std::vector<int32_t> leaf;         /* per token: its innermost group, -1: always asked */
    std::vector<llama_token> probe;    /* per group: the token whose piece is its prefix */
    std::vector<uint8_t> lead;         /* per group: a lead-byte group (see below) */
    std::vector<int32_t> child_begin;  /* per group: its children, contiguous */
    std::vector<int32_t> child_end;
    int32_t n_roots = 0;               /* groups [0, n_roots) have no parent */
};

/* The piece llama.cpp's grammar sees for a token (llama_token_to_piece with special
 * tokens rendered and nothing stripped: its token-to-piece cache). */
static inline std::string llamabind_grammar_piece(const llama_vocab * vocab, llama_token token) {
    char buf[128];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof buf, 0, true);
    if (n >= 0) {
        return std::string(buf, (size_t) n);
    }
    std::string piece((size_t) -n, '\0');
    n = llama_token_to_piece(vocab, token, &piece[0], (int32_t) piece.size(), 0, true);
    piece.resize(n > 0 ? (size_t) n : 0);
    return piece;
}

/* llama.cpp's UTF-8 decoding of a piece (llama-grammar.cpp, decode_utf8), reduced to
 * what the index needs: the first two complete code points and how many there are
 * (`n_cps`, counted up to 3), from a start with `pending` continuation bytes owed.
 * Returns the continuation bytes owed after the piece, or -1 for an invalid sequence
 * (llama.cpp then treats the piece as no code points with an invalid partial). Like
 * llama.cpp, decoding stops at a NUL byte. */
static inline int32_t llamabind_utf8_scan(const std::string & piece, int32_t pending,
                                          uint32_t cps[2], int32_t * n_cps) {
    static const int lookup[] = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4};
    const unsigned char * pos = (const unsigned char *) piece.c_str();
    uint32_t value = 0;
    int32_t n_remain = pending;
    int32_t count = 0;
    if (pending < 0) {
        return -1;
    }
    while (*pos != 0 && n_remain > 0) {  /* the character the last piece began */
        if ((*pos >> 6) != 2) {
            return -1;
        }
        ++pos;
        --n_remain;
    }
    if (pending > 0 && n_remain == 0) {
        count = 3;  /* a code point that began before this piece: not groupable */
    }
    while (*pos != 0) {
        n_remain = lookup[*pos >> 4] - 1;
        if (n_remain < 0) {
            return -1;
        }
        value = *pos & ((1u << (7 - n_remain)) - 1);
        ++pos;
        while (*pos != 0 && n_remain > 0) {
            value = (value << 6) + (*pos & 0x3F);
            ++pos;
            --n_remain;
        }
        if (n_remain == 0) {
            if (count < 2) {
                cps[count] = value;
            }
            if (count < 3) {
                ++count;
            }
        }
    }
    *n_cps = count;
    return n_remain;
}

/* The continuation bytes a grammar owes after accepting `token`, from `pending`
 * (what llama.cpp keeps as the grammar's partial UTF-8 state; -1 stays -1). End of
 * generation tokens are accepted without their piece. */
static inline int32_t llamabind_grammar_pending(const llama_vocab * vocab, int32_t pending,
                                                llama_token token) {
    uint32_t cps[2];
    int32_t n_cps = 0;
    if (pending < 0 || llama_vocab_is_eog(vocab, token)) {
        return pending;
    }
    return llamabind_utf8_scan(llamabind_grammar_piece(vocab, token), pending, cps, &n_cps);
}

/* The first byte of the UTF-8 encoding of `cp`. */
static inline uint32_t llamabind_utf8_lead(uint32_t cp) {
    if (cp < 0x80) return cp;
    if (cp < 0x800) return 0xC0 | (cp >> 6);
    if (cp < 0x10000) return 0xE0 | (cp >> 12);
    return 0xF0 | (cp >> 18);
}

/* Build the index of a vocabulary (tens of milliseconds for 150k tokens).
 *
 * Three levels. A group of tokens whose first code point is C, probed by a token
 * whose piece is exactly C; in large ones, groups by the first two code points, probed
 * likewise. Above the code points of two or more bytes: their lead byte, probed by a
 * token whose piece is that byte alone (byte-level vocabularies have one per byte).
 * llama.cpp decides such a piece by whether the grammar could match any character
 * that starts with the byte (llama_grammar_match_partial_char), which is exact for
 * characters, ranges and "any", but not for a negated class that lists a non-ASCII
 * character: lead groups are asked about only when the caller says there is none. */
static inline llamabind_grammar_index * llamabind_grammar_index_new(const llama_vocab * vocab) {
    const int32_t n = llama_vocab_n_tokens(vocab);
    std::vector<uint32_t> cp0((size_t) n), cp1((size_t) n);
    std::vector<int8_t> kind((size_t) n, 0);    /* complete code points, up to 3; 0: none */
    std::vector<uint8_t> exact((size_t) n, 0);  /* the piece is exactly its code points */
    llama_token lead_probe[256];
    for (int b = 0; b < 256; ++b) {
        lead_probe[b] = -1;
    }
    for (llama_token id = 0; id < n; ++id) {
        if (llama_vocab_is_eog(vocab, id)) {
            continue;  /* decided by the grammar's end state, not by text */
        }
        const std::string piece = llamabind_grammar_piece(vocab, id);
        if (piece.empty() || piece.find('\0') != std::string::npos) {
            continue;
        }
        const unsigned char b0 = (unsigned char) piece[0];
        if (piece.size() == 1 && b0 >= 0xC2 && b0 <= 0xF4 && lead_probe[b0] < 0) {
            lead_probe[b0] = id;
        }
        uint32_t cps[2] = {0, 0};
        int32_t n_cps = 0;
        const int32_t rest = llamabind_utf8_scan(piece, 0, cps, &n_cps);
        if (rest < 0 || n_cps == 0) {
            continue;
        }
        cp0[(size_t) id] = cps[0];
        cp1[(size_t) id] = cps[1];
        kind[(size_t) id] = (int8_t) n_cps;
        exact[(size_t) id] = rest == 0;
    }
    /* candidate groups by key, with their probes and member counts */
    std::unordered_map<uint32_t, llama_token> first_probe;
    std::unordered_map<uint32_t, int32_t> first_count;
    for (llama_token id = 0; id < n; ++id) {
        if (kind[(size_t) id] > 0) {
            first_count[cp0[(size_t) id]] += 1;
            if (kind[(size_t) id] == 1 && exact[(size_t) id] && !first_probe.count(cp0[(size_t) id])) {
                first_probe.emplace(cp0[(size_t) id], id);
            }
        }
    }
    auto has_lead = [&](uint32_t cp) {
        return cp >= 0x80 && lead_probe[llamabind_utf8_lead(cp)] >= 0;
    };
    auto first_kept = [&](uint32_t cp) {  /* a code point group of its own */
        auto it = first_probe.find(cp);
        return it != first_probe.end() &&
               (!has_lead(cp) || first_count.at(cp) >= LLAMABIND_GINDEX_MIN_CHILD);
    };
    std::unordered_map<uint64_t, llama_token> second_probe;
    std::unordered_map<uint64_t, int32_t> second_count;
    for (llama_token id = 0; id < n; ++id) {
        const uint32_t c = cp0[(size_t) id];
        if (kind[(size_t) id] < 2 || !first_kept(c) || first_count.at(c) < LLAMABIND_GINDEX_SPLIT) {
            continue;
        }
        const uint64_t key = ((uint64_t) c << 32) | cp1[(size_t) id];
        second_count[key] += 1;
        if (kind[(size_t) id] == 2 && exact[(size_t) id] && !second_probe.count(key)) {
            second_probe.emplace(key, id);
        }
    }
    /* the tree, breadth first: each group's children contiguous */
    std::vector<std::vector<uint32_t>> firsts_of_lead(256);
    std::vector<uint32_t> root_firsts;
    for (const auto & kv : first_probe) {
        if (!first_kept(kv.first)) {
            continue;
        }
        if (has_lead(kv.first)) {
            firsts_of_lead[llamabind_utf8_lead(kv.first)].push_back(kv.first);
        } else {
            root_firsts.push_back(kv.first);
        }
    }
    std::unordered_map<uint32_t, std::vector<uint64_t>> seconds_of;
    for (const auto & kv : second_probe) {
        if (second_count.at(kv.first) >= LLAMABIND_GINDEX_MIN_CHILD) {
            seconds_of[(uint32_t) (kv.first >> 32)].push_back(kv.first);
        }
    }
    auto * idx = new llamabind_grammar_index();
    std::unordered_map<uint32_t, int32_t> lead_group, first_group;
    std::unordered_map<uint64_t, int32_t> second_group;
    std::vector<int> kind_of;   /* per group: 0 lead, 1 code point, 2 two code points */
    std::vector<uint64_t> key_of;
    auto add = [&](llama_token probe, bool is_lead, int k, uint64_t key) {
        idx->probe.push_back(probe);
        idx->lead.push_back(is_lead ? 1 : 0);
        kind_of.push_back(k);
        key_of.push_back(key);
        return (int32_t) idx->probe.size() - 1;
    };
    for (int b = 0xC2; b <= 0xF4; ++b) {
        if (lead_probe[b] >= 0) {
            lead_group[(uint32_t) b] = add(lead_probe[b], true, 0, (uint64_t) b);
        }
    }
    for (uint32_t c : root_firsts) {
        first_group[c] = add(first_probe.at(c), false, 1, c);
    }
    idx->n_roots = (int32_t) idx->probe.size();
    for (size_t g = 0; g < idx->probe.size(); ++g) {
        const int32_t begin = (int32_t) idx->probe.size();
        if (kind_of[g] == 0) {
            for (uint32_t c : firsts_of_lead[(size_t) key_of[g]]) {
                first_group[c] = add(first_probe.at(c), false, 1, c);
            }
        } else if (kind_of[g] == 1) {
            auto it = seconds_of.find((uint32_t) key_of[g]);
            if (it != seconds_of.end()) {
                for (uint64_t key : it->second) {
                    second_group[key] = add(second_probe.at(key), false, 2, key);
                }
            }
        }
        idx->child_begin.push_back(begin);
        idx->child_end.push_back((int32_t) idx->probe.size());
    }
    idx->leaf.assign((size_t) n, -1);
    for (llama_token id = 0; id < n; ++id) {
        if (kind[(size_t) id] == 0) {
            continue;
        }
        const uint32_t c = cp0[(size_t) id];
        if (kind[(size_t) id] >= 2) {
            auto it = second_group.find(((uint64_t) c << 32) | cp1[(size_t) id]);
            if (it != second_group.end()) {
                idx->leaf[(size_t) id] = it->second;
                continue;
            }
        }
        auto it = first_group.find(c);
        if (it != first_group.end()) {
            idx->leaf[(size_t) id] = it->second;
        } else if (has_lead(c)) {
            idx->leaf[(size_t) id] = lead_group.at(llamabind_utf8_lead(c));
        }
    }
    return idx;
}

static inline void llamabind_grammar_index_free(llamabind_grammar_index * idx) {
    delete idx;
}

/* The grammar's verdict on `tokens` (in place: -inf logit where it rejects). */
static inline void llamabind_grammar_ask(llama_sampler * grammar, std::vector<llama_token_data> & tokens) {
    llama_token_data_array arr = {tokens.data(), tokens.size(), -1, false};
    llama_sampler_apply(grammar, &arr);
}

/* llama_sampler_apply(grammar, cur_p), asking the grammar about probes first. Only for
 * a grammar with no token-id elements and no pending partial character (see above);
 * `use_lead` only when it has no negated class with a non-ASCII character. */
static inline void llamabind_grammar_index_apply(const llamabind_grammar_index * idx,
                                                 llama_sampler * grammar,
                                                 llama_token_data_array * cur_p,
                                                 bool use_lead) {
    std::vector<uint8_t> allowed(idx->probe.size(), 0);
    std::vector<int32_t> frontier, next, asked;
    std::vector<llama_token_data> ask;
    for (int32_t g = 0; g < idx->n_roots; ++g) {
        frontier.push_back(g);
    }
    while (!frontier.empty()) {
        ask.clear();
        asked.clear();
        for (int32_t g : frontier) {
            if (idx->lead[(size_t) g] && !use_lead) {
                allowed[(size_t) g] = 1;   /* not asked: its code points will be */
            } else {
                asked.push_back(g);
                ask.push_back({idx->probe[(size_t) g], 0.0f, 0.0f});
            }
        }
        llamabind_grammar_ask(grammar, ask);
        for (size_t i = 0; i < asked.size(); ++i) {
            allowed[(size_t) asked[i]] = std::isfinite(ask[i].logit) ? 1 : 0;
        }
        next.clear();
        for (int32_t g : frontier) {
            if (allowed[(size_t) g]) {
                for (int32_t c = idx->child_begin[(size_t) g]; c < idx->child_end[(size_t) g]; ++c) {
                    next.push_back(c);
                }
            }
        }
        frontier.swap(next);
    }
    std::vector<size_t> where;
    ask.clear();
    for (size_t i = 0; i < cur_p->size; ++i) {
        const llama_token id = cur_p->data[i].id;
        const int32_t g = id >= 0 && (size_t) id < idx->leaf.size() ? idx->leaf[(size_t) id] : -1;
        if (g < 0 || allowed[(size_t) g]) {
            where.push_back(i);
            ask.push_back(cur_p->data[i]);
        } else {
            cur_p->data[i].logit = -INFINITY;
        }
    }
    llamabind_grammar_ask(grammar, ask);
    for (size_t j = 0; j < where.size(); ++j) {
        cur_p->data[where[j]].logit = ask[j].logit;
    }
}

#endif
