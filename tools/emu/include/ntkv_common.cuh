// tools/emu: stand-in for cuda/include/ntkv_common.cuh that lets a kernel source compile as
// C++20 on the CPU and run with one std::thread per CUDA thread (one CTA at a time).
//
// What it models: __syncthreads as a barrier of the CTA's threads (an exited thread drops
// out, as on sm_70+), warp shuffles as a 32-thread exchange, shared memory as one global
// buffer filled with 0xFF (NaN) before every CTA so reads of unwritten shared memory show
// up, atomicMin under a mutex, and (for NTKV_EMULATE builds of kernels that wrap their inline
// PTX in small helpers, like cuda/attention.cu) mma.sync m16n8k16, ldmatrix.x4[.trans] and
// cp.async with commit/wait groups, from the PTX ISA (see the section at the end).
// cuda/decode.cu takes its own non-PTX fallback path for cp.async.
// What it does not model: the memory model beyond barriers and cp.async groups, timing, bank
// conflicts, register limits, or the tensor core's internal summation order (the emulated mma
// rounds the exact sum once).
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

#include "ntkv_params.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
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
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }
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
inline void cp_async_check_exit();
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
                    cp_async_check_exit();
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

// ---- Warp-collective PTX used by the tensor-core kernels (cuda/attention.cu) ----------------
//
// Written from the PTX ISA's descriptions, independently of any kernel's comments:
//  * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32. groupID = lane >> 2,
//    tig = lane % 4. A (16x16) is 8 elements a0..a7 in 4 .b32 registers ({a0,a1} in reg 0, ...,
//    the lower-numbered element in the lower 16 bits): row = groupID for a0,a1,a4,a5 and
//    groupID + 8 for a2,a3,a6,a7; col = 2 tig + (i & 1) for i < 4 and + 8 for i >= 4.
//    B (16x8) is b0..b3 in 2 registers: row = 2 tig + (i & 1) for i < 2 and + 8 for i >= 2;
//    col = groupID. C/D (16x8 f32) c0..c3: row = groupID for i < 2, groupID + 8 otherwise;
//    col = 2 tig + (i & 1).
//  * ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8 m + r supplies the 16-byte
//    aligned shared address of row r of matrix m; destination register m of lane l holds row
//    l >> 2, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m (lower element in the lower half);
//    with .trans it holds element (row 2 (l % 4), col l >> 2) and (row 2 (l % 4) + 1, col l >> 2).
//  * cp.async.cg.shared.global 16 bytes with src-size: copies src-size bytes, zero-fills the
//    rest, reads nothing when src-size is 0. The two extremes of when a copy may land are
//    modelled: deferred (the default: a copy lands only when the issuing thread waits for its
//    group, so a tile read before its wait shows up as NaN or stale data) and eager
//    (NTKV_EMU_CP_ASYNC=eager: it lands at issue, so a buffer overwritten while other threads
//    may still read it shows up as wrong data).
//
// Every collective deposits its operands in a per-warp slot, meets the warp at a barrier,
// checks that all 32 lanes execute the same collective (the .sync.aligned requirement; a
// divergent or exited lane aborts the run), computes its own outputs from the slot, and meets
// the warp again before the slot is reused.
namespace ntkv_emu {

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "emu: %s (thread %u of block %u)\n", what, threadIdx.x, blockIdx.x);
    std::abort();
}

struct WarpSlot {
    uint64_t tag;
    uint32_t u[8];
    float f[4];
};
inline WarpSlot warp_slots[64][32];
inline thread_local uint64_t collective_seq = 0;

// This warp's exchange slots; a lane writes only its own before collective_meet.
inline WarpSlot* warp_slot_array() { return warp_slots[threadIdx.x >> 5]; }
// The first barrier of collective `op`: after it every lane's operands are in the slots.
inline void collective_meet(uint32_t op) {
    const unsigned lane = threadIdx.x & 31u;
    WarpSlot* s = warp_slot_array();
    s[lane].tag = (collective_seq++ << 8) | op;
    warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
    for (unsigned l = 0; l < 32; ++l)
        if (s[l].tag != s[lane].tag) die("warp-collective op not executed by all 32 lanes in step (.sync.aligned)");
}
inline void collective_leave() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

// Offset of a pointer in the CTA's shared window (what __cvta_generic_to_shared gives the
// kernel as its 32-bit shared address).
inline uint32_t shared_offset(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < smem_ptr || c > smem_ptr + SMEM_CAP) die("generic-to-shared of a non-shared pointer");
    return (uint32_t)(c - smem_ptr);
}
inline unsigned char* shared_at(uint32_t addr, uint32_t bytes) {
    if ((uint64_t)addr + bytes > dynamic_smem_bytes) die("shared access past the dynamic shared memory");
    return smem_ptr + addr;
}

struct PendingCopy {
    uint32_t dst;
    const void* src;
    uint32_t src_bytes;
    uint64_t group;
};
inline thread_local std::vector<PendingCopy> cp_pending;
inline thread_local uint64_t cp_group = 0;  // the open (uncommitted) group's number

inline void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
    if (dst % 16 != 0) die("cp.async 16: shared address not 16-byte aligned");
    if (src_bytes > 16) die("cp.async 16: src-size > 16");
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) die("cp.async 16: global address not 16-byte aligned");
    unsigned char* d = shared_at(dst, 16);
    static const bool eager = [] {
        const char* e = std::getenv("NTKV_EMU_CP_ASYNC");
        return e != nullptr && std::strcmp(e, "eager") == 0;
    }();
    if (eager) {
        if (src_bytes > 0) std::memcpy(d, src, src_bytes);
        std::memset(d + src_bytes, 0, 16 - src_bytes);
        return;
    }
    cp_pending.push_back(PendingCopy{dst, src, src_bytes, cp_group});
}
inline void cp_async_commit() { ++cp_group; }
// cp.async.wait_group n: all but the n most recent committed groups complete. Copies of the
// open group are not committed and stay pending.
inline void cp_async_wait(uint32_t n) {
    std::vector<PendingCopy> keep;
    for (const PendingCopy& c : cp_pending) {
        if (c.group + n < cp_group) {
            unsigned char* d = shared_at(c.dst, 16);
            if (c.src_bytes > 0) std::memcpy(d, c.src, c.src_bytes);
            std::memset(d + c.src_bytes, 0, 16 - c.src_bytes);
        } else {
            keep.push_back(c);
        }
    }
    cp_pending.swap(keep);
}
// Called when a thread exits: copies never waited for are a kernel bug (their data never
// reaches a read the kernel ordered).
inline void cp_async_check_exit() {
    if (!cp_pending.empty()) die("thread exited with cp.async copies never waited for");
    cp_group = 0;
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    WarpSlot* s = warp_slot_array();
    const unsigned lane = threadIdx.x & 31u;
    s[lane].u[0] = addr;
    collective_meet(trans ? 2 : 1);
    for (unsigned m = 0; m < 4; ++m) {
        for (unsigned l = 0; l < 8; ++l)
            if (s[8 * m + l].u[0] % 16 != 0) die("ldmatrix: row address not 16-byte aligned");
        uint16_t e[2];
        for (unsigned h = 0; h < 2; ++h) {
            unsigned row, col;
            if (!trans) {
                row = lane >> 2;
                col = 2 * (lane & 3) + h;
            } else {
                row = 2 * (lane & 3) + h;
                col = lane >> 2;
            }
            std::memcpy(&e[h], shared_at(s[8 * m + row].u[0] + 2 * col, 2), 2);
        }
        r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
    collective_leave();
}

template <typename T> inline float b16_to_f32(uint16_t bits);
template <> inline float b16_to_f32<__half>(uint16_t bits) { return __half2float(__half{bits}); }
template <> inline float b16_to_f32<__nv_bfloat16>(uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }

// D = A B + C, m16n8k16, f32 accumulate. The products of 16-bit inputs are exact in f64; the sum
// is formed in f64 and rounded once (the hardware's internal order and precision are not
// specified; this is the exact result rounded).
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    WarpSlot* s = warp_slot_array();
    const unsigned lane = threadIdx.x & 31u;
    for (int i = 0; i < 4; ++i) s[lane].u[i] = a[i];
    s[lane].u[4] = b0;
    s[lane].u[5] = b1;
    for (int i = 0; i < 4; ++i) s[lane].f[i] = c[i];
    collective_meet(3);
    auto half_of = [](uint32_t reg, unsigned h) { return (uint16_t)(h ? reg >> 16 : reg & 0xffffu); };
    // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2.
    auto A = [&](unsigned row, unsigned k) {
        const unsigned l = 4 * (row % 8) + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return (double)b16_to_f32<T>(half_of(s[l].u[reg], k % 2));
    };
    // B[k][n]: lane 4 n + (k % 8) / 2, register k >= 8, half k % 2.
    auto B = [&](unsigned k, unsigned n) {
        const unsigned l = 4 * n + (k % 8) / 2;
        return (double)b16_to_f32<T>(half_of(s[l].u[4 + (k >= 8 ? 1 : 0)], k % 2));
    };
    float d[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = (lane >> 2) + (i >= 2 ? 8 : 0), col = 2 * (lane & 3) + (i & 1);
        // C[row][col] comes from the lane that holds it, which is this lane.
        double acc = (double)s[lane].f[i];
        for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = (float)acc;
    }
    collective_leave();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

}  // namespace ntkv_emu

inline uint64_t __cvta_generic_to_shared(const void* p) { return ntkv_emu::shared_offset(p); }
