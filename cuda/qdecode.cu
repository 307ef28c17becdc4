// qdecode.cu: decode attention over quantized KV caches (src/qdecode).
//
//   ntkv_qdecode_attn_<T>_d<D>_r<R>  one CTA per (cache head, chunk of positions, tile of R
//                                    query rows). Reads each token's K and V straight from
//                                    the cache's own storage (packed codes with their f16
//                                    scale and min, an important f16/int8 row, or the f16
//                                    residual), dequantizes in registers with the same
//                                    fma(code, scale, min) as the quant kernels, and runs an
//                                    online softmax per warp; the CTA combines its warps and
//                                    writes o/lse (one chunk) or the chunk's partial state;
//   ntkv_qdecode_merge_<T>           merges a head's chunk states in chunk order, with the
//                                    flash-decoding merge shared with decode.cu
//                                    (ntkv_flashdecode.cuh).
//
// All the query rows of one kv head (group * q_tokens of them, up to R per CTA) share the CTA,
// so a head's bytes are read once per row tile. Nothing dequantized is written to global
// memory: values go from the loaded words to registers to the score and PV FMAs.
#include <math_constants.h>

#include "ntkv_common.cuh"
#include "ntkv_flashdecode.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int BLK = 8;  // consecutive positions a warp takes per step

// The device buffers of one operand, as the kernel arguments give them.
struct OpPtrs {
    const uint32_t* codes;
    const __half* scales;
    const __half* mins;
    const __half* ring;
    const uint32_t* imp_idx;
    const uint32_t* imp_counts;
    const __half* hi_rows;
    const uint32_t* hi_codes;
    const __half* hi_scales;
    const __half* hi_mins;
};

// CPL consecutive f16 values (CPL * 2 bytes, aligned to that) widened to f32.
template <int CPL>
__device__ __forceinline__ void load_f16(const __half* p, float (&x)[CPL]) {
    if constexpr (CPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
        x[0] = a.x;
        x[1] = a.y;
        x[2] = b.x;
        x[3] = b.y;
    } else {
        static_assert(CPL == 2, "2 or 4 channels per lane");
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(p));
        x[0] = a.x;
        x[1] = a.y;
    }
}

// CPL consecutive u32 words (aligned to CPL * 4 bytes).
template <int CPL>
__device__ __forceinline__ void load_words(const uint32_t* p, uint32_t (&w)[CPL]) {
    if constexpr (CPL == 4) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        w[0] = u.x;
        w[1] = u.y;
        w[2] = u.z;
        w[3] = u.w;
    } else {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        w[0] = u.x;
        w[1] = u.y;
    }
}

// The dequantization of quant.cu: fma(code, scale, min) in f32, never fused differently.
__device__ __forceinline__ float dequant(uint32_t code, float scale, float mn) {
    return __fmaf_rn((float)code, scale, mn);
}

// One warp's walk over one operand of one head: where it stands in the head's important
// list (tokens only grow along a warp's positions), and the last per-channel word row and
// group parameters it loaded (E consecutive tokens share a word row, `group` a group).
template <int CPL>
struct Cursor {
    const uint32_t* imp;
    uint32_t count;
    uint32_t pos;
    uint32_t wrow;
    uint32_t grow;
    uint32_t words[CPL];
    float sc[CPL];
    float mn[CPL];
};

template <int CPL>
__device__ __forceinline__ void cursor_init(const NtkvQdecodeOperand& op, const OpPtrs& P, uint64_t head,
                                            uint32_t first_token, Cursor<CPL>& c) {
    c.wrow = 0xFFFFFFFFu;
    c.grow = 0xFFFFFFFFu;
    c.imp = nullptr;
    c.count = 0;
    c.pos = 0;
    if (op.hi_kind == 0 || op.kmax == 0) return;
    c.imp = P.imp_idx + head * op.kmax;
    const uint32_t n = P.imp_counts[head];
    c.count = n < op.kmax ? n : op.kmax;
    // lower_bound(first_token): the first entry not below the warp's first token.
    uint32_t lo = 0, hi = c.count;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) >> 1;
        if (c.imp[mid] < first_token) lo = mid + 1;
        else hi = mid;
    }
    c.pos = lo;
}

// Token t's values at this lane's channels c0 .. c0 + CPL - 1 of head `head`, exactly as the
// cache's dequantize_dense reconstructs them: the residual for t >= quantized, else the
// important row when t is listed, else the codes. Every branch is uniform across the warp.
template <int D, int CPL>
__device__ __forceinline__ void load_token(const NtkvQdecodeOperand& op, const OpPtrs& P, uint64_t head, uint32_t t,
                                           int c0, Cursor<CPL>& cur, float (&x)[CPL]) {
    if (t >= op.quantized) {
        const uint32_t row = (t - op.ring_base) % op.ring_rows;
        load_f16<CPL>(P.ring + head * op.ring_hs + (uint64_t)row * D + c0, x);
        return;
    }
    if (cur.count != 0) {
        while (cur.pos < cur.count && cur.imp[cur.pos] < t) ++cur.pos;
        if (cur.pos < cur.count && cur.imp[cur.pos] == t) {
            const uint64_t e = (uint64_t)cur.pos * D + c0;
            if (op.hi_kind == 1) {
                load_f16<CPL>(P.hi_rows + head * op.hi_hs + e, x);
            } else {
                // int8 codes grouped along D: CPL <= 4 channels sit in one word, one group.
                const uint32_t w = P.hi_codes[head * op.hi_hs + e / 4];
                const uint64_t g = head * op.hi_groups_hs + e / op.group;
                const float s = __half2float(P.hi_scales[g]);
                const float m = __half2float(P.hi_mins[g]);
#pragma unroll
                for (int j = 0; j < CPL; ++j) x[j] = dequant((w >> (((c0 + j) & 3) * 8)) & 0xFFu, s, m);
            }
            return;
        }
    }
    const uint32_t e_per_word = 32u / op.bits;
    const uint32_t mask = (1u << op.bits) - 1u;
    if (op.per_channel) {
        const uint32_t wrow = t / e_per_word;
        if (wrow != cur.wrow) {
            load_words<CPL>(P.codes + head * op.codes_hs + (uint64_t)wrow * D + c0, cur.words);
            cur.wrow = wrow;
        }
        const uint32_t grow = t / op.group;
        if (grow != cur.grow) {
            const uint64_t g = head * op.groups_hs + (uint64_t)grow * D + c0;
            load_f16<CPL>(P.scales + g, cur.sc);
            load_f16<CPL>(P.mins + g, cur.mn);
            cur.grow = grow;
        }
        const uint32_t shift = (t % e_per_word) * op.bits;
#pragma unroll
        for (int j = 0; j < CPL; ++j) x[j] = dequant((cur.words[j] >> shift) & mask, cur.sc[j], cur.mn[j]);
    } else {
        // Groups along D: this lane's CPL channels are in one word (CPL divides 32 / bits) and
        // one group (CPL divides the group).
        const uint64_t e = (uint64_t)t * D + c0;
        const uint32_t w = P.codes[head * op.codes_hs + e / e_per_word];
        const uint64_t g = head * op.groups_hs + e / op.group;
        const float s = __half2float(P.scales[g]);
        const float m = __half2float(P.mins[g]);
        const uint32_t slot0 = (uint32_t)(c0 % e_per_word);
#pragma unroll
        for (int j = 0; j < CPL; ++j) x[j] = dequant((w >> ((slot0 + j) * op.bits)) & mask, s, m);
    }
}

// The positions of cache head `head`: tokens [0, tokens), or its CSR list (clamped to the
// buffer so a corrupted indptr cannot make a kernel read outside it; the plan validated it).
__device__ __forceinline__ void positions_of(const NtkvQdecodeParams& p, const uint32_t* __restrict__ indptr,
                                             uint32_t head, uint64_t& begin, uint64_t& end) {
    begin = 0;
    end = p.tokens;
    if (!p.indexed) return;
    uint64_t e = indptr[head + 1];
    uint64_t s = indptr[head];
    e = e < p.n_indices ? e : p.n_indices;
    begin = s < e ? s : e;
    end = e;
}

template <typename T, int D, int R>
__device__ __forceinline__ void qdecode_attn(const NtkvQdecodeParams& p, const T* __restrict__ q, const OpPtrs& KP,
                                             const OpPtrs& VP, const uint32_t* __restrict__ indptr,
                                             const uint32_t* __restrict__ indices, T* __restrict__ o,
                                             float* __restrict__ lse, float* __restrict__ ws_acc,
                                             float* __restrict__ ws_ml) {
    constexpr int CPL = D / 32;  // channels per lane
    __shared__ float red_ml[WARPS][R][2];
    __shared__ float red_acc[WARPS][R][D];

    const ntkv::FdItem item = ntkv::fd_work_item(p);
    if (!item.valid) return;
    const uint32_t head = item.list, chunk = item.chunk, row_tile = item.row_tile, b = item.b, hkv = item.hkv;

    uint64_t begin, end, c_begin, c_end;
    positions_of(p, indptr, head, begin, end);
    if (!ntkv::fd_chunk_range(p, chunk, begin, end, c_begin, c_end)) return;

    const uint32_t row0 = row_tile * R;
    if (row0 >= p.rows) return;
    const int nr = (int)min((uint32_t)R, p.rows - row0);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int c0 = lane * CPL;

    float qf[R][CPL];
    long long lim[R];
    float m[R], l[R], acc[R][CPL];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const bool live = r < nr;
        const uint64_t off = live ? ntkv::fd_row_offset(b, hkv, row0 + r, p.group, p.q_tokens, p.q_heads) * D : 0;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            qf[r][c] = live ? ntkv::to_f32(q[off + c0 + c]) * p.scale_log2 : 0.f;
            acc[r][c] = 0.f;
        }
        const uint32_t tq = (row0 + r) / p.group;
        lim[r] = p.causal ? (long long)p.tokens - (long long)p.q_tokens + (long long)tq : LLONG_MAX;
        m[r] = -CUDART_INF_F;
        l[r] = 0.f;
    }

    auto token_at = [&](uint64_t pos) -> uint32_t {
        return p.indexed ? indices[pos] : (uint32_t)pos;
    };

    const uint64_t first = c_begin + (uint64_t)warp * BLK;
    if (first < c_end) {
        Cursor<CPL> kc, vc;
        const uint32_t t0 = token_at(first);
        cursor_init<CPL>(p.k, KP, head, t0, kc);
        cursor_init<CPL>(p.v, VP, head, t0, vc);
        for (uint64_t pos0 = first; pos0 < c_end; pos0 += (uint64_t)WARPS * BLK) {
            float kx[BLK][CPL], vx[BLK][CPL];
            uint32_t tok[BLK];
            bool valid[BLK];
#pragma unroll
            for (int j = 0; j < BLK; ++j) {
                const uint64_t pos = pos0 + j;
                valid[j] = pos < c_end;
                tok[j] = valid[j] ? token_at(pos) : 0u;
                // Tokens past the cache (only a list the plan did not validate could hold one)
                // are never read.
                valid[j] = valid[j] && tok[j] < p.tokens;
                if (valid[j]) {
                    load_token<D, CPL>(p.k, KP, head, tok[j], c0, kc, kx[j]);
                    load_token<D, CPL>(p.v, VP, head, tok[j], c0, vc, vx[j]);
                } else {
#pragma unroll
                    for (int c = 0; c < CPL; ++c) {
                        kx[j][c] = 0.f;
                        vx[j][c] = 0.f;
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r < nr) {
                    float s[BLK];
                    float blk_max = -CUDART_INF_F;
#pragma unroll
                    for (int j = 0; j < BLK; ++j) {
                        float part = 0.f;
#pragma unroll
                        for (int c = 0; c < CPL; ++c) part = fmaf(qf[r][c], kx[j][c], part);
                        // xor butterfly: every lane ends with the same bits (a + b == b + a).
                        const float dot = ntkv::warp_sum(part);
                        s[j] = (valid[j] && (long long)tok[j] <= lim[r]) ? dot : -CUDART_INF_F;
                        blk_max = fmaxf(blk_max, s[j]);
                    }
                    const float m_new = fmaxf(m[r], blk_max);
                    const float alpha = m[r] == -CUDART_INF_F ? 0.f : exp2f(m[r] - m_new);
                    float psum = 0.f;
#pragma unroll
                    for (int j = 0; j < BLK; ++j) {
                        // A NaN score gives a NaN weight (exp2f(NaN)), which reaches l and o.
                        s[j] = s[j] == -CUDART_INF_F ? 0.f : exp2f(s[j] - m_new);
                        psum += s[j];
                    }
                    l[r] = l[r] * alpha + psum;
#pragma unroll
                    for (int c = 0; c < CPL; ++c) {
                        float a = 0.f;
#pragma unroll
                        for (int j = 0; j < BLK; ++j) a = fmaf(s[j], vx[j][c], a);
                        acc[r][c] = fmaf(acc[r][c], alpha, a);
                    }
                    m[r] = m_new;
                }
            }
        }
    }

    // Combine the four warps' states (fixed order) into the chunk's.
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (lane == 0) {
            red_ml[warp][r][0] = m[r];
            red_ml[warp][r][1] = l[r];
        }
#pragma unroll
        for (int c = 0; c < CPL; ++c) red_acc[warp][r][c0 + c] = acc[r][c];
    }
    __syncthreads();
    for (int e = tid; e < nr * D; e += THREADS) {
        const int r = e / D;
        const int d = e % D;
        float cm, cl, ca;
        ntkv::fd_combine(
            WARPS, [&](uint32_t w) { return make_float2(red_ml[w][r][0], red_ml[w][r][1]); },
            [&](uint32_t w) { return red_acc[w][r][d]; }, cm, cl, ca);
        const uint32_t gr = row0 + r;
        if (p.direct) {
            float out, row_lse;
            ntkv::fd_finish(cm, cl, ca, out, row_lse);
            const uint64_t row = ntkv::fd_row_offset(b, hkv, gr, p.group, p.q_tokens, p.q_heads);
            o[row * D + d] = ntkv::from_f32<T>(out);
            if (d == 0) lse[row] = row_lse;
        } else {
            const uint64_t state = ((uint64_t)head * p.max_chunks + chunk) * p.rows + gr;
            ws_acc[state * D + d] = ca;
            if (d == 0) {
                ws_ml[2 * state] = cm;
                ws_ml[2 * state + 1] = cl;
            }
        }
    }
}


}  // namespace

#define NTKV_QDECODE_OP_ARGS(X)                                                                           \
    const uint32_t *__restrict__ X##_codes, const __half *__restrict__ X##_scales,                        \
        const __half *__restrict__ X##_mins, const __half *__restrict__ X##_ring,                         \
        const uint32_t *__restrict__ X##_imp_idx, const uint32_t *__restrict__ X##_imp_counts,            \
        const __half *__restrict__ X##_hi_rows, const uint32_t *__restrict__ X##_hi_codes,                \
        const __half *__restrict__ X##_hi_scales, const __half *__restrict__ X##_hi_mins
#define NTKV_QDECODE_OP_PTRS(X)                                                                            \
    OpPtrs {                                                                                               \
        X##_codes, X##_scales, X##_mins, X##_ring, X##_imp_idx, X##_imp_counts, X##_hi_rows, X##_hi_codes, \
            X##_hi_scales, X##_hi_mins                                                                     \
    }

#define NTKV_QDECODE_ATTN(NAME, T, D, R)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                               \
        const NtkvQdecodeParams p, const T* __restrict__ q, NTKV_QDECODE_OP_ARGS(k), NTKV_QDECODE_OP_ARGS(v), \
        const uint32_t* __restrict__ indptr, const uint32_t* __restrict__ indices, T* __restrict__ o,         \
        float* __restrict__ lse, float* __restrict__ ws_acc, float* __restrict__ ws_ml) {                     \
        qdecode_attn<T, D, R>(p, q, NTKV_QDECODE_OP_PTRS(k), NTKV_QDECODE_OP_PTRS(v), indptr, indices, o, lse, \
                              ws_acc, ws_ml);                                                                 \
    }

// ntkv_qdecode_attn_<dtype>_d{64,128}_r{1,8}.
#define NTKV_QDECODE_ATTN_DIMS(SUFFIX, T)                        \
    NTKV_QDECODE_ATTN(ntkv_qdecode_attn_##SUFFIX##_d64_r1, T, 64, 1)   \
    NTKV_QDECODE_ATTN(ntkv_qdecode_attn_##SUFFIX##_d64_r8, T, 64, 8)   \
    NTKV_QDECODE_ATTN(ntkv_qdecode_attn_##SUFFIX##_d128_r1, T, 128, 1) \
    NTKV_QDECODE_ATTN(ntkv_qdecode_attn_##SUFFIX##_d128_r8, T, 128, 8)
NTKV_QDECODE_ATTN_DIMS(f16, __half)
NTKV_QDECODE_ATTN_DIMS(bf16, __nv_bfloat16)

// One CTA of head_dim threads per (cache head, query row): merges the head's chunks in order.
NTKV_FD_MERGE_KERNELS(ntkv_qdecode_merge, NtkvQdecodeParams, positions_of)
