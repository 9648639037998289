// Interleaved rANS with 16-bit probability tables (docs/bitstream.md, "Entropy coding").
//
// State: 32 bits, kept in [2^16, 2^32); probabilities sum to 2^16; renormalization moves
// one 16-bit word at a time, so each symbol moves at most one word. Two states alternate
// (symbol i uses state i % 2) for instruction-level parallelism. The encoder writes
// backwards; the decoder reads forwards and checks every read against the stream's end.
#pragma once
#include <cstdint>

#include "check.h"
#include "numeric.h"

namespace kvp {

constexpr uint32_t kProbBits = 16;
constexpr uint32_t kProbTotal = 1u << kProbBits;
constexpr uint32_t kRansLow = 1u << 16;  // lower bound of the normalized state
constexpr uint32_t kRansStates = 2;
constexpr uint32_t kMaxAlphabet = 256;

// Decoder lookup: the 2^16 slots are cut into 2^kLutBits buckets, and each table keeps the
// symbol that holds the first slot of every bucket, so that finding a symbol is one load and
// (rarely more than) one comparison instead of a binary search.
constexpr uint32_t kLutBits = 8;
constexpr uint32_t kLutShift = kProbBits - kLutBits;
constexpr uint32_t kLutWords = (1u << kLutBits) / 4;  // one byte per bucket

// A probability table in decoder form: cum[0] = 0 <= ... <= cum[n] = 2^16, followed by the
// bucket lookup (kLutWords words) in the same array.
struct Table {
    const uint32_t* cum;  // n + 1 entries, then the lookup
    uint32_t n;           // alphabet size
};

// 32-bit words one table of n symbols takes in a plan's table array.
KVP_HD uint64_t table_words(uint32_t n) { return (uint64_t)n + 1 + kLutWords; }

// Worst case encoded size of a stream of `symbols` symbols: every symbol moves at most one
// 16-bit word, plus the flushed states.
KVP_HD uint64_t rans_bound(uint64_t symbols) { return 2 * symbols + 4 * kRansStates; }

// Validate 16-bit frequencies read from a bitstream and build the cumulative table and its
// lookup (table_words(n) words at cum). "Must" rules: every frequency >= 1, sum == 2^16.
KVP_HD int32_t build_cum(const uint8_t* freqs_le, uint32_t n, uint32_t* cum) {
    KVP_CHECK(n >= 2 && n <= kMaxAlphabet, kCorrupt);
    uint32_t total = 0;
    cum[0] = 0;
    for (uint32_t s = 0; s < n; ++s) {
        uint32_t f = rd16(freqs_le + 2 * s);
        KVP_CHECK(f >= 1, kCorrupt);
        total += f;
        cum[s + 1] = total;
    }
    KVP_CHECK(total == kProbTotal, kCorrupt);
    // Bucket b (first slot b << kLutShift) lies in symbol s when cum[s] <= its first slot
    // < cum[s + 1]: the buckets from ceil(cum[s] / bucket) up to ceil(cum[s + 1] / bucket).
    uint8_t* lut = (uint8_t*)(cum + n + 1);
    constexpr uint32_t round_up = (1u << kLutShift) - 1;
    for (uint32_t s = 0; s < n; ++s)
        for (uint32_t b = (cum[s] + round_up) >> kLutShift; b < (cum[s + 1] + round_up) >> kLutShift; ++b)
            lut[b] = (uint8_t)s;
    return kOk;
}

// Counts -> frequencies summing to 2^16, each >= 1. Integer-only, so every platform gives
// the same table for the same counts.
KVP_HD void normalize_freqs(const uint64_t* counts, uint32_t n, uint16_t* freqs) {
    uint64_t total = 0;
    for (uint32_t s = 0; s < n; ++s) total += counts[s];
    uint32_t sum = 0;
    for (uint32_t s = 0; s < n; ++s) {
        uint64_t f = total ? (counts[s] * (uint64_t)(kProbTotal - n)) / total : 0;
        freqs[s] = (uint16_t)(f + 1);  // at most 2^16 - n + 1 <= 2^16 - 1 for n >= 2
        sum += freqs[s];
    }
    // Floors leave sum <= 2^16: give the remainder to the most frequent symbol.
    uint32_t best = 0;
    for (uint32_t s = 1; s < n; ++s)
        if (freqs[s] > freqs[best]) best = s;
    freqs[best] = (uint16_t)(freqs[best] + (kProbTotal - sum));
}

// Symbol whose interval holds `slot`: the bucket's first symbol, then forward. The walk ends
// by cum[n] = 2^16 > slot, so it never leaves the table.
KVP_HD uint32_t find_symbol(const Table& t, uint32_t slot) {
    const uint8_t* lut = (const uint8_t*)(t.cum + t.n + 1);
    uint32_t s = lut[slot >> kLutShift];
    while (t.cum[s + 1] <= slot) ++s;
    return s;
}

// ---- encoder ----------------------------------------------------------------------------

struct RansEncoder {
    uint32_t x[kRansStates];
    uint8_t* begin;  // start of the output buffer (the stream grows down towards it)
    uint8_t* ptr;    // current write position (bytes from ptr to end are written)
};

KVP_HD void rans_enc_init(RansEncoder& e, uint8_t* buf, uint64_t cap) {
    for (uint32_t i = 0; i < kRansStates; ++i) e.x[i] = kRansLow;
    e.begin = buf;
    e.ptr = buf + cap;
}

// Symbols must be put in reverse order; `lane` is the symbol's index modulo kRansStates.
// The caller sizes the buffer with rans_bound, so no write can pass `begin`.
KVP_HD void rans_put(RansEncoder& e, uint32_t lane, uint32_t start, uint32_t freq) {
    uint32_t x = e.x[lane];
    uint32_t x_max = freq << 16;  // ((kRansLow >> kProbBits) << 16) * freq
    if (x >= x_max) {
        e.ptr -= 2;
        wr16(e.ptr, x & 0xFFFFu);
        x >>= 16;
    }
    e.x[lane] = ((x / freq) << kProbBits) + (x % freq) + start;
}

// Write the final states in front of the words; returns the stream's first byte.
KVP_HD uint8_t* rans_enc_flush(RansEncoder& e) {
    for (int i = (int)kRansStates - 1; i >= 0; --i) {
        e.ptr -= 4;
        wr32(e.ptr, e.x[i]);
    }
    return e.ptr;
}

// ---- decoder ----------------------------------------------------------------------------

struct RansDecoder {
    uint32_t x[kRansStates];
    const uint8_t* ptr;
    const uint8_t* end;
};

KVP_HD int32_t rans_dec_init(RansDecoder& d, const uint8_t* p, uint64_t size) {
    KVP_CHECK(size >= 4 * kRansStates, kTruncated);
    for (uint32_t i = 0; i < kRansStates; ++i) {
        d.x[i] = rd32(p + 4 * i);
        KVP_CHECK(d.x[i] >= kRansLow, kCorrupt);
    }
    d.ptr = p + 4 * kRansStates;
    d.end = p + size;
    return kOk;
}

// Decode one symbol of `t` on `lane` into *sym.
KVP_HD int32_t rans_get(RansDecoder& d, uint32_t lane, const Table& t, uint32_t* sym) {
    uint32_t x = d.x[lane];
    uint32_t slot = x & (kProbTotal - 1);
    uint32_t s = find_symbol(t, slot);
    uint32_t start = t.cum[s];
    x = (t.cum[s + 1] - start) * (x >> kProbBits) + slot - start;
    if (x < kRansLow) {
        KVP_CHECK(d.end - d.ptr >= 2, kTruncated);
        x = (x << 16) | rd16(d.ptr);
        d.ptr += 2;
    }
    d.x[lane] = x;
    *sym = s;
    return kOk;
}

// "Must" rule: a stream ends exactly where its words end, with every state back at its
// initial value (this catches most corruption inside a stream).
KVP_HD int32_t rans_dec_finish(const RansDecoder& d) {
    KVP_CHECK(d.ptr == d.end, kCorrupt);
    for (uint32_t i = 0; i < kRansStates; ++i) KVP_CHECK(d.x[i] == kRansLow, kCorrupt);
    return kOk;
}

}  // namespace kvp
