// Plans for the encoder and the decoder: layout, validation of every section, tables.
#include "plan.h"

#include <algorithm>
#include <cstring>

namespace kvp {

FrameParams frame_params(const Header& h) {
    FrameParams f{};
    f.lossless = h.lossless();
    f.dtype = h.dtype;
    f.block_tokens = h.block_tokens;
    f.group_channels = h.group_channels;
    f.anchor_group = h.anchor_group;
    f.table_group = h.table_group;
    f.contexts = h.contexts();
    return f;
}

// Slots of every plane in the float and cum arrays; the cum array itself only with
// `own_tables` (frames coded with a profile use the compiled profile's).
static Plan layout(const Header& h, bool own_tables) {
    Plan plan;
    plan.header = h;
    plan.params = frame_params(h);
    uint64_t nf = 0, nc = 0;
    uint32_t elem = dtype_size(h.dtype);
    for (uint32_t p = 0; p < h.planes(); ++p) {
        const LayerInfo& l = h.layer_of(p);
        PlaneDesc d{};
        d.tokens = h.coded_tokens(p);
        d.width = l.width;
        if (h.lossless()) {
            d.anchor_cum = nc;
            nc += elem * table_words(kMaxAlphabet);
        } else {
            d.ha = h.half_anchor(p);
            d.hd = h.half_delta(p);
            d.mu = nf;
            d.sigma = nf + l.width;
            d.scale = nf + 2ull * l.width;
            nf += 2ull * l.width + d.tokens;
            d.anchor_cum = nc;
            nc += (uint64_t)h.n_tables(p) * h.contexts() * table_words(2 * d.ha + 1);
            d.delta_cum = nc;
            if (h.anchor_group > 1) nc += h.n_tables(p) * table_words(2 * d.hd + 1);
        }
        plan.planes.push_back(d);
    }
    plan.floats.assign(nf, 0.0f);
    plan.cum_words = nc;
    if (own_tables) plan.cum.assign(nc, 0);
    return plan;
}

// Tables of plane p from little-endian 16-bit frequencies, laid out as in the frame.
static int32_t tables_from(Plan& plan, uint32_t p, const uint8_t* le) {
    const PlaneDesc& d = plan.planes[p];
    for (uint64_t i = 0; i < plane_tables(plan.params, d); ++i)
        KVP_TRY(build_plane_table(plan.params, d, le, i, plan.cum.data()));
    return kOk;
}

void set_tables(Plan& plan, uint32_t p, const std::vector<uint16_t>& freqs) {
    std::vector<uint8_t> le(freqs.size() * 2);
    for (size_t i = 0; i < freqs.size(); ++i) wr16(&le[2 * i], freqs[i]);
    ensure(tables_from(plan, p, le.data()), "tables built by the encoder");
}

// Normalization values of plane p from bf16 bits (width each).
static int32_t stats_from(Plan& plan, uint32_t p, const uint8_t* mu_le, const uint8_t* sigma_le,
                          int32_t err) {
    const PlaneDesc& d = plan.planes[p];
    for (uint32_t c = 0; c < d.width; ++c) {
        float mu = bf16_to_f32(rd16(mu_le + 2 * c));
        float sigma = bf16_to_f32(rd16(sigma_le + 2 * c));
        KVP_CHECK(is_finite(mu) && is_finite(sigma) && sigma > 0.0f, err);
        plan.floats[d.mu + c] = mu;
        plan.floats[d.sigma + c] = sigma;
    }
    return kOk;
}

static int32_t profile_into(Plan& plan, const ProfileData& profile) {
    const Header& h = plan.header;
    KVP_CHECK(profile.size() == h.planes(), kProfileMismatch);
    for (uint32_t p = 0; p < h.planes(); ++p) {
        const ProfilePlane& pp = profile[p];
        const PlaneDesc& d = plan.planes[p];
        uint64_t na = 2 * d.ha + 1, nd = 2 * d.hd + 1;
        KVP_CHECK(pp.width == d.width && pp.mu && pp.sigma, kProfileMismatch);
        KVP_CHECK(pp.anchor_freqs && pp.anchor_len == na * d.width * h.contexts(), kProfileMismatch);
        KVP_CHECK(h.anchor_group == 1 || (pp.delta_freqs && pp.delta_len == nd * d.width),
                  kProfileMismatch);
        std::vector<uint8_t> le(2 * (pp.anchor_len + (h.anchor_group > 1 ? pp.delta_len : 0)));
        for (uint64_t i = 0; i < pp.anchor_len; ++i) wr16(&le[2 * i], pp.anchor_freqs[i]);
        if (h.anchor_group > 1)
            for (uint64_t i = 0; i < pp.delta_len; ++i)
                wr16(&le[2 * (pp.anchor_len + i)], pp.delta_freqs[i]);
        KVP_CHECK(tables_from(plan, p, le.data()) == kOk, kProfileMismatch);
        std::vector<uint8_t> mu(2 * d.width), sigma(2 * d.width);
        for (uint32_t c = 0; c < d.width; ++c) {
            wr16(&mu[2 * c], pp.mu[c]);
            wr16(&sigma[2 * c], pp.sigma[c]);
        }
        KVP_TRY(stats_from(plan, p, mu.data(), sigma.data(), kProfileMismatch));
    }
    return kOk;
}

CompiledProfile compile_profile(const Header& h, const ProfileData& profile) {
    if (h.lossless()) throw Error(kBadInput, "a lossless frame uses no profile");
    Plan plan = layout(h, true);
    ensure(profile_into(plan, profile), "profile tables");
    CompiledProfile out;
    out.layout = h;
    out.cum = std::move(plan.cum);
    for (uint32_t p = 0; p < h.planes(); ++p) {
        const PlaneDesc& d = plan.planes[p];
        out.stats_at.push_back(out.stats.size());
        out.stats.insert(out.stats.end(), plan.floats.begin() + d.mu,
                         plan.floats.begin() + d.sigma + d.width);
    }
    return out;
}

bool CompiledProfile::fits(const Header& h) const {
    const Header& c = layout;
    if (h.lossless() || h.planes() != c.planes() || h.anchor_group != c.anchor_group ||
        h.table_group != c.table_group || h.contexts() != c.contexts())
        return false;
    for (uint32_t p = 0; p < h.planes(); ++p)
        if (h.layer_of(p).width != c.layer_of(p).width || h.half_anchor(p) != c.half_anchor(p) ||
            h.half_delta(p) != c.half_delta(p))
            return false;
    return true;
}

static int32_t compiled_into(Plan& plan, const CompiledProfile& profile) {
    KVP_CHECK(profile.fits(plan.header) && profile.cum.size() == plan.cum_words,
              kProfileMismatch);
    for (uint32_t p = 0; p < plan.planes.size(); ++p) {
        const PlaneDesc& d = plan.planes[p];
        const float* stats = profile.stats.data() + profile.stats_at[p];
        std::copy(stats, stats + 2ull * d.width, plan.floats.begin() + d.mu);
    }
    plan.shared_cum = profile.cum.data();
    return kOk;
}

void apply_profile(Plan& plan, const CompiledProfile& profile) {
    ensure(compiled_into(plan, profile), "profile tables");
}

static int32_t sections_into(Plan& plan, const uint8_t* data, const CompiledProfile* profile,
                             bool host_tables) {
    const Header& h = plan.header;
    if (h.has_profile()) {
        KVP_CHECK(profile != nullptr, kProfileMismatch);
        KVP_TRY(compiled_into(plan, *profile));
    }
    uint64_t off = h.header_size;
    for (uint32_t p = 0; p < h.planes(); ++p) {
        SectionLayout s = section_layout(h, p);
        PlaneDesc& d = plan.planes[p];
        plan.exact_at.push_back(off);
        const uint8_t* sec = data + off + s.exact;
        d.freqs_at = off + s.exact + s.stats;
        uint64_t size = h.section_size[p];  // >= s.fixed() + 8 * streams (parse_header)
        if (!h.lossless() && !h.has_profile())
            KVP_TRY(stats_from(plan, p, sec, sec + 2ull * d.width, kCorrupt));
        if ((h.lossless() || !h.has_profile()) && host_tables)
            KVP_TRY(tables_from(plan, p, sec + s.stats));
        const uint8_t* scales = sec + s.stats + s.tables;
        for (uint32_t t = 0; t < (h.lossless() ? 0u : d.tokens); ++t) {
            uint16_t b = rd16(scales + 2ull * t);
            float v = bf16_to_f32(b);
            KVP_CHECK(!(b & 0x8000u) && is_finite(v), kCorrupt);
            plan.floats[d.scale + t] = v;
        }
        const uint8_t* sizes = scales + s.scales;
        uint64_t at = s.fixed();
        for (uint64_t i = 0; i < s.streams; ++i) {
            uint64_t n = rd32(sizes + 4 * i);
            KVP_CHECK(n >= 4ull * kRansStates && n <= size - at, kCorrupt);
            plan.streams.push_back(StreamRef{p, (uint32_t)i, off + at, n});
            at += n;
        }
        KVP_CHECK(at == size, kCorrupt);
        off += size;
    }
    return kOk;
}

Plan plan_decode(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                 bool host_tables) {
    Header h = parse_header(data, size);
    if (h.frame_size != size)
        throw Error(h.frame_size > size ? kTruncated : kCorrupt, "frame size");
    Plan plan = layout(h, !h.has_profile() && host_tables);
    ensure(sections_into(plan, data, profile, host_tables), "frame sections");
    return plan;
}

Plan plan_encode(const Header& h, const std::vector<const void*>& inputs) {
    Plan plan = layout(h, !h.has_profile() || h.lossless());
    uint32_t per_elem = h.lossless() ? dtype_size(h.dtype) : 1;
    uint64_t off = 0;
    for (uint32_t p = 0; p < h.planes(); ++p) {
        plan.planes[p].x = (const uint8_t*)inputs[p] + h.exact_bytes(p);
        StreamGeom g = h.geom(p);
        uint64_t n = stream_count(g);
        for (uint64_t i = 0; i < n; ++i) {
            uint64_t cap = rans_bound(stream_symbols(g, (uint32_t)i, per_elem));
            plan.streams.push_back(StreamRef{p, (uint32_t)i, off, cap});
            off += cap;
        }
    }
    return plan;
}

uint64_t scratch_bytes(const Plan& plan) {
    return plan.streams.empty() ? 0 : plan.streams.back().offset + plan.streams.back().size;
}

std::vector<void*> coded_outputs(const Plan& plan, const std::vector<void*>& outputs) {
    std::vector<void*> out(outputs.size());
    for (uint32_t p = 0; p < outputs.size(); ++p)
        out[p] = (uint8_t*)outputs[p] + plan.header.exact_bytes(p);
    return out;
}

std::vector<uint8_t> host_exact_rows(const Plan& plan, uint32_t p, const void* input) {
    const uint8_t* x = (const uint8_t*)input;
    return std::vector<uint8_t>(x, x + plan.header.exact_bytes(p));
}

static std::vector<uint16_t> normalized(const std::vector<uint64_t>& counts, uint32_t n) {
    std::vector<uint16_t> freqs(counts.size());
    for (size_t i = 0; i < counts.size(); i += n) normalize_freqs(&counts[i], n, &freqs[i]);
    return freqs;
}

std::vector<uint16_t> chunk_tables(const Plan& plan, uint32_t p, std::vector<uint8_t>* symbols) {
    const Header& h = plan.header;
    const PlaneDesc& d = plan.planes[p];
    uint32_t n_tables = h.n_tables(p);
    uint32_t na = 2 * d.ha + 1, nd = 2 * d.hd + 1;
    std::vector<uint64_t> anchor((uint64_t)n_tables * na, 0), delta((uint64_t)n_tables * nd, 0);
    if (symbols) symbols->resize((uint64_t)d.tokens * d.width);
    std::vector<uint64_t> table_of(d.width);  // first count of channel c's table, per role
    for (uint32_t c = 0; c < d.width; ++c) table_of[c] = c / h.table_group;
    QuantInput in = quant_input(plan.params, d, plan.floats.data());
    for (uint32_t t = 0; t < d.tokens; ++t) {
        bool a = is_anchor(t, h.anchor_group);
        uint64_t* counts = a ? anchor.data() : delta.data();
        uint32_t n = a ? na : nd;
        uint8_t* row = symbols ? symbols->data() + (uint64_t)t * d.width : nullptr;
        for (uint32_t c = 0; c < d.width; ++c) {
            uint32_t sym = a ? anchor_symbol(in, t, c) : lossy_symbol(in, t, c);
            counts[table_of[c] * n + sym]++;
            if (row) row[c] = (uint8_t)sym;
        }
    }
    std::vector<uint16_t> freqs = normalized(anchor, na);
    if (h.anchor_group > 1) {
        std::vector<uint16_t> more = normalized(delta, nd);
        freqs.insert(freqs.end(), more.begin(), more.end());
    }
    return freqs;
}

std::vector<uint16_t> lossless_tables(const Plan& plan, uint32_t p) {
    uint32_t elem = dtype_size(plan.header.dtype);
    const PlaneDesc& d = plan.planes[p];
    std::vector<uint64_t> counts((uint64_t)elem * kMaxAlphabet, 0);
    const uint8_t* x = (const uint8_t*)d.x;
    uint64_t n = (uint64_t)d.tokens * d.width;
    for (uint64_t i = 0; i < n; ++i)
        for (uint32_t k = 0; k < elem; ++k) counts[k * kMaxAlphabet + x[i * elem + k]]++;
    return normalized(counts, kMaxAlphabet);
}

}  // namespace kvp
