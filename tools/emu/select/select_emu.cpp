// Runs the real kernel source cuda/select.cu on the CPU (one std::thread per CUDA thread, see
// tools/emu/include/emu_runtime.h) against exact references written here from the contract
// in src/select: segment padding, per-row truncation, and the three-pass expansion of selected
// blocks (or ranges) into sorted, unique CSR token lists. Build and run with
// tools/emu/run.sh select (AddressSanitizer on: any read or write outside the buffers the
// launcher sizes, or past the requested shared memory, aborts the run). Every output slot the
// contract leaves alone starts as a sentinel and must still hold it.
#include "select.cu"  // cuda/, on the shared runtime (tools/emu/run.sh)

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

std::mt19937_64 rng(20261202);
uint32_t below(uint64_t n) { return n == 0 ? 0 : (uint32_t)(rng() % n); }

constexpr uint32_t kSelectThreads = 256;  // SELECT_THREADS in src/select/gpu.rs
constexpr uint32_t kScanThreads = 1024;   // SCAN_THREADS
constexpr uint32_t kNone = 0xffffffffu;

template <typename T> T from_f(float x) { return ntkv::from_f32<T>(x); }
template <typename T> uint32_t bits(T v) {
    uint32_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> const char* dtype_name() {
    if constexpr (sizeof(T) == 4) return "f32";
    else if constexpr (std::is_same_v<T, __half>) return "f16";
    else return "bf16";
}

// ---- pad segments ---------------------------------------------------------------------------
// indptr may hold entries past total and decreasing pairs: the kernel clamps both, so a bad
// device-side indptr cannot move an access out of range (the launcher validates the host copy).
template <typename T>
bool pad_case(const char* name, uint32_t segments, uint32_t max_len, uint64_t total, bool hostile, uint32_t grid) {
    std::vector<uint32_t> indptr(segments + 1, 0);
    for (uint32_t s = 1; s <= segments; ++s) indptr[s] = (uint32_t)std::min<uint64_t>(total, indptr[s - 1] + below(max_len + 3));
    indptr[segments] = (uint32_t)total;
    if (hostile) {
        for (uint32_t s = 0; s <= segments; s += 3) indptr[s] = below(2) ? (uint32_t)(total + 1 + below(100)) : below(total + 1);
    }
    std::vector<T> x(total);
    for (auto& v : x) v = from_f<T>((float)(int32_t)below(2001) - 1000.0f);
    const T sentinel = from_f<T>(12345.0f);
    std::vector<T> out((size_t)segments * max_len, sentinel);
    std::vector<uint32_t> lengths(segments, kNone);
    NtkvSelectPadParams p{total, segments, max_len};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kSelectThreads, 1, 1}, 0, [&] {
        if constexpr (sizeof(T) == 4) ntkv_select_pad_segments_f32(p, indptr.data(), x.data(), out.data(), lengths.data());
        else if constexpr (std::is_same_v<T, __half>) ntkv_select_pad_segments_f16(p, indptr.data(), x.data(), out.data(), lengths.data());
        else ntkv_select_pad_segments_bf16(p, indptr.data(), x.data(), out.data(), lengths.data());
    });
    size_t bad = 0;
    for (uint32_t s = 0; s < segments; ++s) {
        const uint64_t a = std::min<uint64_t>(indptr[s], total), b = std::min<uint64_t>(indptr[s + 1], total);
        const uint64_t len = std::min<uint64_t>(b > a ? b - a : 0, max_len);
        if (lengths[s] != len) ++bad;
        for (uint32_t i = 0; i < max_len; ++i) {
            const T want = i < len ? x[a + i] : sentinel;
            if (bits(out[(size_t)s * max_len + i]) != bits(want)) ++bad;
        }
    }
    std::printf("%-4s pad      %-5s %-26s segments=%u max_len=%u total=%llu grid=%u\n", bad ? "FAIL" : "ok",
                dtype_name<T>(), name, segments, max_len, (unsigned long long)total, grid);
    return bad == 0;
}

// ---- truncate -------------------------------------------------------------------------------
template <typename T>
bool truncate_case(const char* name, uint32_t rows, uint32_t k, bool write_values, uint32_t grid) {
    std::vector<uint32_t> ks(rows);
    for (auto& v : ks) v = below(4) == 0 ? (below(2) ? 0 : k) : below(k + 1);
    std::vector<T> values((size_t)rows * k);
    std::vector<uint32_t> idx((size_t)rows * k);
    for (size_t e = 0; e < idx.size(); ++e) {
        values[e] = from_f<T>((float)(e % 977));
        idx[e] = (uint32_t)e;
    }
    const auto v0 = values;
    NtkvSelectTruncateParams p{rows, k, write_values ? 1u : 0u, 0};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kSelectThreads, 1, 1}, 0, [&] {
        if constexpr (sizeof(T) == 4) ntkv_select_truncate_f32(p, ks.data(), values.data(), idx.data());
        else if constexpr (std::is_same_v<T, __half>) ntkv_select_truncate_f16(p, ks.data(), values.data(), idx.data());
        else ntkv_select_truncate_bf16(p, ks.data(), values.data(), idx.data());
    });
    size_t bad = 0;
    const T ninf = from_f<T>(-INFINITY);
    for (size_t e = 0; e < idx.size(); ++e) {
        const bool cut = e % k >= ks[e / k];
        if (idx[e] != (cut ? kNone : (uint32_t)e)) ++bad;
        if (bits(values[e]) != bits(cut && write_values ? ninf : v0[e])) ++bad;
    }
    std::printf("%-4s truncate %-5s %-26s rows=%u k=%u write_values=%d grid=%u\n", bad ? "FAIL" : "ok",
                dtype_name<T>(), name, rows, k, write_values, grid);
    return bad == 0;
}

// ---- expand ---------------------------------------------------------------------------------
struct Expand {
    uint32_t rows, kb, nb, t, block_size;  // block_size 0: ranges
    bool map_shared;
    std::vector<uint32_t> blocks, lengths, ranges;
};

// The contract: row r's tokens are the union of its selected blocks' intervals (ids >= nb
// skipped), each clipped to [0, min(lengths[r], t)), sorted and unique.
std::vector<std::vector<uint32_t>> expand_reference(const Expand& c) {
    std::vector<std::vector<uint32_t>> out(c.rows);
    for (uint32_t r = 0; r < c.rows; ++r) {
        const uint64_t len = std::min(c.lengths[r], c.t);
        std::set<uint32_t> tok;
        for (uint32_t i = 0; i < c.kb; ++i) {
            const uint32_t b = c.blocks[(size_t)r * c.kb + i];
            if (b >= c.nb) continue;
            uint64_t s, e;
            if (c.block_size > 0) {
                s = (uint64_t)b * c.block_size;
                e = s + c.block_size;
            } else {
                const size_t m = c.map_shared ? 0 : r;
                s = c.ranges[(m * c.nb + b) * 2];
                e = c.ranges[(m * c.nb + b) * 2 + 1];
            }
            for (uint64_t x = s; x < std::min<uint64_t>(e, len); ++x) tok.insert((uint32_t)x);
        }
        out[r].assign(tok.begin(), tok.end());
    }
    return out;
}

uint32_t next_pow2(uint32_t v) {
    uint32_t p = 1;
    while (p < v) p <<= 1;
    return p;
}

bool expand_case(const char* name, Expand c, uint32_t grid) {
    const uint32_t kbpad = next_pow2(std::max(c.kb, 1u));
    // Capacity as ExpandShape sizes it: rows * the most tokens a row can hold.
    uint64_t per_row = c.t;
    if (c.block_size > 0) per_row = std::min<uint64_t>(per_row, (uint64_t)c.kb * c.block_size);
    const uint64_t capacity = std::max<uint64_t>(1, (uint64_t)c.rows * per_row);
    std::vector<unsigned long long> iv((size_t)c.rows * c.kb + 1, 0x5555555555555555ull);
    std::vector<uint32_t> off((size_t)c.rows * c.kb + 1, kNone - 1), n_iv(c.rows, kNone - 1), counts(c.rows, kNone - 1);
    std::vector<uint32_t> indptr(c.rows + 1, kNone - 1), indices(capacity, kNone - 2);
    std::vector<uint32_t> dummy(2, 0);
    const uint32_t* ranges = c.block_size > 0 ? dummy.data() : c.ranges.data();
    NtkvSelectExpandParams p{c.rows, c.kb, c.nb, c.t, c.block_size, c.map_shared ? 1u : 0u, kbpad, 0};
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kSelectThreads, 1, 1}, kbpad * 8, [&] {
        ntkv_select_expand_count(p, c.blocks.data(), c.lengths.data(), ranges, iv.data(), off.data(), n_iv.data(),
                                 counts.data());
    });
    ntkv_emu::launch(dim3_{1, 1, 1}, dim3_{kScanThreads, 1, 1}, 0,
                     [&] { ntkv_select_expand_scan(p, counts.data(), indptr.data()); });
    ntkv_emu::launch(dim3_{grid, 1, 1}, dim3_{kSelectThreads, 1, 1}, 0, [&] {
        ntkv_select_expand_write(p, iv.data(), off.data(), n_iv.data(), indptr.data(), indices.data());
    });
    const auto want = expand_reference(c);
    size_t bad = 0, total = 0;
    bool ptr_ok = indptr[0] == 0;
    for (uint32_t r = 0; r < c.rows && ptr_ok; ++r) {
        ptr_ok = indptr[r + 1] == indptr[r] + want[r].size();
        if (ptr_ok)
            for (size_t i = 0; i < want[r].size(); ++i) bad += indices[indptr[r] + i] != want[r][i];
        total += want[r].size();
    }
    if (!ptr_ok) ++bad;
    for (size_t i = total; i < indices.size(); ++i) bad += indices[i] != kNone - 2;
    // Pass 1's own outputs: intervals that overlap or touch are merged, so row r's intervals are
    // exactly the maximal runs of consecutive tokens, in order, with their offsets in the row.
    for (uint32_t r = 0; r < c.rows; ++r) {
        uint32_t m = 0, at = 0;
        bool row_ok = counts[r] == want[r].size();
        for (size_t i = 0; i < want[r].size() && row_ok; ++m) {
            size_t j = i + 1;
            while (j < want[r].size() && want[r][j] == want[r][j - 1] + 1) ++j;
            const unsigned long long w = ((unsigned long long)want[r][i] << 32) | (want[r][j - 1] + 1ull);
            row_ok = m < c.kb && iv[(size_t)r * c.kb + m] == w && off[(size_t)r * c.kb + m] == at;
            at += (uint32_t)(j - i);
            i = j;
        }
        bad += !(row_ok && n_iv[r] == m);
    }
    std::printf("%-4s expand   %-32s rows=%u kb=%u nb=%u t=%u %s grid=%u tokens=%zu\n", bad ? "FAIL" : "ok", name,
                c.rows, c.kb, c.nb, c.t,
                c.block_size ? ("block=" + std::to_string(c.block_size)).c_str() : (c.map_shared ? "ranges-shared" : "ranges-per-row"),
                grid, total);
    return bad == 0;
}

// Random block ids in [0, nb], with UINT32_MAX padding (a top-k's empty slots) and repeats.
Expand random_fixed(uint32_t rows, uint32_t kb, uint32_t t, uint32_t block_size) {
    Expand c{rows, kb, (t + block_size - 1) / block_size, t, block_size, false, {}, {}, {}};
    for (uint32_t i = 0; i < rows * kb; ++i) {
        const uint32_t u = below(10);
        c.blocks.push_back(u == 0 ? kNone : u == 1 && i > 0 ? c.blocks.back() : below(c.nb + 1));
    }
    for (uint32_t r = 0; r < rows; ++r) c.lengths.push_back(below(4) == 0 ? t + below(50) : below(t + 1));
    return c;
}

// Random intervals, some empty (start >= end), overlapping, touching, or reaching past t.
Expand random_ranges(uint32_t rows, uint32_t kb, uint32_t nb, uint32_t t, bool shared) {
    Expand c{rows, kb, nb, t, 0, shared, {}, {}, {}};
    const uint32_t maps = shared ? 1 : rows;
    for (uint32_t i = 0; i < maps * nb; ++i) {
        const uint32_t s = below(t + 20), w = below(4) == 0 ? 0 : 1 + below(40);
        c.ranges.push_back(s);
        c.ranges.push_back(below(8) == 0 ? s / 2 : s + w);
        if (below(5) == 0 && i > 0) c.ranges[2 * i] = c.ranges[2 * i - 1];  // touches the previous one
    }
    for (uint32_t i = 0; i < rows * kb; ++i) c.blocks.push_back(below(8) == 0 ? kNone : below(nb + 1));
    for (uint32_t r = 0; r < rows; ++r) c.lengths.push_back(below(3) == 0 ? t : below(t + 1));
    return c;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string only = argc > 1 ? argv[1] : "";
    auto want = [&](const char* part) { return only.empty() || only == part; };
    bool ok = true;
    if (want("pad")) {
        ok &= pad_case<float>("ragged", 7, 40, 150, false, 7);
        ok &= pad_case<float>("grid-stride", 33, 300, 5000, false, 4);
        ok &= pad_case<__half>("hostile indptr", 20, 64, 700, true, 3);
        ok &= pad_case<__nv_bfloat16>("max_len cuts", 9, 5, 200, false, 9);
        ok &= pad_case<float>("empty total", 4, 16, 0, false, 2);
    }
    if (want("truncate")) {
        ok &= truncate_case<float>("values", 9, 37, true, 3);
        ok &= truncate_case<__half>("indices only", 5, 300, false, 2);
        ok &= truncate_case<__nv_bfloat16>("k=1", 40, 1, true, 1);
    }
    if (want("expand")) {
        ok &= expand_case("fixed 16, kb=5 (kbpad 8)", random_fixed(6, 5, 333, 16), 6);
        ok &= expand_case("fixed 1, grid-stride", random_fixed(10, 64, 100, 1), 3);
        ok &= expand_case("fixed 64, kb=1", random_fixed(4, 1, 1000, 64), 4);
        ok &= expand_case("fixed 8, all blocks", random_fixed(3, 130, 1037, 8), 3);
        ok &= expand_case("ranges shared", random_ranges(5, 12, 20, 400, true), 5);
        ok &= expand_case("ranges per row", random_ranges(7, 9, 6, 250, false), 2);
        // More rows than scan threads: the scan's per-thread chunks (3 rows each).
        ok &= expand_case("fixed 16, 2500 rows (scan chunks)", random_fixed(2500, 3, 200, 16), 64);
        Expand none = random_fixed(3, 4, 64, 16);
        std::fill(none.blocks.begin(), none.blocks.end(), kNone);
        ok &= expand_case("nothing selected", none, 3);
    }
    std::printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
