// tools/emu/decode/decode_ref.h: what the decode harnesses share (decode_emu.cpp, the small
// cases; decode_large.cpp, the production-scale index checks): the case shape, the f64
// reference and the per-dtype kernel entry points. Include after decode.cu.
#pragma once

#include "emu_check.h"

#include <cmath>
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

using AttnFn = void (*)(NtkvDecodeParams, const void*, const void*, const void*, const uint32_t*, const uint32_t*,
                        const uint32_t*, void*, float*, float*, float*);

template <typename T>
void attn_kernel(uint32_t D, const NtkvDecodeParams& p, const T* q, const T* k, const T* v, const uint32_t* indptr,
                 const uint32_t* indices, const uint32_t* cl, T* o, float* lse, float* wa, float* wm);
template <>
void attn_kernel<__half>(uint32_t D, const NtkvDecodeParams& p, const __half* q, const __half* k, const __half* v,
                         const uint32_t* ip, const uint32_t* ix, const uint32_t* cl, __half* o, float* lse, float* wa,
                         float* wm) {
    if (D == 64) ntkv_decode_attn_f16_d64(p, q, k, v, ip, ix, cl, o, lse, wa, wm);
    else ntkv_decode_attn_f16_d128(p, q, k, v, ip, ix, cl, o, lse, wa, wm);
}
template <>
void attn_kernel<__nv_bfloat16>(uint32_t D, const NtkvDecodeParams& p, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                const __nv_bfloat16* v, const uint32_t* ip, const uint32_t* ix, const uint32_t* cl,
                                __nv_bfloat16* o, float* lse, float* wa, float* wm) {
    if (D == 64) ntkv_decode_attn_bf16_d64(p, q, k, v, ip, ix, cl, o, lse, wa, wm);
    else ntkv_decode_attn_bf16_d128(p, q, k, v, ip, ix, cl, o, lse, wa, wm);
}
void merge_kernel(const NtkvDecodeParams& p, const uint32_t* ip, const float* wa, const float* wm, __half* o, float* lse) {
    ntkv_decode_merge_f16(p, ip, wa, wm, o, lse);
}
void merge_kernel(const NtkvDecodeParams& p, const uint32_t* ip, const float* wa, const float* wm, __nv_bfloat16* o,
                  float* lse) {
    ntkv_decode_merge_bf16(p, ip, wa, wm, o, lse);
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

// The attention launch and, when the lists are split into chunks, the merge. With `lists`
// non-empty only the CTAs of those lists run (the production-scale checks).
template <typename T>
void decode_launch(const NtkvDecodeParams& p, const Lists& l, const T* q, const T* k, const T* v, T* o, float* lse,
                   const std::vector<uint32_t>& lists = {}) {
    const uint32_t n_lists = p.batch * p.kv_heads;
    auto ip = ntkv_emu::dup(l.indptr), ix = ntkv_emu::dup(l.indices), cl = ntkv_emu::dup(l.cache_lens);
    const size_t states = (size_t)n_lists * p.max_chunks * p.rows;
    auto wa = ntkv_emu::dup(std::vector<float>(p.direct ? 1 : states * p.head_dim, NAN));
    auto wm = ntkv_emu::dup(std::vector<float>(p.direct ? 1 : 2 * states, NAN));
    ntkv_emu::LaunchOpts attn, merge;
    for (uint32_t list : lists) {
        for (uint32_t i = 0; i < p.max_chunks * p.row_tiles; ++i) attn.only.push_back(dim3_{list * p.max_chunks * p.row_tiles + i, 0, 0});
        for (uint32_t r = 0; r < p.rows; ++r) merge.only.push_back(dim3_{list * p.rows + r, 0, 0});
    }
    ntkv_emu::launch(dim3_{n_lists * p.max_chunks * p.row_tiles, 1, 1}, dim3_{THREADS, 1, 1}, attn_smem_bytes((int)p.head_dim), [&] {
        attn_kernel<T>(p.head_dim, p, q, k, v, ip.get(), ix.get(), cl.get(), o, lse, wa.get(), wm.get());
    }, attn);
    if (!p.direct) {
        ntkv_emu::launch(dim3_{n_lists * p.rows, 1, 1}, dim3_{p.head_dim, 1, 1}, 0,
                         [&] { merge_kernel(p, ip.get(), wa.get(), wm.get(), o, lse); }, merge);
    }
}

}  // namespace decode_emu
