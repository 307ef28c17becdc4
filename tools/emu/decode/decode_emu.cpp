// Runs the real kernel source cuda/decode.cu on the CPU (one std::thread per CUDA thread,
// see tools/emu/include/emu_runtime.h) against an f64 reference: a check of indexing, masking,
// tiling, the chunk split and the merge that needs no GPU. Build and run with
// tools/emu/run.sh decode (AddressSanitizer on: any out-of-bounds read or write of q, k, v, o,
// lse, the lists, the workspace or past the requested shared memory aborts the run).
//
// It does not replace the GPU tests: cp.async, the memory model and the real warp
// scheduling are only modelled.
#include "decode.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "decode_ref.h"

#include <cstdio>
#include <random>

namespace {

using namespace decode_emu;
using ntkv_emu::dup;

std::mt19937_64 rng(12345);

uint32_t below(uint32_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }

Lists random_lists(const Cfg& c, int mode) {
    Lists l;
    for (uint32_t b = 0; b < c.B; ++b) l.cache_lens.push_back(below(4) == 0 ? below(c.Tcap + 1) : c.Tcap - below(std::min(c.Tcap, 8u)));
    l.indptr.push_back(0);
    for (uint32_t li = 0; li < c.B * c.Hkv; ++li) {
        const uint32_t n = l.cache_lens[li / c.Hkv];
        uint32_t len = mode == 0 ? below(n + 1) : mode == 1 ? n : std::min(n, 1u);
        if (li % 3 == 1 && mode == 0) len = 0;  // some empty lists
        uint32_t need = len;
        for (uint32_t i = 0; i < n && need > 0; ++i) {
            if (below(n - i) < need) {
                l.indices.push_back(i);
                --need;
            }
        }
        l.indptr.push_back((uint32_t)l.indices.size());
    }
    return l;
}

template <typename T>
bool run_case(const Cfg& c, int mode, const char* name) {
    const Lists l = random_lists(c, mode);
    std::normal_distribution<float> nd;
    const size_t nq = (size_t)c.B * c.Tq * c.Hq * c.D, nkv = (size_t)c.B * c.Hkv * c.Tcap * c.D;
    std::vector<T> q(nq), k(nkv), v(nkv);
    for (auto& x : q) x = from_float<T>(nd(rng));
    for (auto& x : k) x = from_float<T>(nd(rng));
    for (auto& x : v) x = from_float<T>(nd(rng));
    std::vector<double> ro, rl;
    reference(c, q, k, v, l, ro, rl);

    const NtkvDecodeParams p = decode_params(c, l);
    auto qd = dup(q), kd = dup(k), vd = dup(v);
    std::vector<T> o_init(nq, from_float<T>(NAN));
    std::vector<float> lse_init((size_t)c.B * c.Tq * c.Hq, NAN);
    auto od = dup(o_init);
    auto lsed = dup(lse_init);
    decode_launch(p, l, qd.get(), kd.get(), vd.get(), od.get(), lsed.get());
    const uint32_t max_chunks = p.max_chunks;
    ntkv_emu::RelL2 o_err;
    double lse_err = 0;
    bool ok = true;
    for (size_t i = 0; i < nq; ++i) {
        const double g = ntkv::to_f32(od[i]);
        if (std::isnan(g)) {
            std::printf("  %s: o[%zu] not written (NaN)\n", name, i);
            ok = false;
            break;
        }
        o_err.add(g, ro[i]);
    }
    for (size_t i = 0; i < rl.size(); ++i) {
        const double g = lsed[i];
        if (std::isinf(rl[i]) ? g != rl[i] : !(std::fabs(g - rl[i]) <= 1e-3 + 1e-4 * std::fabs(rl[i]))) {
            std::printf("  %s: lse[%zu] = %g, want %g\n", name, i, g, rl[i]);
            ok = false;
            break;
        }
        if (!std::isinf(rl[i])) lse_err = std::max(lse_err, std::fabs(g - rl[i]));
        // A row with nothing visible is exactly zero.
        if (std::isinf(rl[i]))
            for (uint32_t d = 0; d < c.D; ++d)
                if (ntkv::to_f32(od[i * c.D + d]) != 0.f) {
                    std::printf("  %s: empty row %zu not zero\n", name, i);
                    ok = false;
                    break;
                }
    }
    const double rel = o_err.value();
    const double tol = sizeof(T) == 2 && std::is_same<T, __half>::value ? 5e-4 : 2e-3;
    if (rel > tol) ok = false;
    std::printf("%-4s %-46s B%u Tq%u Hq%u Hkv%u D%u T%u causal%d chunk%u chunks%u: rel L2 %.2e, max |dlse| %.2e\n",
                ok ? "ok" : "FAIL", name, c.B, c.Tq, c.Hq, c.Hkv, c.D, c.Tcap, c.causal, c.chunk, max_chunks, rel,
                lse_err);
    return ok;
}

bool validate_case() {
    // Two lists of one sequence (Hkv = 2), cache_len 100; faults at known positions.
    struct V { std::vector<uint32_t> indptr, indices; uint64_t want; };
    std::vector<V> cases = {
        {{0, 3, 5}, {1, 5, 9, 0, 99}, ~0ull},
        {{0, 3, 5}, {1, 5, 5, 0, 99}, (2ull << 2) | 2},
        {{0, 3, 5}, {1, 5, 4, 0, 99}, (2ull << 2) | 3},
        {{0, 3, 5}, {1, 5, 9, 0, 100}, (4ull << 2) | 1},
        {{0, 3, 5}, {1, 500, 9, 7, 3}, (1ull << 2) | 1},
        {{0, 0, 2}, {7, 7}, (1ull << 2) | 2},
    };
    // A long list whose fault sits in a later segment and stride.
    V big{{0, 0, 5000}, {}, (4321ull << 2) | 3};
    for (uint32_t i = 0; i < 5000; ++i) big.indices.push_back(i * 20000u / 5000u);
    big.indices[4321] = 0;
    std::vector<uint32_t> cl = {100};
    cases.push_back(big);
    bool ok = true;
    for (size_t n = 0; n < cases.size(); ++n) {
        auto& cs = cases[n];
        std::vector<uint32_t> lens = n + 1 == cases.size() ? std::vector<uint32_t>{20000} : cl;
        auto ip = dup(cs.indptr), ix = dup(cs.indices), cld = dup(lens);
        unsigned long long flag = ~0ull;
        NtkvDecodeValidateParams p{};
        p.n_indices = cs.indices.size();
        p.n_lists = 2;
        p.kv_heads = 2;
        p.batch = 1;
        const uint32_t segments = std::min<uint32_t>(64, std::max<uint32_t>(1, (5000 + 2047) / 2048));
        ntkv_emu::launch(dim3_{2, segments, 1}, dim3_{256, 1, 1}, 0,
                         [&] { ntkv_decode_validate(p, ip.get(), ix.get(), cld.get(), &flag); });
        const bool good = flag == cs.want;
        std::printf("%-4s validate case %zu: verdict %llx want %llx\n", good ? "ok" : "FAIL", n, flag,
                    (unsigned long long)cs.want);
        ok &= good;
    }
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    ok &= validate_case();
    // GQA groups 1, 2, 4, 8; D 64 and 128; direct and split; causal and not; row tiles.
    ok &= run_case<__half>({2, 1, 2, 2, 128, 150, false, 256}, 0, "f16 direct, random lists");
    ok &= run_case<__half>({2, 3, 4, 2, 64, 203, true, 64}, 0, "f16 split 64, group 2, causal");
    ok &= run_case<__nv_bfloat16>({1, 2, 8, 2, 128, 300, false, 128}, 1, "bf16 split 128, group 4, full lists");
    ok &= run_case<__nv_bfloat16>({2, 5, 8, 1, 64, 97, true, 64}, 0, "bf16 group 8 x Tq 5 = 40 rows (3 tiles)");
    ok &= run_case<__half>({1, 16, 16, 2, 64, 130, true, 64}, 2, "f16 single-entry lists, 128 rows, causal");
    ok &= run_case<__half>({1, 4, 6, 2, 128, 260, true, 1024}, 1, "f16 direct full lists, 12 rows, causal");
    ok &= run_case<__nv_bfloat16>({3, 1, 3, 3, 128, 70, false, 64}, 0, "bf16 split 64, group 1, short cache");
    ok &= run_case<__half>({3, 2, 16, 2, 128, 333, false, 64}, 0, "f16 split 64, group 8, D128, 16 rows");
    ok &= run_case<__nv_bfloat16>({1, 1, 4, 4, 128, 2100, false, 256}, 1, "bf16 split 256 (4 tiles/chunk), full");
    ok &= run_case<__half>({2, 7, 6, 3, 64, 180, true, 128}, 0, "f16 split 128, group 2 x Tq 7, causal");
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
