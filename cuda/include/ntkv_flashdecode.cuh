// ntkv_flashdecode.cuh: the split-K (flash-decoding) pieces shared by the decode kernels of
// cuda/decode.cu (sparse-index decode) and cuda/qdecode.cu (decode over quantized caches).
//
// A split list leaves one partial state per (chunk, query row): the unnormalised
// accumulator acc[D], the running max m (log2 units) and the running sum l. Both families
// merge those states with this one function (fd_merge), so the merge order and arithmetic
// (and hence the output bits) are the same everywhere. Two ways to run it: a separate merge
// kernel (NTKV_FD_MERGE_KERNELS, qdecode), or folded into the attention launch, where the
// last CTA of each group of states to finish merges them (fd_fold_ticket and
// fd_merge_workspace_l2, decode).
#pragma once

#include <math_constants.h>

#include "ntkv_common.cuh"

namespace ntkv {

constexpr float FD_LN2 = 0.693147180559945309f;

// Chunks a list of `len` entries is split into (an empty list still has one chunk, which
// writes the empty state).
__device__ __forceinline__ uint32_t fd_chunks_of(uint64_t len, uint32_t chunk_tokens, uint32_t max_chunks) {
    if (len == 0) return 1u;
    const uint64_t n = (len + chunk_tokens - 1) / chunk_tokens;
    return n < max_chunks ? (uint32_t)n : max_chunks;
}

// Flat offset of query row `gr` (= tq * group + g) of kv head `hkv` of sequence `b` in a
// [B, Tq, Hq] row space (times head_dim for q and o, as is for lse).
__device__ __forceinline__ uint64_t fd_row_offset(uint32_t b, uint32_t hkv, uint32_t gr, uint32_t group,
                                                  uint32_t q_tokens, uint32_t q_heads) {
    const uint32_t tq = gr / group;
    const uint32_t g = gr % group;
    return ((uint64_t)b * q_tokens + tq) * q_heads + (uint64_t)hkv * group + g;
}

// The exact, fixed-order log-sum-exp combination of n partial states of one query row,
// element d: M = max_c m_c, l = sum_c 2^(m_c - M) l_c and a = sum_c 2^(m_c - M) acc_c[d],
// summed in state order c = 0, 1, ... . ml(c) returns state c's (m, l) as a float2, acc(c)
// its accumulator element d (read only for states that saw a token). The result (M, l, a) is
// itself a partial state, so combinations nest: a CTA can combine its warps' states into the
// chunk's, and the merge kernel the chunks' into the row's.
template <typename ML, typename ACC>
__device__ __forceinline__ void fd_combine(uint32_t n, ML&& ml, ACC&& acc, float& m_out, float& l_out, float& a_out) {
    float m_max = -CUDART_INF_F;
    for (uint32_t c = 0; c < n; ++c) m_max = fmaxf(m_max, ml(c).x);
    // A state whose scores were all NaN keeps m = -inf with a NaN l: shift by 0 then, so that
    // its NaN reaches l_sum (exp2(-inf - 0) = 0 and fmaf(NaN, 0, x) is NaN).
    const float m_base = m_max == -CUDART_INF_F ? 0.f : m_max;
    float l_sum = 0.f;
    float a_sum = 0.f;
    for (uint32_t c = 0; c < n; ++c) {
        const float2 s = ml(c);
        if (s.y == 0.f) continue;  // a state with no visible token
        const float w = exp2f(s.x - m_base);
        l_sum = fmaf(s.y, w, l_sum);
        a_sum = fmaf(acc(c), w, a_sum);
    }
    m_out = m_max;
    l_out = l_sum;
    a_out = a_sum;
}

// A state's normalised output (0 for a row that saw no token) and its natural-log lse (-inf
// for such a row). A NaN l (a NaN score) stays NaN in both.
__device__ __forceinline__ void fd_finish(float m, float l, float a, float& out, float& lse) {
    out = l == 0.f ? 0.f : a / l;
    lse = l == 0.f ? -CUDART_INF_F : (m + log2f(l)) * FD_LN2;
}

// fd_combine, then fd_finish: the merged output of n states.
template <typename ML, typename ACC>
__device__ __forceinline__ void fd_merge(uint32_t n, ML&& ml, ACC&& acc, float& out, float& lse) {
    float m, l, a;
    fd_combine(n, ml, acc, m, l, a);
    fd_finish(m, l, a, out, lse);
}

// fd_merge over the global workspace: state c of a row at ws_ml[2 (base + c stride)] and
// ws_acc[(base + c stride) head_dim + d].
__device__ __forceinline__ void fd_merge_workspace(uint32_t n, uint64_t base, uint64_t stride, uint32_t head_dim,
                                                   uint32_t d, const float* __restrict__ ws_acc,
                                                   const float* __restrict__ ws_ml, float& out, float& lse) {
    fd_merge(
        n,
        [&](uint32_t c) {
            const uint64_t s = base + (uint64_t)c * stride;
            return make_float2(ws_ml[2 * s], ws_ml[2 * s + 1]);
        },
        [&](uint32_t c) { return ws_acc[(base + (uint64_t)c * stride) * head_dim + d]; }, out, lse);
}

// fd_merge_workspace over states that other CTAs of the same launch wrote (the fold of
// fd_fold_ticket): every state load goes through L2 (__ldcg), so this SM's L1 cannot serve a
// line it cached before those CTAs published. The arithmetic is fd_merge's, in state order,
// so the bits are those of the separate merge kernel and do not depend on which CTA folds.
__device__ __forceinline__ void fd_merge_workspace_l2(uint32_t n, uint64_t base, uint64_t stride, uint32_t head_dim,
                                                      uint32_t d, const float* ws_acc, const float* ws_ml,
                                                      float& out, float& lse) {
    fd_merge(
        n,
        [&](uint32_t c) {
            const uint64_t s = base + (uint64_t)c * stride;
            return make_float2(__ldcg(ws_ml + 2 * s), __ldcg(ws_ml + 2 * s + 1));
        },
        [&](uint32_t c) { return __ldcg(ws_acc + (base + (uint64_t)c * stride) * head_dim + d); }, out, lse);
}

// The ticket of a "last CTA folds" split: every thread of a CTA calls this after its stores
// of the CTA's partial state, with the same counter (one per group of n CTAs whose states
// one CTA merges) and n. It returns true, in every thread, in exactly one CTA of the group:
// the one that drew the last of the n tickets, when all n states are in L2. Nobody waits: the
// other CTAs return false and exit. That CTA also resets the counter to 0, so the next launch
// finds it as the plan allocated it (launches on one stream do not overlap), with no memset.
// `flag` is one shared-memory word that is free here.
__device__ __forceinline__ bool fd_fold_ticket(uint32_t* counter, uint32_t n, uint32_t* flag) {
    __threadfence();  // release: this thread's partial state reaches L2 before the ticket
    __syncthreads();  // ... and so has every other thread's
    if (threadIdx.x == 0) {
        const uint32_t ticket = atomicAdd(counter, 1u);
        const uint32_t last = ticket == n - 1u ? 1u : 0u;
        // All n tickets are drawn, so no CTA of this launch touches the counter again.
        if (last) atomicExch(counter, 0u);
        *flag = last;
    }
    __syncthreads();
    const bool last = *flag != 0u;
    if (last) __threadfence();  // acquire: the other CTAs' states are read after the ticket
    return last;
}

// The geometry a split decode's merge needs: lists (cache heads) of `rows` query rows each,
// their states at (list * max_chunks + chunk) * rows + row, and the [B, Tq, Hq] row space.
struct FdGeometry {
    uint32_t n_lists;
    uint32_t rows;
    uint32_t head_dim;
    uint32_t chunk_tokens;
    uint32_t max_chunks;
    uint32_t kv_heads;
    uint32_t group;
    uint32_t q_tokens;
    uint32_t q_heads;
};

// The merge geometry of a kernel parameter struct with the decode fields (batch, kv_heads,
// rows, head_dim, chunk_tokens, max_chunks, group, q_tokens, q_heads).
template <typename P>
__device__ __forceinline__ FdGeometry fd_geometry(const P& p) {
    return FdGeometry{p.batch * p.kv_heads, p.rows,  p.head_dim, p.chunk_tokens, p.max_chunks,
                      p.kv_heads,           p.group, p.q_tokens, p.q_heads};
}

// The work item of a split attention CTA: blockIdx.x = (list * max_chunks + chunk) *
// row_tiles + row_tile over the batch * kv_heads lists; list = b * kv_heads + hkv. valid is
// false for a CTA past the last list.
struct FdItem {
    uint32_t list, chunk, row_tile, b, hkv;
    bool valid;
};

template <typename P>
__device__ __forceinline__ FdItem fd_work_item(const P& p) {
    uint64_t blk = blockIdx.x;
    FdItem w{};
    w.row_tile = (uint32_t)(blk % p.row_tiles);
    blk /= p.row_tiles;
    w.chunk = (uint32_t)(blk % p.max_chunks);
    blk /= p.max_chunks;
    w.valid = blk < (uint64_t)p.batch * p.kv_heads;
    w.list = (uint32_t)blk;
    w.b = w.list / p.kv_heads;
    w.hkv = w.list % p.kv_heads;
    return w;
}

// The positions [c_begin, c_end) of chunk `chunk` of the list [begin, end), cut to the list;
// false when the list has fewer chunks, so the CTA has no work.
template <typename P>
__device__ __forceinline__ bool fd_chunk_range(const P& p, uint32_t chunk, uint64_t begin, uint64_t end,
                                               uint64_t& c_begin, uint64_t& c_end) {
    if (chunk >= fd_chunks_of(end - begin, p.chunk_tokens, p.max_chunks)) return false;
    c_begin = begin + (uint64_t)chunk * p.chunk_tokens;
    c_begin = c_begin < end ? c_begin : end;
    c_end = c_begin + p.chunk_tokens;
    c_end = c_end < end ? c_end : end;
    return true;
}

// The whole merge kernel: one CTA of head_dim threads per (list, query row), blockIdx.x =
// list * rows + row. len_of(list) is the list's length, from which its chunk count follows
// exactly as the attention kernel split it. Writes o and lse of the row.
template <typename T, typename LEN>
__device__ __forceinline__ void fd_merge_rows(const FdGeometry& g, LEN&& len_of, const float* __restrict__ ws_acc,
                                              const float* __restrict__ ws_ml, T* __restrict__ o,
                                              float* __restrict__ lse) {
    const uint64_t blk = blockIdx.x;
    const uint32_t gr = (uint32_t)(blk % g.rows);
    const uint64_t list64 = blk / g.rows;
    if (list64 >= g.n_lists) return;
    const uint32_t list = (uint32_t)list64;
    const uint32_t d = threadIdx.x;
    if (d >= g.head_dim) return;
    const uint32_t n = fd_chunks_of(len_of(list), g.chunk_tokens, g.max_chunks);
    const uint64_t base = (uint64_t)list * g.max_chunks * g.rows + gr;  // chunk c: base + c * rows
    float out, row_lse;
    fd_merge_workspace(n, base, g.rows, g.head_dim, d, ws_acc, ws_ml, out, row_lse);
    const uint64_t row = fd_row_offset(list / g.kv_heads, list % g.kv_heads, gr, g.group, g.q_tokens, g.q_heads);
    o[row * g.head_dim + d] = from_f32<T>(out);
    if (d == 0) lse[row] = row_lse;
}

}  // namespace ntkv

// The merge kernels PREFIX_f16 and PREFIX_bf16 of a split decode: fd_merge_rows over the lists
// of a PARAMS struct (with the decode fields of fd_geometry), where BOUNDS(p, indptr, list,
// begin, end) gives list's positions [begin, end), exactly as its attention kernel split them.
// Signature: (PARAMS, const u32* indptr, const float* ws_acc, const float* ws_ml, T* o,
// float* lse); grid rows * lists, head_dim threads.
#define NTKV_FD_MERGE_KERNEL(NAME, T, PARAMS, BOUNDS)                                                             \
    extern "C" __global__ void NAME(const PARAMS p, const uint32_t* __restrict__ indptr,                          \
                                    const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,            \
                                    T* __restrict__ o, float* __restrict__ lse) {                                 \
        auto len_of = [&](uint32_t list) {                                                                        \
            uint64_t begin, end;                                                                                  \
            BOUNDS(p, indptr, list, begin, end);                                                                  \
            return end - begin;                                                                                   \
        };                                                                                                        \
        ntkv::fd_merge_rows<T>(ntkv::fd_geometry(p), len_of, ws_acc, ws_ml, o, lse);                             \
    }
#define NTKV_FD_MERGE_KERNELS(PREFIX, PARAMS, BOUNDS)                 \
    NTKV_FD_MERGE_KERNEL(PREFIX##_f16, __half, PARAMS, BOUNDS)        \
    NTKV_FD_MERGE_KERNEL(PREFIX##_bf16, __nv_bfloat16, PARAMS, BOUNDS)
