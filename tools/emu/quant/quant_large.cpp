// Production-scale index checks of cuda/quant.cu (tools/emu/run.sh quant-large): per-channel
// quantize and dequantize, and the per-token quantize (token_case), of one head of the bench runner's shape (4M tokens x 128 channels,
// 2^29 elements) and of one larger than 2^33 elements, in reserved address space
// (ntkv_emu::Reserved: MAP_NORESERVE, zero until touched). The grid is one thread per item, and
// only the CTAs that touch the first and last elements and elements 2^31 and 2^32 of x and of
// the output run. Their codes, scales, mins and dequantized values must equal, bit for bit,
// those of the same kernels on a small tensor holding just the tokens they read (the small
// shapes are checked against the reference by quant_emu.cpp). A flat index computed in 32 bits
// reads or writes the wrong tokens and fails.
#include "quant.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cstdio>
#include <random>
#include <set>

namespace {

constexpr unsigned THREADS_Q = 256;

NtkvQuantParams params(uint64_t tokens, uint32_t dim, uint32_t bits, uint32_t group) {
    const uint64_t n = tokens * dim;
    NtkvQuantParams p{};
    p.heads = 1;
    p.tokens = tokens;
    p.x_head_stride = n;
    p.codes_head_stride = n / (32 / bits);
    p.sm_head_stride = n / group;
    p.dim = dim;
    p.group = group;
    p.bits = bits;
    return p;
}

// Per-channel quantize, then dequantize, of `tokens` x `dim` f16 values; with `only` given,
// just the quantize CTAs listed (and the dequantize CTAs over the same token groups).
struct Buffers {
    __half* x;
    uint32_t* codes;
    __half *scales, *mins, *out;
};
void run(const NtkvQuantParams& p, const Buffers& b, const std::vector<uint64_t>& only, unsigned long long* flags) {
    const uint32_t E = 32 / p.bits, wpg = p.group / E;
    const uint64_t q_items = p.tokens / p.group * p.dim, d_items = p.tokens / E * p.dim;
    ntkv_emu::LaunchOpts qo, dq;
    for (uint64_t c : only) {
        qo.only.push_back(dim3_{(unsigned)c, 0, 0});
        // Quantize CTA c covers token groups [c T / dim, (c + 1) T / dim); their code rows are
        // wpg times as many, and a dequantize CTA covers T / dim of those.
        const uint64_t rw0 = c * THREADS_Q / p.dim * wpg, rw1 = (c + 1) * THREADS_Q / p.dim * wpg;
        for (uint64_t rw = rw0; rw < rw1; rw += THREADS_Q / p.dim)
            dq.only.push_back(dim3_{(unsigned)(rw * p.dim / THREADS_Q), 0, 0});
    }
    ntkv_emu::launch(dim3_{(unsigned)(q_items / THREADS_Q), 1, 1}, dim3_{THREADS_Q, 1, 1}, 0,
                     [&] { ntkv_quant_quantize_channel_f16(p, b.x, b.codes, b.scales, b.mins, flags); }, qo);
    ntkv_emu::launch(dim3_{(unsigned)(d_items / THREADS_Q), 1, 1}, dim3_{THREADS_Q, 1, 1}, 0,
                     [&] { ntkv_quant_dequantize_channel_f16(p, b.codes, b.scales, b.mins, b.out); }, dq);
}

bool large_case(const char* name, uint64_t tokens, uint32_t dim, uint32_t bits, uint32_t group) {
    const uint64_t n = tokens * dim;
    const uint32_t E = 32 / bits;
    const NtkvQuantParams p = params(tokens, dim, bits, group);
    const uint64_t tok_per_cta = THREADS_Q / dim * group;  // tokens a quantize CTA reads
    // The CTAs over the first and last elements and over elements 2^31 and 2^32.
    std::set<uint64_t> pick = {0, n / dim / tok_per_cta - 1};
    for (uint64_t e : {uint64_t(1) << 31, uint64_t(1) << 32})
        if (e < n) pick.insert(e / dim / tok_per_cta);
    const std::vector<uint64_t> ctas(pick.begin(), pick.end());

    ntkv_emu::Reserved<__half> x(n), out(n), scales(n / group), mins(n / group);
    ntkv_emu::Reserved<uint32_t> codes(n / E);
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-3.f, 3.f);
    for (uint64_t c : ctas)
        for (uint64_t t = c * tok_per_cta; t < (c + 1) * tok_per_cta; ++t)
            for (uint32_t d = 0; d < dim; ++d) x[t * dim + d] = __float2half_rn(u(rng));
    unsigned long long flags[2] = {0, 0};
    run(p, {x.get(), codes.get(), scales.get(), mins.get(), out.get()}, ctas, flags);

    bool ok = flags[0] == 0 && flags[1] == 0;
    const uint64_t g_per_cta = tok_per_cta / group, w_per_cta = tok_per_cta / E;
    for (uint64_t c : ctas) {
        // The tokens this CTA reads, alone.
        const NtkvQuantParams sp = params(tok_per_cta, dim, bits, group);
        std::vector<__half> sx(tok_per_cta * dim), so(sx.size()), ss(sx.size() / group), sm(ss.size());
        std::vector<uint32_t> sc(sx.size() / E);
        for (size_t i = 0; i < sx.size(); ++i) sx[i] = x[c * tok_per_cta * dim + i];
        unsigned long long sf[2] = {0, 0};
        run(sp, {sx.data(), sc.data(), ss.data(), sm.data(), so.data()}, {}, sf);
        size_t diff = 0;
        auto cmp = [&](const void* a, const void* b, size_t bytes) { diff += std::memcmp(a, b, bytes) != 0; };
        for (size_t i = 0; i < ss.size(); ++i) {
            cmp(&ss[i], &scales[c * g_per_cta * dim + i], 2);
            cmp(&sm[i], &mins[c * g_per_cta * dim + i], 2);
        }
        for (size_t i = 0; i < sc.size(); ++i) cmp(&sc[i], &codes[c * w_per_cta * dim + i], 4);
        for (size_t i = 0; i < so.size(); ++i) cmp(&so[i], &out[c * tok_per_cta * dim + i], 2);
        std::printf("  CTA %llu (elements from %llu): %zu values differ from the small run\n", (unsigned long long)c,
                    (unsigned long long)(c * tok_per_cta * dim), diff);
        ok &= diff == 0;
    }
    std::printf("%-4s %-24s tokens %llu dim %u bits %u group %u per_channel f16: x %.1f GiB reserved, %ld MiB resident\n",
                ok ? "ok" : "FAIL", name, (unsigned long long)tokens, dim, bits, group, (double)(n * 2) / (1 << 30),
                ntkv_emu::resident_mib());
    return ok;
}

// Per-token quantize (one thread per group): CTA c covers groups [256 c, 256 c + 256), that is
// values [256 c G, 256 (c + 1) G), code words [256 c WPG, ...) and scales/mins [256 c, ...).
// The CTAs over the first and last values and over elements 2^31, 2^32 and 2^33 run on the
// reserved tensor; each must give the codes, scales and mins of a one-CTA run on its values.
bool token_case(const char* name, uint64_t tokens, uint32_t dim, uint32_t bits, uint32_t group) {
    const uint64_t n = tokens * dim;
    const uint32_t E = 32 / bits, wpg = group / E;
    const NtkvQuantParams p = params(tokens, dim, bits, group);
    const uint64_t vals_per_cta = (uint64_t)THREADS_Q * group, ncta = n / vals_per_cta;
    std::set<uint64_t> pick = {0, ncta - 1};
    for (uint64_t e : {uint64_t(1) << 31, uint64_t(1) << 32, uint64_t(1) << 33})
        if (e < n) pick.insert(e / vals_per_cta);
    ntkv_emu::Reserved<__half> x(n), scales(n / group), mins(n / group);
    ntkv_emu::Reserved<uint32_t> codes(n / E);
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-3.f, 3.f);
    for (uint64_t c : pick)
        for (uint64_t i = c * vals_per_cta; i < (c + 1) * vals_per_cta; ++i) x[i] = __float2half_rn(u(rng));
    unsigned long long flags[2] = {0, 0};
    ntkv_emu::LaunchOpts qo;
    for (uint64_t c : pick) qo.only.push_back(dim3_{(unsigned)c, 0, 0});
    ntkv_emu::launch(dim3_{(unsigned)ncta, 1, 1}, dim3_{THREADS_Q, 1, 1}, 0,
                     [&] { ntkv_quant_quantize_token_f16(p, x.get(), codes.get(), scales.get(), mins.get(), flags); },
                     qo);
    bool ok = flags[0] == 0 && flags[1] == 0;
    for (uint64_t c : pick) {
        const NtkvQuantParams sp = params(vals_per_cta / dim, dim, bits, group);
        std::vector<__half> sx(vals_per_cta), ss(THREADS_Q), sm(THREADS_Q);
        std::vector<uint32_t> sc(THREADS_Q * wpg);
        for (size_t i = 0; i < sx.size(); ++i) sx[i] = x[c * vals_per_cta + i];
        unsigned long long sf[2] = {0, 0};
        ntkv_emu::launch(dim3_{1, 1, 1}, dim3_{THREADS_Q, 1, 1}, 0,
                         [&] { ntkv_quant_quantize_token_f16(sp, sx.data(), sc.data(), ss.data(), sm.data(), sf); });
        size_t diff = 0;
        for (size_t i = 0; i < THREADS_Q; ++i) {
            diff += std::memcmp(&ss[i], &scales[c * THREADS_Q + i], 2) != 0;
            diff += std::memcmp(&sm[i], &mins[c * THREADS_Q + i], 2) != 0;
        }
        for (size_t i = 0; i < sc.size(); ++i) diff += sc[i] != codes[c * THREADS_Q * wpg + i];
        std::printf("  CTA %llu (elements from %llu): %zu values differ from the small run\n", (unsigned long long)c,
                    (unsigned long long)(c * vals_per_cta), diff);
        ok &= diff == 0;
    }
    std::printf("%-4s %-24s tokens %llu dim %u bits %u group %u per_token f16: x %.1f GiB reserved, %ld MiB resident\n",
                ok ? "ok" : "FAIL", name, (unsigned long long)tokens, dim, bits, group, (double)(n * 2) / (1 << 30),
                ntkv_emu::resident_mib());
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    // bench/src/quant.rs: 4M tokens x 128 channels, f16 (2^29 elements).
    ok &= large_case("bench", uint64_t(1) << 22, 128, 4, 32);
    // 70M tokens: 8.96e9 elements, past 2^33; 2^31 and 2^32 fall inside CTAs' token ranges.
    ok &= large_case("70M tokens", 70000000, 128, 4, 32);
    ok &= large_case("70M tokens 2-bit", 70000000, 128, 2, 64);
    ok &= token_case("bench", uint64_t(1) << 22, 128, 4, 32);
    ok &= token_case("70M tokens", 70000000, 128, 4, 32);
    ok &= token_case("70M tokens 8-bit g128", 70000000, 128, 8, 128);
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
