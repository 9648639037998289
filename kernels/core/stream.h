// Streams: the unit of parallel coding (docs/bitstream.md, "Streams").
//
// A plane of [tokens, width] elements is cut into blocks of `block_tokens` rows and
// groups of `group_channels` columns; stream s covers token block s / n_groups and channel
// group s % n_groups. Symbols inside a stream run row by row, channel by channel (and byte
// by byte in lossless mode); symbol i is coded on rANS state i % 2. The encoder and the
// decoder of each mode sit next to each other and mirror each other.
#pragma once
#include <cstdint>

#include "check.h"
#include "numeric.h"
#include "quant.h"
#include "rans.h"

namespace kvp {

constexpr uint32_t kMaxGroupChannels = 256;

struct StreamGeom {
    uint32_t tokens, width, block_tokens, group_channels;
};

KVP_HD uint32_t ceil_div(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a + b - 1) / b); }
KVP_HD uint32_t stream_groups(const StreamGeom& g) { return ceil_div(g.width, g.group_channels); }
// 64-bit: a hostile header must not wrap the count around.
KVP_HD uint64_t stream_count(const StreamGeom& g) {
    return g.tokens && g.width ? (uint64_t)ceil_div(g.tokens, g.block_tokens) * stream_groups(g) : 0;
}

struct StreamBox {
    uint32_t t0, t1, c0, c1;
};

KVP_HD StreamBox stream_box(const StreamGeom& g, uint32_t s) {
    uint32_t groups = stream_groups(g);
    StreamBox b;
    b.t0 = (s / groups) * g.block_tokens;
    b.t1 = b.t0 + g.block_tokens < g.tokens ? b.t0 + g.block_tokens : g.tokens;
    b.c0 = (s % groups) * g.group_channels;
    b.c1 = b.c0 + g.group_channels < g.width ? b.c0 + g.group_channels : g.width;
    return b;
}

KVP_HD uint64_t stream_symbols(const StreamGeom& g, uint32_t s, uint32_t per_elem) {
    StreamBox b = stream_box(g, s);
    return (uint64_t)(b.t1 - b.t0) * (b.c1 - b.c0) * per_elem;
}

// Probability tables of a lossy plane, in cumulative form. Channel c uses table
// c / table_group of its role (anchor rows or other rows); with contexts, that table is one
// of kContexts, chosen by the symbol the channel had in the row above (context_of).
struct LossyTables {
    const uint32_t* anchor_cum;  // [n_tables * contexts] tables of table_words(2*ha+1)
    const uint32_t* delta_cum;   // [n_tables] tables of table_words(2*hd+1) (unused when G == 1)
    uint32_t table_group;
    uint32_t contexts;           // 1, or kContexts (only with G == 1)
};

constexpr uint32_t kContexts = 5;
constexpr uint32_t kCenterContext = 2;  // a stream's first row: as if the row above were 0

// Context of a symbol from the symbol above it: its quantized value -2 or less, -1, 0, 1,
// 2 or more (keys move slowly from token to token in most channels).
KVP_HD uint32_t context_of(uint32_t above, int32_t h) {
    int32_t d = (int32_t)above - h;
    return d <= -2 ? 0u : d >= 2 ? 4u : (uint32_t)(d + 2);
}

KVP_HD Table lossy_table(const LossyTables& tb, bool anchor, uint32_t c, int32_t h, uint32_t ctx) {
    uint32_t n = (uint32_t)(2 * h + 1);
    uint32_t group = tb.table_group == 1 ? c : c / tb.table_group;  // no division per symbol
    uint64_t index = anchor ? (uint64_t)group * tb.contexts + ctx : group;
    Table t;
    t.cum = (anchor ? tb.anchor_cum : tb.delta_cum) + index * table_words(n);
    t.n = n;
    return t;
}

// ---- lossy ------------------------------------------------------------------------------

// Encode stream s into buf[0, cap) (cap >= rans_bound of its symbols); the stream occupies
// buf[*begin, cap). Rows go last to first; each row's symbols are computed once, as the row
// above the one being coded (its contexts), then coded themselves.
KVP_HD void encode_lossy_stream(const QuantInput& in, const LossyTables& tb, const StreamGeom& g,
                                uint32_t s, uint8_t* buf, uint64_t cap, uint64_t* begin) {
    StreamBox b = stream_box(g, s);
    uint32_t cw = b.c1 - b.c0;
    uint8_t rows[2][kMaxGroupChannels];
    uint8_t* cur = rows[0];    // symbols of row t
    uint8_t* above = rows[1];  // symbols of row t - 1
    RansEncoder e;
    rans_enc_init(e, buf, cap);
    uint64_t i = (uint64_t)(b.t1 - b.t0) * cw;
    if (b.t1 > b.t0)
        for (uint32_t c = b.c0; c < b.c1; ++c) cur[c - b.c0] = (uint8_t)lossy_symbol(in, b.t1 - 1, c);
    for (uint32_t t = b.t1; t-- > b.t0;) {
        bool anchor = is_anchor(t, in.anchor_group);
        int32_t h = anchor ? in.ha : in.hd;
        if (t > b.t0)
            for (uint32_t c = b.c0; c < b.c1; ++c) above[c - b.c0] = (uint8_t)lossy_symbol(in, t - 1, c);
        for (uint32_t c = b.c1; c-- > b.c0;) {
            --i;
            uint32_t ctx = tb.contexts == 1 ? 0u
                         : t > b.t0 ? context_of(above[c - b.c0], h) : kCenterContext;
            Table tab = lossy_table(tb, anchor, c, h, ctx);
            uint32_t sym = cur[c - b.c0];
            rans_put(e, (uint32_t)(i % kRansStates), tab.cum[sym], tab.cum[sym + 1] - tab.cum[sym]);
        }
        uint8_t* done = cur;
        cur = above;
        above = done;
    }
    *begin = (uint64_t)(rans_enc_flush(e) - buf);
}

// Decoder-side parameters of a lossy plane.
struct DequantPlane {
    uint32_t anchor_group;
    int32_t ha, hd;
    const float* mu;
    const float* sigma;
    const float* scale;
};

KVP_HD int32_t decode_lossy_stream(const DequantPlane& p, const LossyTables& tb,
                                   const StreamGeom& g, uint32_t s, const uint8_t* data,
                                   uint64_t size, void* out, uint8_t dtype) {
    StreamBox b = stream_box(g, s);
    KVP_CHECK(b.c1 - b.c0 <= kMaxGroupChannels, kCorrupt);
    float ya[kMaxGroupChannels];
    uint8_t above[kMaxGroupChannels];  // the row above's symbols (contexts)
    RansDecoder d;
    KVP_TRY(rans_dec_init(d, data, size));
    uint64_t i = 0;
    for (uint32_t t = b.t0; t < b.t1; ++t) {
        bool anchor = is_anchor(t, p.anchor_group);
        int32_t h = anchor ? p.ha : p.hd;
        float st = p.scale[t];
        for (uint32_t c = b.c0; c < b.c1; ++c, ++i) {
            uint32_t ctx = tb.contexts == 1 ? 0u
                         : t > b.t0 ? context_of(above[c - b.c0], h) : kCenterContext;
            Table tab = lossy_table(tb, anchor, c, h, ctx);
            uint32_t sym;
            KVP_TRY(rans_get(d, (uint32_t)(i % kRansStates), tab, &sym));
            above[c - b.c0] = (uint8_t)sym;
            float v = (float)((int32_t)sym - h) * st;
            if (anchor) ya[c - b.c0] = v;
            else v = ya[c - b.c0] + v;
            store_elem(out, dtype, (uint64_t)t * g.width + c, p.mu[c] + p.sigma[c] * v);
        }
    }
    return rans_dec_finish(d);
}

// ---- lossless ---------------------------------------------------------------------------

// Lossless streams code the element bytes (little-endian byte k on table k).
KVP_HD void encode_lossless_stream(const uint8_t* x, uint32_t elem, const uint32_t* cum,
                                   const StreamGeom& g, uint32_t s, uint8_t* buf, uint64_t cap,
                                   uint64_t* begin) {
    StreamBox b = stream_box(g, s);
    uint32_t cw = b.c1 - b.c0;
    RansEncoder e;
    rans_enc_init(e, buf, cap);
    uint64_t i = (uint64_t)(b.t1 - b.t0) * cw * elem;
    for (uint32_t t = b.t1; t-- > b.t0;) {
        for (uint32_t c = b.c1; c-- > b.c0;) {
            const uint8_t* px = x + ((uint64_t)t * g.width + c) * elem;
            for (uint32_t k = elem; k-- > 0;) {
                --i;
                const uint32_t* tc = cum + k * table_words(kMaxAlphabet);
                uint32_t sym = px[k];
                rans_put(e, (uint32_t)(i % kRansStates), tc[sym], tc[sym + 1] - tc[sym]);
            }
        }
    }
    *begin = (uint64_t)(rans_enc_flush(e) - buf);
}

KVP_HD int32_t decode_lossless_stream(const uint32_t* cum, uint32_t elem, const StreamGeom& g,
                                      uint32_t s, const uint8_t* data, uint64_t size,
                                      uint8_t* out) {
    StreamBox b = stream_box(g, s);
    RansDecoder d;
    KVP_TRY(rans_dec_init(d, data, size));
    uint64_t i = 0;
    for (uint32_t t = b.t0; t < b.t1; ++t) {
        for (uint32_t c = b.c0; c < b.c1; ++c) {
            uint8_t* px = out + ((uint64_t)t * g.width + c) * elem;
            for (uint32_t k = 0; k < elem; ++k, ++i) {
                Table tab;
                tab.cum = cum + k * table_words(kMaxAlphabet);
                tab.n = kMaxAlphabet;
                uint32_t sym;
                KVP_TRY(rans_get(d, (uint32_t)(i % kRansStates), tab, &sym));
                px[k] = (uint8_t)sym;
            }
        }
    }
    return rans_dec_finish(d);
}

}  // namespace kvp
