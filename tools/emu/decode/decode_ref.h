// tools/emu/decode/decode_ref.h: what the decode harnesses share (decode_emu.cpp, the small
// cases; decode_large.cpp, the production-scale index checks): the case shape, the f64
// reference and the per-dtype kernel entry points. Include after decode.cu.
#pragma once

#include "emu_check.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

namespace decode_emu {

struct Cfg {
    uint32_t B, Tq, Hq, Hkv, D, Tcap;
    bool causal;
    uint32_t chunk;  // forced chunk tokens (multiple of 64)
};

struct Lists {
    std::vector<uint32_t> cache_lens, indptr, indices;
};

template <typename T>
T from_float(float x) { return ntkv::from_f32<T>(x); }

template <typename T>
void reference(const Cfg& c, const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
               const Lists& l, std::vector<double>& o, std::vector<double>& lse) {
    const uint32_t group = c.Hq / c.Hkv;
    const double scale = (double)(1.0f / std::sqrt((float)c.D));
    o.assign((size_t)c.B * c.Tq * c.Hq * c.D, 0.0);
    lse.assign((size_t)c.B * c.Tq * c.Hq, -INFINITY);
    for (uint32_t b = 0; b < c.B; ++b)
        for (uint32_t t = 0; t < c.Tq; ++t)
            for (uint32_t h = 0; h < c.Hq; ++h) {
                const uint32_t list = b * c.Hkv + h / group;
                const size_t row = ((size_t)b * c.Tq + t) * c.Hq + h;
                const long long lim = (long long)l.cache_lens[b] - c.Tq + t;
                std::vector<std::pair<uint32_t, double>> s;
                for (uint32_t j = l.indptr[list]; j < l.indptr[list + 1]; ++j) {
                    const uint32_t i = l.indices[j];
                    if (c.causal && (long long)i > lim) continue;
                    double dot = 0;
                    for (uint32_t d = 0; d < c.D; ++d)
                        dot += (double)ntkv::to_f32(q[row * c.D + d]) *
                               (double)ntkv::to_f32(k[(((size_t)list) * c.Tcap + i) * c.D + d]);
                    s.push_back({i, scale * dot});
                }
                if (s.empty()) continue;
                double m = -INFINITY;
                for (auto& x : s) m = std::max(m, x.second);
                double z = 0;
                for (auto& x : s) {
                    const double p = std::exp(x.second - m);
                    z += p;
                    for (uint32_t d = 0; d < c.D; ++d)
                        o[row * c.D + d] += p * (double)ntkv::to_f32(v[(((size_t)list) * c.Tcap + x.first) * c.D + d]);
                }
                for (uint32_t d = 0; d < c.D; ++d) o[row * c.D + d] /= z;
                lse[row] = m + std::log(z);
            }
}

template <typename T>
void attn_kernel(uint32_t D, const NtkvDecodeParams& p, const T* q, const T* k, const T* v, const uint32_t* indptr,
                 const uint32_t* indices, const uint32_t* cl, T* o, float* lse, float* wa, float* wm, uint32_t* tk) {
    auto f = emu_pick_dtype<T>(nullptr, D == 64 ? ntkv_decode_attn_f16_d64 : ntkv_decode_attn_f16_d128,
                               D == 64 ? ntkv_decode_attn_bf16_d64 : ntkv_decode_attn_bf16_d128);
    f(p, q, k, v, indptr, indices, cl, o, lse, wa, wm, tk);
}

// The kernel parameters of case c over lists l (as src/decode/gpu.rs sets them up).
inline NtkvDecodeParams decode_params(const Cfg& c, const Lists& l) {
    const uint32_t n_lists = c.B * c.Hkv, group = c.Hq / c.Hkv, rows = group * c.Tq;
    uint32_t max_len = 0;
    for (uint32_t i = 0; i < n_lists; ++i) max_len = std::max(max_len, l.indptr[i + 1] - l.indptr[i]);
    const uint32_t max_chunks = std::max(1u, (max_len + c.chunk - 1) / c.chunk);
    NtkvDecodeParams p{};
    p.n_indices = l.indices.size();
    p.scale_log2 = (1.0f / std::sqrt((float)c.D)) * 1.4426950408889634f;
    p.batch = c.B; p.q_tokens = c.Tq; p.q_heads = c.Hq; p.kv_heads = c.Hkv; p.head_dim = c.D;
    p.cache_capacity = c.Tcap; p.group = group; p.rows = rows; p.row_tiles = (rows + R_TILE - 1) / R_TILE;
    p.chunk_tokens = c.chunk; p.max_chunks = max_chunks; p.causal = c.causal; p.direct = max_chunks == 1;
    return p;
}

// What a DecodePlan holds across steps: the lists on the device, the partial-state workspace
// (NaN until a CTA writes it) and the fold's tickets, one per (list, row tile), zero between
// launches (the kernel resets them; nothing else does). In the device arena (dev_alloc, which
// concurrent launches need) when `arena`, else on the heap.
struct PlanBuffers {
    std::vector<std::shared_ptr<void>> own;
    bool arena;
    uint32_t *ip = nullptr, *ix = nullptr, *cl = nullptr, *tickets = nullptr;
    float *wa = nullptr, *wm = nullptr;
    size_t n_tickets = 0;

    template <typename T>
    T* copy(const std::vector<T>& x) {
        const size_t n = std::max<size_t>(x.size(), 1);
        T* ptr;
        if (arena) {
            ptr = ntkv_emu::dev_alloc<T>(n);
        } else {
            ptr = new T[n];
            own.emplace_back(ptr, [](void* q) { delete[] static_cast<T*>(q); });
        }
        std::copy(x.begin(), x.end(), ptr);
        return ptr;
    }

    PlanBuffers(const NtkvDecodeParams& p, const Lists& l, bool in_arena) : arena(in_arena) {
        const uint32_t n_lists = p.batch * p.kv_heads;
        const size_t states = (size_t)n_lists * p.max_chunks * p.rows;
        ip = copy(l.indptr);
        ix = copy(l.indices);
        cl = copy(l.cache_lens);
        wa = copy(std::vector<float>(p.direct ? 1 : states * p.head_dim, NAN));
        wm = copy(std::vector<float>(p.direct ? 1 : 2 * states, NAN));
        n_tickets = p.direct ? 1 : (size_t)n_lists * p.row_tiles;
        tickets = copy(std::vector<uint32_t>(n_tickets, 0u));
    }
};

// How a launch's CTAs run: in this process in grid order (the default) or in reverse grid
// order, or each CTA in its own process, `concurrent` at once with random start delays
// (seeded), on the weak global-memory model, so the fold's tickets are drawn in a random
// order and a state that no fence published is not seen.
struct Schedule {
    unsigned concurrent = 0;
    bool reverse = false;
    unsigned seed = 1;
};

// One decode step: the attention launch (with the fold of split lists) over the plan's
// buffers. With `lists` non-empty only the CTAs of those lists run, in order (the
// production-scale checks). False when a concurrent launch failed.
template <typename T>
bool decode_step(const NtkvDecodeParams& p, PlanBuffers& w, const T* q, const T* k, const T* v, T* o, float* lse,
                 const Schedule& s = {}, const std::vector<uint32_t>& lists = {}) {
    const uint32_t n_lists = p.batch * p.kv_heads, per_list = p.max_chunks * p.row_tiles;
    ntkv_emu::LaunchOpts opts;
    opts.concurrent = s.concurrent;
    opts.jitter = s.concurrent > 0;
    opts.seed = s.seed;
    for (uint32_t list : lists)
        for (uint32_t i = 0; i < per_list; ++i) opts.only.push_back(dim3_{list * per_list + i, 0, 0});
    if (s.reverse) {
        if (opts.only.empty())
            for (uint32_t i = 0; i < n_lists * per_list; ++i) opts.only.push_back(dim3_{i, 0, 0});
        std::reverse(opts.only.begin(), opts.only.end());
    }
    return ntkv_emu::launch(dim3_{n_lists * per_list, 1, 1}, dim3_{THREADS, 1, 1}, attn_smem_bytes((int)p.head_dim), [&] {
        attn_kernel<T>(p.head_dim, p, q, k, v, w.ip, w.ix, w.cl, o, lse, w.wa, w.wm, w.tickets);
    }, opts);
}

// One step in this process on fresh heap buffers (decode_large.cpp).
template <typename T>
void decode_launch(const NtkvDecodeParams& p, const Lists& l, const T* q, const T* k, const T* v, T* o, float* lse,
                   const std::vector<uint32_t>& lists = {}) {
    PlanBuffers w(p, l, false);
    decode_step(p, w, q, k, v, o, lse, {}, lists);
}

}  // namespace decode_emu
