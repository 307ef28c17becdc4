// Runs the real kernel source cuda/pages.cu on the CPU (one std::thread per CUDA thread, see
// tools/emu/include/emu_runtime.h) against host references: Quest metadata against a naive
// min/max (exact), the page bounds, landmarks, cosines and softmax scores against a host
// transliteration of the kernels' f32 order (bit for bit) and against f64 (tolerance), and the
// outlier marking. Small grids force every grid-stride loop through several steps; sizes are
// not multiples of any tile; GQA groups 1, 3 and 8. Build and run with tools/emu/run.sh pages
// (AddressSanitizer on: any access outside a buffer aborts the run).
#include "pages.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cstdio>
#include <random>
#include <vector>

namespace {

// The real extern "C" entry points of each dtype.
template <typename T> struct K {
    static constexpr auto meta = EMU_KERNEL(T, ntkv_pages_quest_meta);
    static constexpr auto score = EMU_KERNEL(T, ntkv_pages_quest_score);
    static constexpr auto landmark = EMU_KERNEL(T, ntkv_pages_landmark);
    static constexpr auto logits = EMU_KERNEL(T, ntkv_pages_shadow_logits);
};

template <typename T> const char* dtype_name() {
    return std::is_same_v<T, float> ? "f32" : std::is_same_v<T, __half> ? "f16" : "bf16";
}

std::mt19937_64 rng(2026);
float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
uint32_t below(uint32_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }

template <typename T> float f(T x) { return ntkv::to_f32(x); }
template <typename T> T t_of(float x) { return ntkv::from_f32<T>(x); }
uint32_t bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }

float h_nanmax(float a, float b) { return std::isnan(a) ? b : (b > a ? b : a); }
float h_nanmin(float a, float b) { return std::isnan(a) ? b : (b < a ? b : a); }

// The host order of a D-channel sum (src/pages/cpu.rs lane_sum).
template <typename F> float lane_sum(uint32_t d, F term) {
    const uint32_t l = d / 8;
    uint32_t lp = 1;
    while (lp < l) lp <<= 1;
    float p[32] = {};
    for (uint32_t j = 0; j < l; ++j) {
        float acc = 0.0f;
        for (uint32_t c = 0; c < 8; ++c) acc = acc + term(8 * j + c);
        p[j] = acc;
    }
    for (uint32_t n = lp / 2; n > 0; n /= 2)
        for (uint32_t i = 0; i < n; ++i) p[i] = p[i] + p[i + n];
    return p[0];
}

float h_exp(float x) {
    if (std::isnan(x)) return x;
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) return INFINITY;
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * __uint_as_float(0x3f317200u)) - n * __uint_as_float(0x35bfbe8eu);
    float p = 1.0f / 5040.0f;
    const float cs[7] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (float c : cs) p = p * r + c;
    return p * __uint_as_float((uint32_t)((int)n + 127) << 23);
}

uint32_t lanes_pow2(uint32_t d) {
    uint32_t lp = 1;
    while (lp < d / 8) lp <<= 1;
    return lp;
}

struct Case {
    const char* name;
    uint32_t B, Hq, Hkv, Tq, D, cap, P;
    uint32_t grid;  // blocks per launch (small: several grid-stride steps)
};

template <typename T>
bool quest_case(const Case& c) {
    const uint32_t rows = c.B * c.Hkv, np = (c.cap + c.P - 1) / c.P, L = c.D / 8, group = c.Hq / c.Hkv;
    std::vector<T> keys((size_t)rows * c.cap * c.D), q((size_t)c.B * c.Tq * c.Hq * c.D);
    for (auto& k : keys) k = t_of<T>(below(50) == 0 ? NAN : normal());
    for (auto& x : q) x = t_of<T>(normal());
    std::vector<uint32_t> lens(2 * c.B), neu(c.B), old(c.B);
    for (uint32_t b = 0; b < c.B; ++b) {
        neu[b] = b + 1 == c.B ? c.cap : below(c.cap + 1);
        old[b] = below(neu[b] + 1);
    }
    std::vector<T> mx((size_t)rows * np * c.D, t_of<T>(0.0f)), mn = mx;
    auto meta = [&](const std::vector<uint32_t>& from, const std::vector<uint32_t>& to) {
        for (uint32_t b = 0; b < c.B; ++b) {
            lens[b] = from[b];
            lens[c.B + b] = to[b];
        }
        NtkvPagesMetaParams p{(uint64_t)rows * np * L, c.B, c.Hkv, c.cap, c.D, c.P, np, L, 0};
        ntkv_emu::launch(dim3_{c.grid, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
            K<T>::meta(p, keys.data(), lens.data(), mx.data(), mn.data());
        });
    };
    std::vector<uint32_t> zeros(c.B, 0);
    meta(zeros, old);
    meta(old, neu);  // the incremental path: the partial page continues
    bool ok = true;
    for (uint32_t r = 0; r < rows && ok; ++r) {
        const uint32_t len = neu[r / c.Hkv];
        for (uint32_t pg = 0; pg < (len + c.P - 1) / c.P && ok; ++pg)
            for (uint32_t d = 0; d < c.D; ++d) {
                float a = NAN, z = NAN;
                for (uint32_t t = pg * c.P; t < std::min(pg * c.P + c.P, len); ++t) {
                    const float v = f(keys[((size_t)r * c.cap + t) * c.D + d]);
                    a = h_nanmax(a, v);
                    z = h_nanmin(z, v);
                }
                const size_t at = ((size_t)r * np + pg) * c.D + d;
                if (bits(f(mx[at])) != bits(a) || bits(f(mn[at])) != bits(z)) {
                    std::printf("  meta mismatch row %u page %u ch %u\n", r, pg, d);
                    ok = false;
                    break;
                }
            }
    }
    // Scores and the forced last page.
    const uint32_t k = 3;
    std::vector<float> scores((size_t)rows * np, -7.0f);
    std::vector<uint32_t> blocks((size_t)rows * k, 5u);
    NtkvPagesScoreParams sp{(uint64_t)rows * np, c.B, c.Hkv, c.Hq, c.Tq, c.D, c.P, np, L, lanes_pow2(c.D), group, k, k - 1};
    ntkv_emu::launch(dim3_{c.grid, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
        K<T>::score(sp, q.data(), mx.data(), mn.data(), neu.data(), scores.data(), blocks.data());
    });
    double worst = 0;
    for (uint32_t r = 0; r < rows && ok; ++r) {
        const uint32_t b = r / c.Hkv, hk = r % c.Hkv, pages = (neu[b] + c.P - 1) / c.P;
        const uint32_t last = blocks[(size_t)r * k + k - 1];
        if (last != (pages == 0 ? 0xffffffffu : pages - 1) || blocks[(size_t)r * k] != 5u) {
            std::printf("  forced last page wrong in row %u\n", r);
            ok = false;
        }
        for (uint32_t pg = 0; pg < np; ++pg) {
            const float got = scores[(size_t)r * np + pg];
            if (pg + 1 >= pages) {
                if (got != -7.0f) { std::printf("  page %u of row %u was written\n", pg, r); ok = false; }
                continue;
            }
            float best = NAN;
            double best64 = -INFINITY;
            const size_t m = ((size_t)r * np + pg) * c.D;
            for (uint32_t t = 0; t < c.Tq; ++t)
                for (uint32_t g = 0; g < group; ++g) {
                    const size_t qo = (((size_t)b * c.Tq + t) * c.Hq + hk * group + g) * c.D;
                    best = h_nanmax(best, lane_sum(c.D, [&](uint32_t d) {
                        const float qv = f(q[qo + d]);
                        return h_nanmax(qv * f(mx[m + d]), qv * f(mn[m + d]));
                    }));
                    double s = 0;
                    for (uint32_t d = 0; d < c.D; ++d) {
                        const double qv = f(q[qo + d]);
                        s += std::max(qv * f(mx[m + d]), qv * f(mn[m + d]));
                    }
                    best64 = std::max(best64, s);
                }
            if (bits(got) != bits(best) && !(std::isnan(got) && std::isnan(best))) {
                std::printf("  score row %u page %u: %a vs host %a\n", r, pg, got, best);
                ok = false;
            }
            if (std::isfinite(best64)) worst = std::max(worst, std::fabs(got - best64) / (1.0 + std::fabs(best64)));
        }
    }
    if (worst > 1e-4) { std::printf("  score vs f64: %.3g\n", worst); ok = false; }
    std::printf("%s quest %s %s\n", ok ? "ok  " : "FAIL", dtype_name<T>(), c.name);
    return ok;
}

template <typename T>
bool landmark_case(const Case& c, uint32_t n_out) {
    const uint32_t rows = c.B * c.Hkv, nc = (c.cap + 7) / 8, L = c.D / 8, lp = lanes_pow2(c.D), group = c.Hq / c.Hkv;
    std::vector<T> keys((size_t)rows * c.cap * c.D), q((size_t)c.B * c.Tq * c.Hq * c.D);
    for (auto& k : keys) k = t_of<T>(normal());
    for (auto& x : q) x = t_of<T>(normal() * 3.0f);
    std::vector<uint32_t> lens(c.B);
    for (uint32_t b = 0; b < c.B; ++b) lens[b] = b + 1 == c.B ? c.cap : below(c.cap + 1);
    std::vector<float> lm((size_t)rows * nc * c.D, -3.0f), mc((size_t)rows * nc, -3.0f), neg = mc;
    NtkvPagesLandmarkParams p{(uint64_t)rows * nc, c.B, c.Hkv, c.cap, c.D, nc, L, lp, 1e-8f};
    ntkv_emu::launch(dim3_{c.grid, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
        K<T>::landmark(p, keys.data(), lens.data(), lm.data(), mc.data(), neg.data());
    });
    bool ok = true;
    for (uint32_t r = 0; r < rows && ok; ++r) {
        const uint32_t len = lens[r / c.Hkv];
        for (uint32_t ch = 0; ch < nc && ok; ++ch) {
            const size_t at = (size_t)r * nc + ch;
            if (ch * 8 >= len) {
                if (mc[at] != -3.0f || lm[at * c.D] != -3.0f) { std::printf("  chunk %u of row %u written\n", ch, r); ok = false; }
                continue;
            }
            const uint32_t n = std::min(8u, len - ch * 8);
            auto key = [&](uint32_t i, uint32_t d) { return f(keys[((size_t)r * c.cap + ch * 8 + i) * c.D + d]); };
            std::vector<float> m(c.D);
            for (uint32_t d = 0; d < c.D; ++d) {
                float s = key(0, d);
                for (uint32_t i = 1; i < n; ++i) s = s + key(i, d);
                m[d] = s / (float)n;
                if (bits(m[d]) != bits(lm[at * c.D + d])) { std::printf("  landmark %u/%u/%u\n", r, ch, d); ok = false; break; }
            }
            auto clampf = [](float x) { return x > 1e-8f ? x : 1e-8f; };
            const float ln = clampf(std::sqrt(lane_sum(c.D, [&](uint32_t d) { return m[d] * m[d]; })));
            float worst = NAN;
            for (uint32_t i = 0; i < n; ++i) {
                const float dot = lane_sum(c.D, [&](uint32_t d) { return m[d] * key(i, d); });
                const float kn = clampf(std::sqrt(lane_sum(c.D, [&](uint32_t d) { return key(i, d) * key(i, d); })));
                worst = h_nanmin(worst, dot / (ln * kn));
            }
            if (bits(worst) != bits(mc[at]) || bits(-worst) != bits(neg[at])) {
                std::printf("  min_cos row %u chunk %u: %a vs host %a\n", r, ch, mc[at], worst);
                ok = false;
            }
        }
    }
    // Selection: logits, softmax, scores, marks.
    const uint32_t k = 4, stride = k + n_out, qrows = c.B * c.Hq * c.Tq;
    const float scale = 1.0f / std::sqrt((float)c.D);
    std::vector<float> logits((size_t)qrows * nc, -5.0f), sums(qrows, -5.0f), scores((size_t)rows * nc, -5.0f);
    NtkvPagesShadowParams sp{(uint64_t)rows * nc, c.B, c.Hkv, c.Hq, c.Tq, c.D, nc, L, lp, group, k, n_out, stride, scale, 0};
    ntkv_emu::launch(dim3_{c.grid, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
        K<T>::logits(sp, q.data(), lm.data(), lens.data(), logits.data());
    });
    // Host logits and softmax before the kernel rewrites them.
    std::vector<float> hexp((size_t)qrows * nc, 0.0f), hsum(qrows, 0.0f);
    for (uint32_t b = 0; b < c.B; ++b) {
        const uint32_t n = (lens[b] + 7) / 8;
        for (uint32_t h = 0; h < c.Hq; ++h)
            for (uint32_t t = 0; t < c.Tq; ++t) {
                const uint32_t qrow = (b * c.Hq + h) * c.Tq + t, row = b * c.Hkv + h / group;
                const size_t qo = (((size_t)b * c.Tq + t) * c.Hq + h) * c.D;
                float* l = &hexp[(size_t)qrow * nc];
                for (uint32_t ch = 0; ch < n; ++ch) {
                    l[ch] = lane_sum(c.D, [&](uint32_t d) { return f(q[qo + d]) * lm[((size_t)row * nc + ch) * c.D + d]; }) * scale;
                    if (bits(l[ch]) != bits(logits[(size_t)qrow * nc + ch])) {
                        std::printf("  logit %u/%u: %a vs host %a\n", qrow, ch, logits[(size_t)qrow * nc + ch], l[ch]);
                        ok = false;
                    }
                }
                float parts[256];
                for (float& x : parts) x = NAN;
                for (uint32_t ch = 0; ch < n; ++ch) parts[ch % 256] = h_nanmax(parts[ch % 256], l[ch]);
                for (uint32_t hh = 128; hh > 0; hh /= 2)
                    for (uint32_t i = 0; i < hh; ++i) parts[i] = h_nanmax(parts[i], parts[i + hh]);
                const float top = parts[0];
                for (float& x : parts) x = 0.0f;
                for (uint32_t ch = 0; ch < n; ++ch) {
                    l[ch] = h_exp(l[ch] - top);
                    parts[ch % 256] = parts[ch % 256] + l[ch];
                }
                for (uint32_t hh = 128; hh > 0; hh /= 2)
                    for (uint32_t i = 0; i < hh; ++i) parts[i] = parts[i] + parts[i + hh];
                hsum[qrow] = parts[0];
            }
    }
    ntkv_emu::launch(dim3_{std::min(c.grid, qrows), 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
        ntkv_pages_shadow_softmax(sp, lens.data(), logits.data(), sums.data());
    });
    for (uint32_t qrow = 0; qrow < qrows && ok; ++qrow) {
        const uint32_t n = (lens[qrow / (c.Hq * c.Tq)] + 7) / 8;
        if (n > 0 && bits(sums[qrow]) != bits(hsum[qrow])) { std::printf("  sum %u: %a vs %a\n", qrow, sums[qrow], hsum[qrow]); ok = false; }
        for (uint32_t ch = 0; ch < n; ++ch)
            if (bits(logits[(size_t)qrow * nc + ch]) != bits(hexp[(size_t)qrow * nc + ch])) { std::printf("  exp %u/%u\n", qrow, ch); ok = false; break; }
    }
    ntkv_emu::launch(dim3_{c.grid, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
        ntkv_pages_shadow_score(sp, lens.data(), logits.data(), sums.data(), scores.data());
    });
    for (uint32_t r = 0; r < rows && ok; ++r) {
        const uint32_t b = r / c.Hkv, hk = r % c.Hkv, n = (lens[b] + 7) / 8;
        for (uint32_t ch = 0; ch < nc; ++ch) {
            const float got = scores[(size_t)r * nc + ch];
            if (ch >= n) {
                if (got != -5.0f) { std::printf("  score past the row written\n"); ok = false; }
                continue;
            }
            float best = NAN;
            for (uint32_t g = 0; g < group; ++g) {
                float acc = 0.0f;
                for (uint32_t t = 0; t < c.Tq; ++t) {
                    const uint32_t qrow = (b * c.Hq + hk * group + g) * c.Tq + t;
                    acc = acc + hexp[(size_t)qrow * nc + ch] / hsum[qrow];
                }
                best = h_nanmax(best, acc);
            }
            if (bits(got) != bits(best)) { std::printf("  chunk score %u/%u: %a vs %a\n", r, ch, got, best); ok = false; break; }
        }
    }
    if (n_out > 0 && ok) {
        std::vector<uint32_t> outl((size_t)rows * n_out), blocks((size_t)rows * stride, 77u);
        for (auto& x : outl) x = below(4) == 0 ? 0xffffffffu : below(nc + 2);
        std::vector<float> before = scores;
        NtkvPagesShadowParams mp = sp;
        mp.n_items = (uint64_t)rows * n_out;
        ntkv_emu::launch(dim3_{2, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] {
            ntkv_pages_shadow_mark(mp, lens.data(), outl.data(), scores.data(), blocks.data());
        });
        for (uint32_t r = 0; r < rows; ++r) {
            const uint32_t n = (lens[r / c.Hkv] + 7) / 8;
            for (uint32_t j = 0; j < n_out; ++j) {
                const uint32_t x = outl[(size_t)r * n_out + j];
                if (blocks[(size_t)r * stride + k + j] != x) ok = false;
                if (x < n) before[(size_t)r * nc + x] = NAN;
            }
            for (uint32_t j = 0; j < k; ++j) ok &= blocks[(size_t)r * stride + j] == 77u;
        }
        for (size_t i = 0; i < scores.size(); ++i) ok &= bits(scores[i]) == bits(before[i]) || (std::isnan(scores[i]) && std::isnan(before[i]));
        if (!ok) std::printf("  outlier marking wrong\n");
    }
    std::printf("%s landmarks %s %s (outliers %u)\n", ok ? "ok  " : "FAIL", dtype_name<T>(), c.name, n_out);
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    const char* only = argc > 1 ? argv[1] : "";
    bool ok = true;
    int cases = 0;
    const Case qcases[] = {
        {"D128 P16 group 1, T=77", 2, 2, 2, 1, 128, 77, 16, 3},
        {"D64 P16 group 3, Tq 2, T=100", 2, 6, 2, 2, 64, 100, 16, 2},
        {"D24 P7 group 8, Tq 3, T=50", 2, 8, 1, 3, 24, 50, 7, 2},
        {"D256 P32 group 4, T=65", 1, 4, 1, 1, 256, 65, 32, 1},
        {"D8 P1 group 1, T=9", 3, 1, 1, 1, 8, 9, 1, 2},
    };
    for (const Case& c : qcases) {
        if (std::strstr(c.name, only) == nullptr) continue;
        ok &= quest_case<__half>(c);
        ok &= quest_case<__nv_bfloat16>(c);
        ok &= quest_case<float>(c);
        cases += 3;
    }
    const Case lcases[] = {
        {"D128 group 1, T=77", 2, 2, 2, 1, 128, 77, 8, 3},
        {"D64 group 3, Tq 4, T=100", 2, 6, 2, 4, 64, 100, 8, 2},
        {"D24 group 8, Tq 2, T=45", 2, 8, 1, 2, 24, 45, 8, 2},
        {"D8 group 1, T=2100 (softmax strides)", 1, 1, 1, 1, 8, 2100, 8, 2},
    };
    uint32_t outs[] = {2, 1, 3, 0};
    int i = 0;
    for (const Case& c : lcases) {
        const uint32_t n_out = outs[i++];
        if (std::strstr(c.name, only) == nullptr) continue;
        ok &= landmark_case<__half>(c, n_out);
        ok &= landmark_case<__nv_bfloat16>(c, n_out);
        ok &= landmark_case<float>(c, n_out);
        cases += 3;
    }
    std::printf("%d cases: %s\n", cases, ok ? "ALL OK" : "FAILURES");
    return ok ? 0 : 1;
}
