// The CPU path: every stage of encoding and decoding spread over threads.
#pragma once
#include <cstdint>
#include <vector>

#include "plan.h"

namespace kvp {

// Encode planes (host pointers, layer-major, keys first) into a frame whose last 4 bytes
// (the checksum) are left zero. `header` carries the shapes, level and parameters.
std::vector<uint8_t> encode_cpu(const Header& header, const std::vector<const void*>& inputs,
                                const CompiledProfile* profile, int threads);

// Decode a whole frame (checksum already verified) into host outputs, one per plane.
void decode_cpu(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                const std::vector<void*>& outputs, int threads);

// The quantizer's symbols of one plane (for building profiles): [tokens, width] bytes.
std::vector<uint8_t> plane_symbols(const void* x, uint8_t dtype, uint32_t tokens, uint32_t width,
                                   const uint16_t* mu, const uint16_t* sigma,
                                   uint32_t anchor_group, uint32_t anchor_bins, uint32_t bins);

// Token scales of a plane (anchors of each block before its other rows).
void fill_scales(const Plan& plan, uint32_t p, float* floats);

}  // namespace kvp
