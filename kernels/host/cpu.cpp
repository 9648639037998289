// The CPU path: stats, row scales, tables, then streams, each stage parallel over threads.
#include "cpu.h"

#include <cstring>
#include <memory>

#include "parallel.h"

namespace kvp {

static int32_t scales_of_block(const Plan& plan, uint32_t p, uint32_t block, float* floats) {
    const PlaneDesc& d = plan.planes[p];
    const FrameParams& f = plan.params;
    uint32_t t0 = block * f.block_tokens;
    uint32_t t1 = t0 + f.block_tokens < d.tokens ? t0 + f.block_tokens : d.tokens;
    for (int pass = 0; pass < 2; ++pass)  // anchors first: other rows read them
        for (uint32_t t = t0; t < t1; ++t)
            if (is_anchor(t, f.anchor_group) == (pass == 0))
                KVP_TRY(row_scale_at(f, d, floats, t));
    return kOk;
}

void fill_scales(const Plan& plan, uint32_t p, float* floats) {
    uint32_t blocks = ceil_div(plan.planes[p].tokens, plan.params.block_tokens);
    for (uint32_t b = 0; b < blocks; ++b) ensure(scales_of_block(plan, p, b, floats), "row scales");
}

std::vector<uint8_t> encode_cpu(const Header& header, const std::vector<const void*>& inputs,
                                const CompiledProfile* profile, int threads) {
    Plan plan = plan_encode(header, inputs);
    const Header& h = plan.header;
    const FrameParams& f = plan.params;
    uint32_t planes = h.planes();
    std::vector<PlanePart> parts(planes);
    for (uint32_t p = 0; p < planes; ++p) parts[p].exact = host_exact_rows(plan, p, inputs[p]);
    float* floats = plan.floats.data();

    if (!h.lossless()) {
        if (profile) {
            apply_profile(plan, *profile);
        } else {
            parallel_for(planes, threads, "channel statistics", [&](uint64_t p) -> int32_t {
                const PlaneDesc& d = plan.planes[p];
                PlanePart& part = parts[p];
                part.mu.resize(d.width);
                part.sigma.resize(d.width);
                for (uint32_t c = 0; c < d.width; ++c) {
                    KVP_TRY(channel_stats(d.x, f.dtype, d.tokens, d.width, c, &part.mu[c],
                                          &part.sigma[c]));
                    floats[d.mu + c] = bf16_to_f32(part.mu[c]);
                    floats[d.sigma + c] = bf16_to_f32(part.sigma[c]);
                }
                return kOk;
            });
        }
        std::vector<std::pair<uint32_t, uint32_t>> blocks;  // (plane, token block)
        for (uint32_t p = 0; p < planes; ++p)
            for (uint32_t b = 0; b < ceil_div(plan.planes[p].tokens, f.block_tokens); ++b)
                blocks.emplace_back(p, b);
        parallel_for(blocks.size(), threads, "row scales", [&](uint64_t i) {
            return scales_of_block(plan, blocks[i].first, blocks[i].second, floats);
        });
        for (uint32_t p = 0; p < planes; ++p) {
            const PlaneDesc& d = plan.planes[p];
            parts[p].scales.resize(d.tokens);
            for (uint32_t t = 0; t < d.tokens; ++t)
                parts[p].scales[t] = f32_to_bf16(floats[d.scale + t]);
        }
    }
    std::vector<std::vector<uint8_t>> symbols(planes);  // kept by the tables pass
    if (h.lossless() || !profile) {
        parallel_for(planes, threads, "tables", [&](uint64_t p) -> int32_t {
            parts[p].freqs = h.lossless() ? lossless_tables(plan, (uint32_t)p)
                                          : chunk_tables(plan, (uint32_t)p, &symbols[p]);
            return kOk;
        });
        for (uint32_t p = 0; p < planes; ++p) {
            set_tables(plan, p, parts[p].freqs);
            if (!h.lossless()) plan.planes[p].sym = symbols[p].data();
        }
    }

    // Not zeroed: each stream fills the end of its worst-case room, the rest stays untouched.
    std::unique_ptr<uint8_t[]> scratch(new uint8_t[scratch_bytes(plan)]);
    for (uint32_t p = 0; p < planes; ++p) {
        uint64_t n = stream_count(h.geom(p));
        parts[p].stream_size.resize(n);
        parts[p].stream.resize(n);
    }
    parallel_for(plan.streams.size(), threads, "streams", [&](uint64_t i) -> int32_t {
        const StreamRef& s = plan.streams[i];
        uint8_t* buf = scratch.get() + s.offset;
        uint64_t begin = 0;
        encode_stream_at(f, plan.planes[s.plane], s.index, floats, plan.tables(), buf, s.size,
                         &begin);
        parts[s.plane].stream_size[s.index] = (uint32_t)(s.size - begin);
        parts[s.plane].stream[s.index] = buf + begin;
        return kOk;
    });
    return write_frame(h, parts);
}

void decode_cpu(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                const std::vector<void*>& outputs, int threads) {
    Plan plan = plan_decode(data, size, profile);
    if (outputs.size() != plan.planes.size()) throw Error(kBadInput, "one output per plane");
    for (uint32_t p = 0; p < outputs.size(); ++p)
        memcpy(outputs[p], data + plan.exact_at[p], plan.header.exact_bytes(p));
    std::vector<void*> coded = coded_outputs(plan, outputs);
    parallel_for(plan.streams.size(), threads, "stream", [&](uint64_t i) {
        const StreamRef& s = plan.streams[i];
        return decode_stream_at(plan.params, plan.planes[s.plane], s, plan.floats.data(),
                                plan.tables(), data, coded[s.plane]);
    });
}

std::vector<uint8_t> plane_symbols(const void* x, uint8_t dtype, uint32_t tokens, uint32_t width,
                                   const uint16_t* mu, const uint16_t* sigma,
                                   uint32_t anchor_group, uint32_t anchor_bins, uint32_t bins) {
    Header h;
    h.mode = kModeQuantized;
    h.dtype = dtype;
    h.block_tokens = (uint16_t)anchor_group;
    h.group_channels = 1;
    h.anchor_group = (uint16_t)anchor_group;
    h.table_group = 1;
    LayerInfo l;
    l.tokens = tokens;
    l.width = width;
    l.anchor_bins[0] = l.anchor_bins[1] = (uint8_t)anchor_bins;
    l.bins[0] = l.bins[1] = (uint8_t)(anchor_group > 1 ? bins : 0);
    h.layers.push_back(l);
    Plan plan = plan_encode(h, {x, x});
    const PlaneDesc& d = plan.planes[0];
    float* floats = plan.floats.data();
    for (uint32_t c = 0; c < width; ++c) {
        floats[d.mu + c] = bf16_to_f32(mu[c]);
        floats[d.sigma + c] = bf16_to_f32(sigma[c]);
        if (!(floats[d.sigma + c] > 0.0f) || !is_finite(floats[d.sigma + c]) ||
            !is_finite(floats[d.mu + c]))
            throw Error(kBadInput, "channel statistics");
    }
    fill_scales(plan, 0, floats);
    std::vector<uint8_t> out((uint64_t)tokens * width);
    for (uint32_t t = 0; t < tokens; ++t)
        for (uint32_t c = 0; c < width; ++c)
            out[(uint64_t)t * width + c] = (uint8_t)symbol_at(plan.params, d, floats, t, c);
    return out;
}

}  // namespace kvp
