// parallel_for over independent work items with a few std::threads; the first failed
// status wins and is thrown after every thread has joined.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "frame.h"

namespace kvp {

template <class F>
void parallel_for(uint64_t n, int threads, const char* what, F&& fn) {
    std::atomic<uint64_t> next{0};
    std::atomic<int32_t> failed{kOk};
    auto work = [&] {
        for (uint64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
            if (failed.load(std::memory_order_relaxed) != kOk) return;
            int32_t s = fn(i);
            if (s != kOk) {
                int32_t expected = kOk;
                failed.compare_exchange_strong(expected, s);
            }
        }
    };
    uint64_t k = std::min<uint64_t>(threads > 0 ? (uint64_t)threads : 1, n);
    std::vector<std::thread> pool;
    for (uint64_t t = 1; t < k; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    ensure(failed.load(), what);
}

}  // namespace kvp
