// kvpool.kernels._codec: the CPU path of the codec (encode, decode, header parsing, and the
// quantizer's symbols for building profiles). Every call releases the GIL while it works.
#include <cstring>

#include "../host/cpu.h"
#include "common.h"

using namespace kvp;
using namespace kvp::bind;

namespace {

using Plane = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu>;

uint8_t common_dtype(const std::vector<Plane>& planes, const std::vector<LayerTuple>& layers) {
    if (planes.size() != 2 * layers.size()) throw Error(kBadInput, "two planes per layer");
    uint8_t dtype = planes.empty() ? (uint8_t)kF16 : dtype_of(planes[0].dtype());
    for (size_t p = 0; p < planes.size(); ++p) {
        if (dtype_of(planes[p].dtype()) != dtype) throw Error(kBadInput, "mixed dtypes");
        const LayerTuple& l = layers[p / 2];
        if (planes[p].shape(0) != std::get<0>(l) || planes[p].shape(1) != std::get<1>(l))
            throw Error(kBadInput, "plane shape differs from its layer entry");
    }
    return dtype;
}

nb::bytes encode(const std::vector<Plane>& planes, bool lossless, const std::string& level,
                 uint16_t block_tokens, uint16_t group_channels, uint16_t anchor_group,
                 uint16_t table_group, uint8_t exact_rows,
                 const std::vector<LayerTuple>& layers,
                 const std::optional<nb::bytes>& profile_hash, const CompiledProfile* profile,
                 bool contexts, int threads) {
    uint8_t dtype = common_dtype(planes, layers);
    Header h = make_header(dtype, lossless, level, block_tokens, group_channels, anchor_group,
                           table_group, exact_rows, layers, profile_hash, contexts);
    if (profile_hash.has_value() != (profile != nullptr))
        throw Error(kBadInput, "profile hash and tables go together");
    std::vector<const void*> inputs;
    for (const Plane& p : planes) inputs.push_back(p.data());
    std::vector<uint8_t> frame;
    {
        nb::gil_scoped_release release;
        frame = encode_cpu(h, inputs, profile, threads);
    }
    return nb::bytes((const char*)frame.data(), frame.size());
}

nb::dict parse(const Bytes& data) { return header_dict(parse_header(data.data(), data.size())); }

void decode(const Bytes& data, const std::vector<nb::ndarray<nb::ndim<2>, nb::c_contig>>& outputs,
            const CompiledProfile* profile, int threads) {
    std::vector<void*> outs;
    for (const auto& o : outputs) {
        if (o.device_type() != nb::device::cpu::value) throw Error(kBadInput, "outputs on the CPU");
        outs.push_back(o.data());
    }
    Header h = parse_header(data.data(), data.size());
    if (outs.size() != h.planes()) throw Error(kBadInput, "one output per plane");
    for (size_t p = 0; p < outs.size(); ++p) {
        const LayerInfo& l = h.layer_of((uint32_t)p);
        if (dtype_of(outputs[p].dtype()) != h.dtype || outputs[p].shape(0) != l.tokens ||
            outputs[p].shape(1) != l.width)
            throw Error(kBadInput, "output shape or dtype differs from the frame");
    }
    nb::gil_scoped_release release;
    decode_cpu(data.data(), data.size(), profile, outs, threads);
}

// A profile's tables for frames of one layout (the layers' shapes and bins, anchor group,
// contexts), built once and shared by every frame of that layout.
CompiledProfile* compile(const std::vector<LayerTuple>& layers, uint16_t block_tokens,
                         uint16_t group_channels, uint16_t anchor_group, bool contexts,
                         const nb::bytes& profile_hash, const std::vector<ProfileTuple>& profile) {
    Header h = make_header(kF16, false, "compiled", block_tokens, group_channels, anchor_group, 1,
                           0, layers, profile_hash, contexts);
    ProfileData data = profile_data(profile);
    nb::gil_scoped_release release;
    return new CompiledProfile(compile_profile(h, data));
}

nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>> symbols(const Plane& x, const U16& mu, const U16& sigma,
                                                     uint16_t anchor_group, uint8_t anchor_bins,
                                                     uint8_t bins) {
    uint32_t tokens = (uint32_t)x.shape(0), width = (uint32_t)x.shape(1);
    if (mu.size() != width || sigma.size() != width) throw Error(kBadInput, "stats width");
    Header h;
    h.mode = kModeQuantized;
    h.dtype = dtype_of(x.dtype());
    h.block_tokens = h.anchor_group = anchor_group;
    h.group_channels = 1;
    LayerInfo l;
    l.anchor_bins[0] = l.anchor_bins[1] = anchor_bins;
    l.bins[0] = l.bins[1] = anchor_group > 1 ? bins : 0;
    h.layers.push_back(l);
    if (validate(h) != kOk) throw Error(kBadInput, "quantizer parameters");
    auto* out = new std::vector<uint8_t>();
    {
        nb::gil_scoped_release release;
        *out = plane_symbols(x.data(), h.dtype, tokens, width, mu.data(), sigma.data(),
                             anchor_group, anchor_bins, bins);
    }
    nb::capsule owner(out, [](void* p) noexcept { delete (std::vector<uint8_t>*)p; });
    return nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>(out->data(), {tokens, width}, owner);
}

nb::ndarray<nb::numpy, uint16_t, nb::ndim<2>> normalize(
    const nb::ndarray<const uint64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>& counts) {
    size_t rows = counts.shape(0), n = counts.shape(1);
    if (n < 2 || n > kMaxAlphabet) throw Error(kBadInput, "alphabet of 2..256 symbols");
    auto* out = new std::vector<uint16_t>(rows * n);
    for (size_t r = 0; r < rows; ++r)
        normalize_freqs(counts.data() + r * n, (uint32_t)n, out->data() + r * n);
    nb::capsule owner(out, [](void* p) noexcept { delete (std::vector<uint16_t>*)p; });
    return nb::ndarray<nb::numpy, uint16_t, nb::ndim<2>>(out->data(), {rows, n}, owner);
}

}  // namespace

NB_MODULE(_codec, m) {
    m.doc() = "CPU path of the kvpool codec (bitstream v1, docs/bitstream.md)";
    register_codec_error(m);
    nb::class_<CompiledProfile>(m, "CompiledProfile",
                                "A profile's tables for frames of one layout (compile()).")
        .def_prop_ro("nbytes", [](const CompiledProfile& c) {
            return c.cum.size() * sizeof(uint32_t) + c.stats.size() * sizeof(float);
        }, "Bytes it holds.");
    m.def("compile", &compile, nb::arg("layers"), nb::arg("block_tokens"),
          nb::arg("group_channels"), nb::arg("anchor_group"), nb::arg("contexts"),
          nb::arg("profile_hash"), nb::arg("profile"), nb::rv_policy::take_ownership,
          "Check a profile's tables against a frame layout and build them for the coder.");
    m.def("encode", &encode, nb::arg("planes"), nb::arg("lossless"), nb::arg("level"),
          nb::arg("block_tokens"), nb::arg("group_channels"), nb::arg("anchor_group"),
          nb::arg("table_group"), nb::arg("exact_rows"), nb::arg("layers"),
          nb::arg("profile_hash").none(),
          nb::arg("profile").none(), nb::arg("contexts"), nb::arg("threads"),
          "Encode planes (layer-major, keys first) into a frame with a zero checksum.");
    m.def("parse", &parse, nb::arg("data"), "Parse and validate a frame header.");
    m.def("decode", &decode, nb::arg("data"), nb::arg("outputs"), nb::arg("profile").none(),
          nb::arg("threads"), "Decode a frame (checksum verified) into preallocated outputs.");
    m.def("symbols", &symbols, nb::arg("x"), nb::arg("mu"), nb::arg("sigma"),
          nb::arg("anchor_group"), nb::arg("anchor_bins"), nb::arg("bins"),
          "The quantizer's symbols of one plane, for building profile tables.");
    m.def("normalize", &normalize, nb::arg("counts"),
          "Symbol counts [tables, n] -> 16-bit frequencies summing to 2^16, each >= 1.");
    m.attr("PROB_BITS") = kProbBits;
    m.attr("MAX_GROUP_CHANNELS") = kMaxGroupChannels;
}
