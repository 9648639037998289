// A whole frame's work as flat arrays, so that one index (a stream, a row) finds all it
// needs: the CPU threads and the CUDA kernels both call these functions.
#pragma once
#include <cstdint>

#include "check.h"
#include "quant.h"
#include "stream.h"

namespace kvp {

struct FrameParams {
    uint8_t lossless, dtype;
    uint32_t block_tokens, group_channels, anchor_group, table_group;
    uint32_t contexts;  // tables per channel of the anchor role: 1 or kContexts
};

// One plane (a layer's keys or values). Offsets index the plan's float and cum arrays.
struct PlaneDesc {
    const void* x;  // encoder input (host or device pointer), unused when decoding
    const uint8_t* sym;  // encoder: the plane's symbols when already computed, else null
    uint32_t tokens, width;
    int32_t ha, hd;                        // half ranges (0 in lossless mode)
    uint64_t mu, sigma, scale;             // into floats: [width], [width], [tokens]
    uint64_t anchor_cum, delta_cum;        // into cum (lossless: the per-byte tables)
    uint64_t freqs_at;                     // decoding: frame offset of the plane's own tables
};

struct StreamRef {
    uint32_t plane, index;  // plane, stream within the plane
    uint64_t offset, size;  // bytes in the frame (decoding) or scratch (encoding)
};

KVP_HD StreamGeom plane_geom(const FrameParams& f, const PlaneDesc& p) {
    StreamGeom g;
    g.tokens = p.tokens;
    g.width = p.width;
    g.block_tokens = f.block_tokens;
    g.group_channels = f.group_channels;
    return g;
}

KVP_HD QuantInput quant_input(const FrameParams& f, const PlaneDesc& p, const float* floats) {
    QuantInput q;
    q.x = p.x;
    q.dtype = f.dtype;
    q.tokens = p.tokens;
    q.width = p.width;
    q.anchor_group = f.anchor_group;
    q.ha = p.ha;
    q.hd = p.hd;
    q.mu = floats + p.mu;
    q.sigma = floats + p.sigma;
    q.scale = floats + p.scale;
    q.sym = p.sym;
    return q;
}

KVP_HD LossyTables lossy_tables(const FrameParams& f, const PlaneDesc& p, const uint32_t* cum) {
    LossyTables t;
    t.anchor_cum = cum + p.anchor_cum;
    t.delta_cum = cum + p.delta_cum;
    t.table_group = f.table_group;
    t.contexts = f.contexts;
    return t;
}

// Tables of a plane, in the order a frame stores their 16-bit frequencies: lossless, one
// per element byte; lossy, the anchor role's (n_tables * contexts), then the other rows'.
KVP_HD uint64_t plane_tables(const FrameParams& f, const PlaneDesc& p) {
    if (f.lossless) return dtype_size(f.dtype);
    uint64_t n_tables = ceil_div(p.width, f.table_group);
    return n_tables * f.contexts + (f.anchor_group > 1 ? n_tables : 0);
}

// Build table i of plane p (its cum array and lookup) from the plane's frequencies as the
// frame stores them (`freqs_le`, the first table's), validating them: the host and the
// device build a frame's tables with this one function.
KVP_HD int32_t build_plane_table(const FrameParams& f, const PlaneDesc& p, const uint8_t* freqs_le,
                                 uint64_t i, uint32_t* cum) {
    if (f.lossless)
        return build_cum(freqs_le + 2ull * kMaxAlphabet * i, kMaxAlphabet,
                         cum + p.anchor_cum + table_words(kMaxAlphabet) * i);
    uint32_t na = (uint32_t)(2 * p.ha + 1), nd = (uint32_t)(2 * p.hd + 1);
    uint64_t anchors = (uint64_t)ceil_div(p.width, f.table_group) * f.contexts;
    if (i < anchors)
        return build_cum(freqs_le + 2ull * na * i, na, cum + p.anchor_cum + table_words(na) * i);
    uint64_t j = i - anchors;
    return build_cum(freqs_le + 2ull * na * anchors + 2ull * nd * j, nd,
                     cum + p.delta_cum + table_words(nd) * j);
}

// Row scale of token t (anchor rows of a block before its other rows).
KVP_HD int32_t row_scale_at(const FrameParams& f, const PlaneDesc& p, float* floats, uint32_t t) {
    return row_scale(quant_input(f, p, floats), t, floats + p.scale + t);
}

KVP_HD uint32_t symbol_at(const FrameParams& f, const PlaneDesc& p, const float* floats,
                          uint32_t t, uint32_t c) {
    return lossy_symbol(quant_input(f, p, floats), t, c);
}

KVP_HD void encode_stream_at(const FrameParams& f, const PlaneDesc& p, uint32_t index,
                             const float* floats, const uint32_t* cum, uint8_t* buf, uint64_t cap,
                             uint64_t* begin) {
    StreamGeom g = plane_geom(f, p);
    if (f.lossless)
        encode_lossless_stream((const uint8_t*)p.x, dtype_size(f.dtype), cum + p.anchor_cum, g,
                               index, buf, cap, begin);
    else
        encode_lossy_stream(quant_input(f, p, floats), lossy_tables(f, p, cum), g, index, buf,
                            cap, begin);
}

KVP_HD int32_t decode_stream_at(const FrameParams& f, const PlaneDesc& p, const StreamRef& s,
                                const float* floats, const uint32_t* cum, const uint8_t* data,
                                void* out) {
    StreamGeom g = plane_geom(f, p);
    if (f.lossless)
        return decode_lossless_stream(cum + p.anchor_cum, dtype_size(f.dtype), g, s.index,
                                      data + s.offset, s.size, (uint8_t*)out);
    DequantPlane d;
    d.anchor_group = f.anchor_group;
    d.ha = p.ha;
    d.hd = p.hd;
    d.mu = floats + p.mu;
    d.sigma = floats + p.sigma;
    d.scale = floats + p.scale;
    return decode_lossy_stream(d, lossy_tables(f, p, cum), g, s.index, data + s.offset, s.size,
                               out, f.dtype);
}

}  // namespace kvp
