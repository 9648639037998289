// The CUDA path: the same stages as the CPU path (host/cpu.h), as kernels over the core.
#pragma once
#include <cstdint>
#include <vector>

#include "../host/plan.h"

namespace kvp {

// CUDA devices usable by this process (0 without a driver or a device; never throws).
int cuda_device_count();

// Encode planes held in device memory; the frame is byte-identical to encode_cpu's.
std::vector<uint8_t> encode_cuda(const Header& header, const std::vector<const void*>& inputs,
                                 const CompiledProfile* profile);

// Decode a frame held in host memory into device outputs (one per plane).
void decode_cuda(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                 const std::vector<void*>& outputs);

}  // namespace kvp
