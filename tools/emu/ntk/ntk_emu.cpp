// Runs the real kernel source cuda/ntk.cu on the CPU (one std::thread per CUDA thread, see
// tools/emu/include/emu_runtime.h) against f64 references: the split-K GEMM in every arithmetic
// flavour and loader (register-staged with and without vector loads, cp.async pipelines),
// cross and symmetric, the split reduction with every output layout, the mode pipelines
// (Full / Trace / Diagonal / Pseudo with the pre-sum) and the factored combine. Build and run
// with tools/emu/run.sh ntk (AddressSanitizer + UBSan: any out-of-bounds global or shared
// access aborts the run). Shapes are deliberately not tile multiples.
#include "ntk.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)
#include "emu_check.h"

#include <cfloat>
#include <cstdio>
#include <random>
#include <string>

namespace {

std::mt19937_64 rng(20261128);
size_t reduce_failures = 0;  // run_reduce outputs that are not the in-order split sum
float uniform() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

enum class Prec { F32, Tf32, Bf16 };
const char* prec_name(Prec p) { return p == Prec::F32 ? "f32" : p == Prec::Tf32 ? "tf32" : "bf16"; }

// The value the arithmetic uses for input x.
double rounded(float x, Prec p) {
    if (p == Prec::F32) return x;
    if (p == Prec::Tf32) {
        const uint32_t u = __float_as_uint(x);
        return __uint_as_float((u + 0x1000u) & 0xffffe000u);
    }
    return __bfloat162float(__float2bfloat16_rn(x));
}

// Operand storage: f32 or bf16 elements; `vals` keeps them as f32.
struct Operand {
    bool bf16;
    std::vector<float> f;
    std::vector<__nv_bfloat16> h;
    std::vector<float> vals;
    const void* ptr() const { return bf16 ? (const void*)h.data() : (const void*)f.data(); }
    float at(size_t i) const { return vals[i]; }
};
Operand make_operand(size_t n, bool bf16) {
    Operand o;
    o.bf16 = bf16;
    for (size_t i = 0; i < n; ++i) {
        float v = uniform();
        if (bf16) {
            o.h.push_back(__float2bfloat16_rn(v));
            v = __bfloat162float(o.h.back());
        } else {
            o.f.push_back(v);
        }
        o.vals.push_back(v);
    }
    return o;
}

struct GemmShape {
    uint32_t m1, m2, batch;
    uint64_t k, row_stride, batch_stride;
    bool symmetric;
    uint64_t k_chunk;  // multiple of 32
};

uint32_t smem_for(const std::string& name) {
    if (name.find("_async") != std::string::npos) return name.find("tf32") != std::string::npos ? (uint32_t)kTf32AsyncSmem : (uint32_t)kBf16AsyncSmem;
    if (name.find("ffma") != std::string::npos) return (uint32_t)kFfmaSmem;
    if (name.find("_tf32") != std::string::npos) return (uint32_t)kTf32Smem;
    return (uint32_t)kBf16Smem;
}

// Chooses the kernel as src/ntk/gpu.rs does (gemm_kernel + the vec_ok / async_ok rules) and
// runs it; returns the partials [batch][splits][m1][m2] (NaN where no block wrote).
std::vector<float> run_gemm(const GemmShape& s, const Operand& a, const Operand* b, Prec prec, bool allow_async,
                            std::string& kernel, uint32_t& splits_out) {
    const bool bf16 = a.bf16;
    const uint64_t elem = bf16 ? 2 : 4, chunk = 16 / elem;
    const bool vec_ok = s.row_stride % 4 == 0 && s.batch_stride % 4 == 0;
    const bool async_ok = allow_async && s.k % chunk == 0 && s.row_stride % chunk == 0 && s.batch_stride % chunk == 0;
    const uint32_t splits = (uint32_t)std::max<uint64_t>(1, (s.k + s.k_chunk - 1) / s.k_chunk);
    splits_out = splits;
    const uint32_t col_tiles = (s.m2 + kTile - 1) / kTile, row_tiles = (s.m1 + kTile - 1) / kTile;
    const uint32_t tiles = s.symmetric ? col_tiles * (col_tiles + 1) / 2 : row_tiles * col_tiles;
    const NtkvNtkGemmParams p{.a_batch_stride = s.batch_stride, .b_batch_stride = s.batch_stride,
                              .a_row_stride = s.row_stride, .b_row_stride = s.row_stride, .k = s.k,
                              .k_chunk = s.k_chunk, .m1 = s.m1, .m2 = s.m2, .batch = s.batch, .splits = splits,
                              .col_tiles = col_tiles, .symmetric = s.symmetric, .vec_ok = vec_ok};
    std::vector<float> part((size_t)s.batch * splits * s.m1 * s.m2, NAN);
    const void* bp = b ? b->ptr() : a.ptr();
    std::function<void()> body;
    uint32_t threads = kThreads;
    // Picks kernel K (its name selects the shared memory size) with inputs pa, pb.
    auto pick = [&](const char* name, auto k, auto pa, auto pb) {
        kernel = name;
        body = [&p, &part, k, pa, pb] { k(p, pa, pb, part.data()); };
    };
#define NTK_PICK(K, PA, PB) pick(#K, K, PA, PB)
    if (!bf16) {
        const float *fa = (const float*)a.ptr(), *fb = (const float*)bp;
        if (prec == Prec::Tf32 && async_ok) NTK_PICK(ntkv_ntk_gemm_f32_tf32_async, fa, fb), threads = kAsyncThreads;
        else if (prec == Prec::F32) NTK_PICK(ntkv_ntk_gemm_f32_ffma, fa, fb);
        else if (prec == Prec::Tf32) NTK_PICK(ntkv_ntk_gemm_f32_tf32, fa, fb);
        else NTK_PICK(ntkv_ntk_gemm_f32_bf16, fa, fb);
    } else {
        const __nv_bfloat16 *ha = (const __nv_bfloat16*)a.ptr(), *hb = (const __nv_bfloat16*)bp;
        if (prec == Prec::Bf16 && async_ok) NTK_PICK(ntkv_ntk_gemm_bf16_bf16_async, ha, hb), threads = kAsyncThreads;
        else if (prec == Prec::F32) NTK_PICK(ntkv_ntk_gemm_bf16_ffma, ha, hb);
        else if (prec == Prec::Tf32) NTK_PICK(ntkv_ntk_gemm_bf16_tf32, ha, hb);
        else NTK_PICK(ntkv_ntk_gemm_bf16_bf16, ha, hb);
    }
#undef NTK_PICK
    const uint32_t smem = smem_for(kernel);
    ntkv_emu::launch(dim3_{tiles, splits, s.batch}, dim3_{threads, 1, 1}, smem, body);
    return part;
}

// The split-K reduction as documented: output idx decoded to (z, r, c) of the product per kind
// (0: [batch][m1][m2], 1: [n1][n2][o][o], 2: [n1][n2][o] with z = a), mirrored to the upper
// triangle when symmetric, the partials added in split order s = 0, 1, ... from +0 in f32,
// then times scale. The kernel must match it bit for bit: the order is what makes the result
// deterministic.
std::vector<float> reduce_in_order(const std::vector<float>& part, uint32_t m1, uint32_t m2, uint32_t splits, uint32_t kind,
                                   uint32_t n2, uint32_t o, bool symmetric, float scale, uint64_t n_out) {
    std::vector<float> out(n_out);
    const uint64_t plane = (uint64_t)m1 * m2;
    for (uint64_t idx = 0; idx < n_out; ++idx) {
        uint64_t z, r, c;
        if (kind == 1) {
            const uint64_t b = idx % o, a = idx / o % o, j = idx / o / o % n2, i = idx / o / o / n2;
            z = 0, r = i * o + a, c = j * o + b;
        } else if (kind == 2) {
            z = idx % o, c = idx / o % n2, r = idx / o / n2;
        } else {
            z = idx / plane, r = idx % plane / m2, c = idx % m2;
        }
        if (symmetric && r / kTile > c / kTile) std::swap(r, c);
        float acc = 0.f;
        for (uint32_t s = 0; s < splits; ++s) acc += part[((z * splits + s) * plane) + r * m2 + c];
        out[idx] = acc * scale;
    }
    return out;
}

// Counts the elements whose bits differ (NaNs compare by bits too).
size_t bits_differ(const std::vector<float>& a, const std::vector<float>& b) {
    size_t n = a.size() == b.size() ? 0 : std::max(a.size(), b.size());
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += __float_as_uint(a[i]) != __float_as_uint(b[i]);
    return n;
}

// Launches the reduction (kind 0/1/2) with a small grid so the grid-stride loop wraps.
std::vector<float> run_reduce(const std::vector<float>& part, uint32_t m1, uint32_t m2, uint32_t batch, uint32_t splits,
                              uint32_t kind, uint32_t n2, uint32_t o, bool symmetric, float scale, uint64_t n_out) {
    const NtkvNtkReduceParams r{.n_out = n_out, .plane = (uint64_t)m1 * m2, .m1 = m1, .m2 = m2, .splits = splits,
                                .batch = batch, .kind = kind, .n2 = n2, .o = o, .symmetric = symmetric, .scale = scale};
    std::vector<float> out(n_out, NAN);
    ntkv_emu::launch(dim3_{3, 1, 1}, dim3_{64, 1, 1}, 0, [&] { ntkv_ntk_reduce(r, part.data(), out.data()); });
    const size_t bad = bits_differ(out, reduce_in_order(part, m1, m2, splits, kind, n2, o, symmetric, scale, n_out));
    if (bad != 0) {
        std::printf("FAIL reduce    kind=%u splits=%u: %zu of %llu outputs differ from the in-order split sum\n", kind, splits,
                    bad, (unsigned long long)n_out);
        reduce_failures++;
    }
    return out;
}

double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
    ntkv_emu::RelL2 e;
    for (size_t i = 0; i < want.size(); ++i) e.add(got[i], want[i]);
    return std::isnan(e.value()) ? INFINITY : e.value();
}

// The reference rounds the inputs as the arithmetic does (rounded()), so what is left is f32
// accumulation: the largest rel L2 measured over every GEMM and mode case of the full run is
// 2.7e-7 (F32 FFMA, trace), 1.1e-7 (tf32), 8.5e-8 (bf16). 1e-6 is a small multiple of that;
// SPEC's 2e-3 for the tensor-core precisions would hide a tf32 truncation (8e-4).
double bound(Prec) { return 1e-6; }

bool check(const char* what, const std::string& kernel, Prec prec, const std::vector<float>& got,
           const std::vector<double>& want, const std::string& detail) {
    const double e = rel_l2(got, want);
    const uint64_t unr = ntkv_emu::counters().unrounded_tf32.exchange(0), left = ntkv_emu::counters().cp_async_leftover.exchange(0);
    const bool ok = e <= bound(prec) && unr == 0 && left == 0 && got.size() == want.size();
    std::printf("%-4s %-9s %-30s %-5s %s: rel L2 %.2e (bound %.0e)%s%s\n", ok ? "ok" : "FAIL", what, kernel.c_str(),
                prec_name(prec), detail.c_str(), e, bound(prec), unr ? " UNROUNDED-TF32" : "",
                left ? " CP.ASYNC-LEFT-PENDING" : "");
    return ok;
}

// cvt.rna.tf32.f32 defined on values, independently of the kernel's bit trick: x rounded to 11
// significant bits (10 stored), ties away from zero, subnormals on the fixed 2^-136 grid, a
// finite value that rounds past the largest tf32 becoming infinity; inf and NaN unchanged.
uint32_t tf32_rna(float x) {
    if (!std::isfinite(x)) return __float_as_uint(x);
    if (x == 0.f) return __float_as_uint(x);
    const int e = std::max(std::ilogb(x), -126);
    const double ulp = std::ldexp(1.0, e - 10);
    const double q = std::floor(std::fabs((double)x) / ulp + 0.5) * ulp;
    const float r = q > (double)FLT_MAX ? INFINITY : (float)q;  // q is exact in f32 when finite
    return __float_as_uint(std::copysign(r, x));
}

// The kernels' to_tf32 against tf32_rna: ties in both directions, every binade edge, the
// overflow to infinity, subnormals, signed zeros, and random values.
bool tf32_case() {
    std::vector<float> xs = {0.f, -0.f, 1.f, -1.f, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, FLT_MIN, 1e-40f, -3e-42f};
    for (uint32_t lo : {0x0fffu, 0x1000u, 0x1001u, 0x1fffu, 0x3000u})
        for (uint32_t hi : {0x3f800000u, 0x3fffe000u, 0x7f7fe000u, 0x00000000u, 0x00ffe000u})
            for (uint32_t sign : {0u, 0x80000000u}) xs.push_back(__uint_as_float(sign | hi | lo));
    for (int i = 0; i < 20000; ++i) xs.push_back(__uint_as_float((uint32_t)rng()));
    size_t bad = 0;
    for (float x : xs) {
        if (std::isnan(x)) continue;
        const uint32_t got = ntkv::to_tf32(x), want = tf32_rna(x);
        if (got != want && bad++ < 4) std::printf("  to_tf32(%a) = %#x, want %#x\n", x, got, want);
    }
    std::printf("%-4s tf32      to_tf32 vs cvt.rna              %zu values: %zu differ\n", bad ? "FAIL" : "ok", xs.size(), bad);
    return bad == 0;
}

// Plain GEMM: C_z = A_z·B_zᵀ, checked on the partial sums through the kind-0 reduction.
bool gemm_case(Prec prec, bool bf16_in, uint32_t m1, uint32_t m2, uint64_t k, uint64_t pad, uint32_t batch, bool symmetric,
               uint64_t k_chunk, bool allow_async) {
    GemmShape s{m1, symmetric ? m1 : m2, batch, k, k + pad, 0, symmetric, k_chunk};
    s.batch_stride = batch > 1 ? s.row_stride * std::max(m1, s.m2) + pad : 0;
    const size_t na = (size_t)(batch - 1) * s.batch_stride + (size_t)(m1 - 1) * s.row_stride + k;
    const size_t nb = (size_t)(batch - 1) * s.batch_stride + (size_t)(s.m2 - 1) * s.row_stride + k;
    const Operand a = make_operand(na, bf16_in);
    const Operand b = make_operand(nb, bf16_in);
    const Operand* bp = symmetric ? nullptr : &b;
    const Operand& bo = symmetric ? a : b;
    std::string kernel;
    uint32_t splits = 0;
    const auto part = run_gemm(s, a, bp, prec, allow_async, kernel, splits);
    // Reproducibility: a second launch gives the same partials, bit for bit (checked on the
    // aligned cross case of each kernel, the one that also takes the cp.async pipelines).
    const bool rerun = pad == 8 && !symmetric;
    const size_t rerun_differ = rerun ? bits_differ(part, run_gemm(s, a, bp, prec, allow_async, kernel, splits)) : 0;
    const auto out = run_reduce(part, s.m1, s.m2, batch, splits, 0, 0, 0, symmetric, 1.f, (uint64_t)batch * s.m1 * s.m2);
    std::vector<double> want((size_t)batch * s.m1 * s.m2);
    for (uint32_t z = 0; z < batch; ++z)
        for (uint32_t r = 0; r < s.m1; ++r)
            for (uint32_t c = 0; c < s.m2; ++c) {
                double acc = 0;
                for (uint64_t kk = 0; kk < k; ++kk)
                    acc += rounded(a.at(z * s.batch_stride + r * s.row_stride + kk), prec) *
                           rounded(bo.at(z * s.batch_stride + c * s.row_stride + kk), prec);
                want[((size_t)z * s.m1 + r) * s.m2 + c] = acc;
            }
    char d[200];
    std::snprintf(d, sizeof d, "%s %s %ux%u k=%llu ld=%llu batch=%u splits=%u", bf16_in ? "bf16-in" : "f32-in ",
                  symmetric ? "sym  " : "cross", m1, s.m2, (unsigned long long)k, (unsigned long long)s.row_stride, batch,
                  splits);
    if (rerun_differ) std::printf("FAIL gemm      %s: %zu partials differ between two launches\n", kernel.c_str(), rerun_differ);
    return check("gemm", kernel, prec, out, want, d) && rerun_differ == 0;
}


enum class Mode { Full, Trace, Diagonal, Pseudo };
const char* mode_name(Mode m) {
    return m == Mode::Full ? "full" : m == Mode::Trace ? "trace/O" : m == Mode::Diagonal ? "diagonal" : "pseudo";
}

// A mode pipeline as src/ntk/mod.rs runs it (mode_geometry, pre-sum, GEMM, reduce layout),
// against the SPEC §6 definition evaluated in f64 on J directly (on the values the GEMM reads:
// inputs rounded to the precision; for Pseudo the f32 in-order pre-sums, rounded).
bool mode_case(Mode mode, Prec prec, bool bf16_in, uint32_t n1, uint32_t n2_or_0, uint32_t o, uint64_t p, uint64_t k_chunk) {
    const bool sym = n2_or_0 == 0;
    const uint32_t n2 = sym ? n1 : n2_or_0;
    const Operand j1 = make_operand((size_t)n1 * o * p, bf16_in);
    const Operand j2 = sym ? j1 : make_operand((size_t)n2 * o * p, bf16_in);
    GemmShape s{};
    s.symmetric = sym;
    s.k_chunk = k_chunk;
    uint32_t kind = 0;
    float scale = 1.f;
    uint64_t n_out = (uint64_t)n1 * n2;
    switch (mode) {
        case Mode::Full: s = {n1 * o, n2 * o, 1, p, p, 0, sym, k_chunk}; kind = 1; n_out *= (uint64_t)o * o; break;
        case Mode::Trace: s = {n1, n2, 1, o * p, o * p, 0, sym, k_chunk}; scale = 1.f / (float)o; break;
        case Mode::Diagonal: s = {n1, n2, o, p, o * p, p, sym, k_chunk}; kind = 2; n_out *= o; break;
        case Mode::Pseudo: s = {n1, n2, 1, p, p, 0, sym, k_chunk}; break;
    }
    // Pseudo: the pre-sum kernel first; the GEMM then reads f32 sums [n, p].
    auto presum_of = [&](const Operand& j, uint32_t n) {
        const NtkvNtkPresumParams pp{.p = p, .n_out = (uint64_t)n * p, .n = n, .o = o};
        Operand out;
        out.bf16 = false;
        out.f.assign(pp.n_out, NAN);
        float* dst = out.f.data();
        ntkv_emu::launch(dim3_{5, 1, 1}, dim3_{64, 1, 1}, 0, [&] {
            if (j.bf16) ntkv_ntk_presum_bf16(pp, j.h.data(), dst);
            else ntkv_ntk_presum_f32(pp, j.f.data(), dst);
        });
        out.vals = out.f;
        // The in-order f32 sum the kernel must produce, checked exactly.
        bool exact = true;
        for (uint32_t i = 0; i < n; ++i)
            for (uint64_t q = 0; q < p; ++q) {
                float acc = 0.f;
                for (uint32_t a = 0; a < o; ++a) acc += j.at(((size_t)i * o + a) * p + q);
                exact &= acc == out.f[(size_t)i * p + q];
            }
        if (!exact) std::printf("FAIL presum not the in-order f32 sum\n");
        return std::make_pair(out, exact);
    };
    std::string kernel;
    uint32_t splits = 0;
    std::vector<float> part;
    Operand s1, s2;
    bool ok = true;
    if (mode == Mode::Pseudo) {
        auto r1 = presum_of(j1, n1);
        s1 = std::move(r1.first);
        ok &= r1.second;
        if (!sym) {
            auto r2 = presum_of(j2, n2);
            s2 = std::move(r2.first);
            ok &= r2.second;
        }
        part = run_gemm(s, s1, sym ? nullptr : &s2, prec, true, kernel, splits);
    } else {
        part = run_gemm(s, j1, sym ? nullptr : &j2, prec, true, kernel, splits);
    }
    const auto out = run_reduce(part, s.m1, s.m2, s.batch, splits, kind, n2, o, sym, scale, n_out);
    std::vector<double> want(n_out);
    auto J1 = [&](uint32_t i, uint32_t a, uint64_t q) { return rounded(j1.at(((size_t)i * o + a) * p + q), prec); };
    auto J2 = [&](uint32_t i, uint32_t a, uint64_t q) { return rounded(j2.at(((size_t)i * o + a) * p + q), prec); };
    auto dot = [&](uint32_t i, uint32_t a, uint32_t j, uint32_t b) {
        double acc = 0;
        for (uint64_t q = 0; q < p; ++q) acc += J1(i, a, q) * J2(j, b, q);
        return acc;
    };
    for (uint32_t i = 0; i < n1; ++i)
        for (uint32_t j = 0; j < n2; ++j) {
            const size_t ij = (size_t)i * n2 + j;
            if (mode == Mode::Full) {
                for (uint32_t a = 0; a < o; ++a)
                    for (uint32_t b = 0; b < o; ++b) want[(ij * o + a) * o + b] = dot(i, a, j, b);
            } else if (mode == Mode::Diagonal) {
                for (uint32_t a = 0; a < o; ++a) want[ij * o + a] = dot(i, a, j, a);
            } else if (mode == Mode::Trace) {
                double acc = 0;
                for (uint32_t a = 0; a < o; ++a) acc += dot(i, a, j, a);
                want[ij] = acc / o;
            } else {
                const Operand& t2 = sym ? s1 : s2;
                double acc = 0;
                for (uint64_t q = 0; q < p; ++q) acc += rounded(s1.at((size_t)i * p + q), prec) * rounded(t2.at((size_t)j * p + q), prec);
                want[ij] = acc;
            }
        }
    char d[200];
    std::snprintf(d, sizeof d, "%s %s n1=%u n2=%u o=%u p=%llu splits=%u", bf16_in ? "bf16-in" : "f32-in ", sym ? "sym  " : "cross",
                  n1, n2, o, (unsigned long long)p, splits);
    return check(mode_name(mode), kernel, prec, out, want, d) && ok;
}

// ntkv_ntk_combine against its documented formula (f64), kind 0 and 1, = and +=.
bool combine_case(uint32_t kind, bool accumulate, uint32_t n1, uint32_t n2, uint32_t t, uint32_t e, float beta) {
    std::vector<float> aa((size_t)n1 * t * n2 * t), gg((size_t)n1 * t * e * n2 * t * e);
    for (auto& v : aa) v = uniform();
    for (auto& v : gg) v = uniform();
    const NtkvNtkCombineParams c{.n_out = (uint64_t)n1 * n2 * e * (kind == 0 ? e : 1), .n1 = n1, .n2 = n2, .t = t,
                                 .e = e, .kind = kind, .accumulate = accumulate, .beta = beta, .scale = 0.5f};
    std::vector<float> out(c.n_out);
    for (auto& v : out) v = uniform();
    const std::vector<float> before = out;
    ntkv_emu::launch(dim3_{3, 1, 1}, dim3_{64, 1, 1}, 0, [&] { ntkv_ntk_combine(c, aa.data(), gg.data(), out.data()); });
    std::vector<double> want(c.n_out);
    const size_t ac = (size_t)n2 * t, gc = ac * e;
    for (uint32_t i = 0; i < n1; ++i)
        for (uint32_t j = 0; j < n2; ++j)
            for (uint32_t a = 0; a < e; ++a)
                for (uint32_t b = 0; b < e; ++b) {
                    if (kind == 1 && b != a) continue;
                    double s = 0;
                    for (uint32_t ti = 0; ti < t; ++ti)
                        for (uint32_t si = 0; si < t; ++si)
                            s += ((double)aa[((size_t)i * t + ti) * ac + (size_t)j * t + si] + beta) *
                                 gg[(((size_t)i * t + ti) * e + a) * gc + ((size_t)j * t + si) * e + b];
                    const size_t idx = kind == 0 ? (((size_t)i * n2 + j) * e + a) * e + b : ((size_t)i * n2 + j) * e + a;
                    want[idx] = 0.5 * s + (accumulate ? before[idx] : 0.0);
                }
    char d[120];
    std::snprintf(d, sizeof d, "kind=%u acc=%d n1=%u n2=%u t=%u e=%u beta=%g", kind, (int)accumulate, n1, n2, t, e, beta);
    return check("combine", "ntkv_ntk_combine", Prec::F32, out, want, d);
}

// Metric reductions: ntkv_ntk_means + ntkv_ntk_grand_mean, then ntkv_ntk_stats (m_kind 0/1/2,
// centred or not, blocks < total/256 so the grid-stride loop wraps) + ntkv_ntk_stats_finish,
// against f64 sums (relative 1e-12: everything is f64 but the order).
bool metrics_case(uint32_t n, uint32_t m_kind, bool center, uint32_t blocks) {
    std::vector<float> k((size_t)n * n), m((size_t)n * n);
    for (auto& v : k) v = uniform();
    for (auto& v : m) v = uniform();
    std::vector<uint32_t> labels(n);
    for (auto& l : labels) l = (uint32_t)(rng() % 3);
    auto means = [&](const std::vector<float>& x) {
        NtkvNtkMeansParams mp{};
        mp.n = n;
        std::vector<double> out(2 * n + 1, NAN);
        ntkv_emu::launch(dim3_{n + (n + 255) / 256, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_ntk_means(mp, x.data(), out.data()); });
        ntkv_emu::launch(dim3_{1, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_ntk_grand_mean(mp, out.data()); });
        return out;
    };
    auto means_ref = [&](const std::vector<float>& x) {
        std::vector<double> r(2 * n + 1, 0.0);
        for (uint32_t i = 0; i < n; ++i)
            for (uint32_t j = 0; j < n; ++j) {
                r[i] += x[(size_t)i * n + j] / (double)n;
                r[n + j] += x[(size_t)i * n + j] / (double)n;
            }
        for (uint32_t i = 0; i < n; ++i) r[2 * n] += r[i] / n;
        return r;
    };
    bool ok = true;
    auto close = [](double a, double b) { return std::fabs(a - b) <= 1e-12 * std::max(1.0, std::fabs(b)); };
    std::vector<double> cent;
    if (center) {
        const auto ck = means(k), cm = means(m), rk = means_ref(k), rm = means_ref(m);
        for (size_t i = 0; i < ck.size(); ++i) ok &= close(ck[i], rk[i]) && close(cm[i], rm[i]);
        cent = ck;
        cent.insert(cent.end(), cm.begin(), cm.end());
    }
    const NtkvNtkStatsParams sp{.total = (uint64_t)n * n, .n = n, .m_kind = m_kind, .center = center, .blocks = blocks};
    std::vector<double> partials((size_t)blocks * kStats, NAN), out(kStats, NAN);
    const double* cp = center ? cent.data() : nullptr;
    ntkv_emu::launch(dim3_{blocks, 1, 1}, dim3_{256, 1, 1}, 0,
                     [&] { ntkv_ntk_stats(sp, k.data(), m.data(), labels.data(), cp, partials.data()); });
    ntkv_emu::launch(dim3_{1, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_ntk_stats_finish(sp, partials.data(), out.data()); });
    double want[kStats] = {0, 0, 0, 0, 0, 0};
    for (uint32_t i = 0; i < n; ++i)
        for (uint32_t j = 0; j < n; ++j) {
            double kv = k[(size_t)i * n + j];
            if (center) kv = kv - cent[i] - cent[n + j] + cent[2 * n];
            want[0] += kv;
            want[1] += kv * kv;
            if (i == j) want[2] += kv;
            if (m_kind) {
                double mv = m_kind == 1 ? (labels[i] == labels[j] ? 1.0 : -1.0) : (double)m[(size_t)i * n + j];
                if (m_kind == 2 && center) mv = mv - cent[2 * n + 1 + i] - cent[3 * n + 1 + j] + cent[4 * n + 1];
                want[3] += mv;
                want[4] += mv * mv;
                want[5] += kv * mv;
            }
        }
    for (int q = 0; q < kStats; ++q) ok &= std::fabs(out[q] - want[q]) <= 1e-9 * std::max(1.0, std::fabs(want[q]));
    std::printf("%-4s metrics   ntkv_ntk_stats/means           n=%u m_kind=%u center=%d blocks=%u: sum %.6g (want %.6g), "
                "k.m %.6g (want %.6g)\n",
                ok ? "ok" : "FAIL", n, m_kind, (int)center, blocks, out[0], want[0], out[5], want[5]);
    return ok;
}

// MLP elementwise kernels against their documented formulas (ReLU / tanh / GELU).
bool mlp_case(uint32_t act) {
    const uint32_t n = 3, o = 4, cols = 37;
    const uint64_t rows = (uint64_t)n * o, total = rows * cols;
    std::vector<float> pre(total), z(n * cols), bias(cols), t1(total), t2(total), dbias(cols);
    for (auto* v : {&pre, &z, &bias, &t1, &t2, &dbias})
        for (auto& x : *v) x = 2.f * uniform();
    auto f = [&](double x) { return act == 0 ? (x > 0 ? x : 0) : act == 1 ? std::tanh(x) : 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); };
    auto df = [&](double x) {
        if (act == 0) return x > 0 ? 1.0 : 0.0;
        if (act == 1) return 1 - std::tanh(x) * std::tanh(x);
        return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
    };
    double err = 0;
    // bias_act
    NtkvNtkBiasActParams bp{total, cols, 1, 1, act};
    std::vector<float> zo(total, NAN), ao(total, NAN);
    ntkv_emu::launch(dim3_{2, 1, 1}, dim3_{64, 1, 1}, 0, [&] { ntkv_ntk_bias_act(bp, pre.data(), bias.data(), zo.data(), ao.data()); });
    for (uint64_t i = 0; i < total; ++i) {
        const double zz = (double)pre[i] + bias[i % cols];
        err = std::max({err, std::fabs(zo[i] - zz), std::fabs(ao[i] - f((float)zz))});
    }
    // cotangent mode 1 ([n, o, cols] with z [n, cols]) and mode 0 (identity)
    NtkvNtkCotangentParams cp{total, o, cols, 1, act};
    std::vector<float> g(total, NAN);
    ntkv_emu::launch(dim3_{2, 1, 1}, dim3_{64, 1, 1}, 0, [&] { ntkv_ntk_cotangent(cp, pre.data(), z.data(), g.data()); });
    for (uint64_t i = 0; i < total; ++i) err = std::max(err, std::fabs(g[i] - pre[i] * df(z[(i / cols / o) * cols + i % cols])));
    NtkvNtkCotangentParams cp0{(uint64_t)n * o * o, o, o, 0, act};
    std::vector<float> g0(n * o * o, NAN);
    ntkv_emu::launch(dim3_{1, 1, 1}, dim3_{64, 1, 1}, 0, [&] { ntkv_ntk_cotangent(cp0, nullptr, nullptr, g0.data()); });
    for (uint64_t i = 0; i < g0.size(); ++i) err = std::max(err, std::fabs(g0[i] - ((i / o) % o == i % o ? 1.0 : 0.0)));
    // jvp, hidden and last
    for (uint32_t last : {0u, 1u}) {
        const NtkvNtkJvpParams jp{.total = total, .cols = cols, .has_bias = 1, .has_t2 = 1, .is_last = last, .act = act};
        std::vector<float> a(total, NAN), da(total, NAN);
        ntkv_emu::launch(dim3_{2, 1, 1}, dim3_{64, 1, 1}, 0,
                         [&] { ntkv_ntk_jvp(jp, pre.data(), t1.data(), t2.data(), bias.data(), dbias.data(), a.data(), da.data()); });
        for (uint64_t i = 0; i < total; ++i) {
            const double zz = (double)pre[i] + bias[i % cols], dz = (double)t1[i] + t2[i] + dbias[i % cols];
            if (last) err = std::max(err, std::fabs(a[i] - (zz + dz)));
            else err = std::max({err, std::fabs(a[i] - f(zz)), std::fabs(da[i] - df(zz) * dz)});
        }
    }
    const bool ok = err < 1e-5;
    std::printf("%-4s mlp       bias_act/cotangent/jvp         act=%u: max abs err %.2e\n", ok ? "ok" : "FAIL", act, err);
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    // Copies left pending at exit fail the case (check()) instead of aborting, so that a
    // mutant (tools/mutants) reports failing cases.
    ntkv_emu::cp_async_leftover_fatal = false;
    // "quick": fewer GEMM/mode cases; "gemm": only the quick GEMM cases (every kernel, with the
    // split reduction and the tf32 conversion; the mutation suite's case); "misc": only
    // combine, metrics and MLP kernels.
    const std::string arg = argc > 1 ? argv[1] : "";
    const bool gemm_only = arg == "gemm", quick = arg == "quick" || gemm_only, misc_only = arg == "misc";
    bool ok = tf32_case();
    if (!misc_only) {
    for (Prec prec : {Prec::F32, Prec::Tf32, Prec::Bf16})
        for (bool bf16_in : {false, true}) {
            // aligned rows (vector loads; cp.async when the dtype matches), cross, 3 splits
            ok &= gemm_case(prec, bf16_in, 150, 70, 200, 8, 1, false, 96, true);
            // unaligned rows: scalar loads, register-staged
            ok &= gemm_case(prec, bf16_in, 37, 131, 203, 0, 1, false, 64, true);
            // symmetric, 2x2 tiles -> 3 blocks, 2 splits, batch 2
            ok &= gemm_case(prec, bf16_in, 133, 0, 120, 8, 2, true, 64, true);
            if (quick) continue;
            // aligned but forced register-staged (the vec_ok loader)
            ok &= gemm_case(prec, bf16_in, 129, 33, 136, 0, 1, false, 64, false);
        }
    for (Prec prec : {Prec::F32, Prec::Tf32, Prec::Bf16})
        for (bool bf16_in : {false, true}) {
            if (gemm_only) break;
            ok &= mode_case(Mode::Full, prec, bf16_in, 13, 11, 10, 300, 128);
            ok &= mode_case(Mode::Diagonal, prec, bf16_in, 40, 0, 3, 181, 64);
            if (quick) continue;
            ok &= mode_case(Mode::Full, prec, bf16_in, 9, 0, 15, 301, 128);
            ok &= mode_case(Mode::Trace, prec, bf16_in, 50, 29, 3, 250, 256);
            ok &= mode_case(Mode::Diagonal, prec, bf16_in, 21, 35, 4, 64, 32);
            ok &= mode_case(Mode::Pseudo, prec, bf16_in, 60, 45, 4, 333, 128);
            ok &= mode_case(Mode::Pseudo, prec, bf16_in, 70, 0, 3, 96, 32);
        }
    }
    if (gemm_only) {
        ok &= reduce_failures == 0;
        std::printf(ok ? "ALL OK\n" : "FAILURES\n");
        return ok ? 0 : 1;
    }
    ok &= combine_case(0, false, 5, 4, 3, 6, 1.f);
    ok &= combine_case(1, true, 3, 7, 2, 5, 0.f);
    ok &= combine_case(0, true, 4, 4, 1, 3, 1.f);
    ok &= metrics_case(37, 0, false, 2);
    ok &= metrics_case(41, 1, false, 3);
    ok &= metrics_case(29, 2, true, 2);
    ok &= metrics_case(300, 2, true, 5);
    for (uint32_t act : {0u, 1u, 2u}) ok &= mlp_case(act);
    std::printf("mma ops emulated: %llu\n", (unsigned long long)ntkv_emu::counters().mma.load());
    ok &= reduce_failures == 0;
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
