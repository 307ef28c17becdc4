// decode.cu: sparse-index decode attention (src/decode).
//
// Flash-decoding over a per-(sequence, kv head) sorted list of token indices:
//   ntkv_decode_validate        checks every list (ascending, unique, < cache_lens[b]) and
//                               reports the lowest bad position before any attention launch;
//   ntkv_decode_attn_<T>_d<D>   one CTA per (list, chunk of the list, tile of query rows):
//                               gathers K/V rows by index with 16-byte cp.async into a
//                               double-buffered shared-memory tile, scores in f32, online
//                               softmax in the log2 domain, accumulates O; writes o/lse
//                               directly when the list is one chunk, otherwise a partial
//                               state (acc, m, l) and a ticket: the CTA that draws the last
//                               ticket of its (list, row tile) merges the chunks' states in
//                               chunk order (the exact log-sum-exp merge of
//                               ntkv_flashdecode.cuh). No CTA waits for another, and no
//                               float atomics.
//
// All query rows that read one kv head (group * q_tokens of them) share the CTA, so each
// gathered K/V row is read from memory once per row tile (16 rows).
#include <math_constants.h>

#include "ntkv_common.cuh"
#include "ntkv_flashdecode.cuh"

namespace {

constexpr int TK = 64;         // tokens per shared-memory tile
constexpr int R_TILE = 16;     // query rows per CTA
constexpr int THREADS = 128;   // threads per CTA
constexpr int WARPS = THREADS / 32;
constexpr int KPAD = 8;        // row padding in elements: 16 bytes, so 8 consecutive rows
                               // of a 16-byte column fall in 8 different bank groups

static_assert(TK == 64, "the softmax phase reads two scores per lane");

// Bytes of dynamic shared memory the attention kernel needs for head dim D. The Rust side
// (src/decode/gpu.rs, attn_smem_bytes) computes the same number; the kernel checks it.
__host__ __device__ constexpr uint32_t attn_smem_bytes(int D) {
    return (uint32_t)(R_TILE * D * 4          // q_s
                      + R_TILE * TK * 4       // s_s
                      + 3 * R_TILE * 4        // alpha_s, l_s, m_s
                      + R_TILE * 8            // lim_s
                      + 2 * TK * 4            // idx_s
                      + 2 * 2 * TK * (D + KPAD) * 2);  // k_s, v_s: 2 stages each
}

// Flat offset of query row (b, tq, head) in q / o, in elements (times head_dim) or in lse.
__device__ __forceinline__ uint64_t row_offset(const NtkvDecodeParams& p, uint32_t b, uint32_t hkv, uint32_t gr) {
    return ntkv::fd_row_offset(b, hkv, gr, p.group, p.q_tokens, p.q_heads);
}

// Calls f(it, r, c) for this thread's items it < ITEMS of a grid of rows of N items dealt out
// THREADS at a time: item tid + it THREADS is (r, c), row-major.
template <int ITEMS, int N, typename F>
__device__ __forceinline__ void for_items(int tid, F&& f) {
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int e = tid + it * THREADS;
        f(it, e / N, e % N);
    }
}

template <typename T, int D>
__device__ __forceinline__ void decode_attn(const NtkvDecodeParams& p, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            const uint32_t* __restrict__ indptr,
                                            const uint32_t* __restrict__ indices,
                                            const uint32_t* __restrict__ cache_lens, T* __restrict__ o,
                                            float* __restrict__ lse, float* __restrict__ ws_acc,
                                            float* __restrict__ ws_ml, uint32_t* __restrict__ tickets) {
    constexpr int KS = D + KPAD;                        // shared row stride, elements
    constexpr int CHUNKS16 = D / 8;                     // 16-byte pieces per row
    constexpr int PAIRS = D / 2;                        // column pairs per row
    constexpr int S_ITEMS = R_TILE * TK / THREADS;      // scores per thread per tile
    constexpr int PV_ITEMS = R_TILE * PAIRS / THREADS;  // output pairs per thread
    constexpr int LOAD_ITEMS = TK * CHUNKS16 / THREADS; // 16-byte copies per thread per tensor
    static_assert(S_ITEMS * THREADS == R_TILE * TK, "score items");
    static_assert(PV_ITEMS * THREADS == R_TILE * PAIRS, "output items");
    static_assert(LOAD_ITEMS * THREADS == TK * CHUNKS16, "load items");
    static_assert(PAIRS % 32 == 0, "a warp's output pairs share one row");

    NTKV_DYNAMIC_SMEM(unsigned char, smem);
    // A launch with too little shared memory does nothing (and the differential tests fail)
    // rather than touching memory it does not own.
    if (ntkv::dynamic_smem_size() < attn_smem_bytes(D)) return;
    float* q_s = reinterpret_cast<float*>(smem);        // [R_TILE][D], scaled to log2 units
    float* s_s = q_s + R_TILE * D;                      // [R_TILE][TK], scores then weights
    float* alpha_s = s_s + R_TILE * TK;                 // [R_TILE] rescale of this tile
    float* l_s = alpha_s + R_TILE;                      // [R_TILE] running sum
    float* m_s = l_s + R_TILE;                          // [R_TILE] running max (log2 units)
    long long* lim_s = reinterpret_cast<long long*>(m_s + R_TILE);  // [R_TILE] causal limit
    uint32_t* idx_s = reinterpret_cast<uint32_t*>(lim_s + R_TILE);  // [2][TK]
    T* k_s = reinterpret_cast<T*>(idx_s + 2 * TK);      // [2][TK][KS]
    T* v_s = k_s + 2 * TK * KS;                         // [2][TK][KS]

    const ntkv::FdItem item = ntkv::fd_work_item(p);
    if (!item.valid) return;
    const uint32_t list = item.list, chunk = item.chunk, row_tile = item.row_tile, b = item.b, hkv = item.hkv;

    uint64_t list_begin, list_end, c_begin, c_end;
    ntkv::csr_bounds(indptr, list, p.n_indices, list_begin, list_end);
    if (!ntkv::fd_chunk_range(p, chunk, list_begin, list_end, c_begin, c_end)) return;

    const uint32_t row0 = row_tile * R_TILE;
    if (row0 >= p.rows) return;
    const int R = (int)min((uint32_t)R_TILE, p.rows - row0);
    const uint32_t cache_len = min(cache_lens[b], p.cache_capacity);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    for (int e = tid; e < R * D; e += THREADS) {
        const int r = e / D;
        const int d = e % D;
        const uint64_t off = row_offset(p, b, hkv, row0 + r) * D + d;
        q_s[r * D + d] = ntkv::to_f32(q[off]) * p.scale_log2;
    }
    if (tid < R_TILE) {
        alpha_s[tid] = 0.f;
        l_s[tid] = 0.f;
        m_s[tid] = -CUDART_INF_F;
        const uint32_t tq = (row0 + tid) / p.group;
        lim_s[tid] = p.causal ? (long long)cache_len - (long long)p.q_tokens + (long long)tq : LLONG_MAX;
    }

    const T* k_head = k + ((uint64_t)b * p.kv_heads + hkv) * p.cache_capacity * D;
    const T* v_head = v + ((uint64_t)b * p.kv_heads + hkv) * p.cache_capacity * D;
    const uint32_t n_tiles = (uint32_t)((c_end - c_begin + TK - 1) / TK);

    // Index of token tid of a tile; padding past the chunk is UINT32_MAX (never < cache_len).
    // Threads tid >= TK hold no index.
    auto fetch_index = [&](uint32_t tile) -> uint32_t {
        const uint64_t pos = c_begin + (uint64_t)tile * TK + tid;
        return (tid < TK && pos < c_end) ? indices[pos] : 0xFFFFFFFFu;
    };
    // Gathers the K and V rows of a tile into stage buf. Rows whose index is not below
    // cache_len (padding, or anything a bad list could hold) are zero-filled, not read.
    auto issue_tile = [&](int buf) {
#pragma unroll
        for (int it = 0; it < LOAD_ITEMS; ++it) {
            const int e = tid + it * THREADS;
            const int t = e / CHUNKS16;
            const int c = e % CHUNKS16;
            const uint32_t idx = idx_s[buf * TK + t];
            const bool ok = idx < cache_len;
            const uint64_t goff = ok ? (uint64_t)idx * D + c * 8 : 0;
            const uint32_t bytes = ok ? 16u : 0u;
            ntkv::cp_async_cg16(ntkv::smem_u32(k_s + (buf * TK + t) * KS + c * 8), k_head + goff, bytes);
            ntkv::cp_async_cg16(ntkv::smem_u32(v_s + (buf * TK + t) * KS + c * 8), v_head + goff, bytes);
        }
        ntkv::cp_async_commit();
    };

    // The indices of tile i + 2 are fetched into a register while tile i is computed, so
    // the dependent index -> row gather never waits on a fresh index load.
    uint32_t next_idx = 0xFFFFFFFFu;
    if (n_tiles > 0) {
        if (tid < TK) idx_s[tid] = fetch_index(0);
        next_idx = fetch_index(1);
        __syncthreads();
        issue_tile(0);
    }
    __syncthreads();  // q_s, lim_s and the running state are visible

    float acc[PV_ITEMS][2];
#pragma unroll
    for (int it = 0; it < PV_ITEMS; ++it) {
        acc[it][0] = 0.f;
        acc[it][1] = 0.f;
    }

    for (uint32_t tile = 0; tile < n_tiles; ++tile) {
        const int buf = (int)(tile & 1u);
        if (tile + 1 < n_tiles) {
            // Stage buf ^ 1 and idx_s[buf ^ 1] were last read before the barrier that ended
            // the previous iteration, so both can be refilled now.
            if (tid < TK) idx_s[(buf ^ 1) * TK + tid] = next_idx;
            next_idx = fetch_index(tile + 2);
            __syncthreads();
            issue_tile(buf ^ 1);
            ntkv::cp_async_wait<1>();
        } else {
            ntkv::cp_async_wait<0>();
        }
        __syncthreads();  // this tile's K and V are visible to every thread

        // Scores s[r][t] = q_r . k_t in log2 units; -inf where the token is padding,
        // out of range or hidden by the causal limit.
        const T* kt = k_s + buf * TK * KS;
        for_items<S_ITEMS, TK>(tid, [&](int, int r, int t) {
            if (r < R) {
                const uint32_t idx = idx_s[buf * TK + t];
                float s = -CUDART_INF_F;
                if (idx < cache_len && (long long)idx <= lim_s[r]) {
                    // Four independent FMA chains (fixed order, so still deterministic)
                    // instead of one chain of D dependent FMAs.
                    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
                    const float* qr = q_s + r * D;
#pragma unroll 4
                    for (int c = 0; c < CHUNKS16; ++c) {
                        float kf[8];
                        ntkv::load8(kt + t * KS + c * 8, kf);
                        const float4 qa = *reinterpret_cast<const float4*>(qr + c * 8);
                        const float4 qb = *reinterpret_cast<const float4*>(qr + c * 8 + 4);
                        d0 = fmaf(qa.x, kf[0], d0);
                        d0 = fmaf(qa.y, kf[1], d0);
                        d1 = fmaf(qa.z, kf[2], d1);
                        d1 = fmaf(qa.w, kf[3], d1);
                        d2 = fmaf(qb.x, kf[4], d2);
                        d2 = fmaf(qb.y, kf[5], d2);
                        d3 = fmaf(qb.z, kf[6], d3);
                        d3 = fmaf(qb.w, kf[7], d3);
                    }
                    s = (d0 + d1) + (d2 + d3);
                }
                s_s[r * TK + t] = s;
            }
        });
        __syncthreads();

        // Online softmax, one warp per row: new running max, weights p = 2^(s - m), the
        // rescale factor of the old accumulator, and the running sum.
        for (int r = warp; r < R; r += WARPS) {
            const float s0 = s_s[r * TK + lane];
            const float s1 = s_s[r * TK + lane + 32];
            const float m_old = m_s[r];
            const float m_new = fmaxf(m_old, ntkv::warp_max(fmaxf(s0, s1)));
            const float p0 = (s0 == -CUDART_INF_F) ? 0.f : exp2f(s0 - m_new);
            const float p1 = (s1 == -CUDART_INF_F) ? 0.f : exp2f(s1 - m_new);
            const float alpha = (m_old == -CUDART_INF_F) ? 0.f : exp2f(m_old - m_new);
            const float psum = ntkv::warp_sum(p0 + p1);
            s_s[r * TK + lane] = p0;
            s_s[r * TK + lane + 32] = p1;
            __syncwarp();  // every lane has read m_s[r] and l_s[r] before lane 0 updates them
            if (lane == 0) {
                m_s[r] = m_new;
                l_s[r] = l_s[r] * alpha + psum;
                alpha_s[r] = alpha;
            }
        }
        __syncthreads();

        // O[r] = alpha[r] * O[r] + sum_t p[r][t] * v_t, in token order.
        const T* vt = v_s + buf * TK * KS;
        for_items<PV_ITEMS, PAIRS>(tid, [&](int it, int r, int dp) {
            if (r < R) {
                const float a = alpha_s[r];
                const float* pr = s_s + r * TK;
                // Even and odd tokens in two chains, added at the end of the tile.
                float ex = 0.f, ey = 0.f, ox = 0.f, oy = 0.f;
#pragma unroll 8
                for (int t = 0; t < TK; t += 2) {
                    const float w0 = pr[t];
                    const float w1 = pr[t + 1];
                    const float2 v0 = ntkv::load2(vt + t * KS + 2 * dp);
                    const float2 v1 = ntkv::load2(vt + (t + 1) * KS + 2 * dp);
                    ex = fmaf(w0, v0.x, ex);
                    ey = fmaf(w0, v0.y, ey);
                    ox = fmaf(w1, v1.x, ox);
                    oy = fmaf(w1, v1.y, oy);
                }
                acc[it][0] = fmaf(acc[it][0], a, ex + ox);
                acc[it][1] = fmaf(acc[it][1], a, ey + oy);
            }
        });
        __syncthreads();  // stage buf, idx_s[buf] and s_s may be overwritten next
    }

    // A list of one chunk (every list, when p.direct) is whole in this CTA: it writes o and
    // lse itself. In a split plan it does so with fd_finish, the arithmetic the merge of one
    // state reduces to (w = 1, so fmaf(x, w, 0) = x), so those rows keep the merge's bits.
    const uint32_t n_chunks = ntkv::fd_chunks_of(list_end - list_begin, p.chunk_tokens, p.max_chunks);
    const bool whole = p.direct || n_chunks == 1;
    for_items<PV_ITEMS, PAIRS>(tid, [&](int it, int r, int dp) {
        if (r < R) {
            const uint32_t gr = row0 + r;
            if (p.direct) {
                // l == 0 only for a row with no visible token; a NaN l (a NaN in q, or in k
                // of a visible token) stays NaN in o and lse, as in attention.cu.
                const float l = l_s[r];
                const float inv = l == 0.f ? 0.f : 1.f / l;
                const uint64_t off = row_offset(p, b, hkv, gr) * D + 2 * dp;
                o[off] = ntkv::from_f32<T>(acc[it][0] * inv);
                o[off + 1] = ntkv::from_f32<T>(acc[it][1] * inv);
            } else if (whole) {
                float x0, x1, unused;
                ntkv::fd_finish(m_s[r], l_s[r], acc[it][0], x0, unused);
                ntkv::fd_finish(m_s[r], l_s[r], acc[it][1], x1, unused);
                const uint64_t off = row_offset(p, b, hkv, gr) * D + 2 * dp;
                o[off] = ntkv::from_f32<T>(x0);
                o[off + 1] = ntkv::from_f32<T>(x1);
            } else {
                const uint64_t off = (((uint64_t)list * p.max_chunks + chunk) * p.rows + gr) * D + 2 * dp;
                ws_acc[off] = acc[it][0];
                ws_acc[off + 1] = acc[it][1];
            }
        }
    });
    if (tid < R) {
        const uint32_t gr = row0 + tid;
        const float m = m_s[tid];
        const float l = l_s[tid];
        if (whole) {
            float unused, row_lse;
            ntkv::fd_finish(m, l, 0.f, unused, row_lse);
            lse[row_offset(p, b, hkv, gr)] = row_lse;
        } else {
            const uint64_t off = ((uint64_t)list * p.max_chunks + chunk) * p.rows + gr;
            ws_ml[2 * off] = m;
            ws_ml[2 * off + 1] = l;
        }
    }
    if (whole) return;

    // The CTA that draws the last ticket of this (list, row tile) merges all n_chunks states
    // of its rows, in chunk order. idx_s is no longer read, so its first word holds the flag.
    if (!ntkv::fd_fold_ticket(tickets + (uint64_t)list * p.row_tiles + row_tile, n_chunks, idx_s)) return;
    const uint64_t base = (uint64_t)list * p.max_chunks * p.rows + row0;  // row r, chunk c: base + r + c rows
    for (int e = tid; e < R * D; e += THREADS) {
        const int r = e / D;
        const int d = e % D;
        float out, row_lse;
        ntkv::fd_merge_workspace_l2(n_chunks, base + r, p.rows, D, d, ws_acc, ws_ml, out, row_lse);
        const uint64_t row = row_offset(p, b, hkv, row0 + r);
        o[row * D + d] = ntkv::from_f32<T>(out);
        if (d == 0) lse[row] = row_lse;
    }
}

}  // namespace

#define NTKV_DECODE_ATTN(NAME, T, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                         \
        const NtkvDecodeParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, \
        const uint32_t* __restrict__ indptr, const uint32_t* __restrict__ indices,                      \
        const uint32_t* __restrict__ cache_lens, T* __restrict__ o, float* __restrict__ lse,            \
        float* __restrict__ ws_acc, float* __restrict__ ws_ml, uint32_t* __restrict__ tickets) {        \
        decode_attn<T, D>(p, q, k, v, indptr, indices, cache_lens, o, lse, ws_acc, ws_ml, tickets);     \
    }

NTKV_DECODE_ATTN(ntkv_decode_attn_f16_d64, __half, 64)
NTKV_DECODE_ATTN(ntkv_decode_attn_f16_d128, __half, 128)
NTKV_DECODE_ATTN(ntkv_decode_attn_bf16_d64, __nv_bfloat16, 64)
NTKV_DECODE_ATTN(ntkv_decode_attn_bf16_d128, __nv_bfloat16, 128)

// grid (n_lists, segments): block (list, seg) checks positions list_begin + seg * blockDim.x
// + tid, striding by segments * blockDim.x. Each bad position reports (pos << 2 | code) in 64
// bits (pos < 2^32, so it never equals the UINT64_MAX "none" sentinel); atomicMin keeps the
// lowest, so the report does not depend on scheduling.
extern "C" __global__ void ntkv_decode_validate(const NtkvDecodeValidateParams p, const uint32_t* __restrict__ indptr,
                                                const uint32_t* __restrict__ indices,
                                                const uint32_t* __restrict__ cache_lens,
                                                unsigned long long* __restrict__ first_bad) {
    const uint32_t list = blockIdx.x;
    if (list >= p.n_lists) return;
    const uint32_t cache_len = cache_lens[list / p.kv_heads];
    uint64_t begin, end;
    ntkv::csr_bounds(indptr, list, p.n_indices, begin, end);
    const uint64_t stride = (uint64_t)gridDim.y * blockDim.x;
    for (uint64_t j = begin + (uint64_t)blockIdx.y * blockDim.x + threadIdx.x; j < end; j += stride) {
        const uint32_t x = indices[j];
        unsigned long long code = 0;
        if (x >= cache_len) {
            code = 1;
        } else if (j > begin) {
            const uint32_t prev = indices[j - 1];
            if (x == prev) code = 2;
            else if (x < prev) code = 3;
        }
        if (code != 0) atomicMin(first_bad, ((unsigned long long)j << 2) | code);
    }
}
