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
//   ntkv_qdecode_fast_<T>_d<D>_b<B>_g<G>
//                                    the same work for KIVI's layout (keys per channel, values
//                                    per token, both B bits in groups of G, no lists): bits
//                                    and group at compile time, 16-byte code loads, codes
//                                    turned into floats by a shift and a LOP3 (see below);
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

// N = 1, 2 or 4 consecutive u32 words (aligned to N * 4 bytes), in one load.
template <int N>
__device__ __forceinline__ void load_words(const uint32_t* p, uint32_t (&w)[N]) {
    if constexpr (N == 4) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        w[0] = u.x;
        w[1] = u.y;
        w[2] = u.z;
        w[3] = u.w;
    } else if constexpr (N == 2) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        w[0] = u.x;
        w[1] = u.y;
    } else {
        static_assert(N == 1, "1, 2 or 4 words");
        w[0] = *p;
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

// Token t's values at this lane's channels c0 .. c0 + CPL - 1 of head `head` when the token
// is read from a row, not from the codes: the residual for t >= quantized, else important row
// `pos` of the head. Every branch is uniform across the warp.
template <int D, int CPL>
__device__ __forceinline__ void load_row(const NtkvQdecodeOperand& op, const OpPtrs& P, uint64_t head, uint32_t t,
                                         uint32_t pos, int c0, float (&x)[CPL]) {
    if (t >= op.quantized) {
        const uint32_t row = (t - op.ring_base) % op.ring_rows;
        load_f16<CPL>(P.ring + head * op.ring_hs + (uint64_t)row * D + c0, x);
        return;
    }
    const uint64_t e = (uint64_t)pos * D + c0;
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
}

// Token t's values at this lane's channels c0 .. c0 + CPL - 1 of head `head`, exactly as the
// cache's dequantize_dense reconstructs them: the residual for t >= quantized, else the
// important row when t is listed, else the codes. Every branch is uniform across the warp.
template <int D, int CPL>
__device__ __forceinline__ void load_token(const NtkvQdecodeOperand& op, const OpPtrs& P, uint64_t head, uint32_t t,
                                           int c0, Cursor<CPL>& cur, float (&x)[CPL]) {
    if (t >= op.quantized) {
        load_row<D, CPL>(op, P, head, t, 0, c0, x);
        return;
    }
    if (cur.count != 0) {
        while (cur.pos < cur.count && cur.imp[cur.pos] < t) ++cur.pos;
        if (cur.pos < cur.count && cur.imp[cur.pos] == t) {
            load_row<D, CPL>(op, P, head, t, cur.pos, c0, x);
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

// ---- The KIVI fast path --------------------------------------------------------------------
//
// ntkv_qdecode_fast_<T>_d<D>_b<B>_g<G>: keys per channel and values per token, both of B bits
// in groups of G (compile time: every index is a shift), every position of the chunk (no
// lists). One CTA of 8 warps per (cache head, chunk, tile of up to 8 query rows); warp w
// serves row w % nr and every (8 / nr)-th tile of TT = 8 * 32 / B positions of the chunk.
// Per tile a warp:
//   1. scales its query by the tile's per-channel K scales into shared memory,
//      a'[d] = q'[d] * s[d] * 2^B, with A = sum_d a'[d] and M = sum_d q'[d] m[d] per group
//      (the scaled-q barrier follows);
//   2. K codes: lane (u, cs) loads 16-byte quads of the word row u (32 / B tokens of one
//      channel per word) at channel quads cs, cs + 4, ... and accumulates, for each of the
//      word row's tokens, S = sum_d a'[d] * f with f = 1 + code * 2^-(B + c) built by one lop3
//      and a shift shared by a run of codes (unit_code: the code in the mantissa of 1.0, no
//      conversion instruction); two xor shuffles per 32 / B tokens finish the dot;
//      score = (S - A) * 2^c + M;
//   3. rows (the residual ring and important tokens) get their score by a warp dot product;
//   4. softmax: one lane per 32 / TT token, one warp max per tile; p * 2^B to shared memory;
//   5. rows' values (weight p) accumulate into a per-lane D / 32-channel accumulator, and
//      important tokens' code weights are zeroed;
//   6. V codes: lane (tl, sl) loads the 16 channels sl * 16 .. of tokens tl, tl + 32 / (D/16),
//      ... and accumulates w * f (w = p 2^B s), W += w, M += p 2^B m; the value is
//      (acc - W) 2^c + M 2^-B = sum p (code s + m), c = code_shift of the channel's slot.
// The reassociation (step 2's and step 6's sums over scaled codes instead of over each
// fma(code, s, m)) changes only f32 rounding: about 2^-24 * 2^c times the sum of |terms|
// (c <= 6; the unit codes lie in [1, 2)), far below the decode tolerance; src/qdecode/mod.rs
// states it.
constexpr int FAST_THREADS = 256;
constexpr int FAST_WARPS = FAST_THREADS / 32;
constexpr int FAST_ROWS = 8;

// The codes of a word (B bits each, little end first) become f32 values under the exponent
// of 1.0 in runs of P = 4 (B = 2), 2 (B = 4) or 1 (B = 8) consecutive codes that share one
// shift: the run's top code lands in mantissa bits [23 - B, 23), the one j places below it
// j * B bits lower. Code e so reads as f = 1 + code * 2^-(B + code_shift(e)), and sums of
// such terms are rescaled by 2^code_shift(e) once per token (K) or channel (V). The lowest
// code of a run keeps 23 - B - code_shift >= 15 mantissa bits below it, so the rescaled sums
// lose at most 2^6 of f32 precision (B = 2), far inside the decode tolerance.
template <int B>
constexpr int codes_per_shift() {
    return B == 2 ? 4 : (B == 4 ? 2 : 1);
}
template <int B>
constexpr int code_shift(int e) {
    return (codes_per_shift<B>() - 1 - e % codes_per_shift<B>()) * B;
}
template <int B>
constexpr float code_scale(int e) {
    return (float)(1u << code_shift<B>(e));
}

// Code e of word w as 1 + code * 2^-(B + code_shift(e)). e is a constant after unrolling, so
// this is one lop3 (ntkv::and_or: the mask is the immediate, 1.0's bits a register) plus one
// shift per run of codes_per_shift codes.
template <int B>
__device__ __forceinline__ float unit_code(uint32_t w, int e) {
    constexpr int P = codes_per_shift<B>();
    const int top = e - e % P + P - 1;
    const int sh = top * B - (23 - B);
    const uint32_t x = sh >= 0 ? w >> sh : w << -sh;
    return __uint_as_float(ntkv::and_or(x, ((1u << B) - 1u) << (23 - B - code_shift<B>(e)), 0x3F800000u));
}

template <typename T, int D, int B, int G>
__device__ __forceinline__ void qdecode_fast(const NtkvQdecodeParams& p, const T* __restrict__ q, const OpPtrs& KP,
                                             const OpPtrs& VP, T* __restrict__ o, float* __restrict__ lse,
                                             float* __restrict__ ws_acc, float* __restrict__ ws_ml) {
    constexpr int E = 32 / B;                   // codes per word
    constexpr int TT = 8 * E;                   // positions of a warp tile: 8 K word rows
    constexpr int CPL = D / 32;                 // row path: channels per lane
    constexpr int KQ = D / 16;                  // K: 16-byte channel quads per lane
    constexpr int NG = TT >= G ? TT / G : 1;    // K groups of one tile
    constexpr int VSL = D / 16;                 // V: 16-channel slices of a token
    constexpr int VTL = 32 / VSL;               // V: lanes per slice (token lanes)
    constexpr int VW = 16 / E;                  // V: code words of one slice
    constexpr int PL = TT / 32;                 // softmax: positions per lane
    constexpr int EH = E < 8 ? E : 8;           // K: tokens summed per pass
    constexpr float UNIT = (float)(1u << B);
    constexpr float INV_UNIT = 1.0f / (float)(1u << B);
    static_assert(E <= G && G % E == 0 && VW >= 1 && PL >= 1, "tile shape");

    alignas(16) __shared__ float a_sh[FAST_WARPS][NG][D];
    __shared__ float2 b_sh[FAST_WARPS][NG];  // per K group: (sum_d a'[d], sum_d q'[d] m[d])
    __shared__ float s_sh[FAST_WARPS][TT];
    __shared__ float red_ml[FAST_WARPS][2];
    __shared__ float red_acc[FAST_WARPS][D];
    // Per warp, lane-private slices (each lane reads only what it wrote, no barrier): the
    // scaled query and the accumulator of the values read from rows (rare: the residual and
    // important tokens), kept here to leave the registers to the code loops.
    __shared__ float q_sh[FAST_WARPS][D];
    __shared__ float row_sh[FAST_WARPS][D];

    const ntkv::FdItem item = ntkv::fd_work_item(p);
    if (!item.valid) return;
    const uint32_t head = item.list;
    uint64_t c_begin, c_end;
    if (!ntkv::fd_chunk_range(p, item.chunk, 0, p.tokens, c_begin, c_end)) return;
    const uint32_t row0 = item.row_tile * FAST_ROWS;
    if (row0 >= p.rows) return;
    const int nr = (int)min((uint32_t)FAST_ROWS, p.rows - row0);
    const int nws = FAST_WARPS / nr;  // warps per row

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int r = warp % nr;
    const int ws = warp / nr;
    const int c0 = lane * CPL;
    const uint32_t kq = p.k.quantized, vq = p.v.quantized;

    if (ws < nws) {
        const uint32_t gr = row0 + r;
        const uint64_t qoff = ntkv::fd_row_offset(item.b, item.hkv, gr, p.group, p.q_tokens, p.q_heads) * D;
        float* const qf = q_sh[warp] + c0;
        float* const accr = row_sh[warp] + c0;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            qf[c] = ntkv::to_f32(q[qoff + c0 + c]) * p.scale_log2;
            accr[c] = 0.f;
        }
        // Causal: the row sees positions below vis = tokens - q_tokens + tq + 1, clamped to
        // [0, tokens] (a cache shorter than the query tokens leaves early rows nothing).
        const long long vis_s = p.causal ? (long long)p.tokens - (long long)p.q_tokens + (long long)(gr / p.group) + 1
                                         : (long long)p.tokens;
        const uint32_t vis = vis_s < 0 ? 0u : (uint32_t)vis_s;

        float m = -CUDART_INF_F, l = 0.f, wsum = 0.f, msum = 0.f;
        float acc[16];
#pragma unroll
        for (int c = 0; c < 16; ++c) acc[c] = 0.f;

        const uint64_t tb = c_begin / TT;
        const uint64_t te = c_end > c_begin ? (c_end - 1) / TT + 1 : tb;
        Cursor<CPL> kc, vc;
        cursor_init<CPL>(p.k, KP, head, (uint32_t)((tb + ws) * TT), kc);
        cursor_init<CPL>(p.v, VP, head, (uint32_t)((tb + ws) * TT), vc);
        const uint32_t* kcodes = KP.codes + head * p.k.codes_hs;
        const __half* kscales = KP.scales + head * p.k.groups_hs;
        const __half* kmins = KP.mins + head * p.k.groups_hs;
        const uint32_t* vcodes = VP.codes + head * p.v.codes_hs;
        const __half* vscales = VP.scales + head * p.v.groups_hs;
        const __half* vmins = VP.mins + head * p.v.groups_hs;
        float* const s_w = s_sh[warp];

        for (uint64_t tile = tb + ws; tile < te; tile += nws) {
            const uint32_t t0 = (uint32_t)(tile * TT);
            const uint32_t lo = max(t0, (uint32_t)c_begin);
            const uint32_t hi = min(t0 + (uint32_t)TT, (uint32_t)c_end);

            // 1. The query scaled by the tile's K groups (only groups in the codes).
#pragma unroll
            for (int gi = 0; gi < NG; ++gi) {
                const uint32_t gidx = t0 / G + gi;
                if (gidx * G < kq) {
                    float sc[CPL], mn[CPL];
                    load_f16<CPL>(kscales + (uint64_t)gidx * D + c0, sc);
                    load_f16<CPL>(kmins + (uint64_t)gidx * D + c0, mn);
                    float asum = 0.f, msum_q = 0.f;
#pragma unroll
                    for (int c = 0; c < CPL; ++c) {
                        const float a = qf[c] * sc[c] * UNIT;
                        a_sh[warp][gi][c0 + c] = a;
                        asum += a;
                        msum_q = fmaf(qf[c], mn[c], msum_q);
                    }
                    asum = ntkv::warp_sum(asum);
                    msum_q = ntkv::warp_sum(msum_q);
                    if (lane == 0) b_sh[warp][gi] = make_float2(asum, msum_q);
                }
            }
            __syncwarp();  // the scaled query is read by other lanes

            // 2. Scores from the K codes: lane (u, cs), word row u of the tile.
            {
                const int u = lane >> 2, cs = lane & 3;
                const uint32_t trow = t0 + (uint32_t)(u * E);
                // kq is a multiple of G (the plan checks it), so a word row is all in or all out.
                const bool valid = trow < kq;
                const int gi = NG > 1 ? (u * E) / G : 0;
                const uint32_t* wp = kcodes + (uint64_t)(trow / E) * D;
                // At most 8 tokens' sums live at once: int2 takes its word row in two passes,
                // the second reading the words again from L1.
#pragma unroll
                for (int e0 = 0; e0 < E; e0 += EH) {
                    float sc[EH];
#pragma unroll
                    for (int e = 0; e < EH; ++e) sc[e] = 0.f;
#pragma unroll
                    for (int j = 0; j < KQ; ++j) {
                        const int d0 = 4 * (cs + 4 * j);
                        uint32_t w[4] = {0u, 0u, 0u, 0u};
                        if (valid) load_words<4>(wp + d0, w);
                        const float4 a = *reinterpret_cast<const float4*>(&a_sh[warp][gi][d0]);
#pragma unroll
                        for (int e = 0; e < EH; ++e) {
                            float x = sc[e];
                            x = fmaf(a.x, unit_code<B>(w[0], e0 + e), x);
                            x = fmaf(a.y, unit_code<B>(w[1], e0 + e), x);
                            x = fmaf(a.z, unit_code<B>(w[2], e0 + e), x);
                            x = fmaf(a.w, unit_code<B>(w[3], e0 + e), x);
                            sc[e] = x;
                        }
                    }
#pragma unroll
                    for (int e = 0; e < EH; ++e) {
                        // xor butterfly over the 4 channel slices: the 4 lanes end with the same bits.
                        sc[e] += __shfl_xor_sync(0xffffffffu, sc[e], 1);
                        sc[e] += __shfl_xor_sync(0xffffffffu, sc[e], 2);
                    }
                    if (valid) {
                        const float2 bb = b_sh[warp][gi];
                        // score = 2^code_shift (sum a' f - sum a') + sum q' m.
#pragma unroll
                        for (int e = 0; e < EH; ++e)
                            if ((e & 3) == cs) s_w[u * E + e0 + e] = fmaf(sc[e] - bb.x, code_scale<B>(e0 + e), bb.y);
                    }
                }
            }
            __syncwarp();  // rows below may overwrite an important token's code score

            // 3. Scores of the tokens read from rows: the residual, then important tokens.
            for (uint32_t t = max(lo, kq); t < hi; ++t) {
                float x[CPL];
                load_row<D, CPL>(p.k, KP, head, t, 0, c0, x);
                float part = 0.f;
#pragma unroll
                for (int c = 0; c < CPL; ++c) part = fmaf(qf[c], x[c], part);
                const float dot = ntkv::warp_sum(part);
                if (lane == 0) s_w[t - t0] = dot;
            }
            for (; kc.pos < kc.count && kc.imp[kc.pos] < hi; ++kc.pos) {
                const uint32_t t = kc.imp[kc.pos];
                if (t < lo || t >= kq) continue;
                float x[CPL];
                load_row<D, CPL>(p.k, KP, head, t, kc.pos, c0, x);
                float part = 0.f;
#pragma unroll
                for (int c = 0; c < CPL; ++c) part = fmaf(qf[c], x[c], part);
                const float dot = ntkv::warp_sum(part);
                if (lane == 0) s_w[t - t0] = dot;
            }
            __syncwarp();

            // 4. Online softmax over the tile.
            float sv[PL];
            float bmax = -CUDART_INF_F;
#pragma unroll
            for (int k = 0; k < PL; ++k) {
                const uint32_t t = t0 + (uint32_t)(lane + 32 * k);
                const bool ok = t >= lo && t < hi && t < vis;
                sv[k] = ok ? s_w[lane + 32 * k] : -CUDART_INF_F;
                bmax = fmaxf(bmax, sv[k]);
            }
            bmax = ntkv::warp_max(bmax);
            const float m_new = fmaxf(m, bmax);
            const float alpha = m == -CUDART_INF_F ? 0.f : exp2f(m - m_new);
            float psum = 0.f;
#pragma unroll
            for (int k = 0; k < PL; ++k) {
                // A NaN score gives a NaN weight (exp2f(NaN)), which reaches l and o.
                const float pk = sv[k] == -CUDART_INF_F ? 0.f : exp2f(sv[k] - m_new);
                psum += pk;
                s_w[lane + 32 * k] = pk * UNIT;
            }
            l = l * alpha + psum;
            m = m_new;
            __syncwarp();

            // 5. Values read from rows, weight p.
            if (alpha != 1.f) {
#pragma unroll
                for (int c = 0; c < CPL; ++c) accr[c] *= alpha;
            }
            for (uint32_t t = max(lo, vq); t < hi; ++t) {
                float x[CPL];
                load_row<D, CPL>(p.v, VP, head, t, 0, c0, x);
                const float pt = s_w[t - t0] * INV_UNIT;
#pragma unroll
                for (int c = 0; c < CPL; ++c) accr[c] = fmaf(pt, x[c], accr[c]);
            }
            if (vc.count != 0) {
                const uint32_t first = vc.pos;
                for (; vc.pos < vc.count && vc.imp[vc.pos] < hi; ++vc.pos) {
                    const uint32_t t = vc.imp[vc.pos];
                    if (t < lo || t >= vq) continue;
                    float x[CPL];
                    load_row<D, CPL>(p.v, VP, head, t, vc.pos, c0, x);
                    const float pt = s_w[t - t0] * INV_UNIT;
#pragma unroll
                    for (int c = 0; c < CPL; ++c) accr[c] = fmaf(pt, x[c], accr[c]);
                }
                __syncwarp();  // every lane has read the weights before they are zeroed
                if (lane == 0)
                    for (uint32_t i = first; i < vc.pos; ++i) {
                        const uint32_t t = vc.imp[i];
                        if (t >= lo && t < vq) s_w[t - t0] = 0.f;
                    }
                __syncwarp();
            }

            // 6. Values from the V codes: lane (tl, sl).
            {
                const int sl = lane % VSL, tl = lane / VSL;
                wsum *= alpha;
                msum *= alpha;
#pragma unroll
                for (int c = 0; c < 16; ++c) acc[c] *= alpha;
                // The lane's first token of the tile; its k-th token is VTL * k later, so
                // every address below is a base plus a compile-time offset.
                const uint32_t tf = t0 + (uint32_t)tl;
                const uint32_t* const vw = vcodes + (uint64_t)tf * (D / E) + sl * VW;
                const uint64_t g0 = (uint64_t)tf * (D / G) + (uint32_t)(sl * 16) / G;
                const __half* const vs = vscales + g0;
                const __half* const vm = vmins + g0;
                const float* const sw = s_w + tl;
                auto token = [&](int k) {
                    const float pw = sw[VTL * k];
                    uint32_t w[VW];
                    load_words<VW>(vw + k * (VTL * (D / E)), w);
                    const float wt = pw * __half2float(vs[k * (VTL * (D / G))]);
                    wsum += wt;
                    msum = fmaf(pw, __half2float(vm[k * (VTL * (D / G))]), msum);
#pragma unroll
                    for (int c = 0; c < 16; ++c) acc[c] = fmaf(wt, unit_code<B>(w[c / E], c % E), acc[c]);
                };
                if (t0 + (uint32_t)TT <= vq) {
                    // The whole tile is in the codes (every tile but the last quantized one).
#pragma unroll 4
                    for (int k = 0; k < TT / VTL; ++k) token(k);
                } else {
#pragma unroll 4
                    for (int k = 0; k < TT / VTL; ++k)
                        if (tf + (uint32_t)(VTL * k) < vq) token(k);
                }
            }
            __syncwarp();  // the next tile rewrites the scores
        }

        // The warp's state: V token lanes summed (xor butterfly over tl), rows added.
        {
            const int sl = lane % VSL, tl = lane / VSL;
            const float off = msum * INV_UNIT;
#pragma unroll
            for (int c = 0; c < 16; ++c) {
                float v = fmaf(acc[c] - wsum, code_scale<B>(c % E), off);
#pragma unroll
                for (int o2 = VSL; o2 < 32; o2 <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o2);
                if (tl == 0) red_acc[warp][sl * 16 + c] = v;
            }
            const float lsum = ntkv::warp_sum(l);
            __syncwarp();
#pragma unroll
            for (int c = 0; c < CPL; ++c) red_acc[warp][c0 + c] += accr[c];
            if (lane == 0) {
                red_ml[warp][0] = m;
                red_ml[warp][1] = lsum;
            }
        }
    }
    __syncthreads();

    // Combine each row's warps (w = r, r + nr, ...) in warp order into the chunk's state.
    for (int e = tid; e < nr * D; e += FAST_THREADS) {
        const int rr = e / D;
        const int d = e % D;
        float cm, cl, ca;
        ntkv::fd_combine(
            (uint32_t)nws, [&](uint32_t c) { return make_float2(red_ml[rr + c * nr][0], red_ml[rr + c * nr][1]); },
            [&](uint32_t c) { return red_acc[rr + c * nr][d]; }, cm, cl, ca);
        const uint32_t gr = row0 + rr;
        if (p.direct) {
            float out, row_lse;
            ntkv::fd_finish(cm, cl, ca, out, row_lse);
            const uint64_t row = ntkv::fd_row_offset(item.b, item.hkv, gr, p.group, p.q_tokens, p.q_heads);
            o[row * D + d] = ntkv::from_f32<T>(out);
            if (d == 0) lse[row] = row_lse;
        } else {
            const uint64_t state = ((uint64_t)head * p.max_chunks + item.chunk) * p.rows + gr;
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

#define NTKV_QDECODE_FAST(NAME, T, D, B, G)                                                               \
    extern "C" __global__ void __launch_bounds__(FAST_THREADS, 2) NAME(                                  \
        const NtkvQdecodeParams p, const T* __restrict__ q, NTKV_QDECODE_OP_ARGS(k), NTKV_QDECODE_OP_ARGS(v), \
        const uint32_t* __restrict__ indptr, const uint32_t* __restrict__ indices, T* __restrict__ o,         \
        float* __restrict__ lse, float* __restrict__ ws_acc, float* __restrict__ ws_ml) {                     \
        (void)indptr;                                                                                      \
        (void)indices;                                                                                     \
        qdecode_fast<T, D, B, G>(p, q, NTKV_QDECODE_OP_PTRS(k), NTKV_QDECODE_OP_PTRS(v), o, lse, ws_acc,   \
                                 ws_ml);                                                                   \
    }

// ntkv_qdecode_fast_<dtype>_d<D>_b{2,4,8}_g<G>, G in {32, 64} for D = 64 and {32, 64, 128}
// for D = 128 (per-token values need G | D): the same arguments as the general kernel (the
// lists are unused), so one launch serves both.
#define NTKV_QDECODE_FAST_B(SUFFIX, T, D, G)                                         \
    NTKV_QDECODE_FAST(ntkv_qdecode_fast_##SUFFIX##_d##D##_b2_g##G, T, D, 2, G)      \
    NTKV_QDECODE_FAST(ntkv_qdecode_fast_##SUFFIX##_d##D##_b4_g##G, T, D, 4, G)      \
    NTKV_QDECODE_FAST(ntkv_qdecode_fast_##SUFFIX##_d##D##_b8_g##G, T, D, 8, G)
#define NTKV_QDECODE_FAST_DIMS(SUFFIX, T)        \
    NTKV_QDECODE_FAST_B(SUFFIX, T, 64, 32)       \
    NTKV_QDECODE_FAST_B(SUFFIX, T, 64, 64)       \
    NTKV_QDECODE_FAST_B(SUFFIX, T, 128, 32)      \
    NTKV_QDECODE_FAST_B(SUFFIX, T, 128, 64)      \
    NTKV_QDECODE_FAST_B(SUFFIX, T, 128, 128)
NTKV_QDECODE_FAST_DIMS(f16, __half)
NTKV_QDECODE_FAST_DIMS(bf16, __nv_bfloat16)

// One CTA of head_dim threads per (cache head, query row): merges the head's chunks in order.
NTKV_FD_MERGE_KERNELS(ntkv_qdecode_merge, NtkvQdecodeParams, positions_of)
