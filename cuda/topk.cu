// topk.cu: exact radix top-k, H2O score accumulation, SnapKV pooling and in-place eviction
// compaction. The row top-k kernels (ntkv_topk_*) also serve the shared `select` module,
// whose own kernels are in select.cu.
//
// Top-k, per row, in three launches over a batch of rows:
//   1. hist:     every block of a row builds a 4096-bin shared histogram of the top 12 bits
//                of the order-preserving key of its chunk and adds it into the row's global
//                histogram (integer atomics: the sum is order independent). The last block of
//                the row to finish (ticket counter) finds the bucket holding the k-th largest
//                key and writes the row's state.
//   2. filter:   every block re-reads its chunk; keys above the bucket go straight to the
//                row's selected list, keys in the bucket to its candidate list.
//   3. finalize: one block per row refines the candidates by an 8-bit radix select on the
//                56-bit composite (key << 24 | (2^24 - 1 - index)), which is unique per
//                element, so "ties by lower index" falls out of the order; it then sorts the
//                k selected composites in shared memory (bitonic) and writes the outputs, and
//                re-zeroes the workspace for the next call.
// The order in which blocks append to the lists is not deterministic, but the lists are
// sets, and the selected set and the sort order are functions of the composites only, so
// the outputs are.
#include "ntkv_common.cuh"

namespace {

constexpr int kHistBits = 12;
constexpr int kHistBins = 1 << kHistBits;       // 4096
constexpr int kKeyLowBits = 32 - kHistBits;     // 20 key bits below the first digit
constexpr int kIdxBits = 24;                    // N <= 2^24
constexpr int kRestBits = kKeyLowBits + kIdxBits;  // 44 bits refined in the finalize kernel
constexpr uint32_t kIdxMask = (1u << kIdxBits) - 1u;
constexpr int kHistThreads = 512;
constexpr int kFinalThreads = 1024;

// Per-row state words in the workspace.
enum StateWord : int {
    kTicket = 0,     // blocks of the row that finished the histogram
    kBucket = 1,     // top-12-bit bucket of the k-th largest key
    kAbove = 2,      // elements in buckets above it (all selected)
    kWant = 3,       // elements still to take from the bucket (>= 1 when kk > 0)
    kCandCount = 4,  // elements in the bucket
    kKk = 5,         // min(k, row length)
    kSelCursor = 6,  // append cursor of the selected list
    kCandCursor = 7, // append cursor of the candidate list
    kStateWords = 8,
};

// The ranking key: order_key of the value widened to f32, with -0 folded into +0 so that the
// two zeros tie (and the lower index wins) instead of +0 ranking above -0.
template <typename T>
__device__ __forceinline__ uint32_t rank_key(T x) {
    float f = ntkv::to_f32(x);
    if (f == 0.0f) f = 0.0f;
    return ntkv::order_key(f);
}

__device__ __forceinline__ uint32_t row_length(const NtkvTopkParams& p, const uint32_t* lengths, uint32_t row) {
    uint32_t len = p.has_lengths ? lengths[row] : p.uniform_len;
    return len < p.n ? len : p.n;
}

// Exclusive suffix sum over the threads of a block (sum of v over threads with a higher id).
// `scratch` holds at least 32 u32. Every thread of the block must call it.
__device__ __forceinline__ uint32_t block_exclusive_suffix_sum(uint32_t v, uint32_t* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    const uint32_t x = ntkv::warp_suffix_sum(v);  // inclusive suffix within the warp
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        uint32_t w = lane < nwarps ? scratch[lane] : 0u;
        const uint32_t s = ntkv::warp_suffix_sum(w);
        __syncwarp();
        if (lane < nwarps) scratch[lane] = s - w;  // exclusive suffix over warps
    }
    __syncthreads();
    uint32_t r = x - v + scratch[warp];
    __syncthreads();
    return r;
}

// Appends index i to list[...] when `take`; one global atomic per warp.
__device__ __forceinline__ void warp_append(bool take, uint32_t i, uint32_t* cursor, uint32_t* list, uint32_t cap) {
    const unsigned mask = __ballot_sync(0xffffffffu, take);
    if (mask == 0u) return;
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(mask) - 1;
    uint32_t base = 0;
    if (lane == leader) base = atomicAdd(cursor, (uint32_t)__popc(mask));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (take) {
        const uint32_t pos = base + (uint32_t)__popc(mask & ((1u << lane) - 1u));
        if (pos < cap) list[pos] = i;
    }
}

// Whether every row of x starts at a multiple of 4 elements' bytes, so whole quads can be
// loaded as vectors: the row stride is a multiple of 4 and x itself is aligned (a borrowed
// view may start anywhere inside a larger buffer).
template <typename T>
__device__ __forceinline__ bool quad_aligned(const NtkvTopkParams& p, const T* x) {
    return p.row_stride % 4 == 0 && reinterpret_cast<unsigned long long>(x) % (4 * sizeof(T)) == 0;
}

// Keys of the four consecutive elements at ptr, which is aligned to 4 elements (one 16-byte
// load for f32, one 8-byte load for f16/bf16).
template <typename T>
__device__ __forceinline__ void load_quad_keys(const T* ptr, uint32_t (&k)[4]) {
    if constexpr (sizeof(T) == 4) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(ptr));
        k[0] = rank_key(v.x);
        k[1] = rank_key(v.y);
        k[2] = rank_key(v.z);
        k[3] = rank_key(v.w);
    } else {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(ptr));
        T e[4];
        memcpy(e, &v, sizeof(v));
#pragma unroll
        for (int u = 0; u < 4; ++u) k[u] = rank_key(e[u]);
    }
}

// Adds the top-12-bit bins of the keys of xr[start .. end) into the shared histogram.
// `vec`: xr + start is aligned to 4 elements, so whole quads are loaded as vectors.
template <typename T>
__device__ __forceinline__ void hist_range(const T* __restrict__ xr, uint32_t start, uint32_t end, bool vec,
                                           uint32_t* hist) {
    if (end <= start) return;
    const uint32_t step = blockDim.x;
    if (vec) {
        const uint32_t nq = (end - start) / 4;
        // Two quads (eight elements) in flight per thread before the shared atomics.
        for (uint32_t qi = threadIdx.x; qi < nq; qi += 2u * step) {
            uint32_t ka[4], kb[4] = {0u, 0u, 0u, 0u};
            const bool okb = qi + step < nq;
            load_quad_keys(xr + start + 4u * qi, ka);
            if (okb) load_quad_keys(xr + start + 4u * (qi + step), kb);
#pragma unroll
            for (int u = 0; u < 4; ++u) atomicAdd(&hist[ka[u] >> kKeyLowBits], 1u);
            if (okb) {
#pragma unroll
                for (int u = 0; u < 4; ++u) atomicAdd(&hist[kb[u] >> kKeyLowBits], 1u);
            }
        }
        const uint32_t i = start + 4u * nq + threadIdx.x;
        if (i < end) atomicAdd(&hist[rank_key(xr[i]) >> kKeyLowBits], 1u);
        return;
    }
    // Four loads in flight per thread before the shared atomics.
    for (uint32_t base = start + threadIdx.x; base < end; base += 4u * step) {
        uint32_t kv[4];
        bool ok[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const uint32_t i = base + (uint32_t)u * step;
            ok[u] = i < end;
            kv[u] = ok[u] ? rank_key(xr[i]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (ok[u]) atomicAdd(&hist[kv[u] >> kKeyLowBits], 1u);
    }
}

// Appends the indices of xr[start .. end) whose bin is above `bucket` to sel and those in it
// to cand. Every loop bound is uniform per warp, so all lanes reach the ballots.
template <typename T>
__device__ __forceinline__ void filter_range(const T* __restrict__ xr, uint32_t start, uint32_t end, bool vec,
                                             uint32_t bucket, uint32_t* sel_cursor, uint32_t* sel, uint32_t sel_cap,
                                             uint32_t* cand_cursor, uint32_t* cand, uint32_t cand_cap) {
    if (end <= start) return;
    const uint32_t step = blockDim.x;
    const uint32_t lane = threadIdx.x & 31u;
    if (vec) {
        const uint32_t nq = (end - start) / 4;
        for (uint32_t qb = threadIdx.x & ~31u; qb < nq; qb += step) {
            const uint32_t qi = qb + lane;
            const bool ok = qi < nq;
            // Lanes past the end load quad 0 again (in bounds) and take nothing: no divergent
            // branch ahead of the ballots.
            uint32_t kq[4];
            load_quad_keys(xr + start + 4u * (ok ? qi : 0u), kq);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const uint32_t i = start + 4u * qi + (uint32_t)u;
                const uint32_t bin = kq[u] >> kKeyLowBits;
                warp_append(ok && bin > bucket, i, sel_cursor, sel, sel_cap);
                warp_append(ok && bin == bucket, i, cand_cursor, cand, cand_cap);
            }
        }
        // The last (end - start) % 4 elements, by warp 0 (every warp runs the ballots, with
        // nothing to take outside warp 0, so no shuffle sits in a divergent branch).
        const uint32_t i = start + 4u * nq + lane;
        const bool ok = threadIdx.x < 32u && i < end;
        const uint32_t bin = ok ? (rank_key(xr[i]) >> kKeyLowBits) : 0u;
        warp_append(ok && bin > bucket, i, sel_cursor, sel, sel_cap);
        warp_append(ok && bin == bucket, i, cand_cursor, cand, cand_cap);
        return;
    }
    for (uint32_t base = start + (threadIdx.x & ~31u); base < end; base += 4u * step) {
        uint32_t kv[4];
        bool ok[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const uint32_t i = base + lane + (uint32_t)u * step;
            ok[u] = i < end;
            kv[u] = ok[u] ? rank_key(xr[i]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const uint32_t i = base + lane + (uint32_t)u * step;
            const uint32_t bin = kv[u] >> kKeyLowBits;
            warp_append(ok[u] && bin > bucket, i, sel_cursor, sel, sel_cap);
            warp_append(ok[u] && bin == bucket, i, cand_cursor, cand, cand_cap);
        }
    }
}

// ---- 1. histogram -----------------------------------------------------------------------

template <typename T>
__device__ void topk_hist(const NtkvTopkParams& p, const T* __restrict__ x, const uint32_t* __restrict__ lengths,
                          uint32_t* __restrict__ g_hist, uint32_t* __restrict__ g_state) {
    __shared__ uint32_t hist[kHistBins];
    __shared__ uint32_t scratch[32];
    __shared__ uint32_t is_last;
    const uint32_t b = blockIdx.y;
    if (b >= p.rows) return;
    const uint32_t row = p.row_base + b;
    const uint32_t len = row_length(p, lengths, row);
    const uint32_t kk = p.k < len ? p.k : len;
    for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) hist[i] = 0u;
    __syncthreads();

    const T* xr = x + (uint64_t)row * p.row_stride;
    const uint64_t start = (uint64_t)blockIdx.x * p.chunk;
    const uint64_t end = start + p.chunk < (uint64_t)len ? start + p.chunk : (uint64_t)len;
    if (start < end) hist_range(xr, (uint32_t)start, (uint32_t)end, quad_aligned(p, x), hist);
    __syncthreads();
    uint32_t* gh = g_hist + (uint64_t)b * kHistBins;
    for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) {
        const uint32_t c = hist[i];
        if (c) atomicAdd(&gh[i], c);
    }
    __threadfence();
    __syncthreads();
    uint32_t* st = g_state + (uint64_t)b * kStateWords;
    if (threadIdx.x == 0) {
        const uint32_t ticket = atomicAdd(&st[kTicket], 1u);
        is_last = (ticket == p.blocks_per_row - 1u) ? 1u : 0u;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    // The last block of the row: find the bucket of the kk-th largest key.
    // Thread t owns bins [t*per, (t+1)*per); higher bins hold larger keys.
    const int per = kHistBins / kHistThreads;  // 8 (the kernel is launched with 512 threads)
    uint32_t mine[kHistBins / kHistThreads];
    uint32_t total = 0;
#pragma unroll
    for (int j = 0; j < per; ++j) {
        mine[j] = __ldcg(&gh[threadIdx.x * per + j]);
        total += mine[j];
    }
    const uint32_t above_me = block_exclusive_suffix_sum(total, scratch);
    if (kk == 0) {
        if (threadIdx.x == 0) {
            st[kBucket] = 0xffffffffu;
            st[kAbove] = 0u;
            st[kWant] = 0u;
            st[kCandCount] = 0u;
            st[kKk] = 0u;
            st[kTicket] = 0u;
        }
        return;
    }
    uint32_t running = above_me;
#pragma unroll
    for (int j = per - 1; j >= 0; --j) {
        const uint32_t c = mine[j];
        if (running < kk && running + c >= kk) {
            // Exactly one bin of the row satisfies this.
            st[kBucket] = threadIdx.x * per + j;
            st[kAbove] = running;
            st[kWant] = kk - running;
            st[kCandCount] = c;
            st[kKk] = kk;
            st[kTicket] = 0u;
        }
        running += c;
    }
}

// ---- 2. filter --------------------------------------------------------------------------

// Each block appends its chunk's selected and candidate indices to two lists in shared memory,
// then reserves room in the row's global lists with one atomicAdd per list and copies them
// out (a flush). A tile is kFilterTile elements (two quads per thread); a flush happens at the
// end of the chunk, and before that only when a list holds more than kListCap - kFilterTile
// entries, so the next tile always fits: one reservation per block and list unless a block
// has more than kListCap - kFilterTile entries (tie-heavy rows).
constexpr int kFilterQuads = 2;
constexpr uint32_t kFilterTile = kHistThreads * 4 * kFilterQuads;  // 4096 elements
constexpr uint32_t kListCap = 5632;  // entries per shared list (2 x 22 KiB)
constexpr uint32_t kFlushAbove = kListCap - kFilterTile;

// Exclusive prefix sum over the warp (v of lanes below this one); also returns the warp total.
__device__ __forceinline__ uint32_t warp_exclusive_sum(uint32_t v, uint32_t& total) {
    const uint32_t lane = threadIdx.x & 31u;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= (uint32_t)o) x += y;
    }
    total = __shfl_sync(0xffffffffu, x, 31);
    return x - v;
}

struct FilterLists {
    uint32_t sel[kListCap];
    uint32_t cand[kListCap];
    uint32_t fill;      // entries in sel (low 16 bits) and cand (high 16 bits)
    uint32_t over[3];   // tile t sets over[t % 3] when a list passed kFlushAbove
    uint32_t n_sel, n_cand, base_sel, base_cand;
};

// Copies the shared lists into the row's global lists behind one reservation per non-empty
// list, and empties them. Every thread of the block calls it, after a barrier that follows
// the last append.
__device__ __forceinline__ void flush_lists(FilterLists& sh, uint32_t* sel_cursor, uint32_t* sel, uint32_t sel_cap,
                                            uint32_t* cand_cursor, uint32_t* cand, uint32_t cand_cap) {
    if (threadIdx.x == 0) {
        const uint32_t fill = sh.fill;
        sh.n_sel = fill & 0xffffu;
        sh.n_cand = fill >> 16;
        sh.base_sel = sh.n_sel ? atomicAdd(sel_cursor, sh.n_sel) : 0u;
        sh.base_cand = sh.n_cand ? atomicAdd(cand_cursor, sh.n_cand) : 0u;
        sh.fill = 0u;
    }
    __syncthreads();
    const uint32_t ns = sh.n_sel, nc = sh.n_cand, bs = sh.base_sel, bc = sh.base_cand;
    for (uint32_t i = threadIdx.x; i < ns; i += blockDim.x)
        if (bs + i < sel_cap) sel[bs + i] = sh.sel[i];
    for (uint32_t i = threadIdx.x; i < nc; i += blockDim.x)
        if (bc + i < cand_cap) cand[bc + i] = sh.cand[i];
    // The next tile's appends overwrite the entries just copied.
    __syncthreads();
}

// Appends the indices of xr[start .. end) whose bin is above `bucket` to sel and those in it
// to cand, through the block's shared lists. Every loop bound is uniform per block.
template <typename T>
__device__ __forceinline__ void filter_chunk(const T* __restrict__ xr, uint32_t start, uint32_t end, bool vec,
                                             uint32_t bucket, FilterLists& sh, uint32_t* sel_cursor, uint32_t* sel,
                                             uint32_t sel_cap, uint32_t* cand_cursor, uint32_t* cand,
                                             uint32_t cand_cap) {
    const uint32_t len = end > start ? end - start : 0u;
    const uint32_t nquads = (len + 3u) / 4u;  // the last one may be partial
    const uint32_t full = len / 4u;
    const uint32_t lane = threadIdx.x & 31u;
    if (threadIdx.x == 0) {
        sh.fill = 0u;
        sh.over[0] = sh.over[1] = sh.over[2] = 0u;
    }
    __syncthreads();
    uint32_t tile = 0;
    for (uint32_t q0 = 0; q0 < nquads; q0 += kHistThreads * kFilterQuads, ++tile) {
        // over[(tile + 1) % 3] was last read after the barrier of tile - 2, which every thread
        // has passed by now; the next writer is tile + 1, after this tile's barrier.
        if (threadIdx.x == 0) sh.over[(tile + 1u) % 3u] = 0u;
        uint32_t kq[kFilterQuads][4];
        bool okq[kFilterQuads][4];
#pragma unroll
        for (int u = 0; u < kFilterQuads; ++u) {
            const uint32_t qi = q0 + (uint32_t)u * kHistThreads + threadIdx.x;
            if (vec && qi < full) {
                load_quad_keys(xr + start + 4u * qi, kq[u]);
#pragma unroll
                for (int e = 0; e < 4; ++e) okq[u][e] = true;
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const uint32_t i = 4u * qi + (uint32_t)e;
                    okq[u][e] = qi < nquads && i < len;
                    kq[u][e] = okq[u][e] ? rank_key(xr[start + i]) : 0u;
                }
            }
        }
        uint32_t ns = 0, nc = 0;
#pragma unroll
        for (int u = 0; u < kFilterQuads; ++u)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t bin = kq[u][e] >> kKeyLowBits;
                ns += (okq[u][e] && bin > bucket) ? 1u : 0u;
                nc += (okq[u][e] && bin == bucket) ? 1u : 0u;
            }
        // One shared atomic per warp for both lists (two 16-bit halves: fill <= kListCap).
        uint32_t total;
        const uint32_t off = warp_exclusive_sum(ns | (nc << 16), total);
        uint32_t base = 0;
        if (lane == 31u) {
            base = atomicAdd(&sh.fill, total);
            const uint32_t post = base + total;
            if ((post & 0xffffu) > kFlushAbove || (post >> 16) > kFlushAbove) sh.over[tile % 3u] = 1u;
        }
        base = __shfl_sync(0xffffffffu, base, 31) + off;
        uint32_t ps = base & 0xffffu, pc = base >> 16;
#pragma unroll
        for (int u = 0; u < kFilterQuads; ++u)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t bin = kq[u][e] >> kKeyLowBits;
                const uint32_t i = start + 4u * (q0 + (uint32_t)u * kHistThreads + threadIdx.x) + (uint32_t)e;
                if (okq[u][e] && bin > bucket) sh.sel[ps++] = i;
                if (okq[u][e] && bin == bucket) sh.cand[pc++] = i;
            }
        __syncthreads();
        if (sh.over[tile % 3u]) flush_lists(sh, sel_cursor, sel, sel_cap, cand_cursor, cand, cand_cap);
    }
    flush_lists(sh, sel_cursor, sel, sel_cap, cand_cursor, cand, cand_cap);
}

template <typename T>
__device__ void topk_filter(const NtkvTopkParams& p, const T* __restrict__ x, const uint32_t* __restrict__ lengths,
                            uint32_t* __restrict__ g_state, uint32_t* __restrict__ g_sel,
                            uint32_t* __restrict__ g_cand) {
    __shared__ FilterLists sh;
    const uint32_t bx = p.reverse_filter ? (gridDim.x - 1u - blockIdx.x) : blockIdx.x;
    const uint32_t b = p.reverse_filter ? (gridDim.y - 1u - blockIdx.y) : blockIdx.y;
    if (b >= p.rows) return;
    const uint32_t row = p.row_base + b;
    const uint32_t len = row_length(p, lengths, row);
    uint32_t* st = g_state + (uint64_t)b * kStateWords;
    const uint32_t kk = st[kKk];
    if (kk == 0u) return;
    const uint32_t bucket = st[kBucket];
    const T* xr = x + (uint64_t)row * p.row_stride;
    uint32_t* sel = g_sel + (uint64_t)b * p.k;
    uint32_t* cand = g_cand + (uint64_t)b * p.cand_stride;
    const uint64_t start = (uint64_t)bx * p.chunk;
    const uint64_t end = start + p.chunk < (uint64_t)len ? start + p.chunk : (uint64_t)len;
    if (start < end) {
        filter_chunk(xr, (uint32_t)start, (uint32_t)end, quad_aligned(p, x), bucket, sh, &st[kSelCursor], sel, p.k,
                     &st[kCandCursor], cand, (uint32_t)p.cand_stride);
    }
}

// ---- 3. finalize ------------------------------------------------------------------------

// The low 44 bits of the composite: 20 key bits below the bucket, then the reversed index.
__device__ __forceinline__ uint64_t rest_bits(uint32_t key, uint32_t idx) {
    return ((uint64_t)(key & ((1u << kKeyLowBits) - 1u)) << kIdxBits) | (uint64_t)(kIdxMask - idx);
}

// Sort word: larger sorts first. By value: key, then lower index. By index: lower index.
// Real words are never 0 (idx < 2^24), so 0 pads the sort.
__device__ __forceinline__ uint64_t sort_word(uint32_t key, uint32_t idx, bool by_index) {
    const uint64_t rev = (uint64_t)(0xffffffffu - idx);
    return by_index ? rev : (((uint64_t)key << 32) | rev);
}

// One step of a radix select, once every thread has counted the matching words' next digit
// into hist[0 .. 256): digit d (owned by thread d) holds rank need - 1 when
// above(d) < need <= above(d) + hist[d], and its thread narrows the shared state to it.
// Every thread of the block calls it (the suffix sum is block-wide).
__device__ __forceinline__ void radix_pick_digit(const uint32_t* hist, uint32_t need, uint64_t prefix, int bits,
                                                 int width, uint32_t* scratch, uint32_t& s_need, uint32_t& s_match,
                                                 unsigned long long& s_prefix, int& s_bits) {
    const uint32_t cnt = threadIdx.x < 256 ? hist[threadIdx.x] : 0u;
    const uint32_t above_d = block_exclusive_suffix_sum(cnt, scratch);
    if (threadIdx.x < 256 && above_d < need && above_d + cnt >= need) {
        s_need = need - above_d;
        s_match = cnt;
        s_prefix = (prefix << width) | threadIdx.x;
        s_bits = bits + width;
    }
}

// The word of rank r (0 = the largest) among buf[0 .. n), by an 8-bit radix select from bit
// `top` down; bits at and above `top` are 0 in every word. Nonzero words are distinct and
// r is below their count, so the word found is real. Every thread of the block calls it.
__device__ uint64_t block_select_rank(const unsigned long long* buf, uint32_t n, uint32_t r, int top,
                                      uint32_t* dhist, uint32_t* scratch) {
    __shared__ uint32_t r_need, r_match;
    __shared__ unsigned long long r_prefix, r_found;
    __shared__ int r_bits;
    if (threadIdx.x == 0) {
        r_need = r + 1u;
        r_match = n;
        r_prefix = 0ull;
        r_bits = 64 - top;
    }
    __syncthreads();
    while (true) {
        const uint32_t need = r_need;
        const uint32_t match = r_match;
        const int bits = r_bits;
        const uint64_t prefix = r_prefix;
        if (match <= 1u || bits >= 64) break;
        const int shift = 64 - bits - 8;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) dhist[i] = 0u;
        __syncthreads();
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            const uint64_t w = buf[i];
            if (bits == 0 || (w >> (64 - bits)) == prefix) atomicAdd(&dhist[(uint32_t)(w >> shift) & 255u], 1u);
        }
        __syncthreads();
        radix_pick_digit(dhist, need, prefix, bits, 8, scratch, r_need, r_match, r_prefix, r_bits);
        __syncthreads();
    }
    const int bits = r_bits;
    const uint64_t prefix = r_prefix;
    uint64_t word = prefix;
    if (bits < 64) {
        // Exactly one word carries the prefix.
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            const uint64_t w = buf[i];
            if (bits == 0 || (w >> (64 - bits)) == prefix) r_found = w;
        }
        __syncthreads();
        word = r_found;
    }
    // The next call rewrites the shared words.
    __syncthreads();
    return word;
}

// Refines the candidates, gathers the kk selected and writes slice `slice` of `nslices` of
// output row `row`: slots [slice * kpad / nslices, (slice + 1) * kpad / nslices). With one
// slice the block sorts all kpad words. Otherwise it finds the words of the slice's first and
// last-plus-one ranks (radix selects), keeps the words between them and sorts only those.
// Every block of the row gathers the same set, so the slices tile the sorted row whatever
// order the lists were appended in. `above` entries of sel and `ncand` of cand are valid;
// `want` (>= 1 when kk > 0) candidates are taken. sel and cand are not __restrict__: the
// fused kernel wrote them earlier in the same launch.
template <typename T>
__device__ void finalize_row(const NtkvTopkParams& p, const T* __restrict__ xr, uint32_t row, uint32_t kk,
                             uint32_t above, uint32_t want, uint32_t ncand, const uint32_t* sel, const uint32_t* cand,
                             T* __restrict__ out_val, uint32_t* __restrict__ out_idx, uint32_t slice,
                             uint32_t nslices) {
    NTKV_DYNAMIC_SMEM(unsigned long long, sort_buf);  // kpad sort words, then cand_stage candidates
    __shared__ uint32_t dhist[256];
    __shared__ uint32_t scratch[32];
    __shared__ uint32_t s_need, s_match, s_fill, s_kept;
    __shared__ unsigned long long s_prefix;
    __shared__ int s_bits;
    const bool by_index = p.order_by_index != 0u;

    // Stage the candidates as (key << 32 | index) when they fit, so the refinement passes read
    // shared memory instead of gathering from the row again.
    unsigned long long* cbuf = sort_buf + p.kpad;
    const bool staged = ncand <= p.cand_stage;
    if (kk > 0u && staged) {
        for (uint32_t c = threadIdx.x; c < ncand; c += blockDim.x) {
            const uint32_t idx = cand[c] < p.n ? cand[c] : 0u;
            cbuf[c] = ((unsigned long long)rank_key(xr[idx]) << 32) | idx;
        }
    }
    auto load_cand = [&](uint32_t c, uint32_t& key, uint32_t& idx) {
        if (staged) {
            const unsigned long long w = cbuf[c];
            key = (uint32_t)(w >> 32);
            idx = (uint32_t)w;
        } else {
            idx = cand[c] < p.n ? cand[c] : 0u;
            key = rank_key(xr[idx]);
        }
    };
    if (threadIdx.x == 0) {
        s_need = want;
        s_match = ncand;
        s_prefix = 0ull;
        s_bits = 0;
        s_fill = 0u;
    }
    __syncthreads();

    // Radix refine over the candidates until every candidate matching the prefix is wanted.
    // need <= match always holds; at 44 bits match <= 1 (composites are unique), so it ends.
    if (kk > 0u) {
        while (true) {
            const uint32_t need = s_need;
            const uint32_t match = s_match;
            const int bits = s_bits;
            const uint64_t prefix = s_prefix;
            if (need >= match || bits >= kRestBits) break;
            const int width = (kRestBits - bits) >= 8 ? 8 : (kRestBits - bits);
            const int shift = kRestBits - bits - width;
            for (int i = threadIdx.x; i < 256; i += blockDim.x) dhist[i] = 0u;
            __syncthreads();
            for (uint32_t c = threadIdx.x; c < ncand; c += blockDim.x) {
                uint32_t key, idx;
                load_cand(c, key, idx);
                const uint64_t r = rest_bits(key, idx);
                if (bits == 0 || (r >> (kRestBits - bits)) == prefix) {
                    atomicAdd(&dhist[(uint32_t)(r >> shift) & ((1u << width) - 1u)], 1u);
                }
            }
            __syncthreads();
            radix_pick_digit(dhist, need, prefix, bits, width, scratch, s_need, s_match, s_prefix, s_bits);
            __syncthreads();
        }
    }
    const int bits = s_bits;
    const uint64_t threshold = s_prefix << (kRestBits - bits);

    // Gather the kk selected sort words: the ones above the bucket, then the candidates at or
    // above the threshold (exactly `want` of them).
    const uint32_t kpad = p.kpad;
    for (uint32_t i = threadIdx.x; i < kpad; i += blockDim.x) {
        uint64_t w = 0ull;
        if (kk > 0u && i < above && i < p.k) {
            const uint32_t idx = sel[i] < p.n ? sel[i] : 0u;
            w = sort_word(rank_key(xr[idx]), idx, by_index);
        }
        sort_buf[i] = w;
    }
    __syncthreads();
    if (kk > 0u) {
        for (uint32_t c = threadIdx.x; c < ncand; c += blockDim.x) {
            uint32_t key, idx;
            load_cand(c, key, idx);
            if (rest_bits(key, idx) >= threshold) {
                const uint32_t pos = above + atomicAdd(&s_fill, 1u);
                if (pos < kpad) sort_buf[pos] = sort_word(key, idx, by_index);
            }
        }
    }
    __syncthreads();

    // The slots this block writes: [lo, lo + width), sorted descending in sort_buf[0 .. width).
    const uint32_t width = kpad / nslices;  // both powers of two, nslices <= kpad
    const uint32_t lo = slice * width;
    if (nslices > 1u && lo < kk) {
        const uint32_t hi = lo + width < kk ? lo + width : kk;
        const int top = by_index ? 32 : 64;
        const uint64_t w_lo = block_select_rank(sort_buf, kpad, lo, top, dhist, scratch);
        const uint64_t w_hi = hi < kk ? block_select_rank(sort_buf, kpad, hi, top, dhist, scratch) : 0ull;
        if (threadIdx.x == 0) s_kept = 0u;
        __syncthreads();
        // Compaction in place, one block-width at a time: a word is written below the count of
        // kept words read so far, so only words already read (barrier) are overwritten.
        for (uint32_t c = 0; c < kpad; c += blockDim.x) {
            const uint32_t i = c + threadIdx.x;
            const uint64_t w = i < kpad ? sort_buf[i] : 0ull;
            __syncthreads();
            if (i < kpad && w <= w_lo && w > w_hi) sort_buf[atomicAdd(&s_kept, 1u)] = w;
        }
        __syncthreads();
        for (uint32_t i = hi - lo + threadIdx.x; i < width; i += blockDim.x) sort_buf[i] = 0ull;
        __syncthreads();
    }
    // Descending; width is a power of two.
    if (nslices == 1u || lo < kk) ntkv::block_bitonic_sort(sort_buf, width, true);

    const uint64_t obase = (uint64_t)row * p.out_stride;
    for (uint32_t s = threadIdx.x; s < width && lo + s < p.k; s += blockDim.x) {
        const uint32_t slot = lo + s;
        uint32_t idx = 0xffffffffu;
        float v = -INFINITY;
        T val = ntkv::from_f32<T>(v);
        if (slot < kk) {
            idx = 0xffffffffu - (uint32_t)(sort_buf[s] & 0xffffffffull);
            if (idx < p.n) {
                val = xr[idx];
            } else {
                idx = 0xffffffffu;
            }
        }
        out_idx[obase + slot] = idx;
        if (p.write_values) out_val[obase + slot] = val;
    }
    if (slice != 0u) return;
    // The recent window of an eviction keep list, after the selected indices.
    for (uint32_t i = threadIdx.x; i < p.tail_count; i += blockDim.x) out_idx[obase + p.k + i] = p.tail_first + i;
}

template <typename T>
__device__ void topk_finalize(const NtkvTopkParams& p, const T* __restrict__ x, uint32_t* __restrict__ g_hist,
                              uint32_t* __restrict__ g_state, const uint32_t* __restrict__ g_sel,
                              const uint32_t* __restrict__ g_cand, T* __restrict__ out_val,
                              uint32_t* __restrict__ out_idx) {
    __shared__ uint32_t s_last;
    const uint32_t b = blockIdx.y;
    if (b >= p.rows) return;
    const uint32_t row = p.row_base + b;
    const T* xr = x + (uint64_t)row * p.row_stride;
    uint32_t* st = g_state + (uint64_t)b * kStateWords;
    const uint32_t kk = st[kKk];
    const uint32_t above = st[kAbove];
    const uint32_t want = st[kWant];
    const uint32_t ncand = st[kCandCount] < (uint32_t)p.cand_stride ? st[kCandCount] : (uint32_t)p.cand_stride;
    finalize_row<T>(p, xr, row, kk, above, want, ncand, g_sel + (uint64_t)b * p.k, g_cand + (uint64_t)b * p.cand_stride,
                    out_val, out_idx, blockIdx.x, gridDim.x);

    // The last block of the row to finish (ticket; nobody waits) leaves the workspace zeroed
    // for the next call: every block has read the state words before taking its ticket.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = (atomicAdd(&st[kTicket], 1u) == gridDim.x - 1u) ? 1u : 0u;
    __syncthreads();
    if (!s_last) return;
    uint32_t* gh = g_hist + (uint64_t)b * kHistBins;
    for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) gh[i] = 0u;
    if (threadIdx.x < kStateWords) st[threadIdx.x] = 0u;
}

// One block (kFinalThreads) per row, everything in one launch: the histogram lives in shared
// memory, the bucket search, filter, refinement and sort follow after block barriers. Used
// when there are enough rows to fill the device one block per row.
template <typename T>
__device__ void topk_fused(const NtkvTopkParams& p, const T* __restrict__ x, const uint32_t* __restrict__ lengths,
                           uint32_t* g_sel, uint32_t* g_cand, T* __restrict__ out_val, uint32_t* __restrict__ out_idx) {
    __shared__ uint32_t fhist[kHistBins];
    __shared__ uint32_t fscratch[32];
    __shared__ uint32_t s_bucket, s_above, s_want, s_ncand, s_sel_cursor, s_cand_cursor;
    const uint32_t b = blockIdx.x;
    if (b >= p.rows) return;
    const uint32_t row = p.row_base + b;
    const uint32_t len = row_length(p, lengths, row);
    const uint32_t kk = p.k < len ? p.k : len;
    const T* xr = x + (uint64_t)row * p.row_stride;
    uint32_t* sel = g_sel + (uint64_t)b * p.k;
    uint32_t* cand = g_cand + (uint64_t)b * p.cand_stride;
    for (int i = threadIdx.x; i < kHistBins; i += blockDim.x) fhist[i] = 0u;
    if (threadIdx.x == 0) {
        s_bucket = 0xffffffffu;
        s_above = 0u;
        s_want = 0u;
        s_ncand = 0u;
        s_sel_cursor = 0u;
        s_cand_cursor = 0u;
    }
    __syncthreads();
    const bool vec = quad_aligned(p, x);
    hist_range(xr, 0u, len, vec, fhist);
    __syncthreads();
    if (kk > 0u) {
        // Thread t owns bins [t*per, (t+1)*per) (the kernel runs with kFinalThreads threads).
        constexpr int per = kHistBins / kFinalThreads;
        uint32_t mine[per];
        uint32_t total = 0;
#pragma unroll
        for (int j = 0; j < per; ++j) {
            mine[j] = fhist[threadIdx.x * per + j];
            total += mine[j];
        }
        uint32_t running = block_exclusive_suffix_sum(total, fscratch);
#pragma unroll
        for (int j = per - 1; j >= 0; --j) {
            const uint32_t c = mine[j];
            if (running < kk && running + c >= kk) {
                s_bucket = threadIdx.x * per + j;
                s_above = running;
                s_want = kk - running;
                s_ncand = c;
            }
            running += c;
        }
    }
    __syncthreads();
    const uint32_t bucket = s_bucket;
    if (kk > 0u) {
        filter_range(xr, 0u, len, vec, bucket, &s_sel_cursor, sel, p.k, &s_cand_cursor, cand, (uint32_t)p.cand_stride);
    }
    __syncthreads();
    const uint32_t ncand = s_ncand < (uint32_t)p.cand_stride ? s_ncand : (uint32_t)p.cand_stride;
    finalize_row<T>(p, xr, row, kk, s_above, s_want, ncand, sel, cand, out_val, out_idx, 0u, 1u);
}

}  // namespace

#define NTKV_TOPK_KERNELS(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(kHistThreads)                                                        \
        ntkv_topk_hist_##SUFFIX(const NtkvTopkParams p, const T* __restrict__ x, const uint32_t* __restrict__ lengths, \
                                uint32_t* __restrict__ hist, uint32_t* __restrict__ state) {                          \
        topk_hist<T>(p, x, lengths, hist, state);                                                                     \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(kHistThreads) ntkv_topk_filter_##SUFFIX(                             \
        const NtkvTopkParams p, const T* __restrict__ x, const uint32_t* __restrict__ lengths,                        \
        uint32_t* __restrict__ state, uint32_t* __restrict__ sel, uint32_t* __restrict__ cand) {                      \
        topk_filter<T>(p, x, lengths, state, sel, cand);                                                              \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(kFinalThreads) ntkv_topk_finalize_##SUFFIX(                          \
        const NtkvTopkParams p, const T* __restrict__ x, uint32_t* __restrict__ hist, uint32_t* __restrict__ state,   \
        const uint32_t* __restrict__ sel, const uint32_t* __restrict__ cand, T* __restrict__ out_val,                 \
        uint32_t* __restrict__ out_idx) {                                                                             \
        topk_finalize<T>(p, x, hist, state, sel, cand, out_val, out_idx);                                             \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(kFinalThreads) ntkv_topk_fused_##SUFFIX(                             \
        const NtkvTopkParams p, const T* __restrict__ x, const uint32_t* __restrict__ lengths, uint32_t* sel,         \
        uint32_t* cand, T* __restrict__ out_val, uint32_t* __restrict__ out_idx) {                                    \
        topk_fused<T>(p, x, lengths, sel, cand, out_val, out_idx);                                                    \
    }

NTKV_TOPK_KERNELS(f32, float)
NTKV_TOPK_KERNELS(f16, __half)
NTKV_TOPK_KERNELS(bf16, __nv_bfloat16)

// Writes the recent window: out[r, col_start + i] = first_index + i for i < count.
extern "C" __global__ void ntkv_topk_fill_recent(const NtkvFillRecentParams p, uint32_t* __restrict__ out) {
    const uint64_t total = (uint64_t)p.rows * p.count;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t r = (uint32_t)(e / p.count);
        const uint32_t i = (uint32_t)(e % p.count);
        out[(uint64_t)r * p.out_stride + p.col_start + i] = p.first_index + i;
    }
}

// ---- H2O / SnapKV score accumulation ---------------------------------------------------
//
// Two passes over the keys, both with tensor-core MMAs (m16n8k16, f16 or bf16 in, f32 out):
//   pass 1: each block (kv head, tile of 64 keys) computes, for every query head of the GQA
//           group and every query, the tile's max and sum of exp of the masked scores;
//   merge:  one warp per (query head, query) merges the tiles in a fixed order into the
//           row max M and 1 / sum;
//   pass 2: each block recomputes its tile's scores, turns them into probabilities
//           exp(s - M) / sum, sums them over the queries of each head, reduces the group's
//           heads (sum or max) and adds the result into acc[kv head, key]. Each acc element
//           has exactly one writer, so there are no atomics and the result is deterministic.
// The Tq x T probability matrix never leaves registers.

namespace {

constexpr int kKeyTile = 64;  // keys per block: 4 warps x 16 keys (two n-tiles of 8)
constexpr int kH2oThreads = 128;

// Two consecutive 16-bit elements as one 32-bit word (offset is even, rows are 4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* base, uint64_t off) {
    return __ldg(reinterpret_cast<const unsigned int*>(base + off));
}

__device__ __forceinline__ bool visible(const NtkvH2oParams& p, uint32_t qrow, uint32_t key) {
    return qrow < p.tq && key < p.t && key <= p.t - p.tq + qrow;
}

// The block's key tile (blockIdx.x, or reversed) and the warp's B fragments: K rows of keys
// key_base + nt*8 + (lane >> 2), columns ks*16 + (lane & 3)*2 (+8).
template <typename T, int D>
struct KeyFrags {
    uint32_t b[2][D / 16][2];
    uint32_t key_base;

    __device__ __forceinline__ void load(const NtkvH2oParams& p, const T* __restrict__ k, uint32_t hk, uint32_t tile) {
        const int lane = threadIdx.x & 31;
        const int warp = threadIdx.x >> 5;
        key_base = tile * kKeyTile + warp * 16;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const uint32_t key = key_base + nt * 8 + (lane >> 2);
            const bool ok = key < p.t;
            const uint64_t row = ((uint64_t)hk * p.t + (ok ? key : 0u)) * D + (lane & 3) * 2;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                b[nt][ks][0] = ok ? ld_pair(k, row + ks * 16) : 0u;
                b[nt][ks][1] = ok ? ld_pair(k, row + ks * 16 + 8) : 0u;
            }
        }
    }

    // Scores of queries q0.. q0+15 of head h against the warp's 16 keys:
    // c[nt][0..1]: row q0 + lane/4, keys key_base + nt*8 + (lane&3)*2 + {0,1}; c[nt][2..3]: row + 8.
    __device__ __forceinline__ void scores(const NtkvH2oParams& p, const T* __restrict__ q, uint32_t h, uint32_t q0,
                                           float (&c)[2][4]) const {
        const int lane = threadIdx.x & 31;
        const uint32_t r0 = q0 + (lane >> 2);
        const uint32_t r1 = r0 + 8;
        const bool ok0 = r0 < p.tq;
        const bool ok1 = r1 < p.tq;
        const uint64_t row0 = ((uint64_t)h * p.tq + (ok0 ? r0 : 0u)) * D + (lane & 3) * 2;
        const uint64_t row1 = ((uint64_t)h * p.tq + (ok1 ? r1 : 0u)) * D + (lane & 3) * 2;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t a[4];
            a[0] = ok0 ? ld_pair(q, row0 + ks * 16) : 0u;
            a[1] = ok1 ? ld_pair(q, row1 + ks * 16) : 0u;
            a[2] = ok0 ? ld_pair(q, row0 + ks * 16 + 8) : 0u;
            a[3] = ok1 ? ld_pair(q, row1 + ks * 16 + 8) : 0u;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) ntkv::mma_m16n8k16<T>(c[nt], a, b[nt][ks][0], b[nt][ks][1]);
        }
    }
};

__device__ __forceinline__ void merge_ml(float& m, float& l, float m2, float l2) {
    if (!(l2 > 0.0f)) return;
    if (!(l > 0.0f)) {
        m = m2;
        l = l2;
        return;
    }
    const float mx = fmaxf(m, m2);
    l = l * expf(m - mx) + l2 * expf(m2 - mx);
    m = mx;
}

// Pass 1 of key tile `tile` of kv head `hk` (block-uniform arguments).
template <typename T, int D>
__device__ void h2o_tile_pass1(const NtkvH2oParams& p, const T* __restrict__ q, const T* __restrict__ k,
                               float* __restrict__ partial, uint32_t hk, uint32_t tile) {
    __shared__ float wm[4][16], wl[4][16];
    if (hk >= p.hkv || tile >= p.n_tiles) return;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const uint32_t group = p.hq / p.hkv;
    KeyFrags<T, D> kf;
    kf.load(p, k, hk, tile);
    for (uint32_t g = 0; g < group; ++g) {
        const uint32_t h = hk * group + g;
        for (uint32_t q0 = 0; q0 < p.tq; q0 += 16) {
            float c[2][4];
            kf.scores(p, q, h, q0, c);
            const uint32_t r0 = q0 + (lane >> 2), r1 = r0 + 8;
            float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const uint32_t j = kf.key_base + nt * 8 + (lane & 3) * 2 + e;
                    if (visible(p, r0, j)) m0 = fmaxf(m0, c[nt][e] * p.scale);
                    if (visible(p, r1, j)) m1 = fmaxf(m1, c[nt][2 + e] * p.scale);
                }
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
            float l0 = 0.0f, l1 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const uint32_t j = kf.key_base + nt * 8 + (lane & 3) * 2 + e;
                    if (visible(p, r0, j)) l0 += expf(c[nt][e] * p.scale - m0);
                    if (visible(p, r1, j)) l1 += expf(c[nt][2 + e] * p.scale - m1);
                }
            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            if ((lane & 3) == 0) {
                wm[warp][lane >> 2] = m0;
                wl[warp][lane >> 2] = l0;
                wm[warp][(lane >> 2) + 8] = m1;
                wl[warp][(lane >> 2) + 8] = l1;
            }
            __syncthreads();
            if (threadIdx.x < 16) {
                const uint32_t r = q0 + threadIdx.x;
                float m = -INFINITY, l = 0.0f;
                for (int w = 0; w < 4; ++w) merge_ml(m, l, wm[w][threadIdx.x], wl[w][threadIdx.x]);
                if (r < p.tq) {
                    const uint64_t o = (((uint64_t)h * p.tq + r) * p.n_tiles + tile) * 2;
                    partial[o] = m;
                    partial[o + 1] = l;
                }
            }
            __syncthreads();
        }
    }
}

// Pass 2 of key tile `tile` of kv head `hk` (block-uniform arguments). The stats come from the
// merge launch before this one.
template <typename T, int D>
__device__ void h2o_tile_pass2(const NtkvH2oParams& p, const T* __restrict__ q, const T* __restrict__ k,
                               const float* __restrict__ stats, float* __restrict__ acc, uint32_t hk, uint32_t tile) {
    if (hk >= p.hkv || tile >= p.n_tiles) return;
    const int lane = threadIdx.x & 31;
    const uint32_t group = p.hq / p.hkv;
    KeyFrags<T, D> kf;
    kf.load(p, k, hk, tile);
    float red[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (uint32_t g = 0; g < group; ++g) {
        const uint32_t h = hk * group + g;
        float head[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        for (uint32_t q0 = 0; q0 < p.tq; q0 += 16) {
            float c[2][4];
            kf.scores(p, q, h, q0, c);
            const uint32_t r0 = q0 + (lane >> 2), r1 = r0 + 8;
            float mx0 = 0.0f, inv0 = 0.0f, mx1 = 0.0f, inv1 = 0.0f;
            if (r0 < p.tq) {
                mx0 = stats[((uint64_t)h * p.tq + r0) * 2];
                inv0 = stats[((uint64_t)h * p.tq + r0) * 2 + 1];
            }
            if (r1 < p.tq) {
                mx1 = stats[((uint64_t)h * p.tq + r1) * 2];
                inv1 = stats[((uint64_t)h * p.tq + r1) * 2 + 1];
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const uint32_t j = kf.key_base + nt * 8 + (lane & 3) * 2 + e;
                    const float p0 = visible(p, r0, j) ? expf(c[nt][e] * p.scale - mx0) * inv0 : 0.0f;
                    const float p1 = visible(p, r1, j) ? expf(c[nt][2 + e] * p.scale - mx1) * inv1 : 0.0f;
                    float s = p0 + p1;
                    s += __shfl_xor_sync(0xffffffffu, s, 4);
                    s += __shfl_xor_sync(0xffffffffu, s, 8);
                    s += __shfl_xor_sync(0xffffffffu, s, 16);
                    head[nt][e] += s;
                }
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                if (g == 0) {
                    red[nt][e] = head[nt][e];
                } else if (p.reduce_max) {
                    red[nt][e] = fmaxf(red[nt][e], head[nt][e]);
                } else {
                    red[nt][e] += head[nt][e];
                }
            }
    }
    if ((lane >> 2) == 0) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const uint32_t j = kf.key_base + nt * 8 + (lane & 3) * 2 + e;
                if (j < p.t) {
                    float* a = &acc[(uint64_t)hk * p.t + j];
                    *a = p.overwrite ? red[nt][e] : *a + red[nt][e];
                }
            }
    }
}

// Merges row `row` (= query head * tq + query) of the per-tile partials into stats; called by
// a whole warp. Lanes merge tiles lane, lane + 32, ... in order, then a symmetric
// xor tree combines the lanes, so the result is the same bits on every run.
__device__ __forceinline__ void merge_stats_row(const NtkvH2oParams& p, const float* __restrict__ partial, uint64_t row,
                                                float* __restrict__ stats) {
    const uint32_t lane = threadIdx.x & 31u;
    float m = -INFINITY, l = 0.0f;
    for (uint32_t t = lane; t < p.n_tiles; t += 32u) {
        const uint64_t o = (row * p.n_tiles + t) * 2;
        merge_ml(m, l, partial[o], partial[o + 1]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
        float mx = fmaxf(m, m2);
        const float a = (l > 0.0f) ? l * expf(m - mx) : 0.0f;
        const float b = (l2 > 0.0f) ? l2 * expf(m2 - mx) : 0.0f;
        if (!(l > 0.0f) && !(l2 > 0.0f)) mx = -INFINITY;
        m = mx;
        l = a + b;
    }
    if (lane == 0) {
        stats[row * 2] = m;
        stats[row * 2 + 1] = 1.0f / l;
    }
}

}  // namespace

#define NTKV_H2O_KERNELS(SUFFIX, T, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(kH2oThreads) ntkv_h2o_pass1_##SUFFIX##_d##D(                       \
        const NtkvH2oParams p, const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ partial) {     \
        h2o_tile_pass1<T, D>(p, q, k, partial, blockIdx.y, blockIdx.x);                                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(kH2oThreads) ntkv_h2o_pass2_##SUFFIX##_d##D(                       \
        const NtkvH2oParams p, const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ stats,   \
        float* __restrict__ acc) {                                                                                  \
        h2o_tile_pass2<T, D>(p, q, k, stats, acc, gridDim.y - 1u - blockIdx.y, gridDim.x - 1u - blockIdx.x);         \
    }

#define NTKV_H2O_DIMS(SUFFIX, T)      \
    NTKV_H2O_KERNELS(SUFFIX, T, 64)  \
    NTKV_H2O_KERNELS(SUFFIX, T, 128) \
    NTKV_H2O_KERNELS(SUFFIX, T, 256)
NTKV_H2O_DIMS(f16, __half)
NTKV_H2O_DIMS(bf16, __nv_bfloat16)

// Merges the per-tile (max, sum) of every (query head, query) in a fixed order into
// stats = (max, 1 / sum). One warp per row; 8 warps per block.
extern "C" __global__ void ntkv_h2o_merge(const NtkvH2oParams p, const float* __restrict__ partial,
                                          float* __restrict__ stats) {
    const uint64_t row = (uint64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (uint64_t)p.hq * p.tq) return;
    merge_stats_row(p, partial, row, stats);
}

// SnapKV pooling (kernel 5, stride 1, zero padding 2, padding counted).
extern "C" __global__ void ntkv_snapkv_pool(const NtkvPoolParams p, const float* __restrict__ in,
                                            float* __restrict__ out) {
    const uint64_t total = (uint64_t)p.rows * p.n_out;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t r = (uint32_t)(e / p.n_out);
        const int64_t j = (int64_t)(e % p.n_out);
        const float* row = in + (uint64_t)r * p.in_stride;
        float s = 0.0f;
#pragma unroll
        for (int o = -2; o <= 2; ++o) {
            const int64_t i = j + o;
            if (i >= 0 && i < (int64_t)p.n_out) s += row[i];
        }
        out[e] = s / 5.0f;
    }
}

// Writes into *first_bad the lowest flat index of keep that is >= t or not strictly above its
// left neighbour (the caller initialises it to UINT64_MAX, which no flat index can equal:
// rows * budget < 2^40).
extern "C" __global__ void ntkv_h2o_check_keep(const NtkvKeepCheckParams p, const uint32_t* __restrict__ keep,
                                               unsigned long long* __restrict__ first_bad) {
    const uint64_t total = (uint64_t)p.rows * p.budget;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t i = (uint32_t)(e % p.budget);
        const uint32_t v = keep[e];
        const bool bad = v >= p.t || (i > 0 && keep[e - 1] >= v);
        if (bad) atomicMin(first_bad, (unsigned long long)e);
    }
}

// In-place compaction of one kv head per block: row i of the head takes row keep[i]. keep is
// strictly ascending, so keep[i] >= i: a chunk of rows is read completely (into shared
// memory) before it is written, and later chunks read only rows at or after their own
// positions, which no earlier chunk writes. Rows budget.. of the head are left unchanged.
extern "C" __global__ void ntkv_h2o_compact(const NtkvCompactParams p, const uint32_t* __restrict__ keep,
                                            uint32_t* kc, uint32_t* vc, float* acc) {
    NTKV_DYNAMIC_SMEM(uint32_t, stage);  // [2][chunk_rows * row_words] then [chunk_rows] acc
    const uint32_t h = blockIdx.x;
    if (h >= p.hkv) return;
    const uint32_t chunk_rows = 8192u / p.row_words > 0u ? 8192u / p.row_words : 1u;
    const uint32_t chunk_words = chunk_rows * p.row_words;
    uint32_t* sk = stage;
    uint32_t* sv = stage + chunk_words;
    float* sa = reinterpret_cast<float*>(stage + 2 * chunk_words);
    const uint32_t* kr = keep + (uint64_t)h * p.budget;
    const uint64_t head_words = (uint64_t)h * p.t * p.row_words;
    for (uint32_t c0 = 0; c0 < p.budget; c0 += chunk_rows) {
        const uint32_t rows = (p.budget - c0) < chunk_rows ? (p.budget - c0) : chunk_rows;
        for (uint32_t e = threadIdx.x; e < rows * p.row_words; e += blockDim.x) {
            const uint32_t r = e / p.row_words, w = e % p.row_words;
            const uint64_t src = head_words + (uint64_t)kr[c0 + r] * p.row_words + w;
            sk[e] = kc[src];
            sv[e] = vc[src];
        }
        if (p.has_acc) {
            for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) sa[r] = acc[(uint64_t)h * p.t + kr[c0 + r]];
        }
        __syncthreads();
        for (uint32_t e = threadIdx.x; e < rows * p.row_words; e += blockDim.x) {
            const uint64_t dst = head_words + (uint64_t)c0 * p.row_words + e;
            kc[dst] = sk[e];
            vc[dst] = sv[e];
        }
        if (p.has_acc) {
            for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) acc[(uint64_t)h * p.t + c0 + r] = sa[r];
        }
        __syncthreads();
    }
}

// Out-of-place gather into packed caches: out[h, i] = in[h, keep[h, i]] for i < budget, with
// the outputs [hkv, budget, row_words] (and acc_out [hkv, budget]). keep was checked before.
extern "C" __global__ void ntkv_h2o_gather(const NtkvCompactParams p, const uint32_t* __restrict__ keep,
                                           const uint32_t* __restrict__ kc, const uint32_t* __restrict__ vc,
                                           const float* __restrict__ acc, uint32_t* __restrict__ k_out,
                                           uint32_t* __restrict__ v_out, float* __restrict__ acc_out) {
    const uint64_t total = (uint64_t)p.hkv * p.budget * p.row_words;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t row = e / p.row_words;  // h * budget + i
        const uint32_t w = (uint32_t)(e % p.row_words);
        const uint32_t h = (uint32_t)(row / p.budget);
        const uint64_t src = ((uint64_t)h * p.t + keep[row]) * p.row_words + w;
        k_out[e] = kc[src];
        v_out[e] = vc[src];
        if (p.has_acc && w == 0u) acc_out[row] = acc[(uint64_t)h * p.t + keep[row]];
    }
}
