// policy.cu: the device work of the policy family (src/policy) that the shared primitives
// do not already do. The ranking (the radix top-k of topk.cu), the window-to-token expansion
// (select.cu) and the in-place compaction (topk.cu) are reused as they are; these kernels add:
//   ntkv_policy_window_sums:   WindowKV's window scores, one f32 sum per window in token order;
//   ntkv_policy_lazy_update:   LazyEviction's per-token state update (and eviction scores) from
//                              one step's attention mass, elementwise over [hkv, t];
//   ntkv_policy_prefix_cumsum: PrefixKV's entry thresholds from rows sorted descending, f64, in
//                              the fixed chunk order of the Rust docs;
//   ntkv_policy_prefix_probe:  one 8-bit round of the host-driven search for the ratio: for each
//                              of 256 candidate keys, how many thresholds lie at or below it;
//   ntkv_policy_prefix_split:  per row, the thresholds below the ratio and equal to it;
//   ntkv_policy_prefix_keep:   each row's kept prefix of the sorted order, ascending, into CSR.
// Sizes are checked by the Rust launchers; the kernels still clamp what they read from device
// buffers (budgets, token ids, CSR offsets) so no value in them moves an access out of range.
#include "ntkv_common.cuh"

namespace {

constexpr uint32_t kPrefixChunks = 1024;  // PREFIX_SCAN_CHUNKS in src/policy/mod.rs
constexpr uint32_t kPrefixMaxN = 16384;   // MAX_K: rows are sorted by the top-k with k = n
constexpr uint32_t kProbes = 256;         // candidates per search round (8 bits)

// A token's mass: its importance when finite and positive, else 0.
__device__ __forceinline__ double prefix_mass(float x) { return (isfinite(x) && x > 0.0f) ? (double)x : 0.0; }

// Non-negative doubles order as their bit patterns.
__device__ __forceinline__ unsigned long long f64_key(double x) {
    unsigned long long u;
    memcpy(&u, &x, sizeof u);
    return u;
}

// Chunk j of a row of n entries cut into chunks of `per`: [lo, hi), clipped to the row.
__device__ __forceinline__ void chunk_of(uint32_t j, uint32_t per, uint32_t n, uint32_t& lo, uint32_t& hi) {
    const unsigned long long s = (unsigned long long)j * per;
    lo = s < n ? (uint32_t)s : n;
    hi = lo + per < n ? lo + per : n;
}

// Entries of the non-decreasing keys row[0 .. n) that are <= key (upper_bound).
__device__ __forceinline__ uint32_t count_le(const unsigned long long* row, uint32_t n, unsigned long long key) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (row[mid] <= key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Entries of row[0 .. n) that are < key (lower_bound).
__device__ __forceinline__ uint32_t count_lt(const unsigned long long* row, uint32_t n, unsigned long long key) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (row[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

}  // namespace

// Grid-stride over the rows * nw windows; each thread adds one window in token order, so the
// sum has the CPU reference's rounding exactly.
extern "C" __global__ void ntkv_policy_window_sums(const NtkvPolicyWindowParams p, const float* __restrict__ scores,
                                                   float* __restrict__ ws) {
    const unsigned long long total = (unsigned long long)p.rows * p.nw;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long r = e / p.nw;
        const unsigned long long s = (e % p.nw) * p.w;
        const unsigned long long end = s + p.w < p.older ? s + p.w : p.older;
        const float* row = scores + r * p.ld;
        float acc = 0.0f;
        for (unsigned long long j = s; j < end; ++j) acc = acc + row[j];
        ws[e] = acc;
    }
}

// acc += mass; where mass >= hit (the threshold), mri = max(mri, step - last_hit) and last_hit = step;
// with p.scores set, scores = mri - (step - last_hit). Every value is a whole number below
// 2^24 except acc and mass, so the state arithmetic is exact.
extern "C" __global__ void ntkv_policy_lazy_update(const NtkvPolicyLazyParams p, const float* __restrict__ mass,
                                                   float* __restrict__ acc, float* __restrict__ last_hit,
                                                   float* __restrict__ mri, float* __restrict__ scores) {
    const unsigned long long n = (unsigned long long)p.hkv * p.t;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        const float m = mass[e];
        acc[e] = acc[e] + m;
        float lh = last_hit[e], r = mri[e];
        if (m >= p.hit) {
            const float gap = p.step - lh;
            r = gap > r ? gap : r;
            lh = p.step;
            last_hit[e] = lh;
            mri[e] = r;
        }
        if (p.scores) scores[e] = r - (p.step - lh);
    }
}

// One block per row (grid-stride). Chunk j (of kPrefixChunks, ceil(n / 1024) entries each) is
// summed in order by one thread; a chunk's base is the in-order sum of the chunk sums before
// it; each thread then runs its chunk from its base and writes the threshold of the entry
// after each of its entries: keys[r * n + i + 1] = bits(C_i / total), keys[r * n] = bits(0).
extern "C" __global__ void ntkv_policy_prefix_cumsum(const NtkvPolicyPrefixParams p, const float* __restrict__ sorted,
                                                     unsigned long long* __restrict__ keys) {
    __shared__ double chunk_sum[kPrefixChunks];
    const uint32_t n = p.n;
    const uint32_t chunk = (n + kPrefixChunks - 1) / kPrefixChunks;
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const float* row = sorted + (unsigned long long)r * n;
        unsigned long long* out = keys + (unsigned long long)r * n;
        for (uint32_t j = threadIdx.x; j < kPrefixChunks; j += blockDim.x) {
            uint32_t lo, hi;
            chunk_of(j, chunk, n, lo, hi);
            double s = 0.0;
            for (uint32_t i = lo; i < hi; ++i) s += prefix_mass(row[i]);
            chunk_sum[j] = s;
        }
        __syncthreads();
        // Every thread adds the chunk sums in order itself: the same chain of additions as one
        // running sum, so each base and the total round exactly as the CPU reference's.
        double total = 0.0;
        for (uint32_t j = 0; j < kPrefixChunks; ++j) total += chunk_sum[j];
        if (threadIdx.x == 0) out[0] = f64_key(0.0);
        for (uint32_t j = threadIdx.x; j < kPrefixChunks; j += blockDim.x) {
            uint32_t lo, hi;
            chunk_of(j, chunk, n, lo, hi);
            double run = 0.0;
            for (uint32_t i = 0; i < j; ++i) run += chunk_sum[i];
            for (uint32_t i = lo; i < hi; ++i) {
                run += prefix_mass(row[i]);
                if (i + 1 < n) out[i + 1] = f64_key(total > 0.0 ? run / total : 1.0);
            }
        }
        __syncthreads();  // chunk_sum is reused by the next row
    }
}

// counts[d] += entries of every row at or below key | d << bit | (ones below shift), for
// d < 256: one block per row (grid-stride), one binary search per candidate. The launcher
// zeroes counts; integer atomics make the totals independent of the order.
extern "C" __global__ void ntkv_policy_prefix_probe(const NtkvPolicyPrefixParams p,
                                                    const unsigned long long* __restrict__ keys,
                                                    unsigned long long* __restrict__ counts) {
    const uint32_t shift = p.bit < 56u ? p.bit : 56u;
    const unsigned long long low = shift == 0u ? 0ull : ((1ull << shift) - 1ull);
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const unsigned long long* row = keys + (unsigned long long)r * p.n;
        for (uint32_t d = threadIdx.x; d < kProbes; d += blockDim.x) {
            const unsigned long long cand = p.key | ((unsigned long long)d << shift) | low;
            atomicAdd(&counts[d], (unsigned long long)count_le(row, p.n, cand));
        }
    }
}

// split[r * 2] = thresholds of row r below the ratio's key p.key, split[r * 2 + 1] = those
// equal to it (one thread per row, grid-stride).
extern "C" __global__ void ntkv_policy_prefix_split(const NtkvPolicyPrefixParams p,
                                                    const unsigned long long* __restrict__ keys,
                                                    uint32_t* __restrict__ split) {
    for (unsigned long long r = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; r < p.rows;
         r += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long* row = keys + r * p.n;
        const uint32_t below = count_lt(row, p.n, p.key);
        split[r * 2] = below;
        split[r * 2 + 1] = count_le(row, p.n, p.key) - below;
    }
}

// One block per row (grid-stride): marks the tokens of the first budgets[r] sorted entries in
// shared memory, then writes the marked tokens ascending at indices[indptr[r] ..] (each thread
// a contiguous range of tokens, placed after the counts of the threads before it).
extern "C" __global__ void ntkv_policy_prefix_keep(const NtkvPolicyPrefixParams p, const uint32_t* __restrict__ order,
                                                   const uint32_t* __restrict__ budgets,
                                                   const uint32_t* __restrict__ indptr,
                                                   uint32_t* __restrict__ indices) {
    __shared__ unsigned char kept[kPrefixMaxN];
    __shared__ uint32_t part[1024];
    const uint32_t n = p.n < kPrefixMaxN ? p.n : kPrefixMaxN;
    const uint32_t nt = blockDim.x < 1024u ? blockDim.x : 1024u;
    const uint32_t per = (n + nt - 1) / nt;
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const uint32_t b = budgets[r] < n ? budgets[r] : n;
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) kept[i] = 0;
        __syncthreads();
        for (uint32_t i = threadIdx.x; i < b; i += blockDim.x) {
            const uint32_t tok = order[(unsigned long long)r * p.n + i];
            if (tok < n) kept[tok] = 1;
        }
        __syncthreads();
        uint32_t lo = n, hi = n;
        if (threadIdx.x < nt) chunk_of(threadIdx.x, per, n, lo, hi);
        uint32_t c = 0;
        for (uint32_t i = lo; i < hi; ++i) c += kept[i];
        if (threadIdx.x < nt) part[threadIdx.x] = c;
        __syncthreads();
        // Each thread's offset: the counts of the threads before it (nt <= 1024 reads).
        unsigned long long pos = indptr[r];
        for (uint32_t i = 0; i < threadIdx.x && i < nt; ++i) pos += part[i];
        for (uint32_t i = lo; i < hi; ++i) {
            if (!kept[i]) continue;
            if (pos < p.cap) indices[pos] = i;
            ++pos;
        }
        __syncthreads();  // kept and part are reused by the next row
    }
}
