// Element types: exact loads of fp16/bf16/fp32 into float, round-to-nearest-even stores.
//
// Written with integer bit operations only, so that the host and the device produce the
// same bits (no dependence on compiler intrinsics or the host's fp16 support).
#pragma once
#include <cstdint>
#include <cstring>

#include "check.h"

namespace kvp {

enum DType : uint8_t { kF16 = 1, kBF16 = 2, kF32 = 3 };

KVP_HD uint32_t dtype_size(uint8_t dt) { return dt == kF32 ? 4u : (dt == kF16 || dt == kBF16) ? 2u : 0u; }

KVP_HD uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KVP_HD float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

KVP_HD float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (man << 13));  // inf / nan
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        // subnormal: value = man * 2^-24, exact in float
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

KVP_HD uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);  // nan
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to inf
    if (a < 0x38800000u) {  // subnormal or zero in fp16
        if (a < 0x33000000u) return (uint16_t)sign;  // below half the smallest subnormal
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126u - e;  // 14..24 bits to drop to reach 2^-24 units
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15 and round
    return (uint16_t)(sign | (r >> 13));
}

KVP_HD float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

KVP_HD uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet nan
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// The smallest bf16 >= f, for f >= 0 finite (scales are rounded up so that no value
// quantizes past the last bin).
KVP_HD uint16_t f32_to_bf16_up(float f) {
    uint32_t u = f32_bits(f);
    uint32_t hi = u >> 16;
    if (u & 0xFFFFu) hi++;
    return (uint16_t)hi;
}

KVP_HD float load_elem(const void* base, uint8_t dt, uint64_t i) {
    if (dt == kF32) return ((const float*)base)[i];
    uint16_t h = ((const uint16_t*)base)[i];
    return dt == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
}

KVP_HD void store_elem(void* base, uint8_t dt, uint64_t i, float v) {
    if (dt == kF32) ((float*)base)[i] = v;
    else if (dt == kF16) ((uint16_t*)base)[i] = f32_to_f16(v);
    else ((uint16_t*)base)[i] = f32_to_bf16(v);
}

KVP_HD bool is_finite(float f) { return (f32_bits(f) & 0x7F800000u) != 0x7F800000u; }

// Little-endian loads and stores of the bitstream's integers (unaligned).
KVP_HD uint16_t rd16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
KVP_HD uint32_t rd32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
KVP_HD void wr16(uint8_t* p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
KVP_HD void wr32(uint8_t* p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

}  // namespace kvp
