// tools/emu: stand-in for cuda/include/ntkv_common.cuh that lets a kernel source compile as
// C++20 on the CPU and run with one std::thread per CUDA thread (one CTA at a time).
//
// What it models: __syncthreads as a barrier of the CTA's threads (an exited thread drops
// out, as on sm_70+), warp shuffles as a 32-thread exchange, shared memory as one global
// buffer filled with 0xFF (NaN) before every CTA so reads of unwritten shared memory show
// up, cp.async as a plain copy (the fallback path of the source), atomicMin under a mutex.
// What it does not model: the memory model beyond barriers, or timing.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "ntkv_params.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __shared__
#define __align__(n)

struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
struct dim3_ { unsigned x = 0, y = 0, z = 0; };

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half2 { __half a, b; };
struct __nv_bfloat162 { __nv_bfloat16 a, b; };

inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u; std::memcpy(&u, &x, 4);
    if (std::isnan(x)) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.a), __half2float(h.b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.a), __bfloat162float(h.b)}; }

using std::min;
using std::max;

namespace ntkv_emu {
inline uint32_t dynamic_smem_bytes = 0;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
inline float shfl_slots[64][32];
inline std::mutex atomic_mutex;
constexpr size_t SMEM_CAP = 256 * 1024;
// CUDA's `extern __shared__` buffer (one CTA runs at a time). The kernel's block-scope extern
// declaration lives in the source's namespace, so the harness defines it there and points
// this at it.
inline unsigned char* smem_ptr = nullptr;
}  // namespace ntkv_emu

inline thread_local dim3_ threadIdx;
inline thread_local dim3_ blockIdx;
inline dim3_ blockDim;
inline dim3_ gridDim;

inline void __syncthreads() { ntkv_emu::block_barrier->arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) { ntkv_emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    ntkv_emu::shfl_slots[warp][lane] = v;
    ntkv_emu::warp_barriers[warp]->arrive_and_wait();
    const float r = ntkv_emu::shfl_slots[warp][lane ^ (unsigned)o];
    ntkv_emu::warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> g(ntkv_emu::atomic_mutex);
    const unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}

namespace ntkv_emu {
// Runs `kernel` over the grid, one CTA at a time, each with blockDim.x threads.
inline void launch(dim3_ grid, dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel) {
    if (smem_bytes > SMEM_CAP) throw std::runtime_error("shared memory request too large");
    if (block.x > 64 * 32) throw std::runtime_error("block too large");
    gridDim = grid;
    blockDim = block;
    dynamic_smem_bytes = smem_bytes;
    for (unsigned by = 0; by < std::max(grid.y, 1u); ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::memset(smem_ptr, 0xFF, smem_bytes);
            std::barrier<> bar((std::ptrdiff_t)block.x);
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            warp_barriers.clear();
            for (unsigned w = 0; w < (block.x + 31) / 32; ++w) {
                const unsigned n = std::min(32u, block.x - 32 * w);
                warps.push_back(std::make_unique<std::barrier<>>((std::ptrdiff_t)n));
                warp_barriers.push_back(warps.back().get());
            }
            block_barrier = &bar;
            std::vector<std::thread> threads;
            threads.reserve(block.x);
            for (unsigned t = 0; t < block.x; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = dim3_{t, 0, 0};
                    blockIdx = dim3_{bx, by, 0};
                    kernel();
                    // An exited thread no longer takes part in barriers.
                    warp_barriers[t / 32]->arrive_and_drop();
                    block_barrier->arrive_and_drop();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}
}  // namespace ntkv_emu

namespace ntkv {
inline float to_f32(float x) { return x; }
inline float to_f32(__half x) { return __half2float(x); }
inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
}  // namespace ntkv
