// Runs the kernels of cuda/topk.cu on the CPU (tools/emu/include/emu_runtime.h: one std::thread
// per CUDA thread; the launches run concurrently, one forked process per CTA with several CTAs
// at once, so the tickets, histograms and list reservations really race) against straightforward
// references: top-k (fused and many-blocks paths, row batches), eviction selection, H2O
// accumulation (pass 1, merge, pass 2), keep-list check, in-place
// compaction, gather, SnapKV pooling. The launch geometry and parameters are set up as
// src/topk/gpu.rs does. Build and run with tools/emu/run.sh topk (AddressSanitizer + UBSan).
#include "topk.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)

#include <cstdio>
#include <random>
#include <string>

namespace {

using ntkv_emu::dev_alloc;
using ntkv_emu::LaunchOpts;

int g_fail = 0, g_cases = 0;
std::mt19937_64 rng(20261128);
uint32_t below(uint32_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }
float unif() { return (float)((rng() >> 11) * (1.0 / 9007199254740992.0)); }

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            std::printf("  FAIL: " __VA_ARGS__);           \
            std::printf("\n");                             \
            ++g_fail;                                      \
            if (std::getenv("NTKV_EMU_STOP")) std::exit(1); \
            return false;                                  \
        }                                                  \
    } while (0)

template <typename T> const char* dname();
template <> const char* dname<float>() { return "f32"; }
template <> const char* dname<__half>() { return "f16"; }
template <> const char* dname<__nv_bfloat16>() { return "bf16"; }

uint32_t rank_key_ref(float x) {
    if (std::isnan(x)) return 0;
    if (x == 0.0f) x = 0.0f;
    uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
template <typename T> uint32_t bits16(T v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }
uint32_t vbits(float v) { return __float_as_uint(v); }
uint32_t vbits(__half v) { return bits16(v); }
uint32_t vbits(__nv_bfloat16 v) { return bits16(v); }

// ---- top-k ---------------------------------------------------------------------------------

struct Layout { size_t blocks_per_row, chunk, rows_per_batch, kpad, finalize_blocks; };

size_t next_pow2(size_t x) { size_t p = 1; while (p < x) p <<= 1; return p; }

// TopkLayout::choose (src/select/mod.rs), at 4 blocks per SM.
Layout choose(size_t rows, size_t n, size_t k, size_t sm_count) {
    const size_t kpad = next_pow2(std::max<size_t>(k, 1));
    const size_t per_row_bytes = (n + k + 4096 + 8) * 4;
    const size_t rows_per_batch = std::clamp<size_t>((256u << 20) / per_row_bytes, 1, std::clamp<size_t>(rows, 1, 65535));
    const size_t target_blocks = 4 * std::max<size_t>(sm_count, 1);
    const size_t max_bpr = std::max<size_t>((n + 4095) / 4096, 1);
    const size_t bpr = rows_per_batch >= std::max<size_t>(sm_count, 1)
                           ? 1
                           : std::clamp<size_t>((target_blocks + rows_per_batch - 1) / rows_per_batch, 1, max_bpr);
    const size_t chunk = std::max<size_t>(((n + bpr - 1) / bpr + 2047) / 2048, 1) * 2048;
    const size_t blocks_per_row = std::max<size_t>((n + chunk - 1) / chunk, 1);
    size_t fin = 1;
    if (blocks_per_row > 1) {
        const size_t per_row = std::max<size_t>(std::max<size_t>(sm_count, 1) / rows_per_batch, 1);
        while (fin * 2 <= per_row) fin *= 2;
        fin = std::min(fin, std::max<size_t>(kpad / 256, 1));
    }
    return Layout{blocks_per_row, chunk, rows_per_batch, kpad, fin};
}

template <typename T> struct TopkK;
#define TOPK_K(T, S)                                                         \
    template <> struct TopkK<T> {                                            \
        static constexpr auto hist = ntkv_topk_hist_##S;                     \
        static constexpr auto filter = ntkv_topk_filter_##S;                 \
        static constexpr auto finalize = ntkv_topk_finalize_##S;             \
        static constexpr auto fused = ntkv_topk_fused_##S;                   \
    };
TOPK_K(float, f32)
TOPK_K(__half, f16)
TOPK_K(__nv_bfloat16, bf16)

struct TopkOut {
    size_t uniform_len;
    bool has_lengths, order_by_index, write_values;
    size_t out_stride, tail_count, tail_first;
};

struct TopkRun {
    size_t cand_stage_cap = 8192;  // CAND_STAGE_MAX (smaller: exercises the unstaged path)
    unsigned conc = 4;
    unsigned seed = 1;
    size_t fin = 0;  // finalize blocks per row instead of the layout's (a power of two <= kpad)
};

// TopkPlan::launch: the fused kernel when blocks_per_row == 1, else hist, filter, finalize,
// batch after batch. The workspace is reused across `calls` (it must come back zeroed).
template <typename T>
bool topk_launch(const Layout& lay, size_t rows, size_t n, size_t k, const T* x, const uint32_t* lengths,
                 const TopkOut& out, T* values, uint32_t* indices, uint32_t* ws_hist, uint32_t* ws_state,
                 uint32_t* ws_sel, uint32_t* ws_cand, const TopkRun& r) {
    const bool fused = lay.blocks_per_row == 1;
    const size_t limit = ntkv_emu::SMEM_CAP;
    const size_t static_smem = fused ? 18432 : 2048;
    const size_t cand_stage = std::min((limit > static_smem + lay.kpad * 8 ? limit - static_smem - lay.kpad * 8 : 0) / 8,
                                       r.cand_stage_cap);
    const uint32_t smem = (uint32_t)((lay.kpad + cand_stage) * 8);
    for (size_t row_base = 0; row_base < rows;) {
        const size_t batch = std::min(lay.rows_per_batch, rows - row_base);
        NtkvTopkParams p{};
        p.row_stride = n;
        p.cand_stride = n;
        p.out_stride = out.out_stride;
        p.row_base = (uint32_t)row_base;
        p.rows = (uint32_t)batch;
        p.n = (uint32_t)n;
        p.k = (uint32_t)k;
        p.uniform_len = (uint32_t)out.uniform_len;
        p.has_lengths = out.has_lengths;
        p.blocks_per_row = (uint32_t)lay.blocks_per_row;
        p.chunk = (uint32_t)lay.chunk;
        p.kpad = (uint32_t)lay.kpad;
        p.order_by_index = out.order_by_index;
        p.write_values = out.write_values;
        p.reverse_filter = 1;
        p.cand_stage = (uint32_t)cand_stage;
        p.tail_count = (uint32_t)out.tail_count;
        p.tail_first = (uint32_t)out.tail_first;
        p.fin_blocks = (uint32_t)lay.finalize_blocks;
        LaunchOpts o;
        o.concurrent = r.conc;
        o.jitter = true;
        o.seed = r.seed + (unsigned)row_base;
        o.timeout_s = 300.0;  // 1024-thread finalize CTAs with ~200 barriers each, on a loaded host
        if (fused) {
            if (!ntkv_emu::launch(dim3_{(unsigned)batch, 1, 1}, dim3_{1024, 1, 1}, smem,
                                  [&] { TopkK<T>::fused(p, x, lengths, ws_sel, ws_cand, values, indices); }, o))
                return false;
        } else {
            const dim3_ split{(unsigned)lay.blocks_per_row, (unsigned)batch, 1};
            if (!ntkv_emu::launch(split, dim3_{512, 1, 1}, 0, [&] { TopkK<T>::hist(p, x, lengths, ws_hist, ws_state); }, o))
                return false;
            if (!ntkv_emu::launch(split, dim3_{512, 1, 1}, 0,
                                  [&] { TopkK<T>::filter(p, x, lengths, ws_state, ws_sel, ws_cand); }, o))
                return false;
            o.concurrent = std::min(r.conc, 2u);
            if (!ntkv_emu::launch(dim3_{(unsigned)lay.finalize_blocks, (unsigned)batch, 1}, dim3_{1024, 1, 1}, smem, [&] {
                    TopkK<T>::finalize(p, x, ws_hist, ws_state, ws_sel, ws_cand, values, indices);
                }, o))
                return false;
        }
        row_base += batch;
    }
    return true;
}

// Reference: descending rank key, then ascending index; empty slots: index u32::MAX, -inf.
template <typename T>
void topk_ref(const std::vector<T>& x, size_t rows, size_t n, size_t k, const std::vector<uint32_t>* lengths,
              std::vector<uint32_t>& idx) {
    idx.assign(rows * k, 0xffffffffu);
    for (size_t r = 0; r < rows; ++r) {
        const size_t len = lengths ? (*lengths)[r] : n;
        std::vector<std::pair<uint32_t, uint32_t>> o;
        for (size_t i = 0; i < len; ++i) o.push_back({rank_key_ref(ntkv::to_f32(x[r * n + i])), (uint32_t)i});
        std::sort(o.begin(), o.end(), [](auto a, auto b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
        for (size_t s = 0; s < std::min(k, o.size()); ++s) idx[r * k + s] = o[s].second;
    }
}

enum Fill { kRandom, kTies, kFewValues, kSpecials, kSorted, kAllEqual, kZeros, kNanHeavy };

template <typename T>
std::vector<T> make_scores(size_t count, Fill f) {
    std::vector<T> x(count);
    for (size_t i = 0; i < count; ++i) {
        float v = 0.0f;
        switch (f) {
            case kRandom: v = unif() * 8.0f - 4.0f; break;
            case kTies: v = (float)(int)(below(7)) - 3.0f; break;                      // many ties
            case kFewValues: v = 1.0f + (float)below(3) * 1e-7f * 0.0f + below(2); break;  // 1 or 2
            case kSpecials: {
                const uint32_t c = below(12);
                v = c == 0 ? NAN : c == 1 ? INFINITY : c == 2 ? -INFINITY : c == 3 ? -0.0f : c == 4 ? 0.0f
                    : c == 5 ? -NAN : unif() * 2.0f - 1.0f;
                break;
            }
            case kSorted: v = (float)i * 0.001f; break;
            case kAllEqual: v = 0.5f; break;
            case kZeros: v = below(2) ? 0.0f : -0.0f; break;  // an all-zero accumulator (signed zeros tie)
            case kNanHeavy: {  // mostly NaN: NaN ranks below everything, ties among NaN by index
                const uint32_t c = below(10);
                v = c < 7 ? (c & 1 ? NAN : -NAN) : c == 7 ? -INFINITY : unif() - 0.5f;
                break;
            }
        }
        x[i] = ntkv::from_f32<T>(v);
    }
    return x;
}

template <typename T>
bool topk_case(const char* name, size_t rows, size_t n, size_t k, Fill fill, bool with_lengths, size_t sm_count,
               const TopkRun& run = {}, size_t force_rows_per_batch = 0) {
    ++g_cases;
    ntkv_emu::arena_reset();
    Layout lay = choose(rows, n, k, sm_count);
    if (force_rows_per_batch) lay.rows_per_batch = force_rows_per_batch;
    if (run.fin && lay.blocks_per_row > 1) lay.finalize_blocks = run.fin;
    std::printf("topk %-22s %-4s rows=%zu n=%zu k=%zu bpr=%zu chunk=%zu batch=%zu fin=%zu lengths=%d stage<=%zu\n",
                name, dname<T>(), rows, n, k, lay.blocks_per_row, lay.chunk, lay.rows_per_batch, lay.finalize_blocks,
                with_lengths, run.cand_stage_cap);
    std::fflush(stdout);
    const std::vector<T> hx = make_scores<T>(rows * n, fill);
    std::vector<uint32_t> hl(rows, (uint32_t)n);
    if (with_lengths)
        for (size_t r = 0; r < rows; ++r) {
            const uint32_t c = below(5);
            hl[r] = c == 0 ? 0u : c == 1 ? (uint32_t)std::min<size_t>(k, n) - (k > 1 && k <= n ? 1 : 0)
                    : c == 2 ? (uint32_t)n : below((uint32_t)n + 1);
        }
    T* x = dev_alloc<T>(rows * n);
    std::memcpy(x, hx.data(), rows * n * sizeof(T));
    uint32_t* lengths = dev_alloc<uint32_t>(rows);
    std::memcpy(lengths, hl.data(), rows * 4);
    const size_t b = lay.rows_per_batch;
    uint32_t* hist = dev_alloc<uint32_t>(b * 4096);
    uint32_t* state = dev_alloc<uint32_t>(b * 8);
    uint32_t* sel = dev_alloc<uint32_t>(b * k);
    uint32_t* cand = dev_alloc<uint32_t>(b * n);
    T* values = dev_alloc<T>(rows * k);
    uint32_t* indices = dev_alloc<uint32_t>(rows * k);
    std::vector<uint32_t> ref;
    topk_ref(hx, rows, n, k, with_lengths ? &hl : nullptr, ref);
    const TopkOut out{n, with_lengths, false, true, k, 0, 0};
    for (int call = 0; call < 2; ++call) {  // the second call reuses the workspace
        std::memset(indices, 0xAB, rows * k * 4);
        std::memset(values, 0xAB, rows * k * sizeof(T));
        TopkRun r = run;
        r.seed += 100 * call;
        CHECK((topk_launch<T>(lay, rows, n, k, x, lengths, out, values, indices, hist, state, sel, cand, r)),
              "launch failed (call %d)", call);
        for (size_t r2 = 0; r2 < rows; ++r2)
            for (size_t s = 0; s < k; ++s) {
                const size_t e = r2 * k + s;
                CHECK(indices[e] == ref[e], "call %d row %zu slot %zu: index %u, expected %u", call, r2, s, indices[e],
                      ref[e]);
                const T want = ref[e] == 0xffffffffu ? ntkv::from_f32<T>(-INFINITY) : hx[r2 * n + ref[e]];
                CHECK(vbits(values[e]) == vbits(want), "call %d row %zu slot %zu: value bits %x, expected %x", call,
                      r2, s, vbits(values[e]), vbits(want));
            }
        for (size_t i = 0; i < b * 4096; ++i) CHECK(hist[i] == 0, "call %d: histogram workspace not re-zeroed", call);
        for (size_t i = 0; i < b * 8; ++i) CHECK(state[i] == 0, "call %d: state word %zu = %u not re-zeroed", call, i, state[i]);
    }
    return true;
}

// ---- eviction selection (EvictionPlan::run) ---------------------------------------------

bool select_case(const char* name, size_t rows, size_t stride, size_t older, size_t budget, size_t recent, Fill fill,
                 size_t sm_count) {
    ++g_cases;
    ntkv_emu::arena_reset();
    std::printf("select %-20s rows=%zu stride=%zu older=%zu budget=%zu recent=%zu\n", name, rows, stride, older, budget,
                recent);
    std::fflush(stdout);
    const std::vector<float> hx = make_scores<float>(rows * stride, fill);
    float* x = dev_alloc<float>(rows * stride);
    std::memcpy(x, hx.data(), hx.size() * 4);
    uint32_t* keep = dev_alloc<uint32_t>(rows * budget);
    std::memset(keep, 0xAB, rows * budget * 4);
    const size_t k_sel = budget - recent;
    // Reference: keep_list in src/topk/cpu.rs.
    std::vector<uint32_t> ref;
    for (size_t r = 0; r < rows; ++r) {
        std::vector<float> row(hx.begin() + r * stride, hx.begin() + r * stride + older);
        std::vector<uint32_t> chosen;
        if (k_sel > 0) {
            topk_ref(row, 1, older, k_sel, nullptr, chosen);
            chosen.erase(std::remove(chosen.begin(), chosen.end(), 0xffffffffu), chosen.end());
            std::sort(chosen.begin(), chosen.end());
            chosen.resize(k_sel, 0xffffffffu);
        }
        ref.insert(ref.end(), chosen.begin(), chosen.end());
        for (size_t i = 0; i < recent; ++i) ref.push_back((uint32_t)(older + i));
    }
    if (k_sel > 0) {
        Layout lay = choose(rows, stride, k_sel, sm_count);
        const size_t b = lay.rows_per_batch;
        uint32_t* hist = dev_alloc<uint32_t>(b * 4096);
        uint32_t* state = dev_alloc<uint32_t>(b * 8);
        uint32_t* sel = dev_alloc<uint32_t>(b * k_sel);
        uint32_t* cand = dev_alloc<uint32_t>(b * stride);
        float* dummy = dev_alloc<float>(1);
        const TopkOut out{older, false, true, false, budget, recent, older};
        CHECK(topk_launch<float>(lay, rows, stride, k_sel, x, dev_alloc<uint32_t>(rows), out, dummy, keep, hist, state,
                                 sel, cand, TopkRun{}),
              "launch failed");
    } else {
        NtkvFillRecentParams p{(uint32_t)rows, (uint32_t)budget, 0, (uint32_t)recent, (uint32_t)older, 0};
        const size_t blocks = std::clamp<size_t>((rows * recent + 255) / 256, 1, 4096);
        CHECK(ntkv_emu::launch(dim3_{(unsigned)blocks, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_topk_fill_recent(p, keep); },
                               LaunchOpts{2, false, 1, 60}),
              "launch failed");
    }
    for (size_t e = 0; e < rows * budget; ++e)
        CHECK(keep[e] == ref[e], "row %zu slot %zu: %u, expected %u", e / budget, e % budget, keep[e], ref[e]);
    return true;
}

// ---- H2O accumulation ------------------------------------------------------------------

struct Shape { size_t hq, hkv, tq, t, d; };

template <typename T, int D> struct H2oK;
#define H2O_K(T, S, D)                                            \
    template <> struct H2oK<T, D> {                               \
        static constexpr auto pass1 = ntkv_h2o_pass1_##S##_d##D;  \
        static constexpr auto pass2 = ntkv_h2o_pass2_##S##_d##D;  \
    };
H2O_K(__half, f16, 64)
H2O_K(__half, f16, 128)
H2O_K(__nv_bfloat16, bf16, 64)
H2O_K(__nv_bfloat16, bf16, 128)
H2O_K(__half, f16, 256)
H2O_K(__nv_bfloat16, bf16, 256)

template <typename T>
std::vector<double> attention_mass(const std::vector<T>& q, const std::vector<T>& k, const Shape& s, bool max_reduce) {
    const size_t group = s.hq / s.hkv;
    const double scale = 1.0 / std::sqrt((double)s.d);
    std::vector<double> mass(s.hkv * s.t, 0.0), head(s.t), sc(s.t);
    for (size_t hk = 0; hk < s.hkv; ++hk)
        for (size_t g = 0; g < group; ++g) {
            const size_t h = hk * group + g;
            std::fill(head.begin(), head.end(), 0.0);
            for (size_t i = 0; i < s.tq; ++i) {
                const size_t pos = s.t - s.tq + i;
                double mx = -INFINITY;
                for (size_t j = 0; j <= pos; ++j) {
                    double dot = 0;
                    for (size_t e = 0; e < s.d; ++e)
                        dot += (double)ntkv::to_f32(q[(h * s.tq + i) * s.d + e]) * ntkv::to_f32(k[(hk * s.t + j) * s.d + e]);
                    sc[j] = dot * scale;
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (size_t j = 0; j <= pos; ++j) sum += std::exp(sc[j] - mx);
                for (size_t j = 0; j <= pos; ++j) head[j] += std::exp(sc[j] - mx) / sum;
            }
            for (size_t j = 0; j < s.t; ++j) {
                double& o = mass[hk * s.t + j];
                o = g == 0 ? head[j] : max_reduce ? std::max(o, head[j]) : o + head[j];
            }
        }
    return mass;
}

struct H2oState {
    float *partial, *stats;
};

// A device copy of a host vector.
template <typename T>
T* upload(const std::vector<T>& h) {
    T* d = dev_alloc<T>(h.size());
    std::memcpy(d, h.data(), h.size() * sizeof(T));
    return d;
}

// The scratch of an H2O accumulation over shape s (AttnScratch).
H2oState h2o_state(const Shape& s) {
    H2oState st;
    st.partial = dev_alloc<float>(s.hq * s.tq * ((s.t + 63) / 64) * 2);
    st.stats = dev_alloc<float>(s.hq * s.tq * 2);
    return st;
}

// Random q [hq, tq, d] and k [hkv, t, d], uniform in [-2, 2), on the device, with the f64
// attention mass of every key (the reference of the accumulation).
template <typename T>
struct H2oInputs {
    std::vector<double> mass;
    T* q;
    T* k;
};
template <typename T>
H2oInputs<T> h2o_inputs(const Shape& s, bool max_reduce) {
    std::vector<T> hq(s.hq * s.tq * s.d), hk(s.hkv * s.t * s.d);
    for (auto& v : hq) v = ntkv::from_f32<T>(unif() * 4.0f - 2.0f);
    for (auto& v : hk) v = ntkv::from_f32<T>(unif() * 4.0f - 2.0f);
    return H2oInputs<T>{attention_mass(hq, hk, s, max_reduce), upload(hq), upload(hk)};
}

template <typename T, int D>
bool h2o_launch(const Shape& s, bool max_reduce, bool overwrite, const T* q, const T* k, float* acc,
                H2oState& st, unsigned conc, unsigned seed) {
    const size_t n_tiles = (s.t + 63) / 64;
    NtkvH2oParams p{};
    p.hq = (uint32_t)s.hq;
    p.hkv = (uint32_t)s.hkv;
    p.tq = (uint32_t)s.tq;
    p.t = (uint32_t)s.t;
    p.d = (uint32_t)s.d;
    p.n_tiles = (uint32_t)n_tiles;
    p.reduce_max = max_reduce;
    p.scale = 1.0f / std::sqrt((float)s.d);
    p.overwrite = overwrite;
    LaunchOpts o{conc, true, seed, 90.0};
    const dim3_ tiles{(unsigned)n_tiles, (unsigned)s.hkv, 1};
    if (!ntkv_emu::launch(tiles, dim3_{128, 1, 1}, 0, [&] { H2oK<T, D>::pass1(p, q, k, st.partial); }, o)) return false;
    const size_t rows = s.hq * s.tq;
    if (!ntkv_emu::launch(dim3_{(unsigned)((rows + 7) / 8), 1, 1}, dim3_{256, 1, 1}, 0,
                          [&] { ntkv_h2o_merge(p, st.partial, st.stats); }, o))
        return false;
    return ntkv_emu::launch(tiles, dim3_{128, 1, 1}, 0, [&] { H2oK<T, D>::pass2(p, q, k, st.stats, acc); }, o);
}

template <typename T, int D>
bool h2o_case(const char* name, Shape s, bool max_reduce, unsigned conc) {
    ++g_cases;
    ntkv_emu::arena_reset();
    s.d = D;
    std::printf("h2o %-24s %-4s hq=%zu hkv=%zu tq=%zu t=%zu d=%zu %s concurrent=%u\n", name, dname<T>(), s.hq, s.hkv,
                s.tq, s.t, s.d, max_reduce ? "max" : "sum", conc);
    std::fflush(stdout);
    const auto [mass, q, k] = h2o_inputs<T>(s, max_reduce);
    float* acc = dev_alloc<float>(s.hkv * s.t);
    std::vector<float> acc0(s.hkv * s.t);
    for (auto& a : acc0) a = unif();
    std::memcpy(acc, acc0.data(), acc0.size() * 4);
    H2oState st = h2o_state(s);
    // Call 1 accumulates into acc0; call 2 (same scratch) overwrites.
    for (int call = 0; call < 2; ++call) {
        const bool overwrite = call == 1;
        CHECK((h2o_launch<T, D>(s, max_reduce, overwrite, q, k, acc, st, conc, 7 + call)), "launch failed (call %d)",
              call);
        double worst = 0;
        for (size_t e = 0; e < s.hkv * s.t; ++e) {
            const double want = (overwrite ? 0.0 : (double)acc0[e]) + mass[e];
            const double err = std::fabs((double)acc[e] - want);
            worst = std::max(worst, err / (std::fabs(want) + 1e-2));
            CHECK(err <= 1e-4 * std::fabs(want) + 1e-6, "call %d head %zu key %zu: %.9g, expected %.9g", call,
                  e / s.t, e % s.t, (double)acc[e], want);
        }
        std::printf("  call %d ok (worst rel err %.2e)\n", call, worst);
    }
    return true;
}

// ---- keep check, compaction, gather, pooling ---------------------------------------------

std::vector<uint32_t> random_keep(size_t hkv, size_t t, size_t budget, int mode) {
    std::vector<uint32_t> keep;
    for (size_t h = 0; h < hkv; ++h) {
        if (mode == 1 || budget == t) {  // identity prefix
            for (size_t i = 0; i < budget; ++i) keep.push_back((uint32_t)i);
            continue;
        }
        size_t need = budget;
        for (size_t i = 0; i < t; ++i)
            if (below((uint32_t)(t - i)) < need) {
                keep.push_back((uint32_t)i);
                --need;
            }
    }
    return keep;
}

bool check_keep_case(const char* name, size_t hkv, size_t t, size_t budget, std::vector<uint32_t> keep,
                     unsigned long long want) {
    ++g_cases;
    ntkv_emu::arena_reset();
    std::printf("check_keep %-16s hkv=%zu t=%zu budget=%zu expect=%lld\n", name, hkv, t, budget, (long long)want);
    uint32_t* dk = dev_alloc<uint32_t>(keep.size());
    std::memcpy(dk, keep.data(), keep.size() * 4);
    unsigned long long* flag = dev_alloc<unsigned long long>(1);
    *flag = ~0ull;
    NtkvKeepCheckParams p{(uint32_t)hkv, (uint32_t)budget, (uint32_t)t, 0};
    const size_t blocks = std::clamp<size_t>((hkv * budget + 255) / 256, 1, 4096);
    CHECK(ntkv_emu::launch(dim3_{(unsigned)blocks, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_h2o_check_keep(p, dk, flag); },
                           LaunchOpts{3, true, 5, 60}),
          "launch failed");
    CHECK(*flag == want, "first_bad %llu, expected %llu", *flag, want);
    return true;
}

bool compact_case(const char* name, size_t hkv, size_t t, size_t row_words, size_t budget, bool has_acc, int mode) {
    ++g_cases;
    ntkv_emu::arena_reset();
    std::printf("compact+gather %-12s hkv=%zu t=%zu row_words=%zu budget=%zu acc=%d\n", name, hkv, t, row_words, budget,
                has_acc);
    std::fflush(stdout);
    const std::vector<uint32_t> keep = random_keep(hkv, t, budget, mode);
    std::vector<uint32_t> hk(hkv * t * row_words), hv(hk.size());
    std::vector<float> ha(hkv * t);
    for (auto& w : hk) w = (uint32_t)rng();
    for (auto& w : hv) w = (uint32_t)rng();
    for (auto& a : ha) a = unif();
    uint32_t* dkeep = dev_alloc<uint32_t>(keep.size());
    std::memcpy(dkeep, keep.data(), keep.size() * 4);
    uint32_t* kc = dev_alloc<uint32_t>(hk.size());
    uint32_t* vc = dev_alloc<uint32_t>(hv.size());
    float* acc = dev_alloc<float>(has_acc ? ha.size() : 1);
    std::memcpy(kc, hk.data(), hk.size() * 4);
    std::memcpy(vc, hv.data(), hv.size() * 4);
    if (has_acc) std::memcpy(acc, ha.data(), ha.size() * 4);
    NtkvCompactParams p{(uint32_t)hkv, (uint32_t)t, (uint32_t)budget, (uint32_t)row_words, has_acc, 0};
    // Gather first (out of place, from the untouched caches).
    uint32_t* ko = dev_alloc<uint32_t>(hkv * budget * row_words);
    uint32_t* vo = dev_alloc<uint32_t>(hkv * budget * row_words);
    float* ao = dev_alloc<float>(has_acc ? hkv * budget : 1);
    const size_t gblocks = std::clamp<size_t>((hkv * budget * row_words + 255) / 256, 1, 65535);
    CHECK(ntkv_emu::launch(dim3_{(unsigned)gblocks, 1, 1}, dim3_{256, 1, 1}, 0,
                           [&] { ntkv_h2o_gather(p, dkeep, kc, vc, acc, ko, vo, ao); }, LaunchOpts{3, false, 1, 600}),
          "gather launch failed");
    for (size_t h = 0; h < hkv; ++h)
        for (size_t i = 0; i < budget; ++i) {
            const size_t src = keep[h * budget + i];
            for (size_t w = 0; w < row_words; ++w) {
                CHECK(ko[(h * budget + i) * row_words + w] == hk[(h * t + src) * row_words + w], "gather k h%zu i%zu", h, i);
                CHECK(vo[(h * budget + i) * row_words + w] == hv[(h * t + src) * row_words + w], "gather v h%zu i%zu", h, i);
            }
            if (has_acc) CHECK(ao[h * budget + i] == ha[h * t + src], "gather acc h%zu i%zu", h, i);
        }
    // In-place compaction (gpu.rs compact): one block per head.
    const size_t chunk_rows = std::max<size_t>(8192 / row_words, 1);
    const uint32_t smem = (uint32_t)((2 * chunk_rows * row_words + chunk_rows) * 4);
    CHECK(ntkv_emu::launch(dim3_{(unsigned)hkv, 1, 1}, dim3_{256, 1, 1}, smem,
                           [&] { ntkv_h2o_compact(p, dkeep, kc, vc, acc); }, LaunchOpts{2, true, 3, 600}),
          "compact launch failed");
    // Reference: cpu.rs h2o_compact (rows budget.. unchanged).
    std::vector<uint32_t> rk = hk, rv = hv;
    std::vector<float> ra = ha;
    for (size_t h = 0; h < hkv; ++h)
        for (size_t i = 0; i < budget; ++i) {
            const size_t src = keep[h * budget + i];
            for (size_t w = 0; w < row_words; ++w) {
                rk[(h * t + i) * row_words + w] = rk[(h * t + src) * row_words + w];
                rv[(h * t + i) * row_words + w] = rv[(h * t + src) * row_words + w];
            }
            ra[h * t + i] = ra[h * t + src];
        }
    for (size_t e = 0; e < rk.size(); ++e) CHECK(kc[e] == rk[e] && vc[e] == rv[e], "compact word %zu differs", e);
    if (has_acc)
        for (size_t e = 0; e < ra.size(); ++e) CHECK(acc[e] == ra[e], "compact acc %zu differs", e);
    return true;
}

bool pool_case(size_t rows, size_t stride, size_t n_out) {
    ++g_cases;
    ntkv_emu::arena_reset();
    std::printf("snapkv_pool rows=%zu stride=%zu n_out=%zu\n", rows, stride, n_out);
    std::vector<float> hin(rows * stride);
    for (auto& v : hin) v = unif();
    float* in = dev_alloc<float>(hin.size());
    std::memcpy(in, hin.data(), hin.size() * 4);
    float* out = dev_alloc<float>(rows * n_out);
    NtkvPoolParams p{(uint32_t)rows, (uint32_t)stride, (uint32_t)n_out, 0};
    const size_t blocks = std::clamp<size_t>((rows * n_out + 255) / 256, 1, 8192);
    CHECK(ntkv_emu::launch(dim3_{(unsigned)blocks, 1, 1}, dim3_{256, 1, 1}, 0, [&] { ntkv_snapkv_pool(p, in, out); },
                           LaunchOpts{3, false, 1, 600}),
          "launch failed");
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n_out; ++j) {
            // cpu.rs pool5 in f64 over the same inputs.
            double s = 0;
            for (long i = (long)j - 2; i <= (long)j + 2; ++i)
                if (i >= 0 && i < (long)n_out) s += hin[r * stride + i];
            const double want = s / 5.0;
            CHECK(std::fabs(out[r * n_out + j] - want) <= 1e-6 * std::fabs(want) + 1e-7, "pool row %zu col %zu: %g vs %g",
                  r, j, (double)out[r * n_out + j], want);
        }
    return true;
}

// SnapKV as src/topk/mod.rs runs it: votes = accumulate(overwrite) into [hkv, t], pool the
// first t - w columns (row stride t), select capacity - w of them plus the window. The pooling
// is compared with the f64 reference at 1e-5 relative, the selection exactly against the
// reference selection of the kernel's own pooled scores.
template <typename T>
bool snapkv_case(const char* name, Shape s, size_t capacity, bool max_reduce) {
    ++g_cases;
    ntkv_emu::arena_reset();
    s.d = 64;
    std::printf("snapkv %-21s %-4s hq=%zu hkv=%zu w=%zu t=%zu capacity=%zu\n", name, dname<T>(), s.hq, s.hkv, s.tq, s.t,
                capacity);
    std::fflush(stdout);
    const auto [mass, q, k] = h2o_inputs<T>(s, max_reduce);
    float* votes = dev_alloc<float>(s.hkv * s.t);
    for (size_t e = 0; e < s.hkv * s.t; ++e) votes[e] = NAN;  // overwritten, never read
    H2oState st = h2o_state(s);
    CHECK((h2o_launch<T, 64>(s, max_reduce, true, q, k, votes, st, 4, 11)), "accumulate failed");
    const size_t older = s.t - s.tq, w = s.tq;
    float* pooled = dev_alloc<float>(s.hkv * older);
    NtkvPoolParams pp{(uint32_t)s.hkv, (uint32_t)s.t, (uint32_t)older, 0};
    CHECK(ntkv_emu::launch(dim3_{(unsigned)std::clamp<size_t>((s.hkv * older + 255) / 256, 1, 8192), 1, 1},
                           dim3_{256, 1, 1}, 0, [&] { ntkv_snapkv_pool(pp, votes, pooled); }, LaunchOpts{2, false, 1, 60}),
          "pool failed");
    for (size_t h = 0; h < s.hkv; ++h)
        for (size_t j = 0; j < older; ++j) {
            double sum = 0;
            for (long i = (long)j - 2; i <= (long)j + 2; ++i)
                if (i >= 0 && i < (long)older) sum += mass[h * s.t + i];
            const double want = sum / 5.0;
            CHECK(std::fabs(pooled[h * older + j] - want) <= 1e-4 * want + 1e-6, "pooled h%zu j%zu: %g vs %g", h, j,
                  (double)pooled[h * older + j], want);
        }
    // The selection over the kernel's own pooled scores (EvictionPlan::snapkv).
    const size_t k_sel = capacity - w;
    uint32_t* keep = dev_alloc<uint32_t>(s.hkv * capacity);
    std::vector<float> hp(pooled, pooled + s.hkv * older);
    std::vector<uint32_t> ref;
    for (size_t h = 0; h < s.hkv; ++h) {
        std::vector<float> row(hp.begin() + h * older, hp.begin() + (h + 1) * older);
        std::vector<uint32_t> chosen;
        if (k_sel > 0) topk_ref(row, 1, older, k_sel, nullptr, chosen);
        std::sort(chosen.begin(), chosen.end());
        ref.insert(ref.end(), chosen.begin(), chosen.end());
        for (size_t i = 0; i < w; ++i) ref.push_back((uint32_t)(older + i));
    }
    if (k_sel > 0) {
        Layout lay = choose(s.hkv, older, k_sel, 132);
        const size_t b = lay.rows_per_batch;
        const TopkOut out{older, false, true, false, capacity, w, older};
        CHECK((topk_launch<float>(lay, s.hkv, older, k_sel, pooled, dev_alloc<uint32_t>(s.hkv), out, dev_alloc<float>(1),
                                  keep, dev_alloc<uint32_t>(b * 4096), dev_alloc<uint32_t>(b * 8),
                                  dev_alloc<uint32_t>(b * k_sel), dev_alloc<uint32_t>(b * older), TopkRun{})),
              "select failed");
    } else {
        NtkvFillRecentParams fp{(uint32_t)s.hkv, (uint32_t)capacity, 0, (uint32_t)w, (uint32_t)older, 0};
        CHECK(ntkv_emu::launch(dim3_{(unsigned)std::clamp<size_t>((s.hkv * w + 255) / 256, 1, 4096), 1, 1},
                               dim3_{256, 1, 1}, 0, [&] { ntkv_topk_fill_recent(fp, keep); }, LaunchOpts{2, false, 1, 60}),
              "fill_recent failed");
    }
    for (size_t e = 0; e < ref.size(); ++e) CHECK(keep[e] == ref[e], "keep %zu: %u vs %u", e, keep[e], ref[e]);
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    ntkv_emu::arena_init(size_t(64) << 20);
    const std::string only = argc > 1 ? argv[1] : "";
    auto want = [&](const char* group) { return only.empty() || only == group; };
    if (only == "sweep") rng.seed(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 99);

    if (want("topk")) {
        enum Dtype { kF32, kF16, kBf16 };
        struct Spec {
            Dtype dtype;
            const char* name;
            size_t rows, n, k;
            Fill fill;
            bool with_lengths;
            size_t sm_count;
            TopkRun run = {};
            size_t force_rows_per_batch = 0;
        };
        const Spec specs[] = {
            // Fused path (blocks_per_row == 1: sm_count 1).
            {kF32, "fused-random", 3, 1000, 10, kRandom, false, 1},
            {kF32, "fused-k1", 2, 777, 1, kRandom, false, 1},
            {kF32, "fused-k=n", 2, 301, 301, kTies, false, 1},
            {kF32, "fused-k>n", 2, 50, 70, kRandom, false, 1},
            {kF32, "fused-ties", 3, 2500, 100, kTies, false, 1},
            {kF32, "fused-allequal", 2, 999, 37, kAllEqual, false, 1},
            {kF32, "fused-specials", 3, 1203, 200, kSpecials, true, 1},
            {kF32, "fused-lengths", 5, 600, 40, kRandom, true, 1},
            {kF32, "fused-n-odd-stride", 3, 1001, 17, kRandom, false, 1},  // row stride % 4 != 0
            {kF16, "fused-f16", 3, 2049, 64, kRandom, true, 1},
            {kBf16, "fused-bf16", 3, 1500, 300, kTies, false, 1},
            {kF16, "fused-f16-specials", 2, 998, 500, kSpecials, false, 1},
            {kF32, "fused-unstaged", 3, 2000, 30, kFewValues, false, 1, TopkRun{0, 2, 1}},
            {kF32, "fused-stage3", 2, 700, 9, kTies, true, 1, TopkRun{3, 2, 1}},
            // Many blocks per row (sm_count large, few rows).
            {kF32, "split-random", 2, 9000, 50, kRandom, false, 132},
            {kF32, "split-ties", 2, 10001, 333, kTies, true, 132},
            {kF32, "split-specials", 2, 8195, 1000, kSpecials, true, 132},
            {kF32, "split-k1", 1, 12290, 1, kSorted, false, 132},
            {kF32, "split-k=n", 1, 4100, 4100, kRandom, false, 132},
            {kF32, "split-k>len", 3, 8500, 200, kRandom, true, 132},
            {kF16, "split-f16", 2, 9003, 128, kTies, true, 132},
            {kBf16, "split-bf16", 2, 8200, 77, kSpecials, false, 132},
            {kF32, "split-unstaged", 2, 8300, 40, kFewValues, false, 132, TopkRun{0, 4, 3}},
            {kF32, "split-allequal", 1, 8192, 4000, kAllEqual, false, 132},
            {kF32, "split-conc1", 2, 9000, 20, kRandom, true, 132, TopkRun{8192, 1, 2}},
            {kF32, "split-conc8", 1, 20000, 64, kTies, false, 132, TopkRun{8192, 8, 4}},
            // Row batching: force rows_per_batch below rows.
            {kF32, "fused-batches", 5, 800, 11, kTies, true, 1, TopkRun{}, 2},
            {kF32, "split-batches", 5, 8200, 11, kRandom, true, 132, TopkRun{}, 2},
            // Shared-memory lists that overflow (every element a candidate: several flushes per
            // block), tie-heavy rows, NaN, k = 1, k = n, and finalize slices.
            {kF32, "split-allequal-flush", 2, 60000, 2500, kAllEqual, false, 3, TopkRun{8192, 4, 5, 4}},
            {kF32, "split-zeros-fin8", 1, 30000, 1000, kZeros, false, 2, TopkRun{8192, 4, 6, 4}},
            {kF16, "split-zeros-f16", 2, 20000, 600, kZeros, true, 3, TopkRun{8192, 3, 7, 2}},
            {kF32, "split-nan-heavy", 2, 20000, 700, kNanHeavy, true, 3, TopkRun{8192, 4, 8, 2}},
            {kBf16, "split-nan-bf16", 1, 9000, 3000, kNanHeavy, false, 132},
            {kF32, "split-k1-wide", 1, 40000, 1, kAllEqual, false, 2},
            {kF32, "split-k=n-fin", 1, 4100, 4100, kTies, false, 132},   // fin 32: slices past k write nothing
            {kF32, "split-slices-4", 2, 9000, 50, kRandom, false, 132, TopkRun{8192, 4, 9, 16}},
            {kF32, "split-slices-ties", 2, 12000, 333, kTies, true, 132, TopkRun{8192, 4, 10, 8}},
            {kF32, "split-slices-unstaged", 2, 9000, 600, kFewValues, false, 132, TopkRun{0, 4, 11, 4}},
            {kF16, "split-slices-k>len", 3, 8500, 200, kSpecials, true, 132, TopkRun{8192, 4, 12, 4}},
        };
        for (const Spec& c : specs) {
            const auto run = [&](auto dtype) {
                topk_case<decltype(dtype)>(c.name, c.rows, c.n, c.k, c.fill, c.with_lengths, c.sm_count, c.run,
                                           c.force_rows_per_batch);
            };
            if (c.dtype == kF32) run(float{});
            else if (c.dtype == kF16) run(__half{});
            else run(__nv_bfloat16{});
        }
    }
    if (want("select")) {
        select_case("h2o", 3, 700, 650, 120, 50, kRandom, 1);
        select_case("h2o-ties", 2, 3000, 2990, 400, 10, kTies, 1);
        select_case("h2o-split", 2, 9000, 8800, 300, 200, kTies, 132);
        select_case("h2o-split-wide", 2, 20000, 19900, 2100, 64, kTies, 132);    // fin 8, index order
        select_case("h2o-all-zero", 2, 20000, 19936, 2048, 64, kZeros, 132);     // an all-zero accumulator
        select_case("budget=recent", 3, 500, 400, 100, 100, kRandom, 1);
        select_case("recent=0", 2, 600, 600, 64, 0, kSpecials, 1);
        select_case("keep-all-older", 2, 300, 250, 300, 50, kRandom, 1);
        select_case("snapkv", 2, 777, 777, 200, 31, kRandom, 1);  // pooled [hkv, t - w], every column older
    }
    if (want("h2o")) {
        const Shape a{4, 2, 5, 150, 64};    // GQA group 2, tq < 16, t not a multiple of 64
        const Shape b{3, 1, 19, 64, 64};    // group 3, tq > 16, one full tile
        const Shape c{2, 2, 1, 77, 64};     // MHA, tq = 1
        const Shape d{4, 4, 16, 130, 64};   // 4 heads, 3 tiles each
        const Shape e{6, 3, 33, 95, 128};   // d = 128, tq = 33
        const Shape f{2, 2, 64, 64, 64};    // tq == t
        h2o_case<__half, 64>("a", a, false, 4);
        h2o_case<__nv_bfloat16, 64>("a-max", a, true, 4);
        h2o_case<__half, 64>("b", b, false, 3);
        h2o_case<__nv_bfloat16, 64>("c", c, true, 4);
        h2o_case<__half, 64>("f", f, false, 4);
        h2o_case<__half, 64>("d-conc1", d, false, 1);
        h2o_case<__half, 64>("d-max-conc2", d, true, 2);
        h2o_case<__nv_bfloat16, 64>("d-conc-all", d, false, 64);
        h2o_case<__half, 128>("e", e, false, 6);
        h2o_case<__nv_bfloat16, 128>("e-max", e, true, 6);
        const Shape g{3, 3, 40, 40, 64};    // t < 64: one partial tile, tq == t
        h2o_case<__half, 64>("g-short", g, false, 3);
        h2o_case<__nv_bfloat16, 64>("g-short-bf16", g, false, 3);
        const Shape h{6, 6, 3, 100, 64};    // 6 heads
        h2o_case<__half, 64>("h-6heads-conc1", h, true, 1);
        h2o_case<__half, 64>("h-6heads-conc-all", h, false, 64);
        const Shape i{2, 1, 17, 70, 256};   // d = 256
        h2o_case<__nv_bfloat16, 256>("i-d256", i, false, 4);
        h2o_case<__half, 256>("i-d256-max", i, true, 4);
    }
    if (want("evict")) {
        check_keep_case("ok", 3, 100, 20, random_keep(3, 100, 20, 0), ~0ull);
        {
            auto k = random_keep(3, 100, 20, 0);
            k[45] = 100;  // out of range
            check_keep_case("range", 3, 100, 20, k, 45);
            auto k2 = random_keep(3, 100, 20, 0);
            k2[30] = k2[29];  // duplicate
            k2[50] = 200;
            check_keep_case("dup", 3, 100, 20, k2, 30);
            auto k3 = random_keep(2, 1000, 700, 0);
            std::swap(k3[600], k3[601]);
            check_keep_case("order", 2, 1000, 700, k3, 601);
        }
        compact_case("d64-f16", 3, 300, 32, 100, true, 0);
        compact_case("identity", 2, 200, 32, 80, true, 1);
        compact_case("budget=t", 2, 90, 64, 90, false, 0);
        compact_case("multi-chunk", 2, 3000, 3, 2800, true, 0);       // chunk_rows 2730
        compact_case("big-rows", 2, 40, 4096, 25, true, 0);           // chunk_rows 2
        compact_case("max-rows", 2, 12, 8192, 7, false, 0);           // chunk_rows 1
        compact_case("odd", 3, 77, 5, 1, true, 0);
        pool_case(3, 100, 100);
        pool_case(2, 300, 269);
        pool_case(4, 5, 1);
        pool_case(1, 10, 3);
    }
    if (want("snapkv")) {
        snapkv_case<__half>("gqa-sum", Shape{4, 2, 8, 150, 64}, 60, false);
        snapkv_case<__nv_bfloat16>("gqa-max", Shape{6, 3, 20, 130, 64}, 20, true);  // capacity == window
        snapkv_case<__half>("mha", Shape{2, 2, 5, 300, 64}, 295, false);            // keep all older
    }
    if (only == "sweep") {  // optional: random top-k shapes (not in the default run)
        const int count = argc > 2 ? std::atoi(argv[2]) : 20;
        for (int c = 0; c < count; ++c) {
            const bool split = below(2) == 1;
            const size_t n = split ? 4097 + below(9000) : 1 + below(3000);
            const size_t k = below(4) == 0 ? 1 + below(std::min<uint32_t>(2 * (uint32_t)n, 16384)) : 1 + below(std::min<uint32_t>((uint32_t)n, 300));
            const size_t rows = 1 + below(4);
            const Fill fill = (Fill)below(6);
            const bool lengths = below(2) == 1;
            const TopkRun run{below(3) == 0 ? (size_t)below(64) : 8192, 1 + below(4), (unsigned)c};
            const size_t forced = below(3) == 0 ? 1 + below((uint32_t)rows) : 0;
            switch (below(3)) {
                case 0: topk_case<float>("sweep", rows, n, k, fill, lengths, split ? 132 : 1, run, forced); break;
                case 1: topk_case<__half>("sweep", rows, n, k, fill, lengths, split ? 132 : 1, run, forced); break;
                default: topk_case<__nv_bfloat16>("sweep", rows, n, k, fill, lengths, split ? 132 : 1, run, forced); break;
            }
        }
    }
    std::printf("\n%d cases, %d failed\n", g_cases, g_fail);
    return g_fail == 0 ? 0 : 1;
}
