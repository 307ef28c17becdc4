// Production-scale index checks of cuda/decode.cu (tools/emu/run.sh decode-large): the K and V
// caches of the bench-runner shapes and larger (up to 2^33 elements, 16 GiB each) live in
// reserved address space (ntkv_emu::Reserved: MAP_NORESERVE, zero until touched), and only the
// CTAs of chosen lists run: the first, the last, and those whose K/V head straddles element
// 2^31 and 2^32. Each chosen list's output must equal, bit for bit, the output of the same
// kernel on a small cache that holds just that list's rows (which decode_emu.cpp's cases check
// against the f64 reference; here it is checked loosely too). A head offset or row index
// computed in 32 bits reads another head's rows (zeros here) and fails.
#include "decode.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "decode_ref.h"

#include <cstdio>
#include <random>
#include <set>

namespace {

using namespace decode_emu;
using ntkv_emu::dup;

std::mt19937_64 rng(777);

// The tokens list `list` of a head with `t` tokens of d elements selects: `sel` of them, spread
// over the head, plus those around the head's element offsets of 2^31 and 2^32 if it holds one.
std::vector<uint32_t> chosen_tokens(uint64_t list, uint32_t t, uint32_t d, uint32_t sel) {
    std::set<uint32_t> s;
    const uint64_t first = list * t * d, last = first + (uint64_t)t * d;
    for (uint64_t edge : {uint64_t(1) << 31, uint64_t(1) << 32}) {
        if (edge < first || edge >= last) continue;
        const uint32_t tok = (uint32_t)((edge - first) / d);
        for (uint32_t i = tok > 40 ? tok - 40 : 0; i < std::min(t, tok + 40); ++i) s.insert(i);
    }
    s.insert(0);
    s.insert(t - 1);
    while (s.size() < sel) s.insert((uint32_t)(rng() % t));
    return std::vector<uint32_t>(s.begin(), s.end());
}

template <typename T>
bool large_case(const char* name, const Cfg& c, uint32_t sel) {
    const uint32_t n_lists = c.B * c.Hkv, group = c.Hq / c.Hkv;
    const uint64_t per_head = (uint64_t)c.Tcap * c.D;
    // The first, the last, and the lists holding elements 2^31 and 2^32.
    std::set<uint32_t> pick = {0, n_lists - 1};
    for (uint64_t edge : {uint64_t(1) << 31, uint64_t(1) << 32})
        if (edge < per_head * n_lists) pick.insert((uint32_t)(edge / per_head));
    const std::vector<uint32_t> lists(pick.begin(), pick.end());

    Lists l;
    l.cache_lens.assign(c.B, c.Tcap);
    l.indptr.push_back(0);
    std::vector<std::vector<uint32_t>> toks(n_lists);
    for (uint32_t li = 0; li < n_lists; ++li) {
        if (pick.count(li)) toks[li] = chosen_tokens(li, c.Tcap, c.D, sel);
        l.indices.insert(l.indices.end(), toks[li].begin(), toks[li].end());
        l.indptr.push_back((uint32_t)l.indices.size());
    }
    ntkv_emu::Reserved<T> k(per_head * n_lists), v(per_head * n_lists);
    std::normal_distribution<float> nd;
    for (uint32_t li : lists)
        for (uint32_t tok : toks[li])
            for (uint32_t e = 0; e < c.D; ++e) {
                k[li * per_head + (uint64_t)tok * c.D + e] = ntkv::from_f32<T>(nd(rng));
                v[li * per_head + (uint64_t)tok * c.D + e] = ntkv::from_f32<T>(nd(rng));
            }
    const size_t nq = (size_t)c.B * c.Tq * c.Hq * c.D;
    std::vector<T> q(nq);
    for (auto& x : q) x = ntkv::from_f32<T>(nd(rng));
    const NtkvDecodeParams p = decode_params(c, l);
    auto qd = dup(q);
    auto od = dup(std::vector<T>(nq, ntkv::from_f32<T>(NAN)));
    auto lsed = dup(std::vector<float>((size_t)c.B * c.Tq * c.Hq, NAN));
    decode_launch(p, l, qd.get(), k.get(), v.get(), od.get(), lsed.get(), lists);

    bool ok = true;
    for (uint32_t li : lists) {
        // The same list alone: one sequence, one kv head, its rows packed as tokens 0..n-1.
        const uint32_t n = (uint32_t)toks[li].size();
        const Cfg sc{1, c.Tq, group, 1, c.D, n, false, c.chunk};
        Lists sl;
        sl.cache_lens = {n};
        sl.indptr = {0, n};
        for (uint32_t i = 0; i < n; ++i) sl.indices.push_back(i);
        std::vector<T> sk((size_t)n * c.D), sv((size_t)n * c.D), sq((size_t)c.Tq * group * c.D);
        for (uint32_t i = 0; i < n; ++i)
            for (uint32_t e = 0; e < c.D; ++e) {
                sk[(size_t)i * c.D + e] = k[li * per_head + (uint64_t)toks[li][i] * c.D + e];
                sv[(size_t)i * c.D + e] = v[li * per_head + (uint64_t)toks[li][i] * c.D + e];
            }
        const uint32_t b = li / c.Hkv, hkv = li % c.Hkv;
        for (uint32_t gr = 0; gr < group * c.Tq; ++gr)
            for (uint32_t e = 0; e < c.D; ++e)
                sq[ntkv::fd_row_offset(0, 0, gr, group, c.Tq, group) * c.D + e] =
                    q[ntkv::fd_row_offset(b, hkv, gr, group, c.Tq, c.Hq) * c.D + e];
        const NtkvDecodeParams sp = decode_params(sc, sl);
        auto sqd = dup(sq), skd = dup(sk), svd = dup(sv);
        auto so = dup(std::vector<T>(sq.size(), ntkv::from_f32<T>(NAN)));
        auto slse = dup(std::vector<float>((size_t)c.Tq * group, NAN));
        decode_launch(sp, sl, sqd.get(), skd.get(), svd.get(), so.get(), slse.get());
        std::vector<double> ro, rl;
        reference(sc, sq, sk, sv, sl, ro, rl);
        ntkv_emu::RelL2 err;
        size_t diff = 0;
        for (uint32_t gr = 0; gr < group * c.Tq; ++gr) {
            const uint64_t big = ntkv::fd_row_offset(b, hkv, gr, group, c.Tq, c.Hq);
            const uint64_t small = ntkv::fd_row_offset(0, 0, gr, group, c.Tq, group);
            if (std::memcmp(&lsed[big], &slse[small], 4) != 0) ++diff;
            for (uint32_t e = 0; e < c.D; ++e) {
                if (std::memcmp(&od[big * c.D + e], &so[small * c.D + e], sizeof(T)) != 0) ++diff;
                err.add(ntkv::to_f32(so[small * c.D + e]), ro[small * c.D + e]);
            }
        }
        const bool good = diff == 0 && err.value() < 2e-3;
        std::printf("  list %u (kv head offset %llu elements, %u tokens): %zu values differ from the small run; "
                    "small run rel L2 %.2e\n",
                    li, (unsigned long long)(li * per_head), n, diff, err.value());
        ok &= good;
    }
    std::printf("%-4s %-34s B%u Tq%u Hq%u Hkv%u D%u T%u chunk%u: K/V %.1f GiB each reserved, %ld MiB resident\n",
                ok ? "ok" : "FAIL", name, c.B, c.Tq, c.Hq, c.Hkv, c.D, c.Tcap, c.chunk,
                (double)(per_head * n_lists * sizeof(T)) / (1 << 30), ntkv_emu::resident_mib());
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    // bench/src/decode.rs: decode_sparse, decode_sparse_gqa (2^29 and 2^27 elements).
    ok &= large_case<__half>("bench decode_sparse", {1, 1, 32, 32, 128, 131072, false, 512}, 2048);
    ok &= large_case<__nv_bfloat16>("bench decode_sparse_gqa", {1, 4, 32, 8, 128, 131072, false, 512}, 2048);
    // Larger: 2^33 elements; heads start exactly at 2^31 and 2^32.
    ok &= large_case<__half>("B16 (2^33 elements)", {16, 1, 32, 32, 128, 131072, false, 512}, 256);
    // A capacity that is no power of two: 2^31 and 2^32 fall inside a head.
    ok &= large_case<__nv_bfloat16>("B48 T100000 (edges inside heads)", {48, 2, 16, 8, 128, 100000, false, 256}, 300);
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
