// pages.cu: Quest page bounds and ShadowKV chunk landmarks (src/pages).
//
//   ntkv_pages_quest_meta_<T>      per (sequence, kv head, page, 8-channel group): max and min
//                                  of the page's valid keys; one pass, 16-byte loads, and the
//                                  same kernel refreshes only the pages an append touched;
//   ntkv_pages_quest_score_<T>     per (row, page): the Quest upper bound, max over the GQA
//                                  group and the query tokens; writes the forced last page;
//   ntkv_pages_landmark_<T>        per (row, chunk of 8): the mean key and the lowest cosine
//                                  between it and the chunk's keys (outlier detection);
//   ntkv_pages_shadow_logits_<T>   scale * q . landmark for every query row and chunk;
//   ntkv_pages_shadow_softmax      one block per query row: max, exp in place, row sum;
//   ntkv_pages_shadow_score        per (row, chunk): max over the group of the summed
//                                  probabilities over the query tokens;
//   ntkv_pages_shadow_mark         outlier chunks: excluded from the ranking, appended to the
//                                  selected blocks.
//
// Every float result is bit-reproducible against the CPU reference (src/pages/cpu.rs): the
// kernels spell out each rounding (_rn intrinsics, so nothing is contracted into an FMA), sum
// a lane's 8 channels in order and then the lanes of a group by a fixed butterfly, and use
// their own exp (exp_det) instead of the hardware's approximate one.
#include <math_constants.h>

#include "ntkv_common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int CHUNK = 8;  // tokens per ShadowKV chunk

// Grid-stride loop, one thread per item `it` below `n` (a 32-bit count).
#define PAGES_FOR_EACH_ITEM(it, n) \
    for (uint32_t it = blockIdx.x * blockDim.x + threadIdx.x; it < (n); it += gridDim.x * blockDim.x)

// The larger of two floats, ignoring a NaN unless both are NaN; a tie keeps `a`. The same rule
// as src/pages/cpu.rs, so that max and min are bit-identical on both sides.
__device__ __forceinline__ float nanmax(float a, float b) { return (a != a) ? b : (b > a ? b : a); }
__device__ __forceinline__ float nanmin(float a, float b) { return (a != a) ? b : (b < a ? b : a); }

// Eight consecutive elements (the start aligned to 8 elements) widened to f32.
template <typename T>
__device__ __forceinline__ void ld8(const T* p, float (&o)[8]) {
    ntkv::load8(p, o);
}
template <>
__device__ __forceinline__ void ld8<float>(const float* p, float (&o)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// Stores eight values (exactly representable in T) as one or two 16-byte words.
template <typename T>
__device__ __forceinline__ void st8(T* p, const float (&v)[8]) {
    union {
        uint4 u;
        T h[8];
    } w;
#pragma unroll
    for (int i = 0; i < 8; ++i) w.h[i] = ntkv::from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = w.u;
}
template <>
__device__ __forceinline__ void st8<float>(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Sum over the lp lanes of an aligned lane group (lp a power of two <= 32, all 32 lanes of the
// warp calling): level off adds the partial `off` lanes away, from lp/2 down to 1. Both lanes
// of a pair compute the same sum (addition commutes), so every lane ends with the group total;
// the CPU reference folds its lp partials the same way (p[i] += p[i + n], n = lp/2, ..., 1).
__device__ __forceinline__ float group_sum(float v, uint32_t lp) {
#pragma unroll
    for (uint32_t off = 16; off > 0; off >>= 1)
        if (off < lp) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// exp(x) for the softmax, identical on the CPU: x = n ln2 + r with n = rint(x log2 e) (two-part
// ln2, so r is exact to about 2^-32), a degree-7 Taylor polynomial in r (|r| <= 0.35, error
// below 1 ulp), times 2^n built from its exponent bits. Below -87 (where 2^n leaves the normal
// range) it returns 0; NaN gives NaN, +inf stays +inf.
__device__ __forceinline__ float exp_det(float x) {
    if (x != x) return x;
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) return CUDART_INF_F;
    const float n = rintf(__fmul_rn(x, 1.44269504088896341f));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, __uint_as_float(0x3f317200u))), __fmul_rn(n, __uint_as_float(0x35bfbe8eu)));
    float p = 1.0f / 5040.0f;
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 720.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 120.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 24.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f / 6.0f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    const int e = (int)n + 127;  // in [1, 254] for x in [-87, 88]
    return __fmul_rn(p, __uint_as_float((uint32_t)e << 23));
}

__device__ __forceinline__ uint32_t ceil_div(uint32_t a, uint32_t b) { return a / b + (a % b != 0); }

// ---- Quest metadata ------------------------------------------------------------------------

// lens [2 * batch]: lens[b] the tokens already summarised (old), lens[batch + b] the valid
// tokens now (new). Pages from old / page_size (the partial page an append continues) up to
// ceil(new / page_size) are recomputed from all their valid tokens.
template <typename T>
__device__ __forceinline__ void quest_meta(const NtkvPagesMetaParams& p, const T* __restrict__ keys,
                                           const uint32_t* __restrict__ lens, T* __restrict__ page_max,
                                           T* __restrict__ page_min) {
    PAGES_FOR_EACH_ITEM(it, (uint32_t)p.n_items) {
        const uint32_t lane = it % p.lanes;
        const uint32_t pg_row = it / p.lanes;  // row * n_pages + page
        const uint32_t page = pg_row % p.n_pages;
        const uint32_t row = pg_row / p.n_pages;
        const uint32_t b = row / p.kv_heads;
        const uint32_t len = lens[p.batch + b];
        if (page < lens[b] / p.page_size || page >= ceil_div(len, p.page_size)) continue;
        const uint32_t t0 = page * p.page_size;
        const uint32_t t1 = min(t0 + p.page_size, len);
        float mx[8], mn[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) mx[c] = mn[c] = CUDART_NAN_F;
        const T* src = keys + ((uint64_t)row * p.capacity + t0) * p.head_dim + lane * 8u;
        // Unrolled so that several 16-byte loads are in flight per thread (the pass is
        // bandwidth-bound); the fold order stays token order.
#pragma unroll 4
        for (uint32_t t = t0; t < t1; ++t, src += p.head_dim) {
            float v[8];
            ld8(src, v);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                mx[c] = nanmax(mx[c], v[c]);
                mn[c] = nanmin(mn[c], v[c]);
            }
        }
        const uint64_t out = (uint64_t)pg_row * p.head_dim + lane * 8u;
        st8(page_max + out, mx);
        st8(page_min + out, mn);
    }
}

// Lane groups: THREADS / lanes_pow2 groups per block, each serving one item per block step;
// the loop bound is the same for every thread of the block, so the butterflies always see
// all 32 lanes of a warp.
struct Groups {
    uint32_t lane, slot, per_block;
};
__device__ __forceinline__ Groups groups_of(uint32_t lanes_pow2) {
    return Groups{threadIdx.x % lanes_pow2, threadIdx.x / lanes_pow2, blockDim.x / lanes_pow2};
}

// Calls f(g, item, block, row, in_range) for this lane group's items (item = row * n_blocks +
// block) block step by block step. In the last step a group may get item >= n_items
// (in_range false): f must then touch no memory but still run its butterflies.
template <typename F>
__device__ __forceinline__ void for_group_items(uint32_t lanes_pow2, uint64_t n_items64, uint32_t n_blocks, F&& f) {
    const Groups g = groups_of(lanes_pow2);
    const uint32_t n_items = (uint32_t)n_items64;
    for (uint32_t base = blockIdx.x * g.per_block; base < n_items; base += gridDim.x * g.per_block) {
        const uint32_t item = base + g.slot;
        f(g, item, item % n_blocks, item / n_blocks, item < n_items);
    }
}

template <typename T>
__device__ __forceinline__ void quest_score(const NtkvPagesScoreParams& p, const T* __restrict__ q,
                                            const T* __restrict__ page_max, const T* __restrict__ page_min,
                                            const uint32_t* __restrict__ lens, float* __restrict__ scores,
                                            uint32_t* __restrict__ blocks) {
    const uint32_t rows = p.batch * p.kv_heads;
    PAGES_FOR_EACH_ITEM(r, rows) {
        const uint32_t np = ceil_div(lens[r / p.kv_heads], p.page_size);
        blocks[(uint64_t)r * p.blocks_stride + p.last_col] = np == 0 ? 0xffffffffu : np - 1;
    }
    for_group_items(p.lanes_pow2, p.n_items, p.n_pages, [&](const Groups& g, uint32_t item, uint32_t page,
                                                           uint32_t row, bool in_range) {
        const uint32_t b = row / p.kv_heads, hk = row % p.kv_heads;
        const bool valid = in_range && page + 1 < ceil_div(lens[min(b, p.batch - 1)], p.page_size);
        const bool loads = valid && g.lane < p.lanes;
        float mx[8], mn[8];
        if (loads) {
            ld8(page_max + (uint64_t)item * p.head_dim + g.lane * 8u, mx);
            ld8(page_min + (uint64_t)item * p.head_dim + g.lane * 8u, mn);
        }
        float best = CUDART_NAN_F;
        for (uint32_t t = 0; t < p.q_tokens; ++t) {
            for (uint32_t gi = 0; gi < p.group; ++gi) {
                float part = 0.0f;
                if (loads) {
                    float qv[8];
                    const uint64_t qrow = ((uint64_t)b * p.q_tokens + t) * p.q_heads + hk * p.group + gi;
                    ld8(q + qrow * p.head_dim + g.lane * 8u, qv);
#pragma unroll
                    for (int c = 0; c < 8; ++c)
                        part = __fadd_rn(part, nanmax(__fmul_rn(qv[c], mx[c]), __fmul_rn(qv[c], mn[c])));
                }
                best = nanmax(best, group_sum(part, p.lanes_pow2));
            }
        }
        if (valid && g.lane == 0) scores[item] = best;
    });
}

// ---- ShadowKV landmarks --------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void landmark(const NtkvPagesLandmarkParams& p, const T* __restrict__ keys,
                                         const uint32_t* __restrict__ lens, float* __restrict__ landmarks,
                                         float* __restrict__ min_cos, float* __restrict__ neg_cos) {
    for_group_items(p.lanes_pow2, p.n_items, p.n_chunks, [&](const Groups& g, uint32_t item, uint32_t chunk,
                                                            uint32_t row, bool in_range) {
        const uint32_t len = lens[min(row / p.kv_heads, p.batch - 1)];
        const uint32_t t0 = chunk * CHUNK;
        const bool valid = in_range && t0 < len;
        const uint32_t n = valid ? min((uint32_t)CHUNK, len - t0) : 0u;
        const bool loads = valid && g.lane < p.lanes;
        float kv[CHUNK][8];
        float m[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) m[c] = 0.0f;
        if (loads) {
            const T* src = keys + ((uint64_t)row * p.capacity + t0) * p.head_dim + g.lane * 8u;
#pragma unroll
            for (int i = 0; i < CHUNK; ++i) {
                if ((uint32_t)i < n) {
                    ld8(src + (uint64_t)i * p.head_dim, kv[i]);
                } else {
#pragma unroll
                    for (int c = 0; c < 8; ++c) kv[i][c] = 0.0f;
                }
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                float s = kv[0][c];
#pragma unroll
                for (int i = 1; i < CHUNK; ++i)
                    if ((uint32_t)i < n) s = __fadd_rn(s, kv[i][c]);
                m[c] = __fdiv_rn(s, (float)n);
            }
            st8(landmarks + (uint64_t)item * p.head_dim + g.lane * 8u, m);
        } else {
#pragma unroll
            for (int i = 0; i < CHUNK; ++i)
#pragma unroll
                for (int c = 0; c < 8; ++c) kv[i][c] = 0.0f;
        }
        float mm = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) mm = __fadd_rn(mm, __fmul_rn(m[c], m[c]));
        const float lnorm = sqrtf(group_sum(mm, p.lanes_pow2));
        const float ln = lnorm > p.eps ? lnorm : p.eps;
        float worst = CUDART_NAN_F;
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) {
            float dot = 0.0f, kk = 0.0f;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                dot = __fadd_rn(dot, __fmul_rn(m[c], kv[i][c]));
                kk = __fadd_rn(kk, __fmul_rn(kv[i][c], kv[i][c]));
            }
            dot = group_sum(dot, p.lanes_pow2);
            const float knorm = sqrtf(group_sum(kk, p.lanes_pow2));
            const float kn = knorm > p.eps ? knorm : p.eps;
            if ((uint32_t)i < n) worst = nanmin(worst, __fdiv_rn(dot, __fmul_rn(ln, kn)));
        }
        if (valid && g.lane == 0) {
            min_cos[item] = worst;
            neg_cos[item] = -worst;
        }
    });
}

__device__ __forceinline__ uint32_t chunks_of_row(const NtkvPagesShadowParams& p, const uint32_t* lens, uint32_t row) {
    return ceil_div(lens[min(row / p.kv_heads, p.batch - 1)], CHUNK);
}

template <typename T>
__device__ __forceinline__ void shadow_logits(const NtkvPagesShadowParams& p, const T* __restrict__ q,
                                              const float* __restrict__ landmarks, const uint32_t* __restrict__ lens,
                                              float* __restrict__ logits) {
    for_group_items(p.lanes_pow2, p.n_items, p.n_chunks, [&](const Groups& g, uint32_t item, uint32_t chunk,
                                                            uint32_t row, bool in_range) {
        const uint32_t b = row / p.kv_heads, hk = row % p.kv_heads;
        const bool valid = in_range && chunk < chunks_of_row(p, lens, row);
        const bool loads = valid && g.lane < p.lanes;
        float l[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (loads) ld8(landmarks + (uint64_t)item * p.head_dim + g.lane * 8u, l);
        const T* qb = q + ((uint64_t)b * p.q_tokens * p.q_heads + hk * p.group) * p.head_dim + g.lane * 8u;
        float* out = logits + ((uint64_t)b * p.q_heads + hk * p.group) * p.q_tokens * p.n_chunks + chunk;
        // One loop over (group head, token) pairs: two nested loops made ptxas spill the f32 path.
        for (uint32_t j = 0; j < p.group * p.q_tokens; ++j) {
            const uint32_t gi = j / p.q_tokens, t = j % p.q_tokens;
            float part = 0.0f;
            if (loads) {
                float qv[8];
                ld8(qb + ((uint64_t)t * p.q_heads + gi) * p.head_dim, qv);
#pragma unroll
                for (int c = 0; c < 8; ++c) part = __fadd_rn(part, __fmul_rn(qv[c], l[c]));
            }
            const float dot = group_sum(part, p.lanes_pow2);
            // out + (gi Tq + t) NC is logits row (b, hk group + gi, t) at this chunk.
            if (valid && g.lane == 0) out[((uint64_t)gi * p.q_tokens + t) * p.n_chunks] = __fmul_rn(dot, p.scale);
        }
    });
}

// Tree over the block's THREADS partials in shared memory: s[i] = op(s[i], s[i + h]) for
// h = THREADS/2, ..., 1; returns s[0] to every thread.
template <typename Op>
__device__ __forceinline__ float block_tree(float* s, float v, Op op) {
    s[threadIdx.x] = v;
    __syncthreads();
    for (uint32_t h = THREADS / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] = op(s[threadIdx.x], s[threadIdx.x + h]);
        __syncthreads();
    }
    const float r = s[0];
    __syncthreads();
    return r;
}

// One block per query row (grid-stride over rows): thread i folds chunks i, i + 256, ... in
// order, then the tree; exp values replace the logits, the row sum goes to sums[qrow].
__device__ __forceinline__ void shadow_softmax(const NtkvPagesShadowParams& p, const uint32_t* __restrict__ lens,
                                               float* __restrict__ logits, float* __restrict__ sums) {
    __shared__ float red[THREADS];
    const uint32_t qrows = p.batch * p.q_heads * p.q_tokens;
    for (uint32_t qrow = blockIdx.x; qrow < qrows; qrow += gridDim.x) {
        const uint32_t b = qrow / (p.q_heads * p.q_tokens);
        const uint32_t n = ceil_div(lens[b], CHUNK);
        float* l = logits + (uint64_t)qrow * p.n_chunks;
        float m = CUDART_NAN_F;
        for (uint32_t c = threadIdx.x; c < n; c += THREADS) m = nanmax(m, l[c]);
        const float top = block_tree(red, m, [](float a, float c) { return nanmax(a, c); });
        float acc = 0.0f;
        for (uint32_t c = threadIdx.x; c < n; c += THREADS) {
            const float e = exp_det(__fsub_rn(l[c], top));
            l[c] = e;
            acc = __fadd_rn(acc, e);
        }
        const float total = block_tree(red, acc, [](float a, float c) { return __fadd_rn(a, c); });
        if (threadIdx.x == 0) sums[qrow] = total;
    }
}

__device__ __forceinline__ void shadow_score(const NtkvPagesShadowParams& p, const uint32_t* __restrict__ lens,
                                             const float* __restrict__ expd, const float* __restrict__ sums,
                                             float* __restrict__ scores) {
    PAGES_FOR_EACH_ITEM(item, (uint32_t)p.n_items) {
        const uint32_t chunk = item % p.n_chunks;
        const uint32_t row = item / p.n_chunks;
        if (chunk >= chunks_of_row(p, lens, row)) continue;
        const uint32_t b = row / p.kv_heads, hk = row % p.kv_heads;
        float best = CUDART_NAN_F;
        for (uint32_t gi = 0; gi < p.group; ++gi) {
            float acc = 0.0f;
            for (uint32_t t = 0; t < p.q_tokens; ++t) {
                const uint64_t qrow = ((uint64_t)b * p.q_heads + hk * p.group + gi) * p.q_tokens + t;
                acc = __fadd_rn(acc, __fdiv_rn(expd[qrow * p.n_chunks + chunk], sums[qrow]));
            }
            best = nanmax(best, acc);
        }
        scores[item] = best;
    }
}

// Item (row, j < n_outliers): outlier id x goes to column k + j of the row's blocks; a real
// chunk (x below the row's chunk count) gets score NaN, so the ranking takes it last.
__device__ __forceinline__ void shadow_mark(const NtkvPagesShadowParams& p, const uint32_t* __restrict__ lens,
                                            const uint32_t* __restrict__ outliers, float* __restrict__ scores,
                                            uint32_t* __restrict__ blocks) {
    PAGES_FOR_EACH_ITEM(it, (uint32_t)p.n_items) {
        const uint32_t j = it % p.n_outliers;
        const uint32_t row = it / p.n_outliers;
        const uint32_t x = outliers[it];
        blocks[(uint64_t)row * p.blocks_stride + p.k + j] = x;
        if (x < chunks_of_row(p, lens, row)) scores[(uint64_t)row * p.n_chunks + x] = CUDART_NAN_F;
    }
}

}  // namespace

#define NTKV_PAGES_TYPED(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        ntkv_pages_quest_meta_##SUFFIX(const NtkvPagesMetaParams p, const T* __restrict__ keys,                   \
                                       const uint32_t* __restrict__ lens, T* __restrict__ page_max,              \
                                       T* __restrict__ page_min) {                                               \
        quest_meta<T>(p, keys, lens, page_max, page_min);                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) ntkv_pages_quest_score_##SUFFIX(                       \
        const NtkvPagesScoreParams p, const T* __restrict__ q, const T* __restrict__ page_max,                   \
        const T* __restrict__ page_min, const uint32_t* __restrict__ lens, float* __restrict__ scores,           \
        uint32_t* __restrict__ blocks) {                                                                          \
        quest_score<T>(p, q, page_max, page_min, lens, scores, blocks);                                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        ntkv_pages_landmark_##SUFFIX(const NtkvPagesLandmarkParams p, const T* __restrict__ keys,                 \
                                     const uint32_t* __restrict__ lens, float* __restrict__ landmarks,           \
                                     float* __restrict__ min_cos, float* __restrict__ neg_cos) {                 \
        landmark<T>(p, keys, lens, landmarks, min_cos, neg_cos);                                                  \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        ntkv_pages_shadow_logits_##SUFFIX(const NtkvPagesShadowParams p, const T* __restrict__ q,                 \
                                          const float* __restrict__ landmarks, const uint32_t* __restrict__ lens, \
                                          float* __restrict__ logits) {                                           \
        shadow_logits<T>(p, q, landmarks, lens, logits);                                                          \
    }

NTKV_PAGES_TYPED(f32, float)
NTKV_PAGES_TYPED(f16, __half)
NTKV_PAGES_TYPED(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(THREADS)
    ntkv_pages_shadow_softmax(const NtkvPagesShadowParams p, const uint32_t* __restrict__ lens,
                              float* __restrict__ logits, float* __restrict__ sums) {
    shadow_softmax(p, lens, logits, sums);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    ntkv_pages_shadow_score(const NtkvPagesShadowParams p, const uint32_t* __restrict__ lens,
                            const float* __restrict__ expd, const float* __restrict__ sums,
                            float* __restrict__ scores) {
    shadow_score(p, lens, expd, sums, scores);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    ntkv_pages_shadow_mark(const NtkvPagesShadowParams p, const uint32_t* __restrict__ lens,
                           const uint32_t* __restrict__ outliers, float* __restrict__ scores,
                           uint32_t* __restrict__ blocks) {
    shadow_mark(p, lens, outliers, scores, blocks);
}
