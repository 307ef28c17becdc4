// tools/emu/include/emu_runtime.h: the CPU runtime shared by every kernel emulation (decode,
// attention, quant, ntk). A kernel source compiles as C++20 and runs with one std::thread per
// CUDA thread, one CTA at a time over a 1-, 2- or 3-D grid (1-D blocks).
//
// Modelled here:
//  - the CUDA vector and 16-bit float types with their CUDA sizes and alignment (UBSan reports
//    a misaligned vector access), and the conversions and intrinsics the kernels use: f16 and
//    bf16 round-to-nearest-even, a NaN converting to the canonical NaN 0x7fff as cvt.rn does;
//    the _rn arithmetic intrinsics as plain IEEE ops (build with -ffp-contract=off so nothing
//    is fused that the kernel did not fuse);
//  - __syncthreads as a barrier of the CTA's threads and __syncwarp as one of the warp's; an
//    exited thread drops out of both (as on sm_70+);
//  - __shfl_xor_sync as a warp collective (emu_ptx.h): all 32 lanes must reach the same
//    collective in step, or the run aborts;
//  - shared memory: the harness's `extern __shared__` buffer (ntkv_emu::smem_ptr, SMEM_CAP
//    bytes), filled with 0xFF (NaN as f32, tf32, f16 and bf16) before every CTA, with the bytes
//    past the launch's dynamic size poisoned for AddressSanitizer during the launch;
//  - 64-bit atomicMin / atomicMax under a mutex.
// Not modelled: timing, the memory model beyond barriers and cp.async groups, bank conflicts,
// register limits, multi-dimensional blocks.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define NTKV_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define NTKV_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define NTKV_EMU_POISON(p, n) ((void)(p), (void)(n))
#define NTKV_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

// ---- Types ----------------------------------------------------------------------------------
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return uint2{a, b}; }
struct dim3_ { unsigned x = 0, y = 0, z = 0; };

struct alignas(2) __half { uint16_t bits; };
struct alignas(2) __nv_bfloat16 { uint16_t bits; };
struct alignas(4) __half2 { __half a, b; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 a, b; };

// ---- Bit casts and conversions --------------------------------------------------------------
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
// IEEE conversion, round to nearest even; a NaN becomes CUDA's canonical f16 NaN (0x7fff).
inline __half __float2half_rn(float x) {
    if (std::isnan(x)) return __half{0x7fffu};
    const _Float16 f = (_Float16)x;
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.bits << 16); }
// Round to nearest even; a NaN becomes CUDA's canonical bf16 NaN (0x7fff, CUDART_NAN_BF16).
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    if (std::isnan(x)) return __nv_bfloat16{0x7fffu};
    uint32_t u = __float_as_uint(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.a), __half2float(h.b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.a), __bfloat162float(h.b)}; }

// ---- Arithmetic intrinsics ------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }
using std::fabs;
using std::isfinite;
using std::max;
using std::min;

// ---- Thread geometry and CTA state ----------------------------------------------------------
inline thread_local dim3_ threadIdx;
inline thread_local dim3_ blockIdx;
inline dim3_ blockDim;
inline dim3_ gridDim;

namespace ntkv_emu {
constexpr size_t SMEM_CAP = 256 * 1024;
constexpr unsigned MAX_WARPS = 64;
inline uint32_t dynamic_smem_bytes = 0;
// CUDA's `extern __shared__` buffer, SMEM_CAP bytes (one CTA runs at a time). The kernel's
// block-scope extern declaration lives in the source's namespace, so the harness defines it
// there and points this at it; a harness whose kernels use no shared memory may leave it null.
inline unsigned char* smem_ptr = nullptr;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
inline std::mutex atomic_mutex;

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "emu: %s (thread %u of block (%u, %u, %u))\n", what, threadIdx.x, blockIdx.x, blockIdx.y,
                 blockIdx.z);
    std::abort();
}
inline void warp_sync() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }
}  // namespace ntkv_emu

inline void __syncthreads() { ntkv_emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) ntkv_emu::die("__syncwarp with a partial mask is not modelled");
    ntkv_emu::warp_sync();
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> g(ntkv_emu::atomic_mutex);
    const unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> g(ntkv_emu::atomic_mutex);
    const unsigned long long old = *p;
    if (v > old) *p = v;
    return old;
}

namespace ntkv_emu {
inline void thread_exit();  // emu_ptx.h: cp.async bookkeeping of an exiting thread

// Runs `kernel` over the grid (x fastest), one CTA at a time, each with block.x threads and
// `smem_bytes` of dynamic shared memory.
inline void launch(dim3_ grid, dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel) {
    if (smem_bytes > SMEM_CAP) throw std::runtime_error("shared memory request too large");
    if (smem_bytes > 0 && smem_ptr == nullptr) throw std::runtime_error("shared memory requested but ntkv_emu::smem_ptr unset");
    if (block.x == 0 || block.x > MAX_WARPS * 32) throw std::runtime_error("bad block size");
    if (std::max(block.y, 1u) != 1 || std::max(block.z, 1u) != 1) throw std::runtime_error("only 1-D blocks are modelled");
    gridDim = dim3_{grid.x, std::max(grid.y, 1u), std::max(grid.z, 1u)};
    blockDim = dim3_{block.x, 1, 1};
    dynamic_smem_bytes = smem_bytes;
    if (smem_ptr != nullptr) {
        NTKV_EMU_UNPOISON(smem_ptr, SMEM_CAP);
        NTKV_EMU_POISON(smem_ptr + smem_bytes, SMEM_CAP - smem_bytes);
    }
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
            for (unsigned bx = 0; bx < gridDim.x; ++bx) {
                if (smem_bytes > 0) std::memset(smem_ptr, 0xFF, smem_bytes);
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
                        blockIdx = dim3_{bx, by, bz};
                        kernel();
                        thread_exit();
                        // An exited thread no longer takes part in barriers.
                        warp_barriers[t / 32]->arrive_and_drop();
                        block_barrier->arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
            }
    if (smem_ptr != nullptr) NTKV_EMU_UNPOISON(smem_ptr, SMEM_CAP);
}
}  // namespace ntkv_emu
