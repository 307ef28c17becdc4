// Production-scale index checks of cuda/topk.cu (tools/emu/run.sh topk-large): the fused
// top-k over score matrices of the bench runner's row length (32768: H2O's and SnapKV's t) with
// more than 2^32 and 2^33 f32 elements, in reserved address space (ntkv_emu::Reserved:
// MAP_NORESERVE, zero until touched), launched in row batches as TopkPlan does. Only the CTAs
// of chosen rows run (the first, the last, and those holding elements 2^31 and 2^32); their
// indices and values must equal, bit for bit, those of the same kernel on that row alone (the
// small shapes are checked against the reference by topk_emu.cpp). A row offset formed in 32
// bits reads another row's scores and fails.
#include "topk.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cstdio>
#include <random>
#include <set>

namespace {

constexpr size_t N = 32768, K = 2048, FUSED_STATIC_SMEM = 18432, CAND_STAGE_MAX = 8192, MAX_BATCH = 65535;

// The fused kernel over rows [0, rows) of x in batches of MAX_BATCH rows; with `only` given,
// just those rows' CTAs.
void fused(size_t rows, const float* x, float* values, uint32_t* indices, const std::set<size_t>& only) {
    const size_t kpad = K;  // a power of two already
    const size_t cand_stage = std::min((ntkv_emu::SMEM_CAP - FUSED_STATIC_SMEM - kpad * 8) / 8, CAND_STAGE_MAX);
    const uint32_t smem = (uint32_t)((kpad + cand_stage) * 8);
    const size_t batch_max = std::min(rows, MAX_BATCH);
    ntkv_emu::Reserved<uint32_t> sel(batch_max * K), cand(batch_max * N);
    for (size_t row_base = 0; row_base < rows; row_base += batch_max) {
        const size_t batch = std::min(batch_max, rows - row_base);
        NtkvTopkParams p{};
        p.row_stride = N;
        p.cand_stride = N;
        p.out_stride = K;
        p.row_base = (uint32_t)row_base;
        p.rows = (uint32_t)batch;
        p.n = (uint32_t)N;
        p.k = (uint32_t)K;
        p.uniform_len = (uint32_t)N;
        p.blocks_per_row = 1;
        p.chunk = (uint32_t)((N + 2047) / 2048 * 2048);
        p.kpad = (uint32_t)kpad;
        p.write_values = 1;
        p.reverse_filter = 1;
        p.cand_stage = (uint32_t)cand_stage;
        ntkv_emu::LaunchOpts o;
        for (size_t r : only)
            if (r >= row_base && r < row_base + batch) o.only.push_back(dim3_{(unsigned)(r - row_base), 0, 0});
        if (!only.empty() && o.only.empty()) continue;
        ntkv_emu::launch(dim3_{(unsigned)batch, 1, 1}, dim3_{1024, 1, 1}, smem,
                         [&] { ntkv_topk_fused_f32(p, x, nullptr, sel.get(), cand.get(), values, indices); }, o);
    }
}

bool large_case(const char* name, size_t rows) {
    std::set<size_t> pick = {0, rows - 1};
    for (uint64_t e : {uint64_t(1) << 31, uint64_t(1) << 32})
        if (e < rows * N) pick.insert(e / N);
    ntkv_emu::Reserved<float> x(rows * N), values(rows * K);
    ntkv_emu::Reserved<uint32_t> indices(rows * K);
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-4.f, 4.f);
    for (size_t r : pick)
        for (size_t i = 0; i < N; ++i) x[r * N + i] = u(rng);
    fused(rows, x.get(), values.get(), indices.get(), pick);
    bool ok = true;
    for (size_t r : pick) {
        std::vector<float> sx(x.get() + r * N, x.get() + (r + 1) * N), sv(K, NAN);
        std::vector<uint32_t> si(K, 0xABABABABu);
        fused(1, sx.data(), sv.data(), si.data(), {});
        size_t diff = 0;
        for (size_t j = 0; j < K; ++j) {
            diff += si[j] != indices[r * K + j];
            diff += std::memcmp(&sv[j], &values[r * K + j], 4) != 0;
        }
        // The small run itself: the K largest, descending.
        bool sorted = true;
        for (size_t j = 1; j < K; ++j) sorted &= sv[j - 1] >= sv[j];
        std::printf("  row %zu (elements from %llu): %zu values differ from the row alone%s\n", r,
                    (unsigned long long)(r * N), diff, sorted ? "" : "; small run not descending");
        ok &= diff == 0 && sorted;
    }
    std::printf("%-4s %-16s rows %zu n %zu k %zu f32: scores %.1f GiB reserved, %ld MiB resident\n", ok ? "ok" : "FAIL",
                name, rows, N, K, (double)(rows * N * 4) / (1 << 30), ntkv_emu::resident_mib());
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    // bench/src/topk.rs H2O: 32 kv heads x 32768 keys (2^20 elements).
    ok &= large_case("bench h2o", 32);
    // 140000 rows: 4.6e9 elements, three row batches.
    ok &= large_case("past 2^32", 140000);
    // 270000 rows: 8.8e9 elements, past 2^33.
    ok &= large_case("past 2^33", 270000);
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
