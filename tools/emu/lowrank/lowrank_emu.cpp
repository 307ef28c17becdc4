// Runs the real kernel source cuda/lowrank.cu on the CPU (one std::thread per CUDA thread,
// see tools/emu/include/emu_runtime.h) against f64 references: the fused reconstruction at
// D = 64, 128, 256 for f16, bf16 and f32, compact and gathered layouts, ranks that are not a
// multiple of the 32-deep rank chunk, lists longer than a tile, positions 0 and near 2^20;
// the value gather (exact); the widen and narrow casts (exact, masked rows zero). Build and
// run with tools/emu/run.sh lowrank (AddressSanitizer on: any out-of-bounds access aborts).
#include "lowrank.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cstdio>
#include <random>
#include <vector>

namespace {

std::mt19937_64 rng(2468);

uint32_t below(uint32_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }

using ntkv_emu::dup;

struct Lists {
    std::vector<uint32_t> indptr, indices;
    uint32_t longest = 0;
};

// Sorted unique positions below seq_lens[b] per (b, h), with `extra` forced in.
Lists random_lists(const std::vector<uint32_t>& seq_lens, uint32_t hkv, uint32_t max_len,
                   const std::vector<uint32_t>& extra) {
    Lists l;
    l.indptr.push_back(0);
    for (uint32_t b = 0; b < seq_lens.size(); ++b)
        for (uint32_t h = 0; h < hkv; ++h) {
            const uint32_t n = seq_lens[b];
            std::vector<uint32_t> list;
            uint32_t need = below(std::min(max_len, n) + 1);
            for (uint32_t i = 0; i < n && need > 0; ++i)
                if (below(n - i) < need) {
                    list.push_back(i);
                    --need;
                }
            for (uint32_t e : extra)
                if (e < n && std::find(list.begin(), list.end(), e) == list.end()) list.push_back(e);
            std::sort(list.begin(), list.end());
            l.indices.insert(l.indices.end(), list.begin(), list.end());
            l.indptr.push_back((uint32_t)l.indices.size());
            l.longest = std::max<uint32_t>(l.longest, (uint32_t)list.size());
        }
    return l;
}

using RopeFn = void (*)(NtkvLowrankRopeParams, const void*, const void*, const float*, const uint32_t*,
                        const uint32_t*, void*);

template <typename T>
void rope_kernel(uint32_t D, const NtkvLowrankRopeParams& p, const T* u, const T* sv, const float* inv,
                 const uint32_t* ip, const uint32_t* ix, T* out) {
    if constexpr (std::is_same<T, __half>::value) {
        if (D == 64) ntkv_lowrank_rope_f16_d64(p, u, sv, inv, ip, ix, out);
        else if (D == 128) ntkv_lowrank_rope_f16_d128(p, u, sv, inv, ip, ix, out);
        else ntkv_lowrank_rope_f16_d256(p, u, sv, inv, ip, ix, out);
    } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        if (D == 64) ntkv_lowrank_rope_bf16_d64(p, u, sv, inv, ip, ix, out);
        else if (D == 128) ntkv_lowrank_rope_bf16_d128(p, u, sv, inv, ip, ix, out);
        else ntkv_lowrank_rope_bf16_d256(p, u, sv, inv, ip, ix, out);
    } else {
        if (D == 64) ntkv_lowrank_rope_f32_d64(p, u, sv, inv, ip, ix, out);
        else if (D == 128) ntkv_lowrank_rope_f32_d128(p, u, sv, inv, ip, ix, out);
        else ntkv_lowrank_rope_f32_d256(p, u, sv, inv, ip, ix, out);
    }
}

// Max abs error of rope_sincos measured over the sweep of sincos_case: 8.0e-8 (the f32
// polynomials); 4e-7 is 5 times that. Dropping the reduction's low term of pi/2 costs
// k * 6.1e-11, about 6e-4 at 2^24.
constexpr double kSinCosBound = 4e-7;

template <typename T>
double tol() {
    if (std::is_same<T, __half>::value) return 5e-4;
    if (std::is_same<T, __nv_bfloat16>::value) return 4e-3;
    return 1e-5;
}

struct RopeCfg {
    uint32_t B, Tcap, Hkv, D, r, max_len;
    bool gathered;
    std::vector<uint32_t> extra;
};

template <typename T>
bool rope_case(const RopeCfg& c, const char* name) {
    std::vector<uint32_t> seq_lens;
    for (uint32_t b = 0; b < c.B; ++b) seq_lens.push_back(c.Tcap - (b * 5) % std::min(c.Tcap, 7u));
    const Lists l = random_lists(seq_lens, c.Hkv, c.max_len, c.extra);
    const uint32_t N = c.Hkv * c.D, n_lists = c.B * c.Hkv;
    std::normal_distribution<float> nd;
    std::vector<T> u((size_t)c.B * c.Tcap * c.r), sv((size_t)c.B * c.r * N);
    for (auto& x : u) x = ntkv::from_f32<T>(nd(rng));
    const float sc = 1.0f / std::sqrt((float)c.r);
    for (auto& x : sv) x = ntkv::from_f32<T>(nd(rng) * sc);
    std::vector<float> inv(c.D / 2);
    for (uint32_t i = 0; i < c.D / 2; ++i) inv[i] = (float)std::pow(10000.0, -2.0 * i / (double)c.D);

    const uint32_t TT = 8192 / c.D;
    const uint32_t tiles = std::max(1u, (l.longest + TT - 1) / TT);
    const uint32_t budget = c.gathered ? l.longest + 2 : 0;
    const size_t out_rows = c.gathered ? (size_t)n_lists * budget : l.indices.size();
    std::vector<double> want(out_rows * c.D, -7.0);
    for (uint32_t li = 0; li < n_lists; ++li) {
        const uint32_t b = li / c.Hkv, h = li % c.Hkv;
        for (uint32_t j = l.indptr[li]; j < l.indptr[li + 1]; ++j) {
            const uint32_t pos = l.indices[j];
            const size_t orow = c.gathered ? (size_t)li * budget + (j - l.indptr[li]) : j;
            std::vector<double> x(c.D, 0.0);
            for (uint32_t d = 0; d < c.D; ++d)
                for (uint32_t q = 0; q < c.r; ++q)
                    x[d] += (double)ntkv::to_f32(u[((size_t)b * c.Tcap + pos) * c.r + q]) *
                            (double)ntkv::to_f32(sv[((size_t)b * c.r + q) * N + h * c.D + d]);
            for (uint32_t i = 0; i < c.D / 2; ++i) {
                const double ang = (double)((float)pos * inv[i]);
                const double cs = std::cos(ang), sn = std::sin(ang);
                want[orow * c.D + i] = x[i] * cs - x[i + c.D / 2] * sn;
                want[orow * c.D + i + c.D / 2] = x[i + c.D / 2] * cs + x[i] * sn;
            }
        }
    }
    NtkvLowrankRopeParams p{};
    p.n_indices = l.indices.size();
    p.u_batch_stride = (uint64_t)c.Tcap * c.r;
    p.sv_batch_stride = (uint64_t)c.r * N;
    p.batch = c.B; p.kv_heads = c.Hkv; p.rank = c.r; p.capacity = c.Tcap; p.budget = budget; p.tiles_per_list = tiles;
    auto ud = dup(u), svd = dup(sv);
    auto invd = dup(inv);
    auto ip = dup(l.indptr), ix = dup(l.indices);
    std::vector<T> out_init(out_rows * c.D, ntkv::from_f32<T>(-7.0f));
    auto od = dup(out_init);
    ntkv_emu::launch(dim3_{n_lists * tiles, 1, 1}, dim3_{THREADS, 1, 1}, 0,
                     [&] { rope_kernel<T>(c.D, p, ud.get(), svd.get(), invd.get(), ip.get(), ix.get(), od.get()); });
    ntkv_emu::RelL2 err;
    bool ok = true;
    for (size_t i = 0; i < out_rows * c.D; ++i) {
        const double g = ntkv::to_f32(od[i]);
        if (want[i] == -7.0 && g != -7.0) {
            std::printf("  %s: row %zu past its list was written\n", name, i / c.D);
            ok = false;
            break;
        }
        err.add(g, want[i]);
    }
    const double rel = err.value();
    ok &= rel <= tol<T>();
    std::printf("%-4s %-44s B%u T%u Hkv%u D%u r%u rows %zu tiles %u %s: rel L2 %.2e\n", ok ? "ok" : "FAIL", name, c.B,
                c.Tcap, c.Hkv, c.D, c.r, l.indices.size(), tiles, c.gathered ? "gathered" : "compact", rel);
    return ok;
}

template <typename T>
bool gather_case(uint32_t B, uint32_t Tcap, uint32_t Hkv, uint32_t D) {
    std::vector<uint32_t> seq_lens(B, Tcap);
    const Lists l = random_lists(seq_lens, Hkv, Tcap, {0, Tcap - 1});
    const uint32_t n_lists = B * Hkv, budget = l.longest + 1;
    const uint32_t tiles = std::max(1u, (l.longest + GATHER_ROWS - 1) / GATHER_ROWS);
    std::vector<T> v((size_t)n_lists * Tcap * D);
    for (size_t i = 0; i < v.size(); ++i) v[i] = ntkv::from_f32<T>((float)(i % 1000) - 500.f);
    NtkvLowrankGatherParams p{};
    p.n_indices = l.indices.size(); p.n_lists = n_lists; p.capacity = Tcap; p.budget = budget; p.head_dim = D;
    p.tiles_per_list = tiles;
    auto vd = dup(v);
    auto ip = dup(l.indptr), ix = dup(l.indices);
    std::vector<T> out_init((size_t)n_lists * budget * D, ntkv::from_f32<T>(0.25f));
    auto od = dup(out_init);
    ntkv_emu::launch(dim3_{n_lists * tiles, 1, 1}, dim3_{THREADS, 1, 1}, 0,
                     [&] { lowrank_gather<T>(p, ip.get(), ix.get(), vd.get(), od.get()); });
    bool ok = true;
    for (uint32_t li = 0; li < n_lists; ++li)
        for (uint32_t j = 0; j < budget; ++j)
            for (uint32_t d = 0; d < D; ++d) {
                const uint32_t len = l.indptr[li + 1] - l.indptr[li];
                const float want = j < len ? ntkv::to_f32(v[((size_t)li * Tcap + l.indices[l.indptr[li] + j]) * D + d]) : 0.25f;
                ok &= ntkv::to_f32(od[((size_t)li * budget + j) * D + d]) == want;
            }
    std::printf("%-4s gather B%u T%u Hkv%u D%u rows %zu (exact)\n", ok ? "ok" : "FAIL", B, Tcap, Hkv, D,
                l.indices.size());
    return ok;
}

template <typename T>
bool cast_case(uint32_t B, uint32_t rows, uint32_t cols) {
    std::vector<uint32_t> lens;
    for (uint32_t b = 0; b < B; ++b) lens.push_back(1 + below(rows));
    const size_t total = (size_t)B * rows * cols;
    std::normal_distribution<float> nd;
    std::vector<T> x(total);
    for (auto& e : x) e = ntkv::from_f32<T>(nd(rng));
    std::vector<float> y(total, NAN), back_in(total);
    for (size_t i = 0; i < total; ++i) back_in[i] = nd(rng);
    std::vector<T> back(total, ntkv::from_f32<T>(NAN));
    NtkvLowrankCastParams p{};
    p.total = total; p.batch = B; p.rows = rows; p.cols = cols; p.masked = 1;
    auto xd = dup(x), bd = dup(back);
    auto ld = dup(lens);
    auto yd = dup(y), bi = dup(back_in);
    ntkv_emu::launch(dim3_{3, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] { lowrank_widen<T>(p, ld.get(), xd.get(), yd.get()); });
    ntkv_emu::launch(dim3_{2, 1, 1}, dim3_{THREADS, 1, 1}, 0, [&] { lowrank_narrow<T>(p, ld.get(), bi.get(), bd.get()); });
    bool ok = true;
    for (size_t i = 0; i < total; ++i) {
        const uint32_t b = (uint32_t)(i / ((size_t)rows * cols)), t = (uint32_t)((i / cols) % rows);
        const bool live = t < lens[b];
        ok &= yd[i] == (live ? ntkv::to_f32(x[i]) : 0.f);
        const float w = ntkv::to_f32(ntkv::from_f32<T>(live ? back_in[i] : 0.f));
        ok &= ntkv::to_f32(bd[i]) == w;
    }
    std::printf("%-4s widen/narrow B%u rows%u cols%u masked (exact)\n", ok ? "ok" : "FAIL", B, rows, cols);
    return ok;
}

// rope_sincos (the kernel's device function) against f64 sin / cos of the same f32 angle, from
// 0 up to the 2^24 * inv_freq[0] angles of the largest positions: the two-term Cody-Waite
// reduction has to keep the error at the polynomial's level over the whole range.
bool sincos_case() {
    double worst = 0, worst_ang = 0;
    for (int i = 0; i <= 200000; ++i) {
        const float ang = i < 100000 ? (float)i * 1e-3f : std::ldexp(1.0f + (float)(rng() % 1000000) * 1e-6f, (int)(rng() % 25));
        float sn, cs;
        rope_sincos(ang, sn, cs);
        const double e = std::max(std::fabs(sn - std::sin((double)ang)), std::fabs(cs - std::cos((double)ang)));
        if (e > worst) worst = e, worst_ang = ang;
    }
    const bool ok = worst <= kSinCosBound;
    std::printf("%-4s rope_sincos vs f64, angles to 2^25: max abs err %.2e at %.7g (bound %.0e)\n", ok ? "ok" : "FAIL", worst,
                worst_ang, kSinCosBound);
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    bool ok = sincos_case();
    ok &= rope_case<__nv_bfloat16>({1, 100, 2, 128, 7, 100, false, {0, 99}}, "bf16 r7 compact, tile 64 + partial");
    ok &= rope_case<__half>({2, 77, 3, 64, 33, 77, true, {0}}, "f16 r33 (2 rank chunks) gathered");
    ok &= rope_case<float>({1, 50, 1, 256, 1, 50, false, {0}}, "f32 r1 D256 compact (tiles of 32)");
    ok &= rope_case<__nv_bfloat16>({1, (1u << 20) + 3, 1, 128, 3, 8, false, {0, (1u << 20) - 1, 1u << 20, (1u << 20) + 2}},
                                   "bf16 positions near 2^20");
    ok &= rope_case<float>({1, (1u << 20) + 3, 1, 64, 2, 8, true, {0, 1, (1u << 20) + 1}}, "f32 positions near 2^20");
    if (!quick) {
        ok &= rope_case<__half>({1, 300, 2, 128, 160, 140, true, {0}}, "f16 r160 gathered, 3 tiles per list");
        ok &= rope_case<float>({1, 90, 1, 64, 256, 90, false, {}}, "f32 r256 D64");
        ok &= rope_case<__nv_bfloat16>({2, 40, 2, 256, 40, 40, true, {39}}, "bf16 r40 D256 gathered");
    }
    ok &= gather_case<__half>(2, 45, 2, 64);
    ok &= gather_case<float>(1, 70, 3, 128);
    ok &= cast_case<__nv_bfloat16>(2, 37, 19);
    ok &= cast_case<__half>(3, 11, 64);
    ok &= cast_case<float>(1, 13, 7);
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
