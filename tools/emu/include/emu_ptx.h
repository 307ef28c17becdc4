// tools/emu/include/emu_ptx.h: the warp collectives and the tensor-core / async-copy PTX the
// kernels use (ntkv_ptx.cuh and the shuffle/ballot intrinsics call these), written from the
// PTX ISA's descriptions, independently of any kernel's comments.
//
//  * Every collective (shfl.sync, ldmatrix, mma) deposits its operands in a per-warp slot
//    with a tag (the thread's collective count and the op), meets the warp at a barrier,
//    checks that every lane of the warp executes the same collective (.sync.aligned; a
//    divergent or exited lane aborts the run), computes its own outputs from the slots, and
//    meets the warp again before the slots are reused.
//  * mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 and
//    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. groupID g = lane >> 2, tig t = lane % 4.
//    16-bit A (16x16): a0..a7 in 4 .b32 registers (reg i/2, the lower-numbered element in the
//    lower 16 bits): row g for a0,a1,a4,a5 and g + 8 for a2,a3,a6,a7; col 2t + (i & 1), + 8 for
//    i >= 4. 16-bit B (16x8): b0..b3 in 2 registers: k = 2t + (i & 1), + 8 for i >= 2; n = g.
//    tf32 A (16x8): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); tf32 B (8x8): b0 (k = t,
//    n = g), b1 (k = t + 4, n = g). C/D (16x8 f32): ci at row g (i < 2) or g + 8, col 2t + (i & 1).
//    The products are exact in f64; the sum is formed in f64 and rounded once to f32 (the
//    hardware's internal order and precision are unspecified; the difference is far below the
//    16-bit/tf32 tolerances). A tf32 operand whose low 13 bits are not zero (the kernel did not
//    round it) is counted in counters().unrounded_tf32 and its low bits dropped.
//  * ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lane 8m + r gives the 16-byte aligned
//    shared address of row r of matrix m; register m of lane l holds row l >> 2, elements
//    2 (l % 4) and 2 (l % 4) + 1 (lower element in the lower half); with .trans it holds
//    (row 2 (l % 4), col l >> 2) and (row 2 (l % 4) + 1, col l >> 2). Alignment and bounds
//    (inside the launch's dynamic shared memory) are checked.
//  * cp.async.{cg,ca}.shared.global (16 bytes; ca also 4 or 8) with src-size: copies src-size
//    bytes, zero-fills the rest, reads nothing when src-size is 0; commit_group / wait_group N
//    as per-thread groups.
//    NTKV_EMU_CP_ASYNC picks when a copy lands, the two extremes the hardware allows:
//    "lazy" (the default; "deferred" is accepted too): only when a wait_group of the issuing
//    thread retires its group, so a stage read before its wait shows up as NaN or stale data;
//    "eager": at issue, so a stage overwritten while other threads still read it shows up as
//    wrong data. Global memory is read when the copy lands (under AddressSanitizer). Copies
//    a thread never waited for when it exits are counted in counters().cp_async_leftover and, unless
//    cp_async_leftover_fatal is cleared, abort the run.
#pragma once

#include "emu_runtime.h"

namespace ntkv_emu {

inline bool cp_async_leftover_fatal = true;

enum class CpAsyncMode { Lazy, Eager };
inline CpAsyncMode cp_async_mode_from_env() {
    const char* e = std::getenv("NTKV_EMU_CP_ASYNC");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "lazy") == 0 || std::strcmp(e, "deferred") == 0) return CpAsyncMode::Lazy;
    if (std::strcmp(e, "eager") == 0) return CpAsyncMode::Eager;
    std::fprintf(stderr, "emu: NTKV_EMU_CP_ASYNC=%s: expected lazy (or deferred) or eager\n", e);
    std::exit(2);
}
inline const CpAsyncMode cp_async_mode = cp_async_mode_from_env();

// ---- Warp collectives -----------------------------------------------------------------------
enum : uint32_t {
    OP_SHFL_XOR = 1,
    OP_SHFL_DOWN,
    OP_SHFL_UP,
    OP_SHFL_IDX,
    OP_BALLOT,
    OP_LDMATRIX,  // + 8 * (matrices - 1) + 32 * trans
    OP_MMA_F16 = 100,
    OP_MMA_BF16,
    OP_MMA_TF32,
};

struct WarpSlot {
    uint64_t tag;
    uint32_t u[8];
    float f[4];
};
inline WarpSlot warp_slots[MAX_WARPS][32];
inline thread_local uint64_t collective_seq = 0;

inline unsigned lane_id() { return threadIdx.x & 31u; }
// Lanes in this thread's warp (the last warp of a block that is not a multiple of 32 is short).
inline unsigned warp_lanes() { return std::min(32u, blockDim.x - (threadIdx.x & ~31u)); }
// This warp's exchange slots; a lane writes only its own before collective_meet.
inline WarpSlot* warp_slot_array() { return warp_slots[threadIdx.x >> 5]; }
// The first barrier of collective `op`: after it every lane's operands are in the slots.
inline void collective_meet(uint32_t op) {
    const unsigned lane = lane_id();
    WarpSlot* s = warp_slot_array();
    s[lane].tag = (collective_seq++ << 8) | op;
    warp_sync();
    if (warp_lanes() != 32) die("warp collective in a partial warp");
    for (unsigned l = 0; l < 32; ++l)
        if (s[l].tag != s[lane].tag) die("warp-collective op not executed by all 32 lanes in step (.sync.aligned)");
}
// The second barrier: nobody overwrites a slot before every lane has read it.
inline void collective_leave() { warp_sync(); }

// shfl.sync of a 4- or 8-byte value: lane `lane` reads the value of lane src(lane), or keeps its
// own when src(lane) is out of range (down/up past the warp's edge).
template <typename T, typename Src>
inline T shfl(uint32_t op, unsigned mask, T v, Src src) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4- or 8-byte values");
    if (mask != 0xffffffffu) die("__shfl*_sync with a partial mask is not modelled");
    const unsigned lane = lane_id();
    WarpSlot* s = warp_slot_array();
    std::memcpy(s[lane].u, &v, sizeof(T));
    collective_meet(op);
    const unsigned from = src(lane);
    T r;
    std::memcpy(&r, s[from < 32 ? from : lane].u, sizeof(T));
    collective_leave();
    return r;
}
inline unsigned ballot(unsigned mask, bool pred) {
    if (mask != 0xffffffffu) die("__ballot_sync with a partial mask is not modelled");
    WarpSlot* s = warp_slot_array();
    s[lane_id()].u[0] = pred ? 1u : 0u;
    collective_meet(OP_BALLOT);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) r |= (s[l].u[0] & 1u) << l;
    collective_leave();
    return r;
}

// ---- Shared addresses -----------------------------------------------------------------------
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

// ---- ldmatrix -------------------------------------------------------------------------------
// ldmatrix.m8n8.x{N}: lanes 8 m .. 8 m + 7 give the row addresses of matrix m < N.
template <unsigned N>
inline void ldmatrix(uint32_t (&r)[N], uint32_t addr, bool trans) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    WarpSlot* s = warp_slot_array();
    const unsigned lane = lane_id();
    s[lane].u[0] = addr;
    collective_meet(OP_LDMATRIX + 8 * (N - 1) + (trans ? 32 : 0));
    for (unsigned m = 0; m < N; ++m) {
        for (unsigned l = 0; l < 8; ++l) {
            if (s[8 * m + l].u[0] % 16 != 0) die("ldmatrix: row address not 16-byte aligned");
            shared_at(s[8 * m + l].u[0], 16);
        }
        uint16_t e[2];
        for (unsigned h = 0; h < 2; ++h) {
            const unsigned row = trans ? 2 * (lane & 3) + h : lane >> 2;
            const unsigned col = trans ? lane >> 2 : 2 * (lane & 3) + h;
            std::memcpy(&e[h], shared_at(s[8 * m + row].u[0] + 2 * col, 2), 2);
        }
        r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
    collective_leave();
}

// ---- mma.sync -------------------------------------------------------------------------------
inline double f16_value(uint16_t bits) { return (double)__half2float(__half{bits}); }
inline double bf16_value(uint16_t bits) { return (double)__bfloat162float(__nv_bfloat16{bits}); }
inline double tf32_value(uint32_t bits) {
    if (bits & 0x1fffu) {
        counters().unrounded_tf32.fetch_add(1, std::memory_order_relaxed);
        bits &= ~0x1fffu;
    }
    return (double)__uint_as_float(bits);
}

// D = A B + C for one warp; `op` is OP_MMA_F16 / OP_MMA_BF16 (m16n8k16) or OP_MMA_TF32 (m16n8k8).
inline void mma_sync(uint32_t op, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    WarpSlot* s = warp_slot_array();
    const unsigned lane = lane_id();
    for (int i = 0; i < 4; ++i) s[lane].u[i] = a[i], s[lane].f[i] = c[i];
    s[lane].u[4] = b0;
    s[lane].u[5] = b1;
    collective_meet(op);
    const bool tf32 = op == OP_MMA_TF32;
    const int K = tf32 ? 8 : 16;
    auto half_value = [op](uint32_t reg, unsigned h) {
        const uint16_t bits = (uint16_t)(h ? reg >> 16 : reg & 0xffffu);
        return op == OP_MMA_F16 ? f16_value(bits) : bf16_value(bits);
    };
    double A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        if (tf32) {
            A[g][t] = tf32_value(s[l].u[0]);
            A[g + 8][t] = tf32_value(s[l].u[1]);
            A[g][t + 4] = tf32_value(s[l].u[2]);
            A[g + 8][t + 4] = tf32_value(s[l].u[3]);
            B[t][g] = tf32_value(s[l].u[4]);
            B[t + 4][g] = tf32_value(s[l].u[5]);
        } else {
            for (unsigned i = 0; i < 8; ++i) {
                const unsigned row = g + ((i / 2) % 2 == 1 ? 8 : 0);
                const unsigned col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = half_value(s[l].u[i / 2], i & 1);
            }
            for (unsigned i = 0; i < 4; ++i) {
                const unsigned k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
                B[k][g] = half_value(s[l].u[4 + i / 2], i & 1);
            }
        }
    }
    float d[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = (lane >> 2) + (i >= 2 ? 8 : 0), col = 2 * (lane & 3) + (i & 1);
        // C[row][col] comes from the lane that holds it, which is this lane.
        double acc = (double)s[lane].f[i];
        for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
        d[i] = (float)acc;
    }
    if (lane == 0) counters().mma.fetch_add(1, std::memory_order_relaxed);
    collective_leave();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}
// ---- cp.async -------------------------------------------------------------------------------
struct PendingCopy {
    uint32_t dst;
    const void* src;
    uint32_t bytes, src_bytes;
    uint64_t group;
};
inline thread_local std::vector<PendingCopy> cp_pending;
inline thread_local uint64_t cp_group = 0;  // the open (uncommitted) group's number

inline void cp_async_land(const PendingCopy& c) {
    unsigned char* d = shared_at(c.dst, c.bytes);
    if (c.src_bytes > 0) std::memcpy(d, c.src, c.src_bytes);
    std::memset(d + c.src_bytes, 0, c.bytes - c.src_bytes);
}
// A cp.async of `bytes` (4, 8 or 16) with src-size `src_bytes`.
inline void cp_async(uint32_t dst, const void* src, uint32_t bytes, uint32_t src_bytes) {
    if (dst % bytes != 0) die("cp.async: shared address not aligned to the copy size");
    if (src_bytes > bytes) die("cp.async: src-size larger than the copy");
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0) die("cp.async: global address not aligned to the copy size");
    shared_at(dst, bytes);
    const PendingCopy c{dst, src, bytes, src_bytes, cp_group};
    if (cp_async_mode == CpAsyncMode::Eager) cp_async_land(c);
    else cp_pending.push_back(c);
}
inline void cp_async_commit() { ++cp_group; }
// cp.async.wait_group n: all but the n most recent committed groups complete. Copies of the
// open group are not committed and stay pending.
inline void cp_async_wait(uint32_t n) {
    std::vector<PendingCopy> keep;
    for (const PendingCopy& c : cp_pending) {
        if (c.group + n < cp_group) cp_async_land(c);
        else keep.push_back(c);
    }
    cp_pending.swap(keep);
}
// Called when a thread exits: copies never waited for are a kernel bug (their data never
// reaches a read the kernel ordered).
inline void thread_exit() {
    const size_t left = cp_pending.size();
    cp_pending.clear();
    cp_group = 0;
    collective_seq = 0;
    if (left > 0) {
        counters().cp_async_leftover.fetch_add(left);
        if (cp_async_leftover_fatal) die("thread exited with cp.async copies never waited for");
    }
}

}  // namespace ntkv_emu

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return ntkv_emu::shfl(ntkv_emu::OP_SHFL_XOR, mask, v, [=](unsigned l) { return (l ^ (unsigned)lane_mask) & 31u; });
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    return ntkv_emu::shfl(ntkv_emu::OP_SHFL_DOWN, mask, v, [=](unsigned l) { return l + delta; });
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    return ntkv_emu::shfl(ntkv_emu::OP_SHFL_UP, mask, v, [=](unsigned l) { return l >= delta ? l - delta : 32u; });
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src) {
    return ntkv_emu::shfl(ntkv_emu::OP_SHFL_IDX, mask, v, [=](unsigned) { return (unsigned)src & 31u; });
}
inline unsigned __ballot_sync(unsigned mask, bool pred) { return ntkv_emu::ballot(mask, pred); }
inline uint64_t __cvta_generic_to_shared(const void* p) { return ntkv_emu::shared_offset(p); }
