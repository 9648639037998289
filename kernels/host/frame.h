// Frame layout of bitstream v1 (docs/bitstream.md): header, sections, and the plan that
// both the CPU and the CUDA encoders fill before the frame is written.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/check.h"
#include "../core/numeric.h"
#include "../core/rans.h"
#include "../core/stream.h"

namespace kvp {

constexpr uint8_t kMagic[4] = {'K', 'V', 'P', 'C'};
constexpr uint8_t kVersion = 1;
constexpr uint8_t kModeLossless = 0;
constexpr uint8_t kModeQuantized = 1;
constexpr uint8_t kFlagProfile = 1;
constexpr uint8_t kFlagContexts = 2;
constexpr uint32_t kFixedHeader = 36;
constexpr uint32_t kMaxLevelName = 32;
constexpr uint32_t kLayerEntry = 12;
constexpr uint32_t kChecksumSize = 4;

// A failed status with context, raised by host code and turned into CodecError.
struct Error : std::runtime_error {
    int32_t status;
    Error(int32_t s, const std::string& what)
        : std::runtime_error(std::string(status_message(s)) + ": " + what), status(s) {}
};

inline void ensure(int32_t status, const char* what) {
    if (status != kOk) throw Error(status, what);
}

struct LayerInfo {
    uint32_t tokens = 0, width = 0;
    uint8_t bins[2] = {0, 0};         // keys, values: bins of non-anchor rows
    uint8_t anchor_bins[2] = {0, 0};  // keys, values: bins of anchor rows
};

struct Header {
    uint8_t mode = 0, dtype = 0, flags = 0;
    uint8_t exact_rows = 0;  // leading rows of every plane stored verbatim (lossy mode)
    uint16_t block_tokens = 0, group_channels = 0, anchor_group = 1, table_group = 1;
    std::string level;
    uint8_t profile_hash[16] = {};
    std::vector<LayerInfo> layers;
    std::vector<uint32_t> section_size;  // per plane: layer-major, keys then values
    uint64_t header_size = 0;            // bytes before the first section
    uint64_t frame_size = 0;             // header + sections + checksum

    bool lossless() const { return mode == kModeLossless; }
    bool has_profile() const { return flags & kFlagProfile; }
    // Tables per channel (anchor role): kContexts when the row above chooses the table.
    uint32_t contexts() const { return (flags & kFlagContexts) ? kContexts : 1; }
    uint32_t planes() const { return (uint32_t)layers.size() * 2; }
    const LayerInfo& layer_of(uint32_t p) const { return layers[p / 2]; }
    // Rows of plane p stored verbatim, and rows quantized and coded in streams.
    uint32_t exact(uint32_t p) const {
        return exact_rows < layer_of(p).tokens ? exact_rows : layer_of(p).tokens;
    }
    uint32_t coded_tokens(uint32_t p) const { return layer_of(p).tokens - exact(p); }
    uint64_t exact_bytes(uint32_t p) const {
        return (uint64_t)exact(p) * layer_of(p).width * dtype_size(dtype);
    }
    StreamGeom geom(uint32_t p) const {
        const LayerInfo& l = layer_of(p);
        return StreamGeom{coded_tokens(p), l.width, block_tokens, group_channels};
    }
    int32_t half_anchor(uint32_t p) const { return layer_of(p).anchor_bins[p % 2] / 2; }
    int32_t half_delta(uint32_t p) const { return layer_of(p).bins[p % 2] / 2; }
    uint32_t n_tables(uint32_t p) const { return ceil_div(layer_of(p).width, table_group); }
};

// Sizes of the parts of one plane's section, in the order they appear.
struct SectionLayout {
    uint64_t exact = 0, stats = 0, tables = 0, scales = 0, sizes = 0;  // bytes of each part
    uint64_t streams = 0;                                              // number of streams
    uint64_t fixed() const { return exact + stats + tables + scales + sizes; }
};

SectionLayout section_layout(const Header& h, uint32_t plane);

// The header's field rules; kOk or kCorrupt.
int32_t validate(const Header& h);

// Parse and validate the header; `size` is the number of bytes available (the whole frame
// or a prefix of it). Throws Error on any violation.
Header parse_header(const uint8_t* data, uint64_t size);

// Everything an encoder computed for one plane, ready to be written.
struct PlanePart {
    std::vector<uint8_t> exact;           // the plane's exact rows as stored
    std::vector<uint16_t> mu, sigma;      // bf16 bits (no profile)
    std::vector<uint16_t> freqs;          // tables as written (no profile / lossless)
    std::vector<uint16_t> scales;         // bf16 bits per token
    std::vector<uint32_t> stream_size;
    std::vector<const uint8_t*> stream;   // host pointers to each stream's bytes
};

// Header size for `h` (layers and level filled in).
uint64_t header_bytes(const Header& h);

// Write header + sections (the checksum's 4 bytes are left zero at the end).
std::vector<uint8_t> write_frame(Header h, const std::vector<PlanePart>& parts);

}  // namespace kvp
