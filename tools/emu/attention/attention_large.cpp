// Production-scale index checks of cuda/attention.cu (tools/emu/run.sh attention-large): a
// packed batch of 4400 sequences of 256 tokens whose K and V hold more than 2^33 elements,
// in reserved address space (ntkv_emu::Reserved: MAP_NORESERVE, zero until touched). The plan
// lists every work item of the batch, but only the items of chosen sequences run (the first,
// the last, and those whose keys hold elements 2^31 and 2^32), for the first, the last and the
// boundary's kv head, first and last row block. Each item's output rows and lse must equal, bit for bit, those of the
// same kernel on that sequence alone (small prefill shapes are checked against the reference
// by attention_emu.cpp). A token offset times the row stride formed in 32 bits reads or writes
// another sequence's rows and fails.
#include "attention.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cstdio>
#include <random>
#include <set>

namespace {

constexpr uint32_t D = 128, BR = 64, BC = 64, L = 256;  // head dim, row and key blocks, tokens per sequence

// The plan of `seqs` non-causal sequences of L tokens, hq query heads: item (s, head, row
// block) in that order; every item lists all L / BC column blocks (one shared list).
struct Plan {
    std::vector<uint32_t> items, blocks;
};
Plan plan(uint32_t seqs, uint32_t hq) {
    Plan p;
    for (uint32_t c = 0; c < L / BC; ++c) p.blocks.insert(p.blocks.end(), {c, 0u, NTKV_ATTN_NO_TOKEN_MASK, 0u});
    p.items.reserve((size_t)seqs * hq * (L / BR) * NTKV_ATTN_ITEM_WORDS);
    for (uint32_t s = 0; s < seqs; ++s)
        for (uint32_t h = 0; h < hq; ++h)
            for (uint32_t rb = 0; rb < L / BR; ++rb)
                p.items.insert(p.items.end(), {s * L + rb * BR, BR, s * L, L, 0u, 0u, L / BC, h});
    return p;
}

void prefill_launch(uint32_t seqs, uint32_t hq, uint32_t hkv, const Plan& pl, const __half* q, const __half* k,
                    const __half* v, __half* o, float* lse, const std::vector<uint32_t>& only) {
    NtkvAttnPrefillParams p{};
    p.n_items = (uint32_t)(pl.items.size() / NTKV_ATTN_ITEM_WORDS);
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.tq_total = seqs * L;
    p.scale_log2 = (1.0f / std::sqrt((float)D)) * 1.4426950408889634f;
    p.causal = 0;
    ntkv_emu::LaunchOpts o_;
    for (uint32_t i : only) o_.only.push_back(dim3_{i, 0, 0});
    const uint32_t tmask = 0;
    ntkv_emu::launch(dim3_{p.n_items, 1, 1}, dim3_{BR * 2, 1, 1}, 4 * BC * (D + 8) * 2, [&] {
        ntkv_attention_prefill_f16_d128_br64_bc64(p, pl.items.data(), pl.blocks.data(), &tmask, q, k, v, o, lse);
    }, o_);
}

bool large_case(const char* name, uint32_t seqs, uint32_t hq, uint32_t hkv) {
    const uint64_t tokens = (uint64_t)seqs * L, kv_row = (uint64_t)hkv * D, q_row = (uint64_t)hq * D;
    const uint32_t group = hq / hkv;
    std::set<uint32_t> pick_s = {0, seqs - 1};
    std::set<uint32_t> pick_h = {0, hkv - 1};
    for (uint64_t e : {uint64_t(1) << 31, uint64_t(1) << 32}) {
        if (e >= tokens * kv_row) continue;
        pick_s.insert((uint32_t)(e / kv_row / L));
        pick_h.insert((uint32_t)(e / D % hkv));
    }
    const Plan pl = plan(seqs, hq);
    std::vector<uint32_t> only;
    for (uint32_t s : pick_s)
        for (uint32_t hk : pick_h)
            for (uint32_t h = hk * group; h < (hk + 1) * group; ++h)
                for (uint32_t rb : {0u, L / BR - 1}) only.push_back((s * hq + h) * (L / BR) + rb);

    ntkv_emu::Reserved<__half> q(tokens * q_row), k(tokens * kv_row), v(tokens * kv_row), o(tokens * q_row);
    ntkv_emu::Reserved<float> lse((uint64_t)hq * tokens);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    for (uint32_t s : pick_s)
        for (uint64_t t = (uint64_t)s * L; t < (uint64_t)(s + 1) * L; ++t) {
            for (uint64_t e = 0; e < q_row; ++e) q[t * q_row + e] = __float2half_rn(nd(rng));
            for (uint64_t e = 0; e < kv_row; ++e) {
                k[t * kv_row + e] = __float2half_rn(nd(rng));
                v[t * kv_row + e] = __float2half_rn(nd(rng));
            }
        }
    prefill_launch(seqs, hq, hkv, pl, q.get(), k.get(), v.get(), o.get(), lse.get(), only);

    bool ok = true;
    const Plan one = plan(1, hq);
    for (uint32_t s : pick_s) {
        // The sequence alone, as a batch of one.
        const uint64_t t0 = (uint64_t)s * L;
        std::vector<__half> sq(L * q_row), sk(L * kv_row), sv(L * kv_row), so(L * q_row, __float2half_rn(NAN));
        std::vector<float> sl((size_t)hq * L, NAN);
        for (size_t i = 0; i < sq.size(); ++i) sq[i] = q[t0 * q_row + i];
        for (size_t i = 0; i < sk.size(); ++i) sk[i] = k[t0 * kv_row + i], sv[i] = v[t0 * kv_row + i];
        std::vector<uint32_t> one_only;
        for (uint32_t hk : pick_h)
            for (uint32_t h = hk * group; h < (hk + 1) * group; ++h)
                for (uint32_t rb : {0u, L / BR - 1}) one_only.push_back(h * (L / BR) + rb);
        prefill_launch(1, hq, hkv, one, sq.data(), sk.data(), sv.data(), so.data(), sl.data(), one_only);
        std::vector<uint32_t> rows;  // the rows of the first and the last row block
        for (uint32_t r = 0; r < BR; ++r) rows.insert(rows.end(), {r, L - BR + r});
        size_t diff = 0, nan = 0;
        for (uint32_t hk : pick_h)
            for (uint32_t h = hk * group; h < (hk + 1) * group; ++h)
                for (uint32_t r : rows) {
                    diff += std::memcmp(&sl[(size_t)h * L + r], &lse[(uint64_t)h * tokens + t0 + r], 4) != 0;
                    nan += std::isnan(sl[(size_t)h * L + r]);
                    for (uint32_t d = 0; d < D; ++d)
                        diff += std::memcmp(&so[r * q_row + h * D + d], &o[(t0 + r) * q_row + h * D + d], 2) != 0;
                }
        std::printf("  sequence %u (keys from element %llu): %zu values differ from the sequence alone\n", s,
                    (unsigned long long)(t0 * kv_row), diff);
        ok &= diff == 0 && nan == 0;
    }
    std::printf("%-4s %-22s %u sequences x %u tokens, Hq%u Hkv%u D%u f16: K/V %.1f GiB each reserved, %zu CTAs of %zu run, "
                "%ld MiB resident\n",
                ok ? "ok" : "FAIL", name, seqs, L, hq, hkv, D, (double)(tokens * kv_row * 2) / (1 << 30), only.size(),
                pl.items.size() / NTKV_ATTN_ITEM_WORDS, ntkv_emu::resident_mib());
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    // Past 2^33: 4400 x 256 tokens x 64 heads x 128 (MHA).
    ok &= large_case("past 2^33, MHA", 4400, 64, 64);
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
