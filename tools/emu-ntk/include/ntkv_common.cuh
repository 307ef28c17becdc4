// tools/emu-ntk: stand-in for cuda/include/ntkv_common.cuh that lets cuda/ntk.cu compile as
// C++20 on the CPU and run with one std::thread per CUDA thread, one CTA at a time, over a
// 3-D grid. Self-contained (tools/emu's header models a 1-D grid without the warp-collective
// tensor-core ops, and is being extended concurrently for attention; this one adds what the
// NTK kernels use without touching it).
//
// Modelled:
//  - __syncthreads: a barrier of the CTA's threads (an exited thread drops out, as on sm_70+);
//  - warp-collective ops (shuffle, mma.sync): every lane deposits its operands in a per-warp
//    slot, warp barrier, each lane computes its result from all 32 slots, warp barrier;
//  - mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 and
//    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the fragment layouts of the PTX
//    ISA (9.7.14.5.7/8), written here from the ISA tables, not from the kernel: products are
//    summed exactly in f64 and rounded once to f32 (hardware accumulates in ≥ fp32 with
//    unspecified order; the difference is far below the tf32/bf16 tolerances). tf32 operands
//    whose low 13 bits are not zero (not rounded by the kernel) are counted in
//    ntkv_emu::unrounded_tf32 and their low bits dropped;
//  - ldmatrix.sync.aligned.m8n8.x4.shared.b16 from the ISA's description (row addresses from
//    lanes 8i..8i+7 for matrix i; lane l gets bytes 4(l%4).. of row l/4), alignment and bounds
//    checked;
//  - cp.async.cg 16 bytes with src-size 0 or 16 (zero-fill), commit_group and wait_group N as
//    a per-thread queue of committed groups: in "lazy" mode (default) a copy lands only when
//    a wait_group retires its group, so reading a stage before waiting for it reads the 0xFF
//    fill (NaN); in "eager" mode (NTKV_EMU_CP_ASYNC=eager) it lands at issue, so overwriting
//    a stage another warp still reads shows up. Global reads happen when the copy lands,
//    under AddressSanitizer;
//  - shared memory: one buffer filled with 0xFF (NaN as f32, tf32 and bf16) before every CTA,
//    with the bytes past the launch's dynamic size poisoned for ASan by the harness;
//  - uint2/uint4/float4 with their CUDA alignment (UBSan reports misaligned vector accesses).
// Not modelled: timing, the memory model beyond barriers, divergence within a warp (a
// collective must be reached by all 32 lanes: the kernels guarantee it; a deadlock shows a
// violation), bank conflicts, register pressure.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
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

struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return uint2{a, b}; }
struct dim3_ { unsigned x = 0, y = 0, z = 0; };

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u = __float_as_uint(x);
    if (std::isnan(x)) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

using std::max;
using std::min;

inline thread_local dim3_ threadIdx;
inline thread_local dim3_ blockIdx;
inline dim3_ blockDim;
inline dim3_ gridDim;

namespace ntkv_emu {
constexpr size_t SMEM_CAP = 256 * 1024;
inline uint32_t dynamic_smem_bytes = 0;
inline unsigned char* smem_ptr = nullptr;  // the harness's extern __shared__ buffer
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
inline std::atomic<uint64_t> unrounded_tf32{0};
inline std::atomic<uint64_t> mma_count{0};
inline std::atomic<uint64_t> cp_async_leftover{0};
inline bool cp_async_eager = [] {
    const char* e = std::getenv("NTKV_EMU_CP_ASYNC");
    return e != nullptr && std::strcmp(e, "eager") == 0;
}();

struct MmaSlot {
    uint32_t a[32][4];
    uint32_t b[32][2];
    float c[32][4];
};
inline MmaSlot mma_slots[64];

inline unsigned lane_id() { return threadIdx.x & 31u; }
inline void warp_sync() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

inline double tf32_value(uint32_t bits) {
    if (bits & 0x1fffu) {
        unrounded_tf32.fetch_add(1, std::memory_order_relaxed);
        bits &= ~0x1fffu;
    }
    return (double)__uint_as_float(bits);
}
inline double bf16_value(uint32_t reg, int half) { return (double)__uint_as_float(half ? (reg & 0xffff0000u) : (reg << 16)); }

// D = A·B + C for one warp; kBf16 selects m16n8k16 bf16, else m16n8k8 tf32. Layouts from the
// PTX ISA: groupID = lane >> 2, tig = lane % 4.
//  tf32 A 16x8: a0 (g, tig), a1 (g+8, tig), a2 (g, tig+4), a3 (g+8, tig+4).
//  tf32 B 8x8:  b0 (k = tig, n = g), b1 (k = tig+4, n = g).
//  bf16 A 16x16: ai for i in 0..8 (reg i/2, low half first): row g for i in {0,1,4,5}, else
//               g+8; col 2·tig + (i&1) for i < 4, else 2·tig + (i&1) + 8.
//  bf16 B 16x8: bi for i in 0..4: k = 2·tig + (i&1) (+8 for i >= 2), n = g.
//  C/D 16x8 f32: ci: row g for i < 2, else g+8; col 2·tig + (i&1).
template <bool kBf16>
inline void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    const unsigned lane = lane_id(), warp = threadIdx.x >> 5;
    MmaSlot& s = mma_slots[warp];
    for (int i = 0; i < 4; ++i) s.a[lane][i] = a[i], s.c[lane][i] = c[i];
    s.b[lane][0] = b[0];
    s.b[lane][1] = b[1];
    warp_sync();
    constexpr int K = kBf16 ? 16 : 8;
    double A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        if (kBf16) {
            for (int i = 0; i < 8; ++i) {
                const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
                const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = bf16_value(s.a[l][i / 2], i & 1);
            }
            for (int i = 0; i < 4; ++i) {
                const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
                B[k][g] = bf16_value(s.b[l][i / 2], i & 1);
            }
        } else {
            A[g][t] = tf32_value(s.a[l][0]);
            A[g + 8][t] = tf32_value(s.a[l][1]);
            A[g][t + 4] = tf32_value(s.a[l][2]);
            A[g + 8][t + 4] = tf32_value(s.a[l][3]);
            B[t][g] = tf32_value(s.b[l][0]);
            B[t + 4][g] = tf32_value(s.b[l][1]);
        }
    }
    const int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
        double acc = (double)c[i];
        for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
        d[i] = (float)acc;
    }
    if (lane == 0) mma_count.fetch_add(1, std::memory_order_relaxed);
    warp_sync();  // nobody overwrites the slot before every lane has read it
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA 9.7.14.5.15): lanes 8i..8i+7 give the
// row addresses of matrix i (16-byte aligned, inside shared memory); lane l receives in
// register i the 32 bits at byte 4·(l % 4) of row l / 4 of matrix i.
struct LdmSlot {
    const unsigned char* addr[32];
};
inline LdmSlot ldm_slots[64];
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
    const unsigned lane = lane_id(), warp = threadIdx.x >> 5;
    const unsigned char* a = static_cast<const unsigned char*>(row_addr);
    if ((reinterpret_cast<uintptr_t>(a) & 15u) != 0) throw std::runtime_error("ldmatrix: row address not 16-byte aligned");
    if (a < smem_ptr || a + 16 > smem_ptr + dynamic_smem_bytes) throw std::runtime_error("ldmatrix: row outside dynamic shared memory");
    ldm_slots[warp].addr[lane] = a;
    warp_sync();
    for (int i = 0; i < 4; ++i) std::memcpy(&r[i], ldm_slots[warp].addr[8 * i + lane / 4] + 4 * (lane % 4), 4);
    warp_sync();
}

// cp.async: per-thread queue of committed groups.
struct Copy {
    void* dst;
    const void* src;
    bool valid;
};
struct AsyncQueue {
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};
inline thread_local AsyncQueue async_queue;
inline void land(const Copy& c) {
    unsigned char buf[16] = {};
    if (c.valid) std::memcpy(buf, c.src, 16);
    std::memcpy(c.dst, buf, 16);
}
inline void cp_async16(void* dst, const void* src, bool valid) {
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0) throw std::runtime_error("cp.async: shared address not 16-byte aligned");
    if (valid && (reinterpret_cast<uintptr_t>(src) & 15u) != 0) throw std::runtime_error("cp.async: global address not 16-byte aligned");
    const unsigned char* d = static_cast<unsigned char*>(dst);
    if (d < smem_ptr || d + 16 > smem_ptr + dynamic_smem_bytes) throw std::runtime_error("cp.async: destination outside dynamic shared memory");
    const Copy c{dst, src, valid};
    if (cp_async_eager) land(c);
    else async_queue.open.push_back(c);
}
inline void cp_async_commit() {
    async_queue.groups.push_back(std::move(async_queue.open));
    async_queue.open.clear();
}
inline void cp_async_wait(int n) {
    auto& gs = async_queue.groups;
    while ((int)gs.size() > n) {
        for (const Copy& c : gs.front()) land(c);
        gs.erase(gs.begin());
    }
}
inline void cp_async_exit() {
    size_t left = async_queue.open.size();
    for (auto& g : async_queue.groups) left += g.size();
    if (left) cp_async_leftover.fetch_add(left);
    async_queue.open.clear();
    async_queue.groups.clear();
}

// Runs `kernel` over the grid, one CTA at a time, each with block.x threads.
inline void launch(dim3_ grid, dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel) {
    if (smem_bytes > SMEM_CAP) throw std::runtime_error("shared memory request too large");
    if (block.x > 64 * 32 || block.x == 0) throw std::runtime_error("bad block");
    gridDim = grid;
    blockDim = block;
    dynamic_smem_bytes = smem_bytes;
    for (unsigned bz = 0; bz < std::max(grid.z, 1u); ++bz)
        for (unsigned by = 0; by < std::max(grid.y, 1u); ++by)
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
                        blockIdx = dim3_{bx, by, bz};
                        kernel();
                        cp_async_exit();
                        warp_barriers[t / 32]->arrive_and_drop();
                        block_barrier->arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
            }
}
}  // namespace ntkv_emu

inline void __syncthreads() { ntkv_emu::block_barrier->arrive_and_wait(); }

namespace ntkv {
inline float to_f32(float x) { return x; }
inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace ntkv
