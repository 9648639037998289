// kvpool.kernels._codec_cuda: the CUDA path of the codec. Imports without a GPU or driver
// (the CUDA runtime is linked statically); device_count() says whether it can run.
// Compiled profiles are the CPU module's CompiledProfile objects (nanobind shares bound
// types between the extension modules of one build).
#include "../cuda/codec_cuda.h"
#include "common.h"

using namespace kvp;
using namespace kvp::bind;

namespace {

using CudaPlane = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cuda>;

void require_device() {
    if (cuda_device_count() == 0) throw Error(kBadInput, "no CUDA device");
}

nb::bytes encode(const std::vector<CudaPlane>& planes, bool lossless, const std::string& level,
                 uint16_t block_tokens, uint16_t group_channels, uint16_t anchor_group,
                 uint16_t table_group, uint8_t exact_rows,
                 const std::vector<LayerTuple>& layers,
                 const std::optional<nb::bytes>& profile_hash, const CompiledProfile* profile,
                 bool contexts) {
    require_device();
    if (planes.size() != 2 * layers.size()) throw Error(kBadInput, "two planes per layer");
    uint8_t dtype = planes.empty() ? (uint8_t)kF16 : dtype_of(planes[0].dtype());
    std::vector<const void*> inputs;
    for (size_t p = 0; p < planes.size(); ++p) {
        const LayerTuple& l = layers[p / 2];
        if (dtype_of(planes[p].dtype()) != dtype) throw Error(kBadInput, "mixed dtypes");
        if (planes[p].shape(0) != std::get<0>(l) || planes[p].shape(1) != std::get<1>(l))
            throw Error(kBadInput, "plane shape differs from its layer entry");
        inputs.push_back(planes[p].data());
    }
    Header h = make_header(dtype, lossless, level, block_tokens, group_channels, anchor_group,
                           table_group, exact_rows, layers, profile_hash, contexts);
    if (profile_hash.has_value() != (profile != nullptr))
        throw Error(kBadInput, "profile hash and tables go together");
    std::vector<uint8_t> frame;
    {
        nb::gil_scoped_release release;
        frame = encode_cuda(h, inputs, profile);
    }
    return nb::bytes((const char*)frame.data(), frame.size());
}

void decode(const Bytes& data, const std::vector<CudaPlane>& outputs,
            const CompiledProfile* profile) {
    require_device();
    Header h = parse_header(data.data(), data.size());
    if (outputs.size() != h.planes()) throw Error(kBadInput, "one output per plane");
    std::vector<void*> outs;
    for (size_t p = 0; p < outputs.size(); ++p) {
        const LayerInfo& l = h.layer_of((uint32_t)p);
        if (dtype_of(outputs[p].dtype()) != h.dtype || outputs[p].shape(0) != l.tokens ||
            outputs[p].shape(1) != l.width)
            throw Error(kBadInput, "output shape or dtype differs from the frame");
        outs.push_back(outputs[p].data());
    }
    nb::gil_scoped_release release;
    decode_cuda(data.data(), data.size(), profile, outs);
}

}  // namespace

NB_MODULE(_codec_cuda, m) {
    m.doc() = "CUDA path of the kvpool codec (bitstream v1, docs/bitstream.md)";
    register_codec_error(m);
    m.def("device_count", &cuda_device_count, "CUDA devices usable here (0 without any).");
    m.def("encode", &encode, nb::arg("planes"), nb::arg("lossless"), nb::arg("level"),
          nb::arg("block_tokens"), nb::arg("group_channels"), nb::arg("anchor_group"),
          nb::arg("table_group"), nb::arg("exact_rows"), nb::arg("layers"),
          nb::arg("profile_hash").none(),
          nb::arg("profile").none(), nb::arg("contexts"),
          "Encode device planes into a frame with a zero checksum (same bytes as the CPU).");
    m.def("decode", &decode, nb::arg("data"), nb::arg("outputs"), nb::arg("profile").none(),
          "Decode a host frame (checksum verified) into device outputs.");
}
