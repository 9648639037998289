// Header writer and parser of bitstream v1; field tables in docs/bitstream.md.
#include "frame.h"

#include <cstring>

namespace kvp {

uint64_t header_bytes(const Header& h) {
    return kFixedHeader + h.level.size() + (uint64_t)h.layers.size() * (kLayerEntry + 8);
}

SectionLayout section_layout(const Header& h, uint32_t p) {
    const LayerInfo& l = h.layer_of(p);
    SectionLayout s;
    s.streams = stream_count(h.geom(p));
    s.sizes = 4ull * s.streams;
    if (h.lossless()) {
        s.tables = (uint64_t)dtype_size(h.dtype) * kMaxAlphabet * 2;
        return s;
    }
    if (!h.has_profile()) {
        s.stats = 4ull * l.width;
        uint64_t per_table = 2ull * l.anchor_bins[p % 2];
        if (h.anchor_group > 1) per_table += 2ull * l.bins[p % 2];
        s.tables = per_table * h.n_tables(p);
    }
    s.exact = h.exact_bytes(p);
    s.scales = 2ull * h.coded_tokens(p);
    return s;
}

static bool odd_bins(uint8_t b) { return b >= 3 && (b & 1); }

// The header's field rules (docs/bitstream.md, "Frame header"), for the parser and for
// the encoder, which must only write frames its decoder accepts.
int32_t validate(const Header& h) {
    KVP_CHECK(h.mode == kModeLossless || h.mode == kModeQuantized, kCorrupt);
    KVP_CHECK(dtype_size(h.dtype) != 0, kCorrupt);
    KVP_CHECK((h.flags & ~(kFlagProfile | kFlagContexts)) == 0, kCorrupt);
    KVP_CHECK(h.level.size() <= kMaxLevelName, kCorrupt);
    for (char ch : h.level) KVP_CHECK(ch >= 0x21 && ch <= 0x7E, kCorrupt);
    KVP_CHECK(h.layers.size() <= 0xFFFF, kCorrupt);
    KVP_CHECK(h.block_tokens >= 1, kCorrupt);
    KVP_CHECK(h.group_channels >= 1 && h.group_channels <= kMaxGroupChannels, kCorrupt);
    KVP_CHECK(h.anchor_group >= 1 && h.block_tokens % h.anchor_group == 0, kCorrupt);
    KVP_CHECK(h.table_group >= 1, kCorrupt);
    if (h.lossless()) {
        KVP_CHECK(!h.has_profile() && h.anchor_group == 1 && h.table_group == 1, kCorrupt);
        KVP_CHECK(h.exact_rows == 0, kCorrupt);
    } else if (h.has_profile()) {
        KVP_CHECK(h.table_group == 1, kCorrupt);
    }
    // Context tables come from a profile only (a chunk would carry five times the tables).
    if (h.flags & kFlagContexts) KVP_CHECK(h.has_profile() && h.anchor_group == 1, kCorrupt);
    bool zero_hash = true;
    for (int i = 0; i < 16; ++i) zero_hash &= h.profile_hash[i] == 0;
    KVP_CHECK(zero_hash != h.has_profile(), kCorrupt);

    for (const LayerInfo& l : h.layers) {
        for (int k = 0; k < 2; ++k) {
            if (h.lossless()) {
                KVP_CHECK(l.bins[k] == 0 && l.anchor_bins[k] == 0, kCorrupt);
            } else {
                KVP_CHECK(odd_bins(l.anchor_bins[k]), kCorrupt);
                KVP_CHECK(h.anchor_group == 1 ? l.bins[k] == 0 : odd_bins(l.bins[k]), kCorrupt);
            }
        }
    }
    return kOk;
}

namespace {
// Bounded little-endian reader over the header.
struct Reader {
    const uint8_t* p;
    uint64_t left;
    int32_t take(uint64_t n, const uint8_t** out) {
        KVP_CHECK(left >= n, kTruncated);
        *out = p;
        p += n;
        left -= n;
        return kOk;
    }
};

int32_t parse(const uint8_t* data, uint64_t size, Header& h) {
    Reader r{data, size};
    const uint8_t* f;
    KVP_TRY(r.take(kFixedHeader, &f));
    KVP_CHECK(memcmp(f, kMagic, 4) == 0, kCorrupt);
    KVP_CHECK(f[4] == kVersion, kCorrupt);
    h.mode = f[5];
    h.dtype = f[6];
    h.flags = f[7];
    uint16_t n_layers = rd16(f + 8);
    h.block_tokens = rd16(f + 10);
    h.group_channels = rd16(f + 12);
    h.anchor_group = rd16(f + 14);
    h.table_group = rd16(f + 16);
    uint8_t name_len = f[18];
    h.exact_rows = f[19];
    KVP_CHECK(name_len <= kMaxLevelName, kCorrupt);
    memcpy(h.profile_hash, f + 20, 16);
    KVP_TRY(r.take(name_len, &f));
    h.level.assign((const char*)f, name_len);

    KVP_TRY(r.take((uint64_t)n_layers * kLayerEntry, &f));
    h.layers.resize(n_layers);
    for (uint32_t i = 0; i < n_layers; ++i, f += kLayerEntry) {
        LayerInfo& l = h.layers[i];
        l.tokens = rd32(f);
        l.width = rd32(f + 4);
        for (int k = 0; k < 2; ++k) {
            l.bins[k] = f[8 + k];
            l.anchor_bins[k] = f[10 + k];
        }
    }
    KVP_TRY(validate(h));
    KVP_TRY(r.take((uint64_t)n_layers * 8, &f));
    h.section_size.resize(2u * n_layers);
    h.header_size = (uint64_t)(r.p - data);
    uint64_t total = h.header_size;
    for (uint32_t p = 0; p < 2u * n_layers; ++p) {
        h.section_size[p] = rd32(f + 4 * p);
        SectionLayout s = section_layout(h, p);
        // Every stream holds at least its flushed states.
        KVP_CHECK(h.section_size[p] >= s.fixed() + 4ull * kRansStates * s.streams, kCorrupt);
        total += h.section_size[p];
    }
    h.frame_size = total + kChecksumSize;
    return kOk;
}
}  // namespace

Header parse_header(const uint8_t* data, uint64_t size) {
    Header h;
    ensure(parse(data, size, h), "frame header");
    return h;
}

std::vector<uint8_t> write_frame(Header h, const std::vector<PlanePart>& parts) {
    h.header_size = header_bytes(h);
    h.section_size.assign(h.planes(), 0);
    uint64_t total = h.header_size;
    for (uint32_t p = 0; p < h.planes(); ++p) {
        uint64_t size = section_layout(h, p).fixed();
        for (uint32_t s : parts[p].stream_size) size += s;
        if (size > UINT32_MAX) throw Error(kBadInput, "a plane needs more than 4 GiB");
        h.section_size[p] = (uint32_t)size;
        total += size;
    }
    std::vector<uint8_t> out(total + kChecksumSize, 0);
    uint8_t* w = out.data();
    memcpy(w, kMagic, 4);
    w[4] = kVersion;
    w[5] = h.mode;
    w[6] = h.dtype;
    w[7] = h.flags;
    wr16(w + 8, (uint32_t)h.layers.size());
    wr16(w + 10, h.block_tokens);
    wr16(w + 12, h.group_channels);
    wr16(w + 14, h.anchor_group);
    wr16(w + 16, h.table_group);
    w[18] = (uint8_t)h.level.size();
    w[19] = h.exact_rows;
    memcpy(w + 20, h.profile_hash, 16);
    w += kFixedHeader;
    memcpy(w, h.level.data(), h.level.size());
    w += h.level.size();
    for (const LayerInfo& l : h.layers) {
        wr32(w, l.tokens);
        wr32(w + 4, l.width);
        w[8] = l.bins[0];
        w[9] = l.bins[1];
        w[10] = l.anchor_bins[0];
        w[11] = l.anchor_bins[1];
        w += kLayerEntry;
    }
    for (uint32_t p = 0; p < h.planes(); ++p, w += 4) wr32(w, h.section_size[p]);
    auto put16 = [&w](const std::vector<uint16_t>& v) {
        for (uint16_t x : v) { wr16(w, x); w += 2; }
    };
    for (uint32_t p = 0; p < h.planes(); ++p) {
        const PlanePart& part = parts[p];
        if (part.exact.size() != h.exact_bytes(p)) throw Error(kBadInput, "exact rows");
        memcpy(w, part.exact.data(), part.exact.size());
        w += part.exact.size();
        put16(part.mu);
        put16(part.sigma);
        put16(part.freqs);
        put16(part.scales);
        for (uint32_t s : part.stream_size) { wr32(w, s); w += 4; }
        for (size_t s = 0; s < part.stream.size(); ++s) {
            memcpy(w, part.stream[s], part.stream_size[s]);
            w += part.stream_size[s];
        }
    }
    return out;
}

}  // namespace kvp
