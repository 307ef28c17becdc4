// tools/emu/quant/quant_emu.cpp: runs the kernels of cuda/quant.cu on the CPU (see
// tools/emu/include/emu_runtime.h) under AddressSanitizer and UBSan, and compares them bit for bit
// with a plain scalar reference of SPEC §1 written here, plus the known-answer layouts of
// tests/quant_cpu.rs. Catches indexing, bounds, alignment, shuffle-reduction and flag bugs
// that cannot be run on the GPU from a machine without one.
#include "quant.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
// common.cu has no family of its own: its finiteness scan is the first half of the contract
// quant's scan extends (NaN/Inf, lowest index), so its kernels are checked here too.
#include "common.cu"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace emu {
// A (gx, gy) grid of `threads`-thread blocks, no dynamic shared memory.
inline void launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& kernel) {
    ntkv_emu::launch(dim3_{gx, gy, 1}, dim3_{threads, 1, 1}, 0, kernel);
}
}  // namespace emu

namespace {

int failures = 0;

#define CHECK(cond, ...)                                       \
    do {                                                       \
        if (!(cond)) {                                         \
            ++failures;                                        \
            std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            std::fprintf(stderr, __VA_ARGS__);                 \
            std::fprintf(stderr, "\n");                        \
            if (failures > 20) std::exit(1);                   \
        }                                                      \
    } while (0)

struct Rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uniform() { return (float)(next() >> 40) * (1.0f / 16777216.0f); }
    float normal() {
        float a = 0;
        for (int i = 0; i < 4; ++i) a += uniform();
        return (a - 2.0f) * 1.7f;
    }
    unsigned below(unsigned n) { return (unsigned)(next() % n); }
};

template <typename T> T cast(float x) { return ntkv::from_f32<T>(x); }
template <typename T> uint32_t bits_of(T v) {
    float f = ntkv::to_f32(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

template <typename T>
std::vector<T> data(Rng& rng, size_t n, size_t dim) {
    std::vector<T> v(n);
    float amp = 1, off = 0;
    for (size_t i = 0; i < n; ++i) {
        if (i % dim == 0) {
            amp = std::pow(10.0f, rng.uniform() * 5.5f - 3.0f);
            off = rng.normal() * amp;
        }
        v[i] = cast<T>(off + amp * rng.normal());
    }
    return v;
}

struct Quantized {
    std::vector<uint32_t> codes;
    std::vector<__half> scales, mins;
};

// The dense [H, T, D] reference, written from SPEC §1 and the layouts of src/quant/mod.rs.
template <typename T>
Quantized ref_quantize(const std::vector<T>& x, size_t H, size_t Tn, size_t D, int bits, size_t group, bool per_channel) {
    const size_t E = 32 / bits, n = H * Tn * D;
    const float qmax = (float)((1u << bits) - 1);
    Quantized q{std::vector<uint32_t>(n / E, 0), std::vector<__half>(n / group), std::vector<__half>(n / group)};
    for (size_t h = 0; h < H; ++h) {
        const size_t groups_per_head = Tn * D / group;
        for (size_t gi = 0; gi < groups_per_head; ++gi) {
            std::vector<size_t> t_of(group), c_of(group);
            for (size_t i = 0; i < group; ++i) {
                if (per_channel) {
                    t_of[i] = (gi / D) * group + i;
                    c_of[i] = gi % D;
                } else {
                    const size_t f = gi * group + i;
                    t_of[i] = f / D;
                    c_of[i] = f % D;
                }
            }
            float lo = INFINITY, hi = -INFINITY;
            for (size_t i = 0; i < group; ++i) {
                const float v = ntkv::to_f32(x[(h * Tn + t_of[i]) * D + c_of[i]]);
                lo = std::fmin(lo, v);
                hi = std::fmax(hi, v);
            }
            const float mn = lo + 0.0f, mx = hi + 0.0f;
            const __half s16 = __float2half_rn((mx - mn) / qmax), m16 = __float2half_rn(mn);
            const float s = __half2float(s16), m = __half2float(m16);
            const float inv = s == 0.0f ? 0.0f : 1.0f / s;
            const size_t sidx = h * groups_per_head + gi;
            q.scales[sidx] = s16;
            q.mins[sidx] = m16;
            for (size_t i = 0; i < group; ++i) {
                const float v = ntkv::to_f32(x[(h * Tn + t_of[i]) * D + c_of[i]]);
                uint32_t code = 0;
                if (inv != 0.0f) {
                    const float d = v - m;
                    const float p = d * inv;
                    code = (uint32_t)std::fmin(std::fmax(std::rint(p), 0.0f), qmax);
                }
                size_t w, slot;
                if (per_channel) {
                    w = h * (Tn / E * D) + (t_of[i] / E) * D + c_of[i];
                    slot = t_of[i] % E;
                } else {
                    const size_t f = t_of[i] * D + c_of[i];
                    w = h * (Tn * D / E) + f / E;
                    slot = f % E;
                }
                q.codes[w] |= code << (slot * bits);
            }
        }
    }
    return q;
}

template <typename T>
std::vector<T> ref_dequantize(const Quantized& q, size_t H, size_t Tn, size_t D, int bits, size_t group, bool per_channel) {
    const size_t E = 32 / bits;
    std::vector<T> out(H * Tn * D);
    for (size_t h = 0; h < H; ++h)
        for (size_t t = 0; t < Tn; ++t)
            for (size_t c = 0; c < D; ++c) {
                size_t w, slot, g;
                if (per_channel) {
                    w = h * (Tn / E * D) + (t / E) * D + c;
                    slot = t % E;
                    g = h * (Tn / group * D) + (t / group) * D + c;
                } else {
                    const size_t f = t * D + c;
                    w = h * (Tn * D / E) + f / E;
                    slot = f % E;
                    g = h * (Tn * D / group) + f / group;
                }
                const uint32_t code = (q.codes[w] >> (slot * bits)) & ((1u << bits) - 1);
                out[(h * Tn + t) * D + c] = cast<T>(std::fma((float)code, __half2float(q.scales[g]), __half2float(q.mins[g])));
            }
    return out;
}

NtkvQuantParams dense_params(size_t H, size_t Tn, size_t D, int bits, size_t group) {
    NtkvQuantParams p{};
    p.heads = H;
    p.tokens = Tn;
    p.x_offset = 0;
    p.x_head_stride = Tn * D;
    p.codes_offset = 0;
    p.codes_head_stride = Tn * D / (32 / bits);
    p.sm_offset = 0;
    p.sm_head_stride = Tn * D / group;
    p.dim = (uint32_t)D;
    p.group = (uint32_t)group;
    p.bits = (uint32_t)bits;
    return p;
}

unsigned grid_x(size_t items, unsigned threads, unsigned max_blocks) {
    size_t g = (items + threads - 1) / threads;
    return (unsigned)std::max<size_t>(1, std::min<size_t>(g, max_blocks));
}

template <typename T> struct Entry;
// The entry points of one dtype: quantize / dequantize per token (qt, dt) and per channel (qc, dc).
#define QUANT_ENTRY(T, S)                                                                                     \
    template <> struct Entry<T> {                                                                             \
        static constexpr const char* name = #S;                                                               \
        static constexpr auto qt = ntkv_quant_quantize_token_##S, qc = ntkv_quant_quantize_channel_##S;       \
        static constexpr auto dt = ntkv_quant_dequantize_token_##S, dc = ntkv_quant_dequantize_channel_##S;   \
        static constexpr auto scan = ntkv_quant_scan_##S;                                                     \
    };
QUANT_ENTRY(float, f32)
QUANT_ENTRY(__half, f16)
QUANT_ENTRY(__nv_bfloat16, bf16)

bool same_half(const std::vector<__half>& a, const std::vector<__half>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].bits != b[i].bits) return false;
    return true;
}

// Launches the per-channel or per-token quantize kernel of T on a (gx, gy) grid.
template <typename T>
void quantize(bool per_channel, unsigned gx, unsigned gy, unsigned threads, const NtkvQuantParams& p,
              const std::vector<T>& x, std::vector<uint32_t>& codes, std::vector<__half>& scales,
              std::vector<__half>& mins, unsigned long long* flags) {
    const auto kernel = per_channel ? Entry<T>::qc : Entry<T>::qt;
    emu::launch(gx, gy, threads, [&] { kernel(p, x.data(), codes.data(), scales.data(), mins.data(), flags); });
}

// Quantize + dequantize one dense tensor on the emulated device and compare with the reference.
template <typename T>
void dense_case(Rng& rng, size_t H, size_t Tn, size_t D, int bits, size_t group, bool per_channel, unsigned threads,
                unsigned max_blocks, unsigned gy_cap, const std::vector<T>* given = nullptr) {
    const size_t n = H * Tn * D, E = 32 / bits;
    std::vector<T> x = given ? *given : data<T>(rng, n, D);
    NtkvQuantParams p = dense_params(H, Tn, D, bits, group);
    std::vector<uint32_t> codes(n / E, 0xDEADBEEFu);
    std::vector<__half> scales(n / group, __half{0x7777}), mins(n / group, __half{0x7777});
    unsigned long long flags[2] = {0, 0};
    const size_t items = per_channel ? Tn * D / group : Tn * D / E;
    const unsigned gy = (unsigned)std::min<size_t>(H, gy_cap);
    quantize(per_channel, grid_x(items, threads, max_blocks), gy, threads, p, x, codes, scales, mins, flags);
    Quantized want = ref_quantize(x, H, Tn, D, bits, group, per_channel);
    const std::string what = std::string(Entry<T>::name) + " bits " + std::to_string(bits) + " group " +
                             std::to_string(group) + (per_channel ? " per_channel" : " per_token") + " [" +
                             std::to_string(H) + "," + std::to_string(Tn) + "," + std::to_string(D) + "]";
    size_t bad = 0;
    for (size_t i = 0; i < codes.size(); ++i)
        if (codes[i] != want.codes[i] && bad++ == 0)
            CHECK(false, "%s: code word %zu: kernel %#x ref %#x", what.c_str(), i, codes[i], want.codes[i]);
    CHECK(same_half(scales, want.scales), "%s: scales differ", what.c_str());
    CHECK(same_half(mins, want.mins), "%s: mins differ", what.c_str());
    CHECK(flags[0] == 0 && flags[1] == 0, "%s: flags set on finite input", what.c_str());
    std::vector<T> out(n, cast<T>(12345.0f));
    const auto dequantize = per_channel ? Entry<T>::dc : Entry<T>::dt;
    emu::launch(grid_x(Tn * D / E, threads, max_blocks), gy, threads,
                [&] { dequantize(p, codes.data(), scales.data(), mins.data(), out.data()); });
    std::vector<T> ref = ref_dequantize<T>(want, H, Tn, D, bits, group, per_channel);
    bad = 0;
    for (size_t i = 0; i < n; ++i)
        if (bits_of(out[i]) != bits_of(ref[i]) && bad++ == 0)
            CHECK(false, "%s: dequant %zu: kernel %g ref %g", what.c_str(), i, ntkv::to_f32(out[i]), ntkv::to_f32(ref[i]));
}

template <typename T>
void random_dense_cases(Rng& rng, int count) {
    const int bits_list[3] = {2, 4, 8};
    const size_t groups[3] = {32, 64, 128};
    for (int c = 0; c < count; ++c) {
        const int bits = bits_list[rng.below(3)];
        const size_t group = groups[rng.below(3)];
        const bool per_channel = rng.below(2) == 1;
        const size_t H = 1 + rng.below(3);
        size_t Tn, D;
        if (per_channel) {
            Tn = group * (1 + rng.below(2));
            D = 1 + rng.below(70);
        } else {
            Tn = 1 + rng.below(40);
            D = group * (1 + rng.below(2));
        }
        const unsigned threads = rng.below(4) == 0 ? 256 : 64;
        dense_case<T>(rng, H, Tn, D, bits, group, per_channel, threads, 1 + rng.below(3), 1 + rng.below(3));
    }
}

// Every (bits, group) of the one-thread-per-group PerToken quantize, per dtype, on ragged
// shapes (7 or 5 tokens, 3 groups per token, 2 or 3 heads) with grids smaller than the work,
// so every thread strides over several groups and heads run past grid y.
template <typename T>
void token_group_cases(Rng& rng) {
    const int bits_list[3] = {2, 4, 8};
    const size_t groups[3] = {32, 64, 128};
    for (int bits : bits_list)
        for (size_t group : groups) {
            dense_case<T>(rng, 2, 7, 3 * group, bits, group, false, 64, 1, 1);
            dense_case<T>(rng, 3, 5, group, bits, group, false, 32, 2, 2);
        }
}

// Groups whose min is large and whose range is small (f32): 1000.2 .. 1000.21 stores the min
// as f16 1000.0, so (x - mn) / scale is about 300 and the codes clamp to qmax; -1000.2 ..
// -1000.19 stores -1000.0, above every value, so they clamp to 0; 1000.0 .. 1000.01 has an
// exact min. Per token and per channel, every bit width.
void narrow_range_cases(Rng& rng) {
    const float base[3] = {1000.2f, -1000.2f, 1000.0f};
    for (int bits : {2, 4, 8}) {
        std::vector<float> x(2 * 96), xc(96 * 2);
        for (size_t i = 0; i < x.size(); ++i) {
            const size_t k = i % 32, grp = (i / 32) % 3;
            x[i] = base[grp] + (float)((k * 7 + i / 96) % 32) * (0.01f / 31.0f);
        }
        for (size_t t = 0; t < 96; ++t)
            for (size_t c = 0; c < 2; ++c) xc[t * 2 + c] = base[(t / 32 + c) % 3] + (float)((t * 5) % 32) * (0.01f / 31.0f);
        dense_case<float>(rng, 1, 2, 96, bits, 32, false, 32, 1, 1, &x);
        dense_case<float>(rng, 1, 96, 2, bits, 32, true, 32, 1, 1, &xc);
    }
}

void known_answers() {
    Rng rng{1};
    // PerToken 4-bit: values 0..15 then 15..0 (tests/quant_cpu.rs per_token_packing_known_answer).
    std::vector<float> x(32);
    for (int i = 0; i < 16; ++i) x[i] = (float)i;
    for (int i = 0; i < 16; ++i) x[16 + i] = (float)(15 - i);
    NtkvQuantParams p = dense_params(1, 1, 32, 4, 32);
    std::vector<uint32_t> codes(4, 0);
    std::vector<__half> s(1), m(1);
    unsigned long long flags[2] = {0, 0};
    emu::launch(1, 1, 32, [&] { ntkv_quant_quantize_token_f32(p, x.data(), codes.data(), s.data(), m.data(), flags); });
    const uint32_t want[4] = {0x76543210u, 0xFEDCBA98u, 0x89ABCDEFu, 0x01234567u};
    for (int i = 0; i < 4; ++i) CHECK(codes[i] == want[i], "per-token known answer word %d: %#x", i, codes[i]);
    // PerChannel 2-bit: T = 32, D = 2; channel 0 is t % 4, channel 1 is 2 (t % 4).
    std::vector<float> y(64);
    for (int t = 0; t < 32; ++t) {
        y[t * 2] = (float)(t % 4);
        y[t * 2 + 1] = 2.0f * (float)(t % 4);
    }
    NtkvQuantParams pc = dense_params(1, 32, 2, 2, 32);
    std::vector<uint32_t> cc(4, 0);
    std::vector<__half> sc(2), mc(2);
    emu::launch(1, 1, 32, [&] { ntkv_quant_quantize_channel_f32(pc, y.data(), cc.data(), sc.data(), mc.data(), flags); });
    for (int i = 0; i < 4; ++i) CHECK(cc[i] == 0xE4E4E4E4u, "per-channel known answer word %d: %#x", i, cc[i]);
    CHECK(__half2float(sc[0]) == 1.0f && __half2float(sc[1]) == 2.0f, "per-channel known answer scales");
}

// The flags of a 4-bit, group-32 quantize (per channel or per token) of x, [H, 64, 64] f32, and
// of the f32 scan of its first n_scan values.
void flags_of(bool per_channel, size_t H, const std::vector<float>& x, uint64_t n_scan, unsigned long long (&qf)[2],
              unsigned long long (&sf)[2]) {
    const size_t Tn = 64, D = 64;
    NtkvQuantParams p = dense_params(H, Tn, D, 4, 32);
    std::vector<uint32_t> codes(H * Tn * D / 8);
    std::vector<__half> s(H * Tn * D / 32), m(H * Tn * D / 32);
    qf[0] = qf[1] = sf[0] = sf[1] = 0;
    quantize(per_channel, 2, 2, 64, p, x, codes, s, m, qf);
    emu::launch(3, 1, 64, [&] { ntkv_quant_scan_f32(NtkvQuantScanParams{n_scan}, x.data(), sf); });
}

void flag_cases() {
    Rng rng{2};
    // Flags hold ~(lowest bad flat index), 0 for none: NaN/Inf in slot 0, |x| >= 65520 in
    // slot 1, in the quantize kernels and the scan alike. Second, the range limit at its exact
    // boundary: 65520 (the smallest f32 that rounds to infinity in f16) and -65520 are
    // flagged, the f32 just below it is not (the scan stops before 1500 there).
    const float below = std::nextafter(65520.0f, 0.0f);
    struct Scenario {
        size_t H;
        std::vector<std::pair<size_t, float>> set;
        uint64_t scan_less;
        unsigned long long q0, q1, s0, s1;
    };
    const Scenario scenarios[] = {
        {2, {{3000, NAN}, {5000, INFINITY}, {1000, -1e6f}}, 3, ~3000ull, ~1000ull, ~3000ull, ~1000ull},
        {1, {{700, below}, {701, -below}, {1500, 65520.0f}, {2500, -65520.0f}}, 0, 0, ~1500ull, 0, ~1500ull},
        {1, {{700, below}, {701, -below}, {2500, -65520.0f}}, 0, 0, ~2500ull, 0, ~2500ull},
    };
    for (const Scenario& sc : scenarios)
        for (int per_channel = 0; per_channel < 2; ++per_channel) {
            std::vector<float> x = data<float>(rng, sc.H * 64 * 64, 64);
            for (const auto& [i, v] : sc.set) x[i] = v;
            unsigned long long qf[2], sf[2];
            flags_of(per_channel, sc.H, x, sc.H * 64 * 64 - sc.scan_less, qf, sf);
            CHECK(qf[0] == sc.q0 && qf[1] == sc.q1, "quantize flags: %llu %llu (per_channel %d)", ~qf[0], ~qf[1], per_channel);
            CHECK(sf[0] == sc.s0 && sf[1] == sc.s1, "scan flags %llu %llu", ~sf[0], ~sf[1]);
        }
    // The scan's scalar tail (n not a multiple of the vector width) in f16.
    std::vector<__half> h(37, __float2half_rn(1.0f));
    h[36] = __float2half_rn(INFINITY);
    unsigned long long sf[2] = {0, 0};
    emu::launch(1, 1, 32, [&] { ntkv_quant_scan_f16(NtkvQuantScanParams{37}, h.data(), sf); });
    CHECK(sf[0] == ~36ull && sf[1] == 0, "scan tail %llu", ~sf[0]);
}

// A strided region (the MiKV flush): values from a ring at an offset, codes into storage at
// an offset with larger head strides; nothing outside the region may change.
void region_case() {
    Rng rng{3};
    const size_t H = 3, D = 64, ring = 96, cap = 256, group = 32;
    for (int per_channel = 0; per_channel < 2; ++per_channel) {
        const int bits = per_channel ? 2 : 4;
        const size_t E = 32 / bits, Tn = 32, slot0 = 32, t0 = 64;
        std::vector<__half> x = data<__half>(rng, H * ring * D, D);
        std::vector<uint32_t> codes(H * cap * D / E, 0xABABABABu);
        std::vector<__half> s(H * cap * D / group, __half{0x1234}), m(H * cap * D / group, __half{0x1234});
        NtkvQuantParams p{};
        p.heads = H;
        p.tokens = Tn;
        p.x_offset = slot0 * D;
        p.x_head_stride = ring * D;
        p.codes_offset = per_channel ? t0 / E * D : t0 * D / E;
        p.codes_head_stride = cap * D / E;
        p.sm_offset = per_channel ? t0 / group * D : t0 * D / group;
        p.sm_head_stride = cap * D / group;
        p.dim = D;
        p.group = group;
        p.bits = bits;
        unsigned long long flags[2] = {0, 0};
        quantize(per_channel, 2, 2, 64, p, x, codes, s, m, flags);
        std::vector<__half> dense(H * Tn * D);
        for (size_t h = 0; h < H; ++h)
            for (size_t i = 0; i < Tn * D; ++i) dense[h * Tn * D + i] = x[h * ring * D + slot0 * D + i];
        Quantized want = ref_quantize(dense, H, Tn, D, bits, group, per_channel);
        const size_t wph = Tn * D / E, gph = Tn * D / group;
        for (size_t i = 0; i < codes.size(); ++i) {
            const size_t h = i / (cap * D / E), r = i % (cap * D / E);
            const bool inside = r >= p.codes_offset && r < p.codes_offset + wph;
            const uint32_t expect = inside ? want.codes[h * wph + (r - p.codes_offset)] : 0xABABABABu;
            CHECK(codes[i] == expect, "region codes %zu (per_channel %d): %#x want %#x", i, per_channel, codes[i], expect);
        }
        for (size_t i = 0; i < s.size(); ++i) {
            const size_t h = i / (cap * D / group), r = i % (cap * D / group);
            const bool inside = r >= p.sm_offset && r < p.sm_offset + gph;
            const uint16_t expect = inside ? want.scales[h * gph + (r - p.sm_offset)].bits : 0x1234;
            CHECK(s[i].bits == expect, "region scales %zu (per_channel %d)", i, per_channel);
        }
    }
}

void mikv_rows_cases() {
    Rng rng{4};
    const size_t H = 3, T = 50, D = 40, K = 7, ring = 12;
    std::vector<__half> src = data<__half>(rng, H * T * D, D);
    std::vector<uint32_t> idx(H * K, 0), counts = {7, 0, 3};
    for (size_t h = 0; h < H; ++h)
        for (size_t k = 0; k < counts[h]; ++k) idx[h * K + k] = (uint32_t)(k * 7 + h);
    // gather
    NtkvMikvRowsParams g{H, T * D, K * D, (uint32_t)D, (uint32_t)K, (uint32_t)T, (uint32_t)K, 0, 0, 0, 0};
    std::vector<__half> rows(H * K * D, __half{0x5555});
    emu::launch(2, 2, 64, [&] { ntkv_mikv_gather(g, src.data(), idx.data(), counts.data(), rows.data()); });
    for (size_t h = 0; h < H; ++h)
        for (size_t k = 0; k < K; ++k)
            for (size_t d = 0; d < D; ++d) {
                const uint16_t want = k < counts[h] ? src[(h * T + idx[h * K + k]) * D + d].bits : 0;
                CHECK(rows[(h * K + k) * D + d].bits == want, "gather %zu %zu %zu", h, k, d);
            }
    // scatter
    NtkvMikvRowsParams sc{H, K * D, T * D, (uint32_t)D, (uint32_t)K, (uint32_t)K, (uint32_t)T, 0, 0, 0, 0};
    std::vector<__half> dense(H * T * D, __half{0x5555});
    emu::launch(1, 3, 32, [&] { ntkv_mikv_scatter(sc, rows.data(), idx.data(), counts.data(), dense.data()); });
    for (size_t h = 0; h < H; ++h)
        for (size_t t = 0; t < T; ++t) {
            int k = -1;
            for (size_t j = 0; j < counts[h]; ++j)
                if (idx[h * K + j] == t) k = (int)j;
            for (size_t d = 0; d < D; ++d) {
                const uint16_t want = k >= 0 ? rows[(h * K + k) * D + d].bits : 0x5555;
                CHECK(dense[(h * T + t) * D + d].bits == want, "scatter %zu %zu %zu", h, t, d);
            }
        }
    // residual, both directions: the last `ring` tokens into the ring, then ring rows [first, T) out.
    NtkvMikvRowsParams in{H, T * D, ring * D, (uint32_t)D, (uint32_t)ring, (uint32_t)T, (uint32_t)ring, (uint32_t)(T - ring), (uint32_t)ring, 1, 0};
    std::vector<__half> rb(H * ring * D, __half{0x5555});
    emu::launch(2, 1, 64, [&] { ntkv_mikv_residual(in, src.data(), rb.data()); });
    for (size_t h = 0; h < H; ++h)
        for (size_t t = T - ring; t < T; ++t)
            for (size_t d = 0; d < D; ++d)
                CHECK(rb[(h * ring + t % ring) * D + d].bits == src[(h * T + t) * D + d].bits, "to ring %zu %zu", h, t);
    const size_t first = T - 5;
    NtkvMikvRowsParams out{H, ring * D, T * D, (uint32_t)D, 5, (uint32_t)ring, (uint32_t)T, (uint32_t)first, (uint32_t)ring, 0, 0};
    std::vector<__half> back(H * T * D, __half{0x5555});
    emu::launch(1, 2, 64, [&] { ntkv_mikv_residual(out, rb.data(), back.data()); });
    for (size_t h = 0; h < H; ++h)
        for (size_t t = 0; t < T; ++t)
            for (size_t d = 0; d < D; ++d) {
                const uint16_t want = t >= first ? src[(h * T + t) * D + d].bits : 0x5555;
                CHECK(back[(h * T + t) * D + d].bits == want, "from ring %zu %zu", h, t);
            }
    // append into slot 4
    std::vector<__half> tok = data<__half>(rng, H * D, D);
    NtkvMikvRowsParams ap{H, D, ring * D, (uint32_t)D, 1, 1, (uint32_t)ring, 4, (uint32_t)ring, 0, 0};
    std::vector<__half> rb2 = rb;
    emu::launch(1, 1, 32, [&] { ntkv_mikv_append(ap, tok.data(), rb2.data()); });
    for (size_t h = 0; h < H; ++h)
        for (size_t r = 0; r < ring; ++r)
            for (size_t d = 0; d < D; ++d) {
                const uint16_t want = r == 4 ? tok[h * D + d].bits : rb[(h * ring + r) * D + d].bits;
                CHECK(rb2[(h * ring + r) * D + d].bits == want, "append %zu %zu", h, r);
            }
}

// common.cu: ntkv_find_nonfinite (each dtype; the lowest bad index wins whatever the grid;
// the last element counts and the one past n does not) and ntkv_copy_vec16 (a grid-stride
// copy of exactly n_vec16 vectors).
template <typename T>
void finite_case(uint32_t dtype) {
    const size_t n = 1000;
    std::vector<T> x(n + 1, cast<T>(1.0f));
    auto first_bad = [&](size_t len, unsigned blocks) {
        unsigned long long r = ~0ull;
        emu::launch(blocks, 1, 64, [&] { ntkv_find_nonfinite(NtkvFiniteCheckParams{len, dtype, 0}, x.data(), &r); });
        return r;
    };
    CHECK(first_bad(n, 3) == ~0ull, "find_nonfinite dtype %u: flagged clean input", dtype);
    x[n] = cast<T>(NAN);
    CHECK(first_bad(n, 3) == ~0ull, "find_nonfinite dtype %u: read past n", dtype);
    x[n - 1] = cast<T>(-INFINITY);
    CHECK(first_bad(n, 2) == n - 1, "find_nonfinite dtype %u: last element", dtype);
    x[700] = cast<T>(INFINITY);
    x[130] = cast<T>(NAN);
    CHECK(first_bad(n, 2) == 130 && first_bad(n, 5) == 130, "find_nonfinite dtype %u: lowest index", dtype);
}

void common_cases() {
    finite_case<float>(0);
    finite_case<__half>(1);
    finite_case<__nv_bfloat16>(2);
    const size_t n = 77;
    std::vector<uint4> src(n + 1), dst(n + 1, uint4{0xAu, 0xAu, 0xAu, 0xAu});
    for (size_t i = 0; i < src.size(); ++i) src[i] = uint4{(uint32_t)i, (uint32_t)(3 * i), ~(uint32_t)i, 7u};
    emu::launch(2, 1, 32, [&] { ntkv_copy_vec16(NtkvCopyParams{n}, src.data(), dst.data()); });
    for (size_t i = 0; i <= n; ++i) {
        const uint4 want = i < n ? src[i] : uint4{0xAu, 0xAu, 0xAu, 0xAu};
        CHECK(std::memcmp(&dst[i], &want, sizeof want) == 0, "copy_vec16 vector %zu", i);
    }
}

}  // namespace

int main(int argc, char** argv) {
    const int count = argc > 1 ? std::atoi(argv[1]) : 40;
    known_answers();
    flag_cases();
    region_case();
    mikv_rows_cases();
    common_cases();
    Rng rng{42};
    random_dense_cases<float>(rng, count);
    random_dense_cases<__half>(rng, count);
    random_dense_cases<__nv_bfloat16>(rng, count);
    token_group_cases<float>(rng);
    token_group_cases<__half>(rng);
    token_group_cases<__nv_bfloat16>(rng);
    narrow_range_cases(rng);
    // A larger PerToken f16 int4 case with many grid-stride steps per warp.
    dense_case<__half>(rng, 1, 301, 128, 4, 32, false, 64, 2, 1);
    dense_case<__half>(rng, 2, 256, 33, 8, 128, true, 256, 1, 1);
    // Signed zeros and constant groups.
    std::vector<float> z(2 * 64, 0.0f);
    for (size_t i = 0; i < z.size(); i += 3) z[i] = -0.0f;
    dense_case<float>(rng, 1, 2, 64, 4, 32, false, 32, 1, 1, &z);
    // Exact ties: a group spanning 0..15 has scale 1, so k + 0.5 lies halfway between two codes
    // and must round to the even one, per token and per channel.
    auto tie = [](size_t i) { return i % 32 == 0 ? 0.0f : i % 32 == 1 ? 15.0f : (float)(i % 15) + 0.5f; };
    std::vector<float> ties(2 * 64), ties_pc(2 * 64);
    for (size_t i = 0; i < ties.size(); ++i) ties[i] = tie(i);
    for (size_t t = 0; t < 64; ++t)
        for (size_t c = 0; c < 2; ++c) ties_pc[t * 2 + c] = tie(t + 7 * c);  // groups run along tokens
    dense_case<float>(rng, 1, 2, 64, 4, 32, false, 32, 1, 1, &ties);
    dense_case<float>(rng, 1, 64, 2, 4, 32, true, 32, 1, 1, &ties_pc);
    if (failures == 0) std::printf("quant emulation: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
