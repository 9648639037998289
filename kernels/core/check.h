// Status codes and the one bound-check macro used by every decoder function.
//
// Core functions run on the host and on CUDA devices, where exceptions do not exist:
// they return a Status, and the bindings turn any non-zero status into CodecError.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define KVP_HD __host__ __device__ __forceinline__
#else
#define KVP_HD inline
#endif

namespace kvp {

enum Status : int32_t {
    kOk = 0,
    kCorrupt = 1,       // the bitstream breaks a "must" rule of docs/bitstream.md
    kTruncated = 2,     // a read would go past the end of its buffer
    kBadInput = 3,      // the encoder was given values or parameters it cannot code
    kProfileMismatch = 4,  // profile tables do not fit the chunk
};

KVP_HD const char* status_message(int32_t s) {
    switch (s) {
        case kOk: return "ok";
        case kCorrupt: return "corrupt bitstream";
        case kTruncated: return "truncated bitstream";
        case kBadInput: return "invalid input";
        case kProfileMismatch: return "profile does not match the chunk";
        default: return "unknown error";
    }
}

}  // namespace kvp

// Every bound or consistency check: return `status` from the enclosing function when
// `cond` is false. Functions using it return kvp::Status (int32_t).
#define KVP_CHECK(cond, status)              \
    do {                                     \
        if (!(cond)) return (status);        \
    } while (0)

// Propagate a failed status from a callee.
#define KVP_TRY(expr)                        \
    do {                                     \
        int32_t kvp_status_ = (expr);        \
        if (kvp_status_ != ::kvp::kOk) return kvp_status_; \
    } while (0)
