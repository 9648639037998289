// Quantization of one plane (one layer's keys or values, [tokens, width]).
//
// Per channel c:  y = (x - mu[c]) / sigma[c]            (channel normalization)
// Anchor rows (t % G == 0), per-token scale s_t = bf16_up(max_c |y| / ha):
//                 q = clamp(rint(y / s_t), -ha, ha),  yhat = q * s_t
// Other rows t of the group anchored at a (closed loop, against the decoded anchor):
//                 r = y - yhat_a,  s_t = bf16_up(max_c |r| / hd)
//                 q = clamp(rint(r / s_t), -hd, hd),  yhat = yhat_a + q * s_t
// Decoded value:  x' = mu[c] + sigma[c] * yhat.   Symbol = q + h.
// Every function here is pure and uses only IEEE float operations without contraction,
// so the host and the device compute the same bits.
#pragma once
#include <cmath>
#include <cstdint>

#include "check.h"
#include "numeric.h"

namespace kvp {

// Encoder-side view of a plane with its normalization and token scales.
struct QuantInput {
    const void* x;        // [tokens, width] row-major, dtype below
    uint8_t dtype;
    uint32_t tokens, width;
    uint32_t anchor_group;  // G >= 1
    int32_t ha, hd;         // half ranges: anchor rows, other rows (bins = 2h + 1)
    const float* mu;        // [width]
    const float* sigma;     // [width], > 0
    const float* scale;     // [tokens] token scales (filled by row_scale first)
    const uint8_t* sym;     // [tokens, width] symbols already computed, or null
};

KVP_HD bool is_anchor(uint32_t t, uint32_t group) { return t % group == 0; }

KVP_HD float normalized(const QuantInput& in, uint32_t t, uint32_t c) {
    float x = load_elem(in.x, in.dtype, (uint64_t)t * in.width + c);
    return (x - in.mu[c]) / in.sigma[c];
}

KVP_HD int32_t quantize(float v, float s, int32_t h) {
    if (!(s > 0.0f)) return 0;
    float q = rintf(v / s);
    if (q > (float)h) q = (float)h;
    if (q < (float)-h) q = (float)-h;
    return (int32_t)q;
}

// Decoded normalized value of anchor row a, channel c.
KVP_HD float anchor_value(const QuantInput& in, uint32_t a, uint32_t c) {
    float s = in.scale[a];
    return (float)quantize(normalized(in, a, c), s, in.ha) * s;
}

// Token scale of row t (anchor rows first: other rows read their anchor's scale).
KVP_HD int32_t row_scale(const QuantInput& in, uint32_t t, float* out) {
    float amax = 0.0f;
    if (is_anchor(t, in.anchor_group)) {
        for (uint32_t c = 0; c < in.width; ++c) {
            float v = fabsf(normalized(in, t, c));
            KVP_CHECK(is_finite(v), kBadInput);
            amax = v > amax ? v : amax;
        }
        amax = amax / (float)in.ha;
    } else {
        uint32_t a = t - t % in.anchor_group;
        for (uint32_t c = 0; c < in.width; ++c) {
            float v = fabsf(normalized(in, t, c) - anchor_value(in, a, c));
            KVP_CHECK(is_finite(v), kBadInput);
            amax = v > amax ? v : amax;
        }
        amax = amax / (float)in.hd;
    }
    float s = bf16_to_f32(f32_to_bf16_up(amax));
    KVP_CHECK(is_finite(s), kBadInput);
    *out = s;
    return kOk;
}

// The symbol of element (t, c) of an anchor row; its row scale must be set.
KVP_HD uint32_t anchor_symbol(const QuantInput& in, uint32_t t, uint32_t c) {
    return (uint32_t)(quantize(normalized(in, t, c), in.scale[t], in.ha) + in.ha);
}

// The symbol of element (t, c); row scales of t and of its anchor must be set.
KVP_HD uint32_t lossy_symbol(const QuantInput& in, uint32_t t, uint32_t c) {
    if (in.sym) return in.sym[(uint64_t)t * in.width + c];
    if (is_anchor(t, in.anchor_group)) return anchor_symbol(in, t, c);
    float y = normalized(in, t, c);
    float ya = anchor_value(in, t - t % in.anchor_group, c);
    return (uint32_t)(quantize(y - ya, in.scale[t], in.hd) + in.hd);
}

}  // namespace kvp

namespace kvp {

// Channel normalization of a chunk without a profile: the midpoint of channel c over all
// tokens (bf16, to nearest) and the largest distance of a value from that rounded midpoint
// (bf16, rounded up; 1.0 for a constant channel), so that |y| <= 1. min/max are exact, so
// the result does not depend on the order of reduction.
KVP_HD int32_t channel_stats(const void* x, uint8_t dtype, uint32_t tokens, uint32_t width,
                             uint32_t c, uint16_t* mu, uint16_t* sigma) {
    float lo = 0.0f, hi = 0.0f;
    for (uint32_t t = 0; t < tokens; ++t) {
        float v = load_elem(x, dtype, (uint64_t)t * width + c);
        KVP_CHECK(is_finite(v), kBadInput);
        if (t == 0 || v < lo) lo = v;
        if (t == 0 || v > hi) hi = v;
    }
    *mu = f32_to_bf16(hi * 0.5f + lo * 0.5f);
    float m = bf16_to_f32(*mu);
    float up = hi - m, down = m - lo;
    float half = up > down ? up : down;
    *sigma = half > 0.0f ? f32_to_bf16_up(half) : (uint16_t)0x3F80u;  // 1.0
    KVP_CHECK(is_finite(bf16_to_f32(*sigma)) && is_finite(m), kBadInput);
    return kOk;
}

}  // namespace kvp
