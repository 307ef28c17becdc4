// Runs the real kernel source cuda/policy.cu on the CPU (one std::thread per CUDA thread, see
// tools/emu/include/emu_runtime.h) against exact references written here from the contract in
// src/policy: WindowKV window sums, the LazyEviction state update and scores, and the PrefixKV
// thresholds, ratio search (driven from the host as the Rust launcher drives it), split counts
// and keep lists, all compared bit for bit. Small grids force every grid-stride loop through
// several steps; sizes are not multiples of any chunk. Build and run with tools/emu/run.sh
// policy (AddressSanitizer on: any access outside a buffer aborts the run). Output slots the
// contract leaves alone start as a sentinel and must still hold it.
#include "policy.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

std::mt19937_64 rng(20261202);
uint32_t below(uint64_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }
float uniform() { return std::uniform_real_distribution<float>(0.0f, 1.0f)(rng); }

constexpr uint32_t kThreads = 256;  // POLICY_THREADS in src/policy/gpu.rs
uint32_t fbits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
uint64_t dbits(double x) { uint64_t u; std::memcpy(&u, &x, 8); return u; }

bool report(const char* what, const char* name, size_t bad) {
    std::printf("%-14s %-40s %s (%zu bad)\n", what, name, bad ? "FAIL" : "ok", bad);
    return bad == 0;
}

bool window_case(const char* name, uint32_t rows, uint32_t older, uint32_t window, uint32_t grid, uint32_t pad = 0) {
    const uint32_t nw = (older + window - 1) / window;
    const uint32_t stride = older + pad;  // votes rows of the whole cache: the window is skipped
    std::vector<float> scores((size_t)rows * stride);
    for (auto& s : scores) s = below(6) == 0 ? -uniform() : uniform() * 3.0f;
    if (!scores.empty() && below(2)) scores[below(scores.size())] = NAN;
    auto sc = ntkv_emu::dup(scores);
    std::vector<float> ws((size_t)rows * nw, 777.0f);
    auto wsd = ntkv_emu::dup(ws);
    const NtkvPolicyWindowParams p{rows, older, window, nw, stride};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kThreads, 1, 1}, 0, [&] { ntkv_policy_window_sums(p, sc.get(), wsd.get()); });
    size_t bad = 0;
    for (uint32_t r = 0; r < rows; ++r)
        for (uint32_t i = 0; i < nw; ++i) {
            float acc = 0.0f;
            for (uint32_t j = i * window; j < std::min((i + 1) * window, older); ++j) acc = acc + scores[(size_t)r * stride + j];
            if (fbits(wsd[(size_t)r * nw + i]) != fbits(acc)) ++bad;
        }
    return report("window_sums", name, bad);
}

bool lazy_case(const char* name, uint32_t hkv, uint32_t t, uint32_t step, bool scores_too, uint32_t grid) {
    const size_t n = (size_t)hkv * t;
    const float th = 0.25f;
    std::vector<float> mass(n), acc(n), lh(n), mri(n), sc(n, 555.0f);
    for (size_t e = 0; e < n; ++e) {
        mass[e] = below(4) == 0 ? th : uniform() * 0.5f;  // the threshold itself counts as a hit
        acc[e] = uniform() * 10.0f;
        lh[e] = (float)below(step + 1);
        mri[e] = (float)below(step + 1);
    }
    auto md = ntkv_emu::dup(mass), ad = ntkv_emu::dup(acc), ld = ntkv_emu::dup(lh), rd = ntkv_emu::dup(mri), sd = ntkv_emu::dup(sc);
    const NtkvPolicyLazyParams p{(float)step, th, hkv, t, scores_too ? 1u : 0u};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kThreads, 1, 1}, 0,
                     [&] { ntkv_policy_lazy_update(p, md.get(), ad.get(), ld.get(), rd.get(), sd.get()); });
    size_t bad = 0;
    const float s = (float)step;
    for (size_t e = 0; e < n; ++e) {
        float a = acc[e] + mass[e], h = lh[e], r = mri[e];
        if (mass[e] >= th) {
            r = std::max(r, s - h);
            h = s;
        }
        const float want_score = scores_too ? r - (s - h) : 555.0f;
        if (fbits(ad[e]) != fbits(a) || ld[e] != h || rd[e] != r || fbits(sd[e]) != fbits(want_score)) ++bad;
    }
    return report("lazy_update", name, bad);
}

// The Rust reference's thresholds (src/policy/cpu.rs prefix_thresholds), as keys.
std::vector<uint64_t> host_thresholds(const std::vector<float>& sorted, uint32_t rows, uint32_t n) {
    auto mass = [](float x) { return (std::isfinite(x) && x > 0.0f) ? (double)x : 0.0; };
    const uint32_t chunk = (n + 1023) / 1024;
    std::vector<uint64_t> out((size_t)rows * n);
    std::vector<double> cum(n);
    for (uint32_t r = 0; r < rows; ++r) {
        const float* row = sorted.data() + (size_t)r * n;
        double base = 0.0;
        for (uint32_t lo = 0; lo < n; lo += chunk) {
            const uint32_t hi = std::min(lo + chunk, n);
            double run = base, s = 0.0;
            for (uint32_t i = lo; i < hi; ++i) {
                run += mass(row[i]);
                cum[i] = run;
                s += mass(row[i]);
            }
            base += s;
        }
        out[(size_t)r * n] = dbits(0.0);
        for (uint32_t i = 1; i < n; ++i) out[(size_t)r * n + i] = dbits(base > 0.0 ? cum[i - 1] / base : 1.0);
    }
    return out;
}

// A row sorted descending as the shared top-k sorts (ties by index, NaN last): values, order.
void host_sort(const std::vector<float>& x, uint32_t rows, uint32_t n, std::vector<float>& v, std::vector<uint32_t>& o) {
    v.resize(x.size());
    o.resize(x.size());
    for (uint32_t r = 0; r < rows; ++r) {
        std::vector<std::pair<uint32_t, uint32_t>> k;
        for (uint32_t i = 0; i < n; ++i) k.push_back({ntkv::order_key(x[(size_t)r * n + i]), i});
        std::sort(k.begin(), k.end(), [](auto a, auto b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
        for (uint32_t i = 0; i < n; ++i) {
            o[(size_t)r * n + i] = k[i].second;
            v[(size_t)r * n + i] = x[(size_t)r * n + k[i].second];
        }
    }
}

bool prefix_case(const char* name, uint32_t rows, uint32_t n, uint64_t budget, uint32_t grid, int ties) {
    std::vector<float> imp((size_t)rows * n);
    for (auto& x : imp) {
        const uint32_t c = below(10);
        x = c == 0 ? 0.0f : c == 1 ? -1.0f : c == 2 && ties ? NAN : (ties ? (float)(1 + below(3)) : uniform());
    }
    if (ties == 2)  // every row the same: the tie rule decides
        for (uint32_t r = 1; r < rows; ++r) std::copy(imp.begin(), imp.begin() + n, imp.begin() + (size_t)r * n);
    std::vector<float> sorted;
    std::vector<uint32_t> order;
    host_sort(imp, rows, n, sorted, order);
    auto sd = ntkv_emu::dup(sorted);
    std::vector<unsigned long long> keys((size_t)rows * n, 0);
    auto kd = ntkv_emu::dup(keys);
    NtkvPolicyPrefixParams p{0, 0, rows, n, 0};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kThreads, 1, 1}, 0, [&] { ntkv_policy_prefix_cumsum(p, sd.get(), kd.get()); });
    const std::vector<uint64_t> want = host_thresholds(sorted, rows, n);
    size_t bad = 0;
    for (size_t e = 0; e < want.size(); ++e) bad += kd[e] != want[e];
    bool ok = report("prefix_cumsum", name, bad);

    // The host-driven search, as src/policy/gpu.rs runs it: 8 rounds of 256 probes.
    uint64_t prefix = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        std::vector<unsigned long long> counts(256, 0);
        auto cd = ntkv_emu::dup(counts);
        p.key = prefix;
        p.bit = (uint32_t)shift;
        ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kThreads, 1, 1}, 0, [&] { ntkv_policy_prefix_probe(p, kd.get(), cd.get()); });
        uint32_t d = 0;
        while (d < 255 && cd[d] < budget) ++d;
        prefix |= (uint64_t)d << shift;
    }
    // Reference: the budget-th smallest (key, row, entry).
    std::vector<std::tuple<uint64_t, uint32_t, uint32_t>> all;
    for (uint32_t r = 0; r < rows; ++r)
        for (uint32_t i = 0; i < n; ++i) all.emplace_back(want[(size_t)r * n + i], r, i);
    std::sort(all.begin(), all.end());
    std::vector<uint32_t> want_budget(rows, 0);
    for (uint64_t j = 0; j < budget; ++j) ++want_budget[std::get<1>(all[j])];
    ok &= report("prefix_probe", name, prefix != std::get<0>(all[budget - 1]));

    std::vector<uint32_t> split((size_t)rows * 2, 0);
    auto spd = ntkv_emu::dup(split);
    p.key = prefix;
    ntkv_emu::launch(dim3_{std::max(1u, grid / 2), 1, 1}, dim3_{32, 1, 1}, 0, [&] { ntkv_policy_prefix_split(p, kd.get(), spd.get()); });
    uint64_t rem = budget;
    for (uint32_t r = 0; r < rows; ++r) rem -= spd[(size_t)r * 2];
    std::vector<uint32_t> budgets(rows), indptr(rows + 1, 0);
    bad = 0;
    for (uint32_t r = 0; r < rows; ++r) {
        const uint32_t extra = (uint32_t)std::min<uint64_t>(spd[(size_t)r * 2 + 1], rem);
        rem -= extra;
        budgets[r] = spd[(size_t)r * 2] + extra;
        indptr[r + 1] = indptr[r] + budgets[r];
        bad += budgets[r] != want_budget[r];
    }
    ok &= report("prefix_split", name, bad);

    const uint32_t sentinel = 0xdeadbeefu;
    std::vector<uint32_t> indices(budget + 3, sentinel);
    auto od = ntkv_emu::dup(order), bd = ntkv_emu::dup(budgets), ipd = ntkv_emu::dup(indptr), id = ntkv_emu::dup(indices);
    p.cap = (uint32_t)budget;
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kThreads, 1, 1}, 0,
                     [&] { ntkv_policy_prefix_keep(p, od.get(), bd.get(), ipd.get(), id.get()); });
    bad = 0;
    for (uint32_t r = 0; r < rows; ++r) {
        std::vector<uint32_t> k(order.begin() + (size_t)r * n, order.begin() + (size_t)r * n + budgets[r]);
        std::sort(k.begin(), k.end());
        for (uint32_t j = 0; j < budgets[r]; ++j) bad += id[indptr[r] + j] != k[j];
    }
    for (uint64_t j = budget; j < budget + 3; ++j) bad += id[j] != sentinel;
    ok &= report("prefix_keep", name, bad);
    return ok;
}

bool window_cases() {
    bool ok = window_case("short last window", 3, 37, 5, 1);
    ok &= window_case("w = 1, grid-stride", 5, 300, 1, 2);
    ok &= window_case("one window", 2, 7, 8, 1);
    ok &= window_case("many rows", 40, 129, 16, 3);
    return window_case("row stride t (recent 9)", 4, 50, 7, 2, 9) && ok;
}

bool lazy_cases() {
    bool ok = lazy_case("scores", 3, 1000, 40, true, 2);
    ok &= lazy_case("no scores", 2, 777, 7, false, 1);
    return lazy_case("step 0", 1, 33, 0, true, 1) && ok;
}

bool prefix_cases() {
    bool ok = prefix_case("small", 3, 7, 9, 2, 0);
    ok &= prefix_case("chunks of 3 (n 2100)", 4, 2100, 3000, 3, 0);
    ok &= prefix_case("integer ties, NaN", 5, 64, 100, 2, 1);
    ok &= prefix_case("identical rows", 6, 40, 77, 4, 2);
    ok &= prefix_case("budget 1", 2, 50, 1, 1, 0);
    ok &= prefix_case("budget all", 3, 31, 93, 2, 1);
    return prefix_case("n = 1", 9, 1, 4, 2, 0) && ok;
}

}  // namespace

// Argument: one part (window, lazy, prefix) to run alone.
int main(int argc, char** argv) {
    const std::pair<const char*, bool (*)()> parts[] = {{"window", window_cases}, {"lazy", lazy_cases}, {"prefix", prefix_cases}};
    bool ok = true;
    for (const auto& [part, run] : parts)
        if (argc < 2 || std::string(argv[1]) == part) ok = run() && ok;
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
