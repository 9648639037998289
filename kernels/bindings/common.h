// Argument conversion shared by the CPU and CUDA extension modules: arrays to plane
// pointers, Python profile tuples to ProfileData, headers to dicts, Error to CodecError.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../host/frame.h"
#include "../host/plan.h"

namespace nb = nanobind;

namespace kvp::bind {

using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U16 = nb::ndarray<const uint16_t, nb::c_contig, nb::device::cpu>;
// (mu bits, sigma bits, anchor freqs [width, anchor bins], delta freqs or None)
using ProfileTuple = std::tuple<U16, U16, U16, std::optional<U16>>;
// (tokens, width, key bins, value bins, key anchor bins, value anchor bins)
using LayerTuple = std::tuple<uint32_t, uint32_t, uint8_t, uint8_t, uint8_t, uint8_t>;

inline void register_codec_error(nb::module_& m) {
    static nb::object codec_error =
        nb::module_::import_("kvpool.kernels.errors").attr("CodecError");
    m.attr("CodecError") = codec_error;
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const Error& e) {
            PyErr_SetString(codec_error.ptr(), e.what());
        }
    });
}

inline uint8_t dtype_of(const nb::dlpack::dtype& d) {
    using nb::dlpack::dtype_code;
    if (d.lanes == 1 && d.code == (uint8_t)dtype_code::Float && d.bits == 16) return kF16;
    if (d.lanes == 1 && d.code == (uint8_t)dtype_code::Bfloat && d.bits == 16) return kBF16;
    if (d.lanes == 1 && d.code == (uint8_t)dtype_code::Float && d.bits == 32) return kF32;
    throw Error(kBadInput, "dtype must be float16, bfloat16 or float32");
}

inline Header make_header(uint8_t dtype, bool lossless, const std::string& level,
                          uint16_t block_tokens, uint16_t group_channels, uint16_t anchor_group,
                          uint16_t table_group, uint8_t exact_rows,
                          const std::vector<LayerTuple>& layers,
                          const std::optional<nb::bytes>& profile_hash, bool contexts) {
    Header h;
    h.mode = lossless ? kModeLossless : kModeQuantized;
    h.dtype = dtype;
    h.block_tokens = block_tokens;
    h.group_channels = group_channels;
    h.anchor_group = anchor_group;
    h.table_group = table_group;
    h.exact_rows = exact_rows;
    if (level.size() > kMaxLevelName) throw Error(kBadInput, "level name too long");
    h.level = level;
    if (profile_hash) {
        if (profile_hash->size() != 16) throw Error(kBadInput, "profile hash must be 16 bytes");
        h.flags |= kFlagProfile;
        memcpy(h.profile_hash, profile_hash->c_str(), 16);
    }
    if (contexts) h.flags |= kFlagContexts;
    for (const LayerTuple& t : layers) {
        LayerInfo l;
        std::tie(l.tokens, l.width, l.bins[0], l.bins[1], l.anchor_bins[0], l.anchor_bins[1]) = t;
        h.layers.push_back(l);
    }
    // The encoder only writes frames its decoder accepts.
    if (validate(h) != kOk) throw Error(kBadInput, "codec parameters break the format's rules");
    return h;
}

inline ProfileData profile_data(const std::vector<ProfileTuple>& planes) {
    ProfileData out;
    for (const ProfileTuple& t : planes) {
        ProfilePlane p;
        const U16& mu = std::get<0>(t);
        const U16& sigma = std::get<1>(t);
        const U16& anchor = std::get<2>(t);
        if (mu.size() != sigma.size()) throw Error(kProfileMismatch, "stats sizes differ");
        p.mu = mu.data();
        p.sigma = sigma.data();
        p.width = mu.size();
        p.anchor_freqs = anchor.data();
        p.anchor_len = anchor.size();
        if (const std::optional<U16>& delta = std::get<3>(t)) {
            p.delta_freqs = delta->data();
            p.delta_len = delta->size();
        }
        out.push_back(p);
    }
    return out;
}

inline nb::dict header_dict(const Header& h) {
    nb::dict d;
    d["mode"] = h.mode;
    d["dtype"] = h.dtype;
    d["flags"] = h.flags;
    d["level"] = h.level;
    d["profile_hash"] = nb::bytes((const char*)h.profile_hash, 16);
    d["block_tokens"] = h.block_tokens;
    d["group_channels"] = h.group_channels;
    d["anchor_group"] = h.anchor_group;
    d["table_group"] = h.table_group;
    d["exact_rows"] = h.exact_rows;
    nb::list layers;
    for (const LayerInfo& l : h.layers)
        layers.append(nb::make_tuple(l.tokens, l.width, l.bins[0], l.bins[1], l.anchor_bins[0],
                                     l.anchor_bins[1]));
    d["layers"] = layers;
    d["header_size"] = h.header_size;
    d["frame_size"] = h.frame_size;
    return d;
}

}  // namespace kvp::bind
