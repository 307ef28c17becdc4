// tools/emu-topk: stand-in for cuda/include/ntkv_common.cuh that lets cuda/topk.cu compile as
// C++20 on the CPU and run with one std::thread per CUDA thread and one PROCESS per CTA, so
// that several CTAs run at once and the inter-block protocols (integer-atomic histograms, the
// last-block ticket, the H2O work queue and its spin-wait) are exercised concurrently.
//
// Model:
// - Global memory: buffers from ntkv_emu::dev_alloc live in one MAP_SHARED arena, visible to
//   every CTA process; gaps between buffers are ASan-poisoned (out-of-bounds reads/writes
//   abort the CTA, which fails the launch).
// - Shared memory: `__shared__` becomes `static`, so static shared variables are per process,
//   i.e. per CTA (zero at CTA start: reads of unwritten static shared memory are NOT caught).
//   The dynamic (extern) buffers are filled with 0xFF (NaN) at CTA start and poisoned past the
//   requested size.
// - Atomics (shared and global): std::atomic_ref (lock-free, so also across processes).
//   __threadfence = seq_cst fence; __ldcg = relaxed atomic load.
// - __syncthreads: a barrier of the CTA's threads (an exited thread drops out, as on sm_70+).
// - Warp collectives (shuffles, ballot, mma.sync m16n8k16): every lane posts its operand and a
//   per-lane sequence number; a lane reading a partner whose sequence number differs (a
//   divergent collective, or a partner that exited) aborts with a message.
// - mma m16n8k16 row.col f32 += f16/bf16: PTX ISA fragment layouts (groupID = lane >> 2,
//   tig = lane & 3; A: a0,a1 row g col 2t+{0,1}; a2,a3 row g+8; a4..a7 the same at col +8;
//   B: b0,b1 k = 2t+{0,1}, n = g; b2,b3 k + 8; C: c0,c1 row g col 2t+{0,1}; c2,c3 row g+8).
//   Products summed in f32 in k order (the hardware's order and internal precision differ).
// Not modelled: the memory model beyond fences and atomics, timing, warp scheduling inside a
// CTA beyond OS threads, uninitialised static shared memory, register/occupancy limits.
#pragma once

#include <sanitizer/asan_interface.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <random>
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
#define __shared__ static
#define __align__(n)

struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
struct dim3_ { unsigned x = 0, y = 0, z = 0; };

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u; std::memcpy(&u, &x, 4);
    if (std::isnan(x)) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline uint32_t __float_as_uint(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
inline int __ffs(uint32_t x) { return __builtin_ffs((int)x); }

using std::min;
using std::max;

namespace ntkv_emu {
constexpr size_t SMEM_CAP = 232448;  // H200 opt-in shared memory per block
constexpr int MAX_WARPS = 32;
inline uint32_t dynamic_smem_bytes = 0;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
// Dynamic shared buffers (the harness defines the source's extern arrays and registers them).
inline std::vector<unsigned char*> dyn_smem;

[[noreturn]] inline void fatal(const char* what) {
    std::fprintf(stderr, "EMU FATAL: %s\n", what);
    std::fflush(stderr);
    _exit(3);
}

struct WarpSlots {
    uint32_t v[32][16];
    uint64_t seq[32];
};
inline WarpSlots warp_slots[MAX_WARPS];
inline thread_local uint64_t lane_seq = 0;
}  // namespace ntkv_emu

inline thread_local dim3_ threadIdx;
inline dim3_ blockIdx;
inline dim3_ blockDim;
inline dim3_ gridDim;

inline void __syncthreads() { ntkv_emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ntkv_emu::warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { sched_yield(); }

namespace ntkv_emu {
// Posts `n` words of this lane, waits for the warp, lets `read` look at the whole warp's
// slots, waits again. Checks that every lane of the warp is at the same collective.
template <typename R>
inline void warp_collective(const uint32_t* words, int n, unsigned mask, R&& read) {
    if (mask != 0xffffffffu) fatal("partial-mask warp collective (not modelled)");
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    WarpSlots& s = warp_slots[warp];
    const uint64_t seq = ++lane_seq;
    for (int i = 0; i < n; ++i) s.v[lane][i] = words[i];
    s.seq[lane] = seq;
    warp_barriers[warp]->arrive_and_wait();
    for (unsigned l = 0; l < 32; ++l)
        if (s.seq[l] != seq) fatal("divergent or incomplete warp collective");
    read(s);
    warp_barriers[warp]->arrive_and_wait();
}
template <typename T>
inline uint32_t bits_of(T v) { static_assert(sizeof(T) == 4); uint32_t u; std::memcpy(&u, &v, 4); return u; }
template <typename T>
inline T from_bits(uint32_t u) { T v; std::memcpy(&v, &u, 4); return v; }
template <typename T, typename F>
inline T shfl_generic(unsigned mask, T v, F src_of) {
    const uint32_t w = bits_of(v);
    uint32_t r = 0;
    const unsigned lane = threadIdx.x & 31u;
    warp_collective(&w, 1, mask, [&](WarpSlots& s) { r = s.v[src_of(lane)][0]; });
    return from_bits<T>(r);
}
}  // namespace ntkv_emu

template <typename T>
inline T __shfl_xor_sync(unsigned m, T v, int o) {
    return ntkv_emu::shfl_generic(m, v, [o](unsigned l) { return (l ^ (unsigned)o) & 31u; });
}
template <typename T>
inline T __shfl_down_sync(unsigned m, T v, unsigned o) {
    return ntkv_emu::shfl_generic(m, v, [o](unsigned l) { return l + o < 32u ? l + o : l; });
}
template <typename T>
inline T __shfl_sync(unsigned m, T v, int src) {
    return ntkv_emu::shfl_generic(m, v, [src](unsigned) { return (unsigned)src & 31u; });
}
inline unsigned __ballot_sync(unsigned m, bool pred) {
    const uint32_t w = pred ? 1u : 0u;
    unsigned r = 0;
    ntkv_emu::warp_collective(&w, 1, m, [&](ntkv_emu::WarpSlots& s) {
        for (unsigned l = 0; l < 32; ++l) r |= (s.v[l][0] & 1u) << l;
    });
    return r;
}

// ---- atomics --------------------------------------------------------------------------------
template <typename T>
inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline uint32_t atomicAdd(uint32_t* p, unsigned v) { return std::atomic_ref<uint32_t>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline uint32_t atomicExch(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).exchange(v); }
inline uint32_t atomicMin(uint32_t* p, uint32_t v) {
    std::atomic_ref<uint32_t> a(*p);
    uint32_t old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __ldcg(const float* p) { return std::atomic_ref<float>(*const_cast<float*>(p)).load(std::memory_order_relaxed); }
inline uint32_t __ldcg(const uint32_t* p) {
    return std::atomic_ref<uint32_t>(*const_cast<uint32_t*>(p)).load(std::memory_order_relaxed);
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 -------------------------
namespace ntkv_emu {
inline float ntkv_emu_to_f32(__half h) { return __half2float(h); }
inline float ntkv_emu_to_f32(__nv_bfloat16 h) { return __bfloat162float(h); }
template <typename E>
inline float half_of(uint32_t w, int hi) {
    E e;
    const uint16_t b = (uint16_t)(hi ? (w >> 16) : (w & 0xffffu));
    std::memcpy(&e, &b, 2);
    return ntkv_emu_to_f32(e);
}
template <typename E>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    uint32_t words[6] = {a[0], a[1], a[2], a[3], b0, b1};
    float A[16][16], B[16][8];
    warp_collective(words, 6, 0xffffffffu, [&](WarpSlots& s) {
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 8; ++i) {
                const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
                const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = half_of<E>(s.v[l][i >> 1], i & 1);
            }
            for (int i = 0; i < 4; ++i) {
                const int krow = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
                B[krow][g] = half_of<E>(s.v[l][4 + (i >> 1)], i & 1);
            }
        }
    });
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8;
        const int col = t * 2 + (i & 1);
        float acc = c[i];
        for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
        c[i] = acc;
    }
}
}  // namespace ntkv_emu

// ---- launch: one process per CTA, up to `concurrent` at once --------------------------------
namespace ntkv_emu {
inline unsigned char* arena = nullptr;
inline size_t arena_size = 0, arena_used = 0;

inline void arena_init(size_t bytes) {
    arena_size = bytes;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fatal("mmap");
    arena = (unsigned char*)p;
    ASAN_POISON_MEMORY_REGION(arena, bytes);
}
inline void arena_reset() {
    ASAN_POISON_MEMORY_REGION(arena, arena_size);
    arena_used = 0;
}
// A device buffer: 256-byte aligned start, poisoned gap after the end (rounded up to ASan's
// 8-byte granule: reads within the last partial granule are not caught).
template <typename T>
inline T* dev_alloc(size_t n) {
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    const size_t start = (arena_used + 255) & ~size_t(255);
    if (start + bytes + 256 > arena_size) fatal("arena full");
    arena_used = start + bytes + 64;
    ASAN_UNPOISON_MEMORY_REGION(arena + start, bytes);
    std::memset(arena + start, 0, bytes);
    return (T*)(arena + start);
}

struct LaunchOpts {
    unsigned concurrent = 1;   // CTAs resident at once
    bool jitter = false;       // random start delays, so tickets are taken in random order
    unsigned seed = 1;
    double timeout_s = 60.0;   // a launch that takes longer is reported as a deadlock
};

inline void run_cta(dim3_ grid, dim3_ block, uint32_t smem_bytes, unsigned bx, unsigned by,
                    const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    blockIdx = dim3_{bx, by, 0};
    dynamic_smem_bytes = smem_bytes;
    for (unsigned char* d : dyn_smem) {
        ASAN_UNPOISON_MEMORY_REGION(d, SMEM_CAP);
        std::memset(d, 0xFF, smem_bytes);
        ASAN_POISON_MEMORY_REGION(d + smem_bytes, SMEM_CAP - smem_bytes);
    }
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
            kernel();
            warp_barriers[t / 32]->arrive_and_drop();
            block_barrier->arrive_and_drop();
        });
    }
    for (auto& th : threads) th.join();
}

// Runs the grid; CTAs start in linear order (x fastest), at most `concurrent` at a time, each
// in a forked process. Returns false (after printing why) on a CTA failure or a timeout.
inline bool launch(dim3_ grid, dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel,
                   LaunchOpts o = {}) {
    if (smem_bytes > SMEM_CAP) fatal("shared memory request too large");
    if (block.x > MAX_WARPS * 32u || block.x % 32u != 0) fatal("block size not modelled");
    grid.y = std::max(grid.y, 1u);
    const unsigned total = grid.x * grid.y;
    std::mt19937 rng(o.seed);
    std::vector<pid_t> running;
    const auto t0 = std::chrono::steady_clock::now();
    bool ok = true;
    unsigned next = 0;
    std::fflush(stdout);
    std::fflush(stderr);
    while (next < total || !running.empty()) {
        while (ok && next < total && running.size() < o.concurrent) {
            const unsigned bx = next % grid.x, by = next / grid.x;
            const unsigned delay = o.jitter ? (unsigned)(rng() % 3000) : 0u;
            const pid_t pid = fork();
            if (pid < 0) fatal("fork");
            if (pid == 0) {
                if (delay) usleep(delay);
                run_cta(grid, block, smem_bytes, bx, by, kernel);
                std::fflush(stdout);
                _exit(0);
            }
            running.push_back(pid);
            ++next;
        }
        if (!ok && next < total) next = total;
        int status = 0;
        const pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            running.erase(std::find(running.begin(), running.end(), pid));
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                std::fprintf(stderr, "CTA process failed (status %d)\n", status);
                ok = false;
            }
            continue;
        }
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (el > o.timeout_s) {
            std::fprintf(stderr, "launch timed out after %.0f s: deadlock (%zu CTAs still running)\n", el,
                         running.size());
            for (pid_t p : running) kill(p, SIGKILL);
            for (pid_t p : running) waitpid(p, &status, 0);
            running.clear();
            return false;
        }
        usleep(200);
    }
    return ok;
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
inline uint32_t order_key(float x) {
    uint32_t u = __float_as_uint(x);
    if (x != x) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
}  // namespace ntkv
