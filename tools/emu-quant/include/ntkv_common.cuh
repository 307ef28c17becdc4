// tools/emu-quant: a CPU stand-in for cuda/include/ntkv_common.cuh, so that cuda/quant.cu
// compiles as C++20 and runs with one std::thread per CUDA thread (one block at a time).
//
// Modelled: threadIdx/blockIdx/blockDim/gridDim, warp shuffles (a 32-lane exchange between
// two barriers), __ldg, the _rn float intrinsics (plain IEEE ops; build with
// -ffp-contract=off so nothing is fused), f16 and bf16 round-to-nearest-even conversions,
// and atomicMax under a mutex. uint4/uint2 carry their CUDA alignment, so UBSan reports a
// misaligned vector access. Not modelled: timing, the memory model, divergence (a shuffle
// must be reached by all 32 lanes, which the kernels guarantee and this checks by deadlock).
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "ntkv_params.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };

inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return uint2{a, b}; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return (float)f;
}
inline __half __float2half_rn(float x) {
    _Float16 f = (_Float16)x;  // IEEE conversion, round to nearest even
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (std::isnan(x)) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::fabs;
inline float fabsf(float x) { return std::fabs(x); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float rintf(float x) { return std::rint(x); }
using std::isfinite;
inline int __ffs(int v) { return __builtin_ffs(v); }

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

struct dim3_ {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3_ threadIdx;
inline thread_local dim3_ blockIdx;
inline dim3_ blockDim;
inline dim3_ gridDim;

namespace emu {
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shfl_slots[32][32];
inline std::mutex atomic_mutex;
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    emu::shfl_slots[warp][lane] = v;
    emu::warp_barriers[warp]->arrive_and_wait();
    const float r = emu::shfl_slots[warp][lane ^ (unsigned)o];
    emu::warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> g(emu::atomic_mutex);
    const unsigned long long old = *p;
    if (v > old) *p = v;
    return old;
}

namespace emu {
// Runs `kernel` on a grid of (gx, gy) blocks of `threads` threads (a multiple of 32), one
// block at a time, one std::thread per CUDA thread.
inline void launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& kernel) {
    gridDim = dim3_{gx, gy, 1};
    blockDim = dim3_{threads, 1, 1};
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::vector<std::thread> ts;
            ts.reserve(threads);
            for (unsigned t = 0; t < threads; ++t) {
                ts.emplace_back([&, t, bx, by] {
                    threadIdx = dim3_{t, 0, 0};
                    blockIdx = dim3_{bx, by, 0};
                    kernel();
                });
            }
            for (auto& th : ts) th.join();
        }
    }
}
}  // namespace emu

namespace ntkv {
inline float to_f32(float x) { return x; }
inline float to_f32(__half x) { return __half2float(x); }
inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
}  // namespace ntkv
