// cluster.cu: k-means of keys per head and cluster retrieval (src/cluster).
//
// k-means (one launch sequence per iteration, no host round trip):
//   ntkv_kmeans_init_<T>    seeded sample of C keys per head as the first centroids; labels
//                           set to "none", per-head flags cleared;
//   ntkv_kmeans_norms_<T>   (cosine) 1/|x| of every key, for the centroid update;
//   ntkv_kmeans_assign_<T>  a fused dot-product tile loop (128 keys x 64 centroids, 32-deep
//                           slices of D) with a running argmax over the centroid tiles: the
//                           T x C score matrix never reaches memory;
//   ntkv_kmeans_assign_tf32_d<D>_<T>  the TF32 mode of the assignment (tensor cores; D 64 or
//                           128), labels within a stated margin of the f32 ones;
//   ntkv_kmeans_sort        counting sort of the labels (one CTA per head): sizes, CSR
//                           indptr and members, each cluster's members ascending;
//   ntkv_kmeans_update_<T>  one CTA per (head, cluster) sums its members in member order.
// Every dot product is one f32 fma chain over d = 0, 1, ..., D-1 starting from +0, the same
// operations in the same order as the CPU reference (src/cluster/cpu.rs), so labels and
// centroids are bit-exact. Integer atomics only (histogram counts, bitmap bits).
//
// Retrieval:
//   ntkv_cluster_score_<T>  q.c per (list, cluster), combined over the list's query rows;
//   (the ranking is src/select's top-k over the scores)
//   ntkv_cluster_mark       budget prefix over the ranked sizes; sinks, window and the
//                           taken members set bits of a per-list token bitmap;
//   ntkv_cluster_write      the bitmap compacted to a sorted CSR token list.
#include <math_constants.h>

#include "ntkv_common.cuh"

namespace {

constexpr int ASSIGN_THREADS = 256;
constexpr int TK = 128;        // keys per assignment tile
constexpr int TC = 64;         // centroids per assignment tile
constexpr int DC = 32;         // depth of one staged slice of D
constexpr int KI = TK / 16;    // keys per thread
constexpr int CJ = TC / 16;    // centroids per thread
constexpr int ROW_THREADS = 128;    // init / update / score CTAs
constexpr int LIST_THREADS = 256;   // sort / mark / write CTAs
constexpr int SCORE_ROWS = 8;       // query rows per pass of the score kernel
constexpr uint32_t MAX_D = 1024;    // src/cluster MAX_HEAD_DIM
constexpr uint32_t NONE = 0xffffffffu;

// SplitMix64's output function: the per-head offset of the seeded sample.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Whether (s, i) ranks above (bs, bi): larger score, ties to the lower index. A NaN score
// never ranks above anything, so a NaN never wins a running argmax.
__device__ __forceinline__ bool better(float s, uint32_t i, float bs, uint32_t bi) {
    return s > bs || (s == bs && i < bi);
}

// Exclusive scan of one u32 per thread over the CTA (blockDim.x a multiple of 32, at most
// 1024); `total` receives the sum. Every thread must call it. Integer adds: any order gives
// the same result.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t& total) {
    __shared__ uint32_t warp_tot[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (int)(blockDim.x >> 5);
    uint32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        uint32_t t = lane < nwarps ? warp_tot[lane] : 0u;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        warp_tot[lane] = t;
    }
    __syncthreads();
    const uint32_t before = warp > 0 ? warp_tot[warp - 1] : 0u;
    total = warp_tot[nwarps - 1];
    __syncthreads();  // warp_tot may be reused by the next call
    return before + incl - v;
}

// |v|^2 as the fma chain over d in order, from smem (every thread gets the same value).
__device__ __forceinline__ float sq_norm(const float* v, uint32_t D) {
    float ss = 0.0f;
    for (uint32_t d = 0; d < D; ++d) ss = fmaf(v[d], v[d], ss);
    return ss;
}

// Stores centroid (h, c) from the f32 row in smem, unit length for cosine (a zero row stays
// zero). Every thread of the CTA calls it; row_s holds D values.
__device__ __forceinline__ void store_centroid(const NtkvKmeansParams& p, const float* row_s, uint64_t hc,
                                               float* __restrict__ centroids, bool normalize) {
    const uint32_t D = p.head_dim;
    float inv = 1.0f;
    if (normalize) {
        const float ss = sq_norm(row_s, D);
        inv = ss > 0.0f ? 1.0f / sqrtf(ss) : 0.0f;
    }
    for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) centroids[hc * D + d] = normalize ? row_s[d] * inv : row_s[d];
}

template <typename T>
__device__ __forceinline__ void kmeans_init(const NtkvKmeansParams& p, const T* __restrict__ keys,
                                            float* __restrict__ centroids, uint32_t* __restrict__ labels, uint32_t* __restrict__ iterations,
                                            uint32_t* __restrict__ done, uint32_t* __restrict__ changed) {
    __shared__ float row_s[MAX_D];
    const uint64_t blk = blockIdx.x;
    if (blk >= (uint64_t)p.heads * p.clusters || p.head_dim > MAX_D || p.tokens == 0) return;
    const uint32_t h = (uint32_t)(blk / p.clusters);
    const uint32_t c = (uint32_t)(blk % p.clusters);
    const uint64_t n = p.tokens;
    const uint64_t offset = mix64(p.seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(h + 1))) % n;
    const uint64_t t = (offset + (uint64_t)c * n / p.clusters) % n;
    const uint32_t D = p.head_dim;
    const T* x = keys + ((uint64_t)h * p.capacity + t) * D;
    for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) row_s[d] = ntkv::to_f32(x[d]);
    __syncthreads();
    store_centroid(p, row_s, (uint64_t)h * p.clusters + c, centroids, p.metric == 0);
    for (uint64_t i = (uint64_t)c * blockDim.x + threadIdx.x; i < n; i += (uint64_t)p.clusters * blockDim.x)
        labels[(uint64_t)h * p.capacity + i] = NONE;
    if (c == 0 && threadIdx.x == 0) {
        iterations[h] = 0;
        done[h] = 0;
        changed[h] = 0;
    }
}

template <typename T>
__device__ __forceinline__ void kmeans_norms(const NtkvKmeansParams& p, const T* __restrict__ keys,
                                             float* __restrict__ inv_norm) {
    const uint64_t n = (uint64_t)p.heads * p.tokens;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t h = i / p.tokens;
        const uint64_t t = i % p.tokens;
        const T* x = keys + (h * p.capacity + t) * p.head_dim;
        float ss = 0.0f;
        for (uint32_t d = 0; d < p.head_dim; ++d) {
            const float v = ntkv::to_f32(x[d]);
            ss = fmaf(v, v, ss);
        }
        inv_norm[h * p.capacity + t] = ss > 0.0f ? 1.0f / sqrtf(ss) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void kmeans_assign(const NtkvKmeansParams& p, const T* __restrict__ keys,
                                              const float* __restrict__ centroids, const uint32_t* __restrict__ done, uint32_t* __restrict__ labels,
                                              uint32_t* __restrict__ changed) {
    __shared__ float ks[TK][DC + 1];
    __shared__ float cs[TC][DC + 1];
    if (p.tokens <= p.first) return;
    const uint32_t tiles = (p.tokens - p.first + TK - 1) / TK;
    const uint64_t blk = blockIdx.x;
    if (blk >= (uint64_t)p.heads * tiles) return;
    const uint32_t h = (uint32_t)(blk / tiles);
    if (p.track != 0 && done[h] != 0) return;
    const uint32_t t0 = p.first + (uint32_t)(blk % tiles) * TK;
    const uint32_t nk = min((uint32_t)TK, p.tokens - t0);
    const uint32_t D = p.head_dim;
    const uint32_t C = p.clusters;
    const int tid = threadIdx.x;
    const int ty = tid / 16;  // keys ty + 16 i
    const int tx = tid % 16;  // centroids tx + 16 j
    const T* kbase = keys + ((uint64_t)h * p.capacity + t0) * D;
    const float* cbase = centroids + (uint64_t)h * C * D;

    float best_s[KI];
    uint32_t best_i[KI];
#pragma unroll
    for (int i = 0; i < KI; ++i) {
        best_s[i] = -CUDART_INF_F;
        best_i[i] = NONE;
    }
    const bool l2 = p.metric == 1;
    for (uint32_t c0 = 0; c0 < C; c0 += TC) {
        float acc[KI][CJ];
        float cn[CJ];  // L2: |c|^2, the same fma chain over d as the dot products
#pragma unroll
        for (int j = 0; j < CJ; ++j) cn[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < KI; ++i)
#pragma unroll
            for (int j = 0; j < CJ; ++j) acc[i][j] = 0.0f;
        for (uint32_t d0 = 0; d0 < D; d0 += DC) {
            __syncthreads();
            // Zero padding past T, C and D: fma(0, 0, acc) == acc for every acc the chain can
            // hold (it starts at +0, so it is never -0), so padding changes no bit.
            for (int e = tid; e < TK * DC; e += ASSIGN_THREADS) {
                const int r = e / DC, dd = e % DC;
                const uint32_t d = d0 + dd;
                ks[r][dd] = ((uint32_t)r < nk && d < D) ? ntkv::to_f32(kbase[(uint64_t)r * D + d]) : 0.0f;
            }
            for (int e = tid; e < TC * DC; e += ASSIGN_THREADS) {
                const int r = e / DC, dd = e % DC;
                const uint32_t d = d0 + dd;
                cs[r][dd] = (c0 + r < C && d < D) ? cbase[(uint64_t)(c0 + r) * D + d] : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int dd = 0; dd < DC; ++dd) {
                float kv[KI], cv[CJ];
#pragma unroll
                for (int i = 0; i < KI; ++i) kv[i] = ks[ty + 16 * i][dd];
#pragma unroll
                for (int j = 0; j < CJ; ++j) cv[j] = cs[tx + 16 * j][dd];
                if (l2) {
#pragma unroll
                    for (int j = 0; j < CJ; ++j) cn[j] = fmaf(cv[j], cv[j], cn[j]);
                }
#pragma unroll
                for (int i = 0; i < KI; ++i)
#pragma unroll
                    for (int j = 0; j < CJ; ++j) acc[i][j] = fmaf(kv[i], cv[j], acc[i][j]);
            }
        }
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
            const uint32_t c = c0 + tx + 16 * j;
            if (c >= C) continue;
#pragma unroll
            for (int i = 0; i < KI; ++i) {
                // Cosine: x.c; L2: -(|c|^2 - 2 x.c). Adding +0 makes -0 and +0 the same score.
                const float s = (l2 ? -fmaf(-2.0f, acc[i][j], cn[j]) : acc[i][j]) + 0.0f;
                if (better(s, c, best_s[i], best_i[i])) {
                    best_s[i] = s;
                    best_i[i] = c;
                }
            }
        }
    }
    // The 16 lanes of a half-warp share their keys: a total order, so any tree gives the
    // same winner.
#pragma unroll
    for (int i = 0; i < KI; ++i) {
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {
            const float s = __shfl_xor_sync(0xffffffffu, best_s[i], o);
            const uint32_t c = __shfl_xor_sync(0xffffffffu, best_i[i], o);
            if (better(s, c, best_s[i], best_i[i])) {
                best_s[i] = s;
                best_i[i] = c;
            }
        }
    }
    if (tx != 0) return;
    bool moved = false;
#pragma unroll
    for (int i = 0; i < KI; ++i) {
        const uint32_t r = ty + 16 * i;
        if (r >= nk) continue;
        const uint32_t lab = best_i[i] == NONE ? 0u : best_i[i];  // every score NaN: cluster 0
        uint32_t* slot = labels + (uint64_t)h * p.capacity + t0 + r;
        moved |= *slot != lab;
        *slot = lab;
    }
    if (moved && p.track != 0) changed[h] = 1u;  // every writer stores 1: no race on the value
}

// The TF32 assignment mode (src/cluster AssignPrecision::Tf32): the same scores, with the dot
// products x.c on the tensor cores (mma.m16n8k8, f32 accumulation in the hardware's order).
// Each of the 8 warps owns 16 keys of the CTA's 128, held for all of D as A fragments in
// registers (D/8 k-steps x 4 words, rounded to tf32 to nearest), so keys are read once. The
// head's centroids stream through a 3-stage cp.async ring of 64-centroid x 32-deep f32 slices;
// the tensor core reads their top 19 bits (tf32 truncation), which keeps the staging free of
// registers and conversions. The error per score term stays under src/cluster's
// TF32_EPSILON = 2^-9: 2^-11 (keys) + 2^-10 (centroids) + the accumulation. For L2, |c|^2 of
// each centroid is an exact f32 sum over the staged f32 slices (4 fma chains, chain q over the
// depths d with (d mod 32) / 8 = q, then (s0 + s1) + (s2 + s3)), so only x.c carries the tf32
// error. Equal centroids give equal scores bit for bit, and ties
// still go to the lower index.
constexpr int TF_CENT = 64;                 // centroids per tile: 8 n-tiles of 8
constexpr int TF_DEPTH = 32;                // depth of one staged slice
constexpr int TF_STRIDE = TF_DEPTH + 4;     // words per staged row: 144 B keeps every 16-byte
                                            // cp.async destination aligned and the 64-bit
                                            // fragment loads conflict-free
constexpr int TF_STAGES = 3;                // slices in flight
constexpr uint32_t TF32_RING_BYTES = TF_STAGES * TF_CENT * TF_STRIDE * 4;
static_assert(TF32_RING_BYTES == 27648, "src/cluster TF32_ASSIGN_SMEM is this ring's size");
static_assert(TF_CENT * TF_DEPTH / 4 % ASSIGN_THREADS == 0, "whole 16-byte copies per thread");

// Issues the cp.async copies of slice `s` (tile s / (D/32), depth slice s % (D/32)) of head
// `cbase`'s centroids into `buf`; centroids past C are zero-filled. One commit group per
// call, empty past the last slice, so every thread's group count stays uniform.
template <int D>
__device__ __forceinline__ void tf32_stage(uint32_t (*buf)[TF_STRIDE], const float* __restrict__ cbase, uint32_t C,
                                           uint32_t s, uint32_t n_slices) {
    constexpr uint32_t SL = D / TF_DEPTH;
    if (s < n_slices) {
        const uint32_t c0 = (s / SL) * TF_CENT, d0 = (s % SL) * TF_DEPTH;
#pragma unroll
        for (int i = 0; i < TF_CENT * TF_DEPTH / 4 / ASSIGN_THREADS; ++i) {
            const uint32_t e = threadIdx.x + (uint32_t)i * ASSIGN_THREADS;
            const uint32_t r = e / (TF_DEPTH / 4), q = e % (TF_DEPTH / 4);
            const bool in = c0 + r < C;
            const float* src = cbase + (uint64_t)(in ? c0 + r : 0) * D + d0 + 4 * q;
            ntkv::cp_async_cg16(ntkv::smem_u32(&buf[r][4 * q]), src, in ? 16u : 0u);
        }
    }
    ntkv::cp_async_commit();
}

template <typename T, int D>
__device__ __forceinline__ void kmeans_assign_tf32(const NtkvKmeansParams& p, const T* __restrict__ keys,
                                                   const float* __restrict__ centroids, const uint32_t* __restrict__ done,
                                                   uint32_t* __restrict__ labels, uint32_t* __restrict__ changed) {
    static_assert(D % TF_DEPTH == 0 && D <= 128, "the A fragments of D/8 k-steps live in registers");
    constexpr int KS = D / 8;
    constexpr uint32_t SL = D / TF_DEPTH;
    // The ring is the dynamic shared memory (TF32_RING_BYTES; src/cluster TF32_ASSIGN_SMEM).
    NTKV_DYNAMIC_SMEM(uint32_t, ring);
    uint32_t(*cs)[TF_CENT][TF_STRIDE] = reinterpret_cast<uint32_t(*)[TF_CENT][TF_STRIDE]>(ring);
    __shared__ float cn_s[TF_CENT];
    if (p.tokens <= p.first || p.head_dim != (uint32_t)D) return;
    const uint32_t tiles = (p.tokens - p.first + TK - 1) / TK;
    const uint64_t blk = blockIdx.x;
    if (blk >= (uint64_t)p.heads * tiles) return;
    const uint32_t h = (uint32_t)(blk / tiles);
    if (p.track != 0 && done[h] != 0) return;
    const uint32_t t0 = p.first + (uint32_t)(blk % tiles) * TK;
    const uint32_t nk = min((uint32_t)TK, p.tokens - t0);
    const uint32_t C = p.clusters;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const uint32_t r0 = (uint32_t)(warp * 16 + g), r1 = r0 + 8;  // the lane's two key rows
    const T* kbase = keys + ((uint64_t)h * p.capacity + t0) * D;
    const float* cbase = centroids + (uint64_t)h * C * D;
    const uint32_t n_slices = (C + TF_CENT - 1) / TF_CENT * SL;
#pragma unroll
    for (int s = 0; s < TF_STAGES - 1; ++s) tf32_stage<D>(cs[s], cbase, C, (uint32_t)s, n_slices);

    // The mma's k-step of 8 reads depth 8 k + 2 t as its k = t and 8 k + 2 t + 1 as k = t + 4
    // (A and B alike: a dot product's terms in another order), so each lane's pair of B
    // words is adjacent and one 64-bit shared load.
    uint32_t a[KS][4];
#pragma unroll
    for (int k = 0; k < KS; ++k) {
        const int d = 8 * k + 2 * t;
        a[k][0] = r0 < nk ? ntkv::to_tf32(ntkv::to_f32(kbase[(uint64_t)r0 * D + d])) : 0u;
        a[k][1] = r1 < nk ? ntkv::to_tf32(ntkv::to_f32(kbase[(uint64_t)r1 * D + d])) : 0u;
        a[k][2] = r0 < nk ? ntkv::to_tf32(ntkv::to_f32(kbase[(uint64_t)r0 * D + d + 1])) : 0u;
        a[k][3] = r1 < nk ? ntkv::to_tf32(ntkv::to_f32(kbase[(uint64_t)r1 * D + d + 1])) : 0u;
    }
    float best_s[2] = {-CUDART_INF_F, -CUDART_INF_F};
    uint32_t best_i[2] = {NONE, NONE};
    const bool l2 = p.metric == 1;
    for (uint32_t c0 = 0, s0 = 0; c0 < C; c0 += TF_CENT, s0 += SL) {
        // L2: thread (j, q) = (tid / 4, tid % 4) sums c_d^2 of centroid c0 + j over the depths
        // d with (d mod 32) / 8 = q, in ascending d, from the staged slices.
        const uint32_t j = (uint32_t)tid >> 2, q = (uint32_t)tid & 3;
        float ss = 0.0f;
        float acc[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
#pragma unroll
        for (uint32_t sl = 0; sl < SL; ++sl) {
            const uint32_t s = s0 + sl;
            // Slice s has landed for this thread, then for all; every thread is past slice
            // s - 1, whose buffer the next copies overwrite.
            ntkv::cp_async_wait<TF_STAGES - 2>();
            __syncthreads();
            tf32_stage<D>(cs[(s + TF_STAGES - 1) % TF_STAGES], cbase, C, s + TF_STAGES - 1, n_slices);
            const uint32_t(*buf)[TF_STRIDE] = cs[s % TF_STAGES];
            if (l2) {
                // Two 16-byte loads: a quarter-warp's 8 lanes hit 8 distinct 4-bank groups.
                const uint4 u = *reinterpret_cast<const uint4*>(&buf[j][8 * q]);
                const uint4 w = *reinterpret_cast<const uint4*>(&buf[j][8 * q + 4]);
                const uint32_t v[8] = {u.x, u.y, u.z, u.w, w.x, w.y, w.z, w.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) ss = fmaf(__uint_as_float(v[i]), __uint_as_float(v[i]), ss);
            }
#pragma unroll
            for (int kk = 0; kk < TF_DEPTH / 8; ++kk) {
                const int k = (int)sl * (TF_DEPTH / 8) + kk;
#pragma unroll
                for (int n = 0; n < 8; ++n) {
                    // 8-byte aligned: even row stride, even column; a half-warp's 16 lanes
                    // cover banks 4 g + 2 t, +1 once each.
                    const uint2 b = *reinterpret_cast<const uint2*>(&buf[8 * n + g][8 * kk + 2 * t]);
                    ntkv::mma_m16n8k8_tf32(acc[n], a[k], b.x, b.y);
                }
            }
        }
        if (l2) {
            // The previous tile's scores read cn_s before this tile's first slice barrier.
            ss += __shfl_xor_sync(0xffffffffu, ss, 1);
            ss += __shfl_xor_sync(0xffffffffu, ss, 2);
            if (q == 0) cn_s[j] = ss;
            __syncthreads();
        }
        // acc[n][e]: key row (e < 2 ? g : g + 8), centroid c0 + 8 n + 2 t + (e & 1). A lane
        // meets its candidates in ascending index, so "strictly greater" alone keeps ties at
        // the lower index (and -0 == +0 needs no canonical zero); a NaN never compares
        // greater. The quad reduction below, across lanes, uses the full order.
        const bool full = c0 + TF_CENT <= C;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t cl = (uint32_t)(8 * n + 2 * t + (e & 1));
                if (!full && c0 + cl >= C) continue;
                const float s = l2 ? -fmaf(-2.0f, acc[n][e], cn_s[cl]) : acc[n][e];
                const int row = e >> 1;
                if (s > best_s[row]) {
                    best_s[row] = s;
                    best_i[row] = c0 + cl;
                }
            }
        }
    }
    ntkv::cp_async_wait<0>();  // the empty trailing groups: nothing left in flight at exit
    // The 4 lanes of a quad share their rows: a total order, so any tree gives the same winner.
#pragma unroll
    for (int row = 0; row < 2; ++row) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            const float s = __shfl_xor_sync(0xffffffffu, best_s[row], o);
            const uint32_t c = __shfl_xor_sync(0xffffffffu, best_i[row], o);
            if (better(s, c, best_s[row], best_i[row])) {
                best_s[row] = s;
                best_i[row] = c;
            }
        }
    }
    if (t != 0) return;
    bool moved = false;
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        const uint32_t r = row == 0 ? r0 : r1;
        if (r >= nk) continue;
        // No score above -inf (every score NaN or -inf): cluster 0.
        const uint32_t lab = best_i[row] == NONE ? 0u : best_i[row];
        uint32_t* slot = labels + (uint64_t)h * p.capacity + t0 + r;
        moved |= *slot != lab;
        *slot = lab;
    }
    if (moved && p.track != 0) changed[h] = 1u;  // every writer stores 1: no race on the value
}

// One CTA per head: sizes, indptr and members from the labels of tokens [0, tokens).
// Labels >= C (none) belong to no cluster. Within a cluster members keep token order: the
// scatter goes warp by warp, and within a warp lanes with the same label rank by lane.
__device__ __forceinline__ void kmeans_sort(const NtkvKmeansParams& p, const uint32_t* __restrict__ labels,
                                            uint32_t* __restrict__ done, uint32_t* __restrict__ changed,
                                            uint32_t* __restrict__ iterations, uint32_t* __restrict__ sizes,
                                            uint32_t* __restrict__ indptr, uint32_t* __restrict__ members,
                                            uint32_t* __restrict__ cursor) {
    const uint32_t h = blockIdx.x;
    if (h >= p.heads) return;
    const int tid = threadIdx.x;
    if (p.track != 0) {
        if (done[h] != 0) return;
        const bool moved = changed[h] != 0;
        __syncthreads();
        if (tid == 0) {
            iterations[h] += 1;
            changed[h] = 0;
            if (p.track == 2 && !moved) done[h] = 1;
        }
        // No label moved: members and centroids from the previous pass are already final.
        if (p.track == 2 && !moved) return;
    }
    const uint32_t C = p.clusters;
    const uint32_t T = p.tokens;
    const uint32_t* lab = labels + (uint64_t)h * p.capacity;
    uint32_t* sz = sizes + (uint64_t)h * C;
    uint32_t* ip = indptr + (uint64_t)h * (C + 1);
    uint32_t* cur = cursor + (uint64_t)h * C;
    uint32_t* mem = members + (uint64_t)h * p.capacity;
    for (uint32_t c = tid; c < C; c += blockDim.x) sz[c] = 0;
    __syncthreads();
    for (uint32_t t = tid; t < T; t += blockDim.x) {
        const uint32_t l = lab[t];
        if (l < C) atomicAdd(&sz[l], 1u);
    }
    __syncthreads();
    const uint32_t per = (C + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(C, tid * per), hi = min(C, lo + per);
    uint32_t local = 0;
    for (uint32_t c = lo; c < hi; ++c) local += sz[c];
    uint32_t total;
    uint32_t run = block_exclusive_scan(local, total);
    for (uint32_t c = lo; c < hi; ++c) {
        ip[c] = run;
        cur[c] = run;
        run += sz[c];
    }
    if (tid == 0) ip[C] = total;
    __syncthreads();
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = (int)(blockDim.x >> 5);
    const uint32_t nbits = C > 1 ? 32 - __clz(C - 1) : 0;
    for (uint32_t base = 0; base < T; base += blockDim.x) {
        const uint32_t t = base + tid;
        const uint32_t l = t < T ? lab[t] : NONE;
        const bool valid = l < C;
        for (int w = 0; w < nwarps; ++w) {
            if (warp == w) {
                uint32_t peers = __ballot_sync(0xffffffffu, valid);
                for (uint32_t b = 0; b < nbits; ++b) {
                    const bool bit = ((l >> b) & 1u) != 0;
                    const uint32_t m = __ballot_sync(0xffffffffu, valid && bit);
                    peers &= bit ? m : ~m;
                }
                if (!valid) peers = 0;
                const uint32_t rank = __popc(peers & ((1u << lane) - 1u));
                const int leader = peers ? __ffs(peers) - 1 : lane;
                const uint32_t mine = (valid && rank == 0) ? cur[l] : 0u;
                const uint32_t start = __shfl_sync(0xffffffffu, mine, leader);
                if (valid) {
                    const uint32_t pos = start + rank;
                    if (pos < p.capacity) mem[pos] = t;
                }
                __syncwarp();
                if (valid && rank == 0) cur[l] = start + __popc(peers);
            }
            __syncthreads();
        }
    }
}

// One CTA per (head, cluster): the member-order sum of the members' keys (cosine: of the
// unit keys, fma(x_d, 1/|x|, acc)), then the mean (L2) or the unit direction (cosine). An
// empty cluster, or a cosine sum of zero length, keeps its centroid.
template <typename T>
__device__ __forceinline__ void kmeans_update(const NtkvKmeansParams& p, const T* __restrict__ keys,
                                              const float* __restrict__ inv_norm, const uint32_t* __restrict__ indptr,
                                              const uint32_t* __restrict__ members, const uint32_t* __restrict__ done,
                                              float* __restrict__ centroids) {
    __shared__ float row_s[MAX_D];
    const uint64_t blk = blockIdx.x;
    if (blk >= (uint64_t)p.heads * p.clusters || p.head_dim > MAX_D) return;
    const uint32_t h = (uint32_t)(blk / p.clusters);
    const uint32_t c = (uint32_t)(blk % p.clusters);
    if (p.track != 0 && done[h] != 0) return;
    const uint32_t* ip = indptr + (uint64_t)h * (p.clusters + 1);
    const uint32_t e = min(ip[c + 1], p.capacity);
    const uint32_t s = min(ip[c], e);
    if (s == e) return;
    const uint32_t D = p.head_dim;
    const uint64_t row0 = (uint64_t)h * p.capacity;
    const uint32_t* mem = members + row0;
    const bool cosine = p.metric == 0;
    for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t j = s; j < e; ++j) {
            const uint32_t m = min(mem[j], p.capacity - 1);
            const float x = ntkv::to_f32(keys[(row0 + m) * D + d]);
            acc = cosine ? fmaf(x, inv_norm[row0 + m], acc) : acc + x;
        }
        row_s[d] = cosine ? acc : acc / (float)(e - s);
    }
    __syncthreads();
    if (cosine && !(sq_norm(row_s, D) > 0.0f)) return;
    store_centroid(p, row_s, (uint64_t)h * p.clusters + c, centroids, cosine);
}

// ---- retrieval -----------------------------------------------------------------------

// grid: n_lists * ceil(C / ROW_THREADS); thread = one centroid. Row scores are fma chains
// over d from +0; combined over rows r = tq * group + g in order: max keeps the larger (a NaN
// row makes the score NaN), sum adds in row order.
template <typename T>
__device__ __forceinline__ void cluster_score(const NtkvClusterRetrieveParams& p, const T* __restrict__ q,
                                              const float* __restrict__ centroids, float* __restrict__ scores) {
    __shared__ float cs[ROW_THREADS][DC + 1];
    __shared__ float qs[SCORE_ROWS][DC];
    const uint32_t ctiles = (p.clusters + ROW_THREADS - 1) / ROW_THREADS;
    const uint64_t blk = blockIdx.x;
    if (blk >= (uint64_t)p.n_lists * ctiles) return;
    const uint32_t list = (uint32_t)(blk / ctiles);
    const uint32_t c0 = (uint32_t)(blk % ctiles) * ROW_THREADS;
    const uint32_t b = list / p.kv_heads;
    const uint32_t hk = list % p.kv_heads;
    const uint32_t D = p.head_dim;
    const int tid = threadIdx.x;
    const uint32_t c = c0 + tid;
    const float* cbase = centroids + (uint64_t)list * p.clusters * D;
    float s = 0.0f;
    for (uint32_t r0 = 0; r0 < p.rows; r0 += SCORE_ROWS) {
        float acc[SCORE_ROWS];
#pragma unroll
        for (int i = 0; i < SCORE_ROWS; ++i) acc[i] = 0.0f;
        for (uint32_t d0 = 0; d0 < D; d0 += DC) {
            __syncthreads();
            for (int e = tid; e < ROW_THREADS * DC; e += ROW_THREADS) {
                const int r = e / DC, dd = e % DC;
                const uint32_t d = d0 + dd;
                cs[r][dd] = (c0 + r < p.clusters && d < D) ? cbase[(uint64_t)(c0 + r) * D + d] : 0.0f;
            }
            for (int e = tid; e < SCORE_ROWS * DC; e += ROW_THREADS) {
                const int i = e / DC, dd = e % DC;
                const uint32_t r = r0 + i, d = d0 + dd;
                float v = 0.0f;
                if (r < p.rows && d < D) {
                    const uint32_t tq = r / p.group, g = r % p.group;
                    const uint64_t row = ((uint64_t)b * p.q_tokens + tq) * p.q_heads + (uint64_t)hk * p.group + g;
                    v = ntkv::to_f32(q[row * D + d]);
                }
                qs[i][dd] = v;
            }
            __syncthreads();
            for (int dd = 0; dd < DC; ++dd) {
                const float cv = cs[tid][dd];
#pragma unroll
                for (int i = 0; i < SCORE_ROWS; ++i) acc[i] = fmaf(qs[i][dd], cv, acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < SCORE_ROWS; ++i) {
            const uint32_t r = r0 + i;
            const float v = acc[i];
            if (r >= p.rows) {
                // past the last row: nothing to combine
            } else if (r == 0) {
                s = v;
            } else if (p.combine == 1) {
                s = s + v;
            } else if (s != s || v != v) {
                s = CUDART_NAN_F;
            } else if (v > s) {
                s = v;
            }
        }
    }
    if (c < p.clusters) scores[(uint64_t)list * p.clusters + c] = s + 0.0f;
}

// Members [s, e) of cluster `cl` of list `list`, clamped to the members row.
__device__ __forceinline__ void cluster_range(const NtkvClusterRetrieveParams& p, const uint32_t* __restrict__ cindptr,
                                              uint32_t list, uint32_t cl, uint32_t& s, uint32_t& e) {
    if (cl >= p.clusters) {
        s = e = 0;
        return;
    }
    const uint32_t* ip = cindptr + (uint64_t)list * (p.clusters + 1);
    e = min(ip[cl + 1], p.capacity);
    s = min(ip[cl], e);
}

__device__ __forceinline__ void set_bit(uint32_t* bm, uint32_t t) { atomicOr(&bm[t >> 5], 1u << (t & 31)); }

// One CTA per list; dynamic shared memory: (clusters + 1) u32 prefix sums of the ranked sizes,
// saturating at 2^32 - 1 (they are only compared with the budget).
__device__ __forceinline__ void cluster_mark(const NtkvClusterRetrieveParams& p, const uint32_t* __restrict__ ranked,
                                             const uint32_t* __restrict__ cindptr,
                                             const uint32_t* __restrict__ members,
                                             const uint32_t* __restrict__ seq_lens, uint32_t* __restrict__ bitmap,
                                             uint32_t* __restrict__ counts) {
    NTKV_DYNAMIC_SMEM(uint32_t, pre);
    if (ntkv::dynamic_smem_size() < (p.clusters + 1) * 4u) return;
    const uint32_t list = blockIdx.x;
    if (list >= p.n_lists) return;
    const uint32_t b = list / p.kv_heads;
    const uint32_t len = min(seq_lens[b], p.capacity);
    const uint32_t nw = (len + 31) / 32;
    uint32_t* bm = bitmap + (uint64_t)list * p.words;
    const uint32_t* rk = ranked + (uint64_t)list * p.clusters;
    const int tid = threadIdx.x;
    for (uint32_t w = tid; w < nw; w += blockDim.x) bm[w] = 0;

    const uint32_t C = p.clusters;
    const uint32_t per = (C + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(C, tid * per), hi = min(C, lo + per);
    uint32_t local = 0;
    for (uint32_t i = lo; i < hi; ++i) {
        uint32_t s, e;
        cluster_range(p, cindptr, list, rk[i], s, e);
        const uint32_t n = e - s;
        local = local > 0xffffffffu - n ? 0xffffffffu : local + n;
    }
    // The scan of saturated chunk sums: exact while the sum fits, which is all the budget
    // comparison needs (the budget is below 2^32 - 1 whenever anything is cut).
    uint32_t total;
    uint32_t run = block_exclusive_scan(local, total);
    if (tid == 0) pre[0] = 0;
    for (uint32_t i = lo; i < hi; ++i) {
        uint32_t s, e;
        cluster_range(p, cindptr, list, rk[i], s, e);
        const uint32_t n = e - s;
        run = run > 0xffffffffu - n ? 0xffffffffu : run + n;
        pre[i + 1] = run;
    }
    __syncthreads();
    const uint32_t take = min(p.cluster_budget, pre[C]);
    for (uint32_t j = tid; j < take; j += blockDim.x) {
        // The rank i with pre[i] <= j < pre[i + 1]: whole clusters first, then the cut one.
        uint32_t a = 0, z = C;  // pre[a] <= j < pre[z]
        while (z - a > 1) {
            const uint32_t mid = (a + z) / 2;
            if (pre[mid] <= j) a = mid; else z = mid;
        }
        uint32_t s, e;
        cluster_range(p, cindptr, list, rk[a], s, e);
        const uint32_t off = j - pre[a];
        if (s + off >= e) continue;
        const uint32_t t = members[(uint64_t)list * p.capacity + s + off];
        if (t < len) set_bit(bm, t);
    }
    const uint32_t ns = min(p.sinks, len);
    for (uint32_t t = tid; t < ns; t += blockDim.x) set_bit(bm, t);
    const uint32_t nwin = min(p.window, len);
    for (uint32_t t = len - nwin + tid; t < len; t += blockDim.x) set_bit(bm, t);
    __syncthreads();
    uint32_t bits = 0;
    for (uint32_t w = tid; w < nw; w += blockDim.x) bits += __popc(bm[w]);
    uint32_t n;
    (void)block_exclusive_scan(bits, n);
    if (tid == 0) counts[list] = n;
}

// One CTA per list: its offset is the sum of the earlier lists' counts; the bitmap's set bits
// are written in ascending order.
__device__ __forceinline__ void cluster_write(const NtkvClusterRetrieveParams& p, const uint32_t* __restrict__ seq_lens,
                                              const uint32_t* __restrict__ bitmap,
                                              const uint32_t* __restrict__ counts, uint32_t* __restrict__ indptr,
                                              uint32_t* __restrict__ indices) {
    const uint32_t list = blockIdx.x;
    if (list >= p.n_lists) return;
    const int tid = threadIdx.x;
    uint32_t before = 0;
    for (uint32_t l = tid; l < list; l += blockDim.x) before += counts[l];
    uint32_t offset;
    (void)block_exclusive_scan(before, offset);
    if (list == 0 && tid == 0) indptr[0] = 0;
    if (tid == 0) indptr[list + 1] = offset + counts[list];
    const uint32_t len = min(seq_lens[list / p.kv_heads], p.capacity);
    const uint32_t nw = (len + 31) / 32;
    const uint32_t* bm = bitmap + (uint64_t)list * p.words;
    const uint32_t per = (nw + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(nw, tid * per), hi = min(nw, lo + per);
    uint32_t local = 0;
    for (uint32_t w = lo; w < hi; ++w) local += __popc(bm[w]);
    uint32_t unused;
    uint64_t pos = (uint64_t)offset + block_exclusive_scan(local, unused);
    for (uint32_t w = lo; w < hi; ++w) {
        uint32_t word = bm[w];
        while (word != 0) {
            const uint32_t bit = (uint32_t)__ffs((int)word) - 1;
            if (pos < p.n_indices) indices[pos] = w * 32 + bit;
            ++pos;
            word &= word - 1;
        }
    }
}

}  // namespace

#define NTKV_CLUSTER_TYPED(T, SUF)                                                                                  \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) ntkv_kmeans_init_##SUF(                               \
        const NtkvKmeansParams p, const T* __restrict__ keys, float* __restrict__ centroids,                       \
        uint32_t* __restrict__ labels, uint32_t* __restrict__ iterations, uint32_t* __restrict__ done,            \
        uint32_t* __restrict__ changed) {                                                                           \
        kmeans_init<T>(p, keys, centroids, labels, iterations, done, changed);                                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) ntkv_kmeans_norms_##SUF(                              \
        const NtkvKmeansParams p, const T* __restrict__ keys, float* __restrict__ inv_norm) {                      \
        kmeans_norms<T>(p, keys, inv_norm);                                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ASSIGN_THREADS) ntkv_kmeans_assign_##SUF(                          \
        const NtkvKmeansParams p, const T* __restrict__ keys, const float* __restrict__ centroids,                 \
        const uint32_t* __restrict__ done, uint32_t* __restrict__ labels, uint32_t* __restrict__ changed) {       \
        kmeans_assign<T>(p, keys, centroids, done, labels, changed);                                               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ASSIGN_THREADS) ntkv_kmeans_assign_tf32_d64_##SUF(                 \
        const NtkvKmeansParams p, const T* __restrict__ keys, const float* __restrict__ centroids,                 \
        const uint32_t* __restrict__ done, uint32_t* __restrict__ labels, uint32_t* __restrict__ changed) {       \
        kmeans_assign_tf32<T, 64>(p, keys, centroids, done, labels, changed);                                      \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ASSIGN_THREADS) ntkv_kmeans_assign_tf32_d128_##SUF(                \
        const NtkvKmeansParams p, const T* __restrict__ keys, const float* __restrict__ centroids,                 \
        const uint32_t* __restrict__ done, uint32_t* __restrict__ labels, uint32_t* __restrict__ changed) {       \
        kmeans_assign_tf32<T, 128>(p, keys, centroids, done, labels, changed);                                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) ntkv_kmeans_update_##SUF(                             \
        const NtkvKmeansParams p, const T* __restrict__ keys, const float* __restrict__ inv_norm,                  \
        const uint32_t* __restrict__ indptr, const uint32_t* __restrict__ members,                                 \
        const uint32_t* __restrict__ done, float* __restrict__ centroids) {                                        \
        kmeans_update<T>(p, keys, inv_norm, indptr, members, done, centroids);                                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) ntkv_cluster_score_##SUF(                             \
        const NtkvClusterRetrieveParams p, const T* __restrict__ q, const float* __restrict__ centroids,           \
        float* __restrict__ scores) {                                                                               \
        cluster_score<T>(p, q, centroids, scores);                                                                  \
    }

NTKV_CLUSTER_TYPED(float, f32)
NTKV_CLUSTER_TYPED(__half, f16)
NTKV_CLUSTER_TYPED(__nv_bfloat16, bf16)

extern "C" __global__ void __launch_bounds__(LIST_THREADS)
    ntkv_kmeans_sort(const NtkvKmeansParams p, const uint32_t* __restrict__ labels, uint32_t* __restrict__ done,
                     uint32_t* __restrict__ changed, uint32_t* __restrict__ iterations, uint32_t* __restrict__ sizes,
                     uint32_t* __restrict__ indptr, uint32_t* __restrict__ members, uint32_t* __restrict__ cursor) {
    kmeans_sort(p, labels, done, changed, iterations, sizes, indptr, members, cursor);
}

extern "C" __global__ void __launch_bounds__(LIST_THREADS)
    ntkv_cluster_mark(const NtkvClusterRetrieveParams p, const uint32_t* __restrict__ ranked,
                      const uint32_t* __restrict__ cindptr, const uint32_t* __restrict__ members,
                      const uint32_t* __restrict__ seq_lens, uint32_t* __restrict__ bitmap,
                      uint32_t* __restrict__ counts) {
    cluster_mark(p, ranked, cindptr, members, seq_lens, bitmap, counts);
}

extern "C" __global__ void __launch_bounds__(LIST_THREADS)
    ntkv_cluster_write(const NtkvClusterRetrieveParams p, const uint32_t* __restrict__ seq_lens,
                       const uint32_t* __restrict__ bitmap, const uint32_t* __restrict__ counts,
                       uint32_t* __restrict__ indptr, uint32_t* __restrict__ indices) {
    cluster_write(p, seq_lens, bitmap, counts, indptr, indices);
}
