// CUDA kernels of the codec: thin loops over the core's __host__ __device__ functions
// (core/planned.h), one thread per channel, row, element or stream. The host side reuses the
// CPU path's plans, tables and frame writer, so both paths produce the same bytes.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "../core/planned.h"
#include "codec_cuda.h"

namespace kvp {
namespace {

void cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

// The current device's stream-ordered memory pool keeps what is freed (instead of handing it
// back to the driver at every synchronization), so that a call's buffers cost no cudaMalloc.
void keep_freed_memory() {
    static thread_local int configured = -1;
    int device = 0;
    cuda_check(cudaGetDevice(&device), "device");
    if (configured == device) return;
    cudaMemPool_t pool;
    cuda_check(cudaDeviceGetDefaultMemPool(&pool, device), "memory pool");
    uint64_t keep = UINT64_MAX;
    cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "pool");
    configured = device;
}

// Owned device memory, allocated from the pool on the default stream (the stream every
// kernel and copy here runs on).
template <class T>
struct DeviceArray {
    T* ptr = nullptr;
    size_t n = 0;
    explicit DeviceArray(size_t count) : n(count) {
        keep_freed_memory();
        if (n) cuda_check(cudaMallocAsync((void**)&ptr, n * sizeof(T), 0), "malloc");
    }
    DeviceArray(const T* host, size_t count) : DeviceArray(count) { upload(host); }
    ~DeviceArray() { if (ptr) cudaFreeAsync(ptr, 0); }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    void upload(const T* host) {
        if (n) cuda_check(cudaMemcpy(ptr, host, n * sizeof(T), cudaMemcpyHostToDevice), "upload");
    }
    void download(T* host) const {
        if (n) cuda_check(cudaMemcpy(host, ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    }
    void zero() { if (n) cuda_check(cudaMemset(ptr, 0, n * sizeof(T)), "memset"); }
};

constexpr int kThreads = 128;

inline unsigned blocks_for(uint64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

__device__ void fail(int32_t* status, int32_t s) {
    if (s != kOk) atomicCAS(status, kOk, s);
}

__global__ void stats_kernel(FrameParams f, const PlaneDesc* planes, uint32_t p, float* floats,
                             uint16_t* bits, int32_t* status) {
    uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    const PlaneDesc& d = planes[p];
    if (c >= d.width) return;
    uint16_t mu, sigma;
    int32_t s = channel_stats(d.x, f.dtype, d.tokens, d.width, c, &mu, &sigma);
    fail(status, s);
    if (s != kOk) return;
    bits[c] = mu;
    bits[d.width + c] = sigma;
    floats[d.mu + c] = bf16_to_f32(mu);
    floats[d.sigma + c] = bf16_to_f32(sigma);
}

__global__ void scales_kernel(FrameParams f, const PlaneDesc* planes, uint32_t p, int anchors,
                              float* floats, int32_t* status) {
    uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    const PlaneDesc& d = planes[p];
    if (t >= d.tokens || is_anchor(t, f.anchor_group) != (anchors != 0)) return;
    fail(status, row_scale_at(f, d, floats, t));
}

__global__ void symbol_hist_kernel(FrameParams f, const PlaneDesc* planes, uint32_t p,
                                   const float* floats, unsigned long long* anchor,
                                   unsigned long long* delta) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const PlaneDesc& d = planes[p];
    if (i >= (uint64_t)d.tokens * d.width) return;
    uint32_t t = (uint32_t)(i / d.width), c = (uint32_t)(i % d.width);
    bool a = is_anchor(t, f.anchor_group);
    uint32_t n = (uint32_t)(2 * (a ? d.ha : d.hd) + 1);
    uint32_t sym = symbol_at(f, d, floats, t, c);
    atomicAdd((a ? anchor : delta) + (uint64_t)(c / f.table_group) * n + sym, 1ull);
}

__global__ void byte_hist_kernel(const uint8_t* x, uint64_t elems, uint32_t elem,
                                 unsigned long long* counts) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= elems) return;
    for (uint32_t k = 0; k < elem; ++k) atomicAdd(counts + k * kMaxAlphabet + x[i * elem + k], 1ull);
}

__global__ void encode_kernel(FrameParams f, const PlaneDesc* planes, const StreamRef* streams,
                              uint64_t n, const float* floats, const uint32_t* cum,
                              uint8_t* scratch, uint64_t* begin) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const StreamRef& s = streams[i];
    encode_stream_at(f, planes[s.plane], s.index, floats, cum, scratch + s.offset, s.size,
                     &begin[i]);
}

// The frame's own tables, built and checked on the device: blockIdx.y is the plane.
__global__ void tables_kernel(FrameParams f, const PlaneDesc* planes, const uint8_t* data,
                              uint32_t* cum, int32_t* status) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const PlaneDesc& d = planes[blockIdx.y];
    if (i >= plane_tables(f, d)) return;
    fail(status, build_plane_table(f, d, data + d.freqs_at, i, cum));
}

__global__ void decode_kernel(FrameParams f, const PlaneDesc* planes, const StreamRef* streams,
                              uint64_t n, const float* floats, const uint32_t* cum,
                              const uint8_t* data, void* const* outputs, int32_t* status) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const StreamRef& s = streams[i];
    fail(status, decode_stream_at(f, planes[s.plane], s, floats, cum, data, outputs[s.plane]));
}

// A compiled profile's tables on the current device: uploaded at first use, then kept with
// the profile (one device at a time; another device uploads its own copy).
std::shared_ptr<void> device_tables(const CompiledProfile& profile) {
    static std::mutex lock;
    std::lock_guard<std::mutex> guard(lock);
    int device = 0;
    cuda_check(cudaGetDevice(&device), "device");
    if (!profile.device_cum || profile.device != device) {
        void* ptr = nullptr;
        size_t bytes = profile.cum.size() * sizeof(uint32_t);
        cuda_check(cudaMalloc(&ptr, bytes ? bytes : 4), "malloc");
        profile.device_cum.reset(ptr, [device](void* p) {
            int current = 0;
            cudaGetDevice(&current);
            cudaSetDevice(device);
            cudaFree(p);
            cudaSetDevice(current);
        });
        profile.device = device;
        cuda_check(cudaMemcpy(ptr, profile.cum.data(), bytes, cudaMemcpyHostToDevice), "upload");
    }
    return profile.device_cum;  // the caller's copy keeps it while it is in use
}

void check_status(const DeviceArray<int32_t>& status, const char* what) {
    cuda_check(cudaDeviceSynchronize(), what);
    int32_t s = kOk;
    status.download(&s);
    ensure(s, what);
}

std::vector<uint16_t> normalized(const std::vector<unsigned long long>& counts, uint32_t n) {
    std::vector<uint64_t> c(counts.begin(), counts.end());
    std::vector<uint16_t> freqs(c.size());
    for (size_t i = 0; i < c.size(); i += n) normalize_freqs(&c[i], n, &freqs[i]);
    return freqs;
}

}  // namespace

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

std::vector<uint8_t> encode_cuda(const Header& header, const std::vector<const void*>& inputs,
                                 const CompiledProfile* profile) {
    Plan plan = plan_encode(header, inputs);
    const Header& h = plan.header;
    const FrameParams& f = plan.params;
    uint32_t planes = h.planes();
    std::vector<PlanePart> parts(planes);
    for (uint32_t p = 0; p < planes; ++p) {
        parts[p].exact.resize(h.exact_bytes(p));
        if (!parts[p].exact.empty())
            cuda_check(cudaMemcpy(parts[p].exact.data(), inputs[p], parts[p].exact.size(),
                                  cudaMemcpyDeviceToHost), "exact rows");
    }
    DeviceArray<PlaneDesc> d_planes(plan.planes.data(), plan.planes.size());
    DeviceArray<int32_t> status(1);
    status.zero();
    if (!h.lossless() && profile) apply_profile(plan, *profile);
    DeviceArray<float> d_floats(plan.floats.data(), plan.floats.size());

    if (!h.lossless()) {
        for (uint32_t p = 0; p < planes && !profile; ++p) {
            const PlaneDesc& d = plan.planes[p];
            DeviceArray<uint16_t> bits(2ull * d.width);
            stats_kernel<<<blocks_for(d.width), kThreads>>>(f, d_planes.ptr, p, d_floats.ptr,
                                                           bits.ptr, status.ptr);
            check_status(status, "channel statistics");
            std::vector<uint16_t> host(2ull * d.width);
            bits.download(host.data());
            parts[p].mu.assign(host.begin(), host.begin() + d.width);
            parts[p].sigma.assign(host.begin() + d.width, host.end());
        }
        for (uint32_t p = 0; p < planes; ++p)
            for (int anchors = 1; anchors >= 0; --anchors)
                scales_kernel<<<blocks_for(plan.planes[p].tokens), kThreads>>>(
                    f, d_planes.ptr, p, anchors, d_floats.ptr, status.ptr);
        check_status(status, "row scales");
        d_floats.download(plan.floats.data());
        for (uint32_t p = 0; p < planes; ++p) {
            const PlaneDesc& d = plan.planes[p];
            parts[p].scales.resize(d.tokens);
            for (uint32_t t = 0; t < d.tokens; ++t)
                parts[p].scales[t] = f32_to_bf16(plan.floats[d.scale + t]);
        }
    }
    if (h.lossless() || !profile) {
        for (uint32_t p = 0; p < planes; ++p) {
            const PlaneDesc& d = plan.planes[p];
            uint64_t elems = (uint64_t)d.tokens * d.width;
            if (h.lossless()) {
                uint32_t elem = dtype_size(f.dtype);
                DeviceArray<unsigned long long> counts((uint64_t)elem * kMaxAlphabet);
                counts.zero();
                if (elems)
                    byte_hist_kernel<<<blocks_for(elems), kThreads>>>((const uint8_t*)d.x, elems,
                                                                     elem, counts.ptr);
                cuda_check(cudaDeviceSynchronize(), "byte histogram");
                std::vector<unsigned long long> host(counts.n);
                counts.download(host.data());
                parts[p].freqs = normalized(host, kMaxAlphabet);
            } else {
                uint32_t nt = h.n_tables(p), na = 2 * d.ha + 1, nd = 2 * d.hd + 1;
                DeviceArray<unsigned long long> anchor((uint64_t)nt * na), delta((uint64_t)nt * nd);
                anchor.zero();
                delta.zero();
                if (elems)
                    symbol_hist_kernel<<<blocks_for(elems), kThreads>>>(
                        f, d_planes.ptr, p, d_floats.ptr, anchor.ptr, delta.ptr);
                cuda_check(cudaDeviceSynchronize(), "symbol histogram");
                std::vector<unsigned long long> ha(anchor.n), hd(delta.n);
                anchor.download(ha.data());
                delta.download(hd.data());
                parts[p].freqs = normalized(ha, na);
                if (h.anchor_group > 1) {
                    std::vector<uint16_t> more = normalized(hd, nd);
                    parts[p].freqs.insert(parts[p].freqs.end(), more.begin(), more.end());
                }
            }
            set_tables(plan, p, parts[p].freqs);
        }
    }

    std::shared_ptr<void> shared = plan.shared_cum ? device_tables(*profile) : nullptr;
    DeviceArray<uint32_t> d_cum(shared ? 0 : plan.cum_words);
    if (!shared) d_cum.upload(plan.cum.data());
    const uint32_t* cum = shared ? (const uint32_t*)shared.get() : d_cum.ptr;
    DeviceArray<StreamRef> d_streams(plan.streams.data(), plan.streams.size());
    uint64_t n = plan.streams.size();
    DeviceArray<uint8_t> d_scratch(scratch_bytes(plan));
    DeviceArray<uint64_t> d_begin(n);
    if (n)
        encode_kernel<<<blocks_for(n), kThreads>>>(f, d_planes.ptr, d_streams.ptr, n, d_floats.ptr,
                                                  cum, d_scratch.ptr, d_begin.ptr);
    cuda_check(cudaDeviceSynchronize(), "stream encoding");
    std::vector<uint8_t> scratch(d_scratch.n);
    std::vector<uint64_t> begin(n);
    d_scratch.download(scratch.data());
    d_begin.download(begin.data());
    for (uint32_t p = 0; p < planes; ++p) {
        uint64_t count = stream_count(h.geom(p));
        parts[p].stream_size.resize(count);
        parts[p].stream.resize(count);
    }
    for (uint64_t i = 0; i < n; ++i) {
        const StreamRef& s = plan.streams[i];
        parts[s.plane].stream_size[s.index] = (uint32_t)(s.size - begin[i]);
        parts[s.plane].stream[s.index] = scratch.data() + s.offset + begin[i];
    }
    return write_frame(h, parts);
}

void decode_cuda(const uint8_t* data, uint64_t size, const CompiledProfile* profile,
                 const std::vector<void*>& outputs) {
    Plan plan = plan_decode(data, size, profile, /*host_tables=*/false);
    if (outputs.size() != plan.planes.size()) throw Error(kBadInput, "one output per plane");
    for (uint32_t p = 0; p < outputs.size(); ++p)
        if (plan.header.exact_bytes(p))
            cuda_check(cudaMemcpy(outputs[p], data + plan.exact_at[p], plan.header.exact_bytes(p),
                                  cudaMemcpyHostToDevice), "exact rows");
    std::vector<void*> coded = coded_outputs(plan, outputs);
    uint64_t n = plan.streams.size();
    if (!n) return;
    DeviceArray<uint8_t> d_data(data, size);
    DeviceArray<PlaneDesc> d_planes(plan.planes.data(), plan.planes.size());
    DeviceArray<StreamRef> d_streams(plan.streams.data(), n);
    DeviceArray<float> d_floats(plan.floats.data(), plan.floats.size());
    DeviceArray<int32_t> status(1);
    status.zero();
    // A profile's tables are uploaded once per device and kept with it; the frame's own
    // are built on the device.
    std::shared_ptr<void> shared = plan.shared_cum ? device_tables(*profile) : nullptr;
    DeviceArray<uint32_t> d_cum(shared ? 0 : plan.cum_words);
    const uint32_t* cum = shared ? (const uint32_t*)shared.get() : d_cum.ptr;
    if (!shared) {
        uint64_t most = 0;
        for (const PlaneDesc& d : plan.planes) most = std::max(most, plane_tables(plan.params, d));
        dim3 grid(blocks_for(most), (unsigned)plan.planes.size());
        if (most) tables_kernel<<<grid, kThreads>>>(plan.params, d_planes.ptr, d_data.ptr,
                                                    d_cum.ptr, status.ptr);
        check_status(status, "tables");
    }
    DeviceArray<void*> d_outs(coded.data(), coded.size());
    decode_kernel<<<blocks_for(n), kThreads>>>(plan.params, d_planes.ptr, d_streams.ptr, n,
                                              d_floats.ptr, cum, d_data.ptr, d_outs.ptr,
                                              status.ptr);
    check_status(status, "stream");
}

}  // namespace kvp
