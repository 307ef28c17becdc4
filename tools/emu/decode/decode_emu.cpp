// Runs the real kernel source cuda/decode.cu on the CPU (one std::thread per CUDA thread,
// see tools/emu/include/emu_runtime.h) against an f64 reference: a check of indexing, masking,
// tiling, the chunk split and the merge that needs no GPU. The merge is folded into the
// attention launch (the CTA that draws a (list, row tile)'s last ticket merges), so split cases
// also run with CTAs in concurrent processes on the weak memory model, in reverse order, and
// over several steps on one set of tickets (run_case). Build and run with
// tools/emu/run.sh decode (AddressSanitizer on: any out-of-bounds read or write of q, k, v, o,
// lse, the lists, the workspace or past the requested shared memory aborts the run).
//
// It does not replace the GPU tests: cp.async, the memory model and the real warp
// scheduling are only modelled.
#include "decode.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "decode_ref.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
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
        uint32_t len = mode == 0 ? below(n + 1) : mode == 1 ? n : mode == 2 ? std::min(n, 1u) : li % 2 ? n : 0;
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

// Compares one step's o and lse with the f64 reference; prints the errors under `name`.
template <typename T>
bool check_output(const Cfg& c, const T* od, const float* lsed, const std::vector<double>& ro,
                  const std::vector<double>& rl, const char* name, double& rel, double& lse_err) {
    const size_t nq = ro.size();
    ntkv_emu::RelL2 o_err;
    lse_err = 0;
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
    rel = o_err.value();
    const double tol = std::is_same<T, __half>::value ? 5e-4 : 2e-3;
    if (!(rel <= tol)) ok = false;
    return ok;
}

// The fold's bits: every row of a list of two or more chunks must hold exactly what
// fd_merge_workspace (the separate merge kernel's function, plain loads, chunk order) makes of
// the states this step left in the workspace, whichever CTA drew the last ticket. Returns the
// number of values (o and lse) that differ.
template <typename T>
size_t fold_mismatches(const NtkvDecodeParams& p, const Lists& l, const PlanBuffers& w, const T* o, const float* lse) {
    if (p.direct) return 0;
    size_t bad = 0;
    for (uint32_t list = 0; list < p.batch * p.kv_heads; ++list) {
        const uint32_t n = ntkv::fd_chunks_of(l.indptr[list + 1] - l.indptr[list], p.chunk_tokens, p.max_chunks);
        if (n < 2) continue;
        for (uint32_t gr = 0; gr < p.rows; ++gr) {
            const uint64_t base = (uint64_t)list * p.max_chunks * p.rows + gr;
            const uint64_t row =
                ntkv::fd_row_offset(list / p.kv_heads, list % p.kv_heads, gr, p.group, p.q_tokens, p.q_heads);
            for (uint32_t d = 0; d < p.head_dim; ++d) {
                float out, row_lse;
                ntkv::fd_merge_workspace(n, base, p.rows, p.head_dim, d, w.wa, w.wm, out, row_lse);
                const T want = ntkv::from_f32<T>(out);
                if (std::memcmp(&want, &o[row * p.head_dim + d], sizeof(T)) != 0) ++bad;
                if (d == 0 && std::memcmp(&row_lse, &lse[row], 4) != 0) ++bad;
            }
        }
    }
    return bad;
}

template <typename T>
std::vector<T> random_values(size_t n) {
    std::normal_distribution<float> nd;
    std::vector<T> x(n);
    for (auto& e : x) e = from_float<T>(nd(rng));
    return x;
}

// One case: a plan (lists, workspace, tickets) and three steps over it, as a decode loop runs
// them. Step 1: CTAs in concurrent processes with random start delays (the fold's tickets
// drawn in a random order, a state published only by a fence). Step 2: the same inputs, CTAs
// in this process in reverse grid order (chunk 0 folds): o and lse must equal step 1's bit for
// bit. Step 3: a new q, concurrent again, on the tickets the earlier steps left. Every step is
// checked against the f64 reference and the fixed-order merge, and must leave every ticket 0.
template <typename T>
bool run_case(const Cfg& c, int mode, const char* name) {
    ntkv_emu::arena_reset();
    const Lists l = random_lists(c, mode);
    const size_t nq = (size_t)c.B * c.Tq * c.Hq * c.D, nkv = (size_t)c.B * c.Hkv * c.Tcap * c.D;
    const size_t nrows = (size_t)c.B * c.Tq * c.Hq;
    const std::vector<T> q1 = random_values<T>(nq), k = random_values<T>(nkv), v = random_values<T>(nkv);
    const std::vector<T> q2 = random_values<T>(nq);
    std::vector<double> ro1, rl1, ro2, rl2;
    reference(c, q1, k, v, l, ro1, rl1);
    reference(c, q2, k, v, l, ro2, rl2);

    const NtkvDecodeParams p = decode_params(c, l);
    PlanBuffers w(p, l, true);
    const T *q1d = w.copy(q1), *q2d = w.copy(q2), *kd = w.copy(k), *vd = w.copy(v);
    T* od = w.copy(std::vector<T>(nq));
    float* lsed = w.copy(std::vector<float>(nrows));
    std::vector<T> o1(nq);
    std::vector<float> lse1(nrows);

    struct Step {
        const T* q;
        Schedule s;
        const char* what;
    };
    const Step steps[3] = {{q1d, {4, false, 11}, "concurrent"}, {q1d, {0, true, 1}, "reverse order"},
                           {q2d, {4, false, 29}, "new q, concurrent"}};
    bool ok = true;
    double rel = 0, lse_err = 0;
    size_t fold_bad = 0, tickets_left = 0, vs_step1 = 0;
    for (int si = 0; si < 3 && ok; ++si) {
        const Step& st = steps[si];
        std::fill(od, od + nq, from_float<T>(NAN));
        std::fill(lsed, lsed + nrows, NAN);
        if (!decode_step(p, w, st.q, kd, vd, od, lsed, st.s)) {
            std::printf("  %s: step %d (%s) failed\n", name, si + 1, st.what);
            ok = false;
            break;
        }
        double r, e;
        ok &= check_output(c, od, lsed, si == 2 ? ro2 : ro1, si == 2 ? rl2 : rl1, name, r, e);
        rel = std::max(rel, r);
        lse_err = std::max(lse_err, e);
        const size_t bad = fold_mismatches(p, l, w, od, lsed);
        fold_bad += bad;
        for (size_t t = 0; t < w.n_tickets; ++t) tickets_left += w.tickets[t] != 0;
        if (si == 0) {
            std::copy(od, od + nq, o1.begin());
            std::copy(lsed, lsed + nrows, lse1.begin());
        } else if (si == 1) {
            vs_step1 = 0;
            for (size_t i = 0; i < nq; ++i) vs_step1 += std::memcmp(&od[i], &o1[i], sizeof(T)) != 0;
            for (size_t i = 0; i < nrows; ++i) vs_step1 += std::memcmp(&lsed[i], &lse1[i], 4) != 0;
        }
        if (bad || tickets_left || vs_step1) {
            std::printf("  %s: step %d (%s): %zu values differ from the fixed-order merge, %zu from step 1, "
                        "%zu tickets not reset\n",
                        name, si + 1, st.what, bad, vs_step1, tickets_left);
            ok = false;
        }
    }
    std::printf("%-4s %-46s B%u Tq%u Hq%u Hkv%u D%u T%u causal%d chunk%u chunks%u: rel L2 %.2e, max |dlse| %.2e, "
                "3 steps bit-stable\n",
                ok ? "ok" : "FAIL", name, c.B, c.Tq, c.Hq, c.Hkv, c.D, c.Tcap, c.causal, c.chunk, p.max_chunks, rel,
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
#ifdef __SANITIZE_THREAD__
    // The race check (--tsan) is about the barriers inside a CTA. The weak memory model's
    // page-fault bookkeeping takes a lock in code TSan does not instrument, so TSan would
    // report the bookkeeping itself; there the concurrent steps run on the sc model (the
    // ASan build keeps the weak model, which the fence mutant needs).
    setenv("NTKV_EMU_MEMORY", "sc", 0);
#endif
    ntkv_emu::arena_init(size_t(64) << 20);
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
    // The fold: many chunks per list (33, one CTA each, every one may fold); a split plan
    // whose lists alternate empty and 5 chunks (the empty ones write o = 0, lse = -inf
    // directly); a split plan with one-chunk lists beside split ones (mode 0 at chunk 64).
    ok &= run_case<__half>({1, 1, 4, 2, 64, 2100, false, 64}, 1, "f16 33 chunks per list (fold of 33 states)");
    ok &= run_case<__nv_bfloat16>({2, 2, 4, 2, 128, 300, true, 64}, 3, "bf16 split, empty lists beside 5 chunks");
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
