// Plans: a frame's planes and streams laid out as flat arrays (core/planned.h), built on
// the host for the CPU path and uploaded as they are for the CUDA path.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "../core/planned.h"
#include "frame.h"

namespace kvp {

// Profile tables for one plane, as the Python Profile holds them (bf16 bits, u16 freqs).
struct ProfilePlane {
    const uint16_t* mu = nullptr;
    const uint16_t* sigma = nullptr;
    uint64_t width = 0;
    const uint16_t* anchor_freqs = nullptr;  // [width, anchor bins]
    uint64_t anchor_len = 0;
    const uint16_t* delta_freqs = nullptr;   // [width, bins]
    uint64_t delta_len = 0;
};
using ProfileData = std::vector<ProfilePlane>;  // one per plane, layer-major, keys first

// A profile's tables and statistics for one frame layout (planes' widths and bins, anchor
// group, contexts), in the form the coder reads: built once, then shared by every frame
// of that layout instead of being rebuilt for each (tens of thousands of tables per
// whole-model frame with context tables).
struct CompiledProfile {
    Header layout;               // the header it was built for (tokens do not matter)
    std::vector<uint32_t> cum;   // every plane's tables, laid out as a plan of `layout` lays them
    std::vector<float> stats;    // per plane: mu[width] then sigma[width]
    std::vector<uint64_t> stats_at;
    // A copy of cum in a GPU's memory, made by the CUDA path at first use (freed with this).
    mutable std::shared_ptr<void> device_cum;
    mutable int device = -1;
    // Whether frames with header h code with these tables (same planes, widths, bins,
    // anchor group, contexts).
    bool fits(const Header& h) const;
};

// Check a profile's tables and statistics against the layout of h and build them
// (kProfileMismatch when they do not fit).
CompiledProfile compile_profile(const Header& h, const ProfileData& profile);

struct Plan {
    Header header;
    FrameParams params{};
    std::vector<PlaneDesc> planes;
    std::vector<StreamRef> streams;
    std::vector<float> floats;
    std::vector<uint32_t> cum;             // the frame's own tables (empty with a profile)
    uint64_t cum_words = 0;                // words of every plane's tables
    const uint32_t* shared_cum = nullptr;  // a compiled profile's tables, used instead of cum
    std::vector<uint64_t> exact_at;  // decoding: frame offset of each plane's exact rows

    const uint32_t* tables() const { return shared_cum ? shared_cum : cum.data(); }
};

FrameParams frame_params(const Header& h);

// Parse and validate a whole frame (without checking the checksum, which the caller did):
// every section, table, scale and stream size. Streams are checked while decoding.
// Without `host_tables`, the frame's own tables are neither built nor checked here: the
// caller builds them (build_plane_table, from each plane's freqs_at) and checks them then.
Plan plan_decode(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                 bool host_tables = true);

// Lay out an encoder's plan: float and cum slots for every plane, streams with scratch
// offsets (rans_bound each); `inputs` are the planes' element pointers. The caller fills
// the floats (stats, scales) and tables before encoding the streams.
Plan plan_encode(const Header& h, const std::vector<const void*>& inputs);

// A compiled profile's stats and tables into the plan (kProfileMismatch when it does not
// fit the plan's header); the plan refers to its tables, which must outlive it.
void apply_profile(Plan& plan, const CompiledProfile& profile);

// Build the cum arrays of plane p from 16-bit frequencies laid out as in the frame.
void set_tables(Plan& plan, uint32_t p, const std::vector<uint16_t>& freqs);

// Symbols per table of a lossy plane with its row scales set (for tables built from the
// chunk itself): [n_tables][anchor bins] then [n_tables][bins].
// The tables of plane p from its own symbols; with `symbols`, also keeps the symbols
// ([tokens, width]) so that the streams need not quantize again.
std::vector<uint16_t> chunk_tables(const Plan& plan, uint32_t p,
                                   std::vector<uint8_t>* symbols = nullptr);

// Byte histograms of a lossless plane: [elem bytes][256] frequencies.
std::vector<uint16_t> lossless_tables(const Plan& plan, uint32_t p);

// Size of the scratch buffer holding every stream at its worst case.
uint64_t scratch_bytes(const Plan& plan);

// Where the coded rows of each plane start in `outputs` (after its exact rows).
std::vector<void*> coded_outputs(const Plan& plan, const std::vector<void*>& outputs);

// A plane's exact rows as the encoder read them from a host input.
std::vector<uint8_t> host_exact_rows(const Plan& plan, uint32_t p, const void* input);

}  // namespace kvp
