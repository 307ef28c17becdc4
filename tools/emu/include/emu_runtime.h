// tools/emu/include/emu_runtime.h: the one CPU runtime of every kernel emulation. With this
// directory first on the include path, an unmodified cuda/<family>.cu compiles as C++20: the
// CUDA headers it includes (cuda_fp16.h, cuda_bf16.h, math_constants.h) and the PTX layer
// (ntkv_ptx.cuh, see emu_ptx.h) are the stand-ins here, and cuda/include/ntkv_common.cuh is
// compiled as it is. Each CUDA thread is a std::thread (1-D blocks, 1-, 2- or 3-D grids).
//
// Modelled here:
//  - the CUDA vector and 16-bit float types with their CUDA sizes and alignment (UBSan reports
//    a misaligned vector access), and the conversions and intrinsics the kernels use: f16 and
//    bf16 round-to-nearest-even, a NaN converting to the canonical NaN 0x7fff as cvt.rn does;
//    the _rn arithmetic intrinsics as plain IEEE ops (build with -ffp-contract=off so nothing
//    is fused that the kernel did not fuse);
//  - __syncthreads as a barrier of the CTA's threads and __syncwarp as one of the warp's; an
//    exited thread drops out of both (as on sm_70+);
//  - warp collectives (emu_ptx.h): all 32 lanes must reach the same collective in step, or the
//    run aborts;
//  - shared memory, filled with 0xFF bytes (NaN as f32, tf32, f16 and bf16) at the start of
//    every CTA, so a read of shared memory the CTA never wrote shows up: the dynamic buffer
//    (NTKV_DYNAMIC_SMEM, SMEM_CAP bytes, the bytes past the launch's size poisoned for
//    AddressSanitizer) and every static `__shared__` variable. `__shared__` is `static`, so a
//    static shared variable is one per process; the runtime finds them in the executable's
//    symbol table (function-local statics of functions in an anonymous namespace, in namespace
//    ntkv, or of the extern "C" ntkv_* kernels: a harness must not add function-local statics
//    of its own there);
//  - atomics (std::atomic_ref: lock-free, so also between processes on the shared arena) and
//    __ldcg (a relaxed atomic load) on the shared view of global memory; __threadfence as a
//    seq_cst fence that, in a concurrent launch, also publishes the CTA's stores (the weak
//    global-memory model of emu_memory.h).
//
// Two ways to run a grid (ntkv_emu::launch, LaunchOpts::concurrent):
//  - 0 (the default): in this process, one CTA after another (x fastest). Global memory may be
//    any host memory.
//  - n >= 1: every CTA in its own forked process, at most n at once, CTAs started in linear
//    order (with optional random start delays), so that inter-CTA protocols (tickets, queues,
//    spin-waits on flags) run concurrently; a launch that runs past its timeout is reported as
//    a deadlock and a CTA that crashes fails the launch. Global memory must then come from
//    ntkv_emu::dev_alloc (one MAP_SHARED arena, gaps between buffers poisoned for ASan), and
//    another CTA sees a CTA's plain stores only after a fence or at the end of the launch.
// LaunchOpts::only runs chosen CTAs of a full grid (the production-scale checks, over
// ntkv_emu::Reserved address space). See docs/emulator.md.
// Not modelled: timing, bank conflicts, register limits, multi-dimensional blocks.
#pragma once

#define NTKV_EMULATE 1

#include <link.h>
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
#include <elf.h>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <type_traits>
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
#define __shared__ static
#define __align__(n)

// ---- Types ----------------------------------------------------------------------------------
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return uint2{a, b}; }
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
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

// ---- Arithmetic and bit intrinsics ----------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v == 0 ? 32 : __builtin_clz(v); }
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
constexpr size_t SMEM_CAP = 232448;  // the H200's opt-in shared memory per block
constexpr unsigned MAX_WARPS = 32;   // 1024 threads
inline uint32_t dynamic_smem_bytes = 0;
// The CTA's dynamic shared memory (one buffer per process: one CTA at a time uses it).
alignas(128) inline unsigned char smem_buf[SMEM_CAP];
inline unsigned char* const smem_ptr = smem_buf;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "emu: %s (thread %u of block (%u, %u, %u))\n", what, threadIdx.x, blockIdx.x, blockIdx.y,
                 blockIdx.z);
    std::fflush(stderr);
    std::abort();
}
inline void warp_sync() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

// Counters a harness may read after a launch; they live in a shared mapping, so the CTAs of a
// concurrent (forked) launch add to the same ones.
struct Counters {
    std::atomic<uint64_t> unrounded_tf32, mma, cp_async_leftover;
};
inline Counters& counters() {
    static Counters* c = [] {
        void* p = mmap(nullptr, sizeof(Counters), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) die("mmap of the counters failed");
        return new (p) Counters{};
    }();
    return *c;
}
}  // namespace ntkv_emu

#define NTKV_DYNAMIC_SMEM(type, name) type* const name = reinterpret_cast<type*>(::ntkv_emu::smem_ptr)

inline void __syncthreads() { ntkv_emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) ntkv_emu::die("__syncwarp with a partial mask is not modelled");
    ntkv_emu::warp_sync();
}
#include "emu_memory.h"

inline void __threadfence() {
    if (ntkv_emu::weak_active) ntkv_emu::weak_publish();
    std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __nanosleep(unsigned) { sched_yield(); }

// ---- Atomics --------------------------------------------------------------------------------
// Every atomic works on the shared view of global memory (ntkv_emu::sync_ptr: the L2 of the
// weak model, emu_memory.h), and a CTA then sees its own result.
namespace ntkv_emu {
template <typename T, typename F> inline T atomic_op(T* p, F&& f) {
    const T old = f(std::atomic_ref<T>(*sync_ptr(p)));
    after_atomic(p);
    return old;
}
}  // namespace ntkv_emu
template <typename T> inline T atomicAdd(T* p, T v) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) { return a.fetch_add(v); });
}
inline unsigned atomicAdd(unsigned* p, int v) { return atomicAdd(p, (unsigned)v); }
template <typename T> inline T atomicOr(T* p, T v) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) { return a.fetch_or(v); });
}
template <typename T> inline T atomicExch(T* p, T v) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) { return a.exchange(v); });
}
template <typename T> inline T atomicCAS(T* p, T expected, T desired) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) {
        a.compare_exchange_strong(expected, desired);
        return expected;
    });
}
template <typename T> inline T atomicMin(T* p, T v) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) {
        T old = a.load();
        while (v < old && !a.compare_exchange_weak(old, v)) {}
        return old;
    });
}
template <typename T> inline T atomicMax(T* p, T v) {
    return ntkv_emu::atomic_op(p, [&](std::atomic_ref<T> a) {
        T old = a.load();
        while (v > old && !a.compare_exchange_weak(old, v)) {}
        return old;
    });
}
template <typename T> inline T __ldcg(const T* p) {
    return std::atomic_ref<T>(*const_cast<T*>(ntkv_emu::sync_ptr(p))).load(std::memory_order_relaxed);
}

namespace ntkv_emu {
inline void thread_exit();  // emu_ptx.h: cp.async bookkeeping of an exiting thread

// ---- Static shared memory -------------------------------------------------------------------
struct Region {
    unsigned char* p;
    size_t n;
};
// Every static `__shared__` variable of the kernel sources, from the executable's symbol table.
inline const std::vector<Region>& static_shared() {
    static const std::vector<Region> regions = [] {
        std::vector<Region> out;
        FILE* f = std::fopen("/proc/self/exe", "rb");
        if (f == nullptr) die("cannot read /proc/self/exe");
        std::vector<unsigned char> img;
        unsigned char buf[1 << 16];
        for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) img.insert(img.end(), buf, buf + n);
        std::fclose(f);
        const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
        // The load bias of a PIE: the runtime address of a symbol minus its link-time value.
        uintptr_t bias = 0;
        dl_iterate_phdr([](dl_phdr_info* i, size_t, void* b) { *(uintptr_t*)b = i->dlpi_addr; return 1; }, &bias);
        auto ours = [](const char* n) {
            // Function-local statics (_ZZ) of functions in an anonymous namespace, in ntkv, of
            // internal linkage, or of an extern "C" ntkv_* kernel.
            if (std::strncmp(n, "_ZZ", 3) != 0) return false;
            n += 3;
            if (std::strncmp(n, "N12_GLOBAL__N_1", 15) == 0 || std::strncmp(n, "N4ntkv", 6) == 0 || *n == 'L') return true;
            while (*n >= '0' && *n <= '9') ++n;
            return std::strncmp(n, "ntkv_", 5) == 0;
        };
        for (unsigned s = 0; s < eh->e_shnum; ++s) {
            if (sh[s].sh_type != SHT_SYMTAB) continue;
            const auto* sym = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[s].sh_offset);
            const char* str = reinterpret_cast<const char*>(img.data() + sh[sh[s].sh_link].sh_offset);
            for (size_t i = 0; i < sh[s].sh_size / sizeof(Elf64_Sym); ++i) {
                const Elf64_Sym& y = sym[i];
                if (ELF64_ST_TYPE(y.st_info) != STT_OBJECT || y.st_size == 0 || y.st_shndx == SHN_UNDEF ||
                    y.st_shndx >= eh->e_shnum)
                    continue;
                const Elf64_Shdr& in = sh[y.st_shndx];
                if (!(in.sh_flags & SHF_WRITE) || (in.sh_flags & SHF_TLS) || !ours(str + y.st_name)) continue;
                out.push_back(Region{reinterpret_cast<unsigned char*>(bias + y.st_value), y.st_size});
            }
        }
        return out;
    }();
    return regions;
}

// ---- Device memory for concurrent launches --------------------------------------------------
// (arena, arena_alias, arena_size, arena_used: emu_memory.h)
inline void arena_init(size_t bytes) {
    arena_size = (bytes + PAGE - 1) / PAGE * PAGE;
    arena_fd = memfd_create("ntkv-emu-arena", 0);
    if (arena_fd < 0 || ftruncate(arena_fd, (off_t)arena_size) != 0) die("memfd of the device arena failed");
    void* p = mmap(nullptr, arena_size, PROT_READ | PROT_WRITE, MAP_SHARED, arena_fd, 0);
    void* q = mmap(nullptr, arena_size, PROT_READ | PROT_WRITE, MAP_SHARED, arena_fd, 0);
    if (p == MAP_FAILED || q == MAP_FAILED) die("mmap of the device arena failed");
    arena = (unsigned char*)p;
    arena_alias = (unsigned char*)q;
    if (weak_model_wanted()) {
        // The log of stores no fence published: at most every arena byte once per CTA that
        // wrote it, plus record headers; address space only.
        const size_t cap = 4 * arena_size;
        void* l = mmap(nullptr, sizeof(LogHeader) + cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (l == MAP_FAILED) die("mmap of the weak-model log failed");
        weak_log = new (l) LogHeader{};
        weak_log->cap = cap;
    }
    NTKV_EMU_POISON(arena, arena_size);
}
// Frees every buffer (the next case starts from an empty arena).
inline void arena_reset() {
    NTKV_EMU_POISON(arena, arena_size);
    arena_used = 0;
}
// A zeroed device buffer of n T: 256-byte aligned start, poisoned gap after the end (rounded
// up to ASan's 8-byte granule: reads within the last partial granule are not caught).
template <typename T>
inline T* dev_alloc(size_t n) {
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    const size_t start = (arena_used + 255) & ~size_t(255);
    if (arena == nullptr || start + bytes + 256 > arena_size) die("device arena full (or arena_init not called)");
    arena_used = start + bytes + 64;
    NTKV_EMU_UNPOISON(arena + start, bytes);
    std::memset(arena + start, 0, bytes);
    return (T*)(arena + start);
}

// ---- Launch ---------------------------------------------------------------------------------
struct LaunchOpts {
    unsigned concurrent = 0;  // 0: in process, one CTA at a time; n: forked CTAs, n at once
    bool jitter = false;      // random start delays (concurrent), so tickets are taken in random order
    unsigned seed = 1;
    double timeout_s = 60.0;  // a concurrent launch that takes longer is reported as a deadlock
    // Production-scale index checks: run only these CTAs of the grid (empty: all of them),
    // in the order given; the kernel still sees the full gridDim.
    std::vector<dim3_> only = {};
};

// Runs CTA (bx, by, bz) with block.x threads in this process.
inline void run_cta(dim3_ block, uint32_t smem_bytes, unsigned bx, unsigned by, unsigned bz,
                    const std::function<void()>& kernel) {
    if (smem_bytes > 0) std::memset(smem_ptr, 0xFF, smem_bytes);
    for (const Region& r : static_shared()) std::memset(r.p, 0xFF, r.n);
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

// Runs CTAs in forked processes, at most o.concurrent at once. False (after saying why) when a
// CTA fails or the launch times out.
inline bool launch_forked(dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel, const LaunchOpts& o) {
    const unsigned total = o.only.empty() ? gridDim.x * gridDim.y * gridDim.z : (unsigned)o.only.size();
    std::mt19937 rng(o.seed);
    std::vector<pid_t> running;
    const auto t0 = std::chrono::steady_clock::now();
    bool ok = true;
    unsigned next = 0;
    std::fflush(stdout);
    std::fflush(stderr);
    while ((ok && next < total) || !running.empty()) {
        while (ok && next < total && running.size() < o.concurrent) {
            unsigned bx = next % gridDim.x, by = next / gridDim.x % gridDim.y, bz = next / gridDim.x / gridDim.y;
            if (!o.only.empty()) bx = o.only[next].x, by = o.only[next].y, bz = o.only[next].z;
            const unsigned delay = o.jitter ? (unsigned)(rng() % 3000) : 0u;
            const pid_t pid = fork();
            if (pid < 0) die("fork failed");
            if (pid == 0) {
                if (delay) usleep(delay);
                weak_begin();
                run_cta(block, smem_bytes, bx, by, bz, kernel);
                weak_end();
                std::fflush(stdout);
                _exit(0);
            }
            running.push_back(pid);
            ++next;
        }
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
            if (weak_log != nullptr) weak_log->used.store(0);
            return false;
        }
        usleep(200);
    }
    // The end of the launch: every store is visible now.
    weak_apply_log();
    return ok;
}

// Runs `kernel` over the grid with block.x threads per CTA and `smem_bytes` of dynamic shared
// memory. In process (o.concurrent == 0) a failure aborts the run and the result is true.
inline bool launch(dim3_ grid, dim3_ block, uint32_t smem_bytes, const std::function<void()>& kernel,
                   const LaunchOpts& o = {}) {
    if (smem_bytes > SMEM_CAP) throw std::runtime_error("shared memory request too large");
    if (block.x == 0 || block.x > MAX_WARPS * 32) throw std::runtime_error("bad block size");
    if (std::max(block.y, 1u) != 1 || std::max(block.z, 1u) != 1) throw std::runtime_error("only 1-D blocks are modelled");
    gridDim = dim3_{grid.x, std::max(grid.y, 1u), std::max(grid.z, 1u)};
    blockDim = dim3_{block.x, 1, 1};
    dynamic_smem_bytes = smem_bytes;
    NTKV_EMU_UNPOISON(smem_ptr, SMEM_CAP);
    NTKV_EMU_POISON(smem_ptr + smem_bytes, SMEM_CAP - smem_bytes);
    bool ok = true;
    if (o.concurrent > 0) {
        ok = launch_forked(block, smem_bytes, kernel, o);
    } else {
        if (!o.only.empty()) {
            for (const dim3_& c : o.only) {
                if (c.x >= gridDim.x || c.y >= gridDim.y || c.z >= gridDim.z) throw std::runtime_error("chosen CTA outside the grid");
                run_cta(block, smem_bytes, c.x, c.y, c.z, kernel);
            }
        } else {
            for (unsigned bz = 0; bz < gridDim.z; ++bz)
                for (unsigned by = 0; by < gridDim.y; ++by)
                    for (unsigned bx = 0; bx < gridDim.x; ++bx) run_cta(block, smem_bytes, bx, by, bz, kernel);
        }
    }
    NTKV_EMU_UNPOISON(smem_ptr, SMEM_CAP);
    return ok;
}
}  // namespace ntkv_emu
