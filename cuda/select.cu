// select.cu: kernels of the shared selection module (src/select), used by every family that
// ranks blocks, pages, chunks or clusters.
//
// The row top-k of `select` is the radix top-k of topk.cu (ntkv_topk_*, Module::Topk). These
// kernels add:
//   ntkv_select_pad_segments_<T>: copies each segment of a ragged array (CSR indptr) into a
//       row of a padded [segments, max_len] matrix and writes the row lengths, so the row
//       top-k runs over segments;
//   ntkv_select_truncate_<T>:    pads the slots at or past a per-row k (ks[r]) with index
//       UINT32_MAX and value -inf (top-k_r is the first k_r slots of the sorted top-k);
//   ntkv_select_expand_{count,scan,write}: expands selected block ids into a CSR list of
//       sorted, unique token indices (the input of the sparse-index decode).
// Every size and pointer extent is checked by the Rust launcher; the kernels still clamp
// what they read from device buffers (indptr, lengths, block ids) so that no value in them
// can move an access out of range.
#include "ntkv_common.cuh"

namespace {

template <typename T>
__device__ void select_pad_segments(const NtkvSelectPadParams& p, const uint32_t* __restrict__ indptr,
                                    const T* __restrict__ x, T* __restrict__ out, uint32_t* __restrict__ lengths) {
    const unsigned long long total = p.total;
    const uint32_t max_len = p.max_len;
    for (uint32_t s = blockIdx.x; s < p.segments; s += gridDim.x) {
        const unsigned long long start = indptr[s] < total ? indptr[s] : total;
        const unsigned long long end = indptr[s + 1] < total ? indptr[s + 1] : total;
        unsigned long long len = end > start ? end - start : 0ull;
        if (len > max_len) len = max_len;
        T* row = out + (unsigned long long)s * max_len;
        for (uint32_t i = threadIdx.x; i < (uint32_t)len; i += blockDim.x) row[i] = x[start + i];
        if (threadIdx.x == 0) lengths[s] = (uint32_t)len;
    }
}

template <typename T>
__device__ void select_truncate(const NtkvSelectTruncateParams& p, const uint32_t* __restrict__ ks,
                                T* __restrict__ values, uint32_t* __restrict__ indices) {
    const uint32_t k = p.k;
    const unsigned long long n = (unsigned long long)p.rows * k;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        const uint32_t r = (uint32_t)(e / k);
        const uint32_t j = (uint32_t)(e % k);
        if (j >= ks[r]) {
            indices[e] = 0xffffffffu;
            if (p.write_values) values[e] = ntkv::from_f32<T>(-INFINITY);
        }
    }
}

}  // namespace

#define NTKV_SELECT_KERNELS(SUFFIX, T)                                                                      \
    extern "C" __global__ void ntkv_select_pad_segments_##SUFFIX(                                           \
        const NtkvSelectPadParams p, const uint32_t* __restrict__ indptr, const T* __restrict__ x,          \
        T* __restrict__ out, uint32_t* __restrict__ lengths) {                                              \
        select_pad_segments<T>(p, indptr, x, out, lengths);                                                 \
    }                                                                                                       \
    extern "C" __global__ void ntkv_select_truncate_##SUFFIX(const NtkvSelectTruncateParams p,              \
                                                             const uint32_t* __restrict__ ks,               \
                                                             T* __restrict__ values,                        \
                                                             uint32_t* __restrict__ indices) {              \
        select_truncate<T>(p, ks, values, indices);                                                         \
    }

NTKV_SELECT_KERNELS(f32, float)
NTKV_SELECT_KERNELS(f16, __half)
NTKV_SELECT_KERNELS(bf16, __nv_bfloat16)

// Pass 1 of the expansion, one block per row (grid-stride over rows). Row r's selected block
// ids blocks[r * kb ..] (ids >= nb, such as the UINT32_MAX padding of a top-k, are skipped)
// become token intervals [start, end): block_size > 0: [b * block_size, (b + 1) * block_size);
// block_size == 0: ranges[(m * nb + b) * 2 + {0, 1}] with m = 0 when map_shared, else r.
// Each interval is clipped to [0, min(lengths[r], t)). The intervals are sorted by start
// (bitonic, kbpad words of dynamic shared memory) and merged where they overlap or touch;
// the merged intervals go to iv[r * kb ..] (start << 32 | end) with their offsets within the
// row in off[r * kb ..], their number to n_iv[r] and the row's token count to counts[r].
extern "C" __global__ void ntkv_select_expand_count(const NtkvSelectExpandParams p,
                                                    const uint32_t* __restrict__ blocks,
                                                    const uint32_t* __restrict__ lengths,
                                                    const uint32_t* __restrict__ ranges,
                                                    unsigned long long* __restrict__ iv, uint32_t* __restrict__ off,
                                                    uint32_t* __restrict__ n_iv, uint32_t* __restrict__ counts) {
    NTKV_DYNAMIC_SMEM(unsigned long long, sel_iv);  // kbpad words
    const uint32_t rows = p.rows, kb = p.kb, nb = p.nb, t = p.t, block_size = p.block_size;
    const uint32_t map_shared = p.map_shared, kbpad = p.kbpad;
    const unsigned long long kEmpty = ~0ull;       // sorts after every real interval
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint64_t len = lengths[r] < t ? lengths[r] : t;
        for (uint32_t i = threadIdx.x; i < kbpad; i += blockDim.x) {
            unsigned long long w = kEmpty;
            if (i < kb) {
                const uint32_t b = blocks[(uint64_t)r * kb + i];
                if (b < nb) {
                    uint64_t s, e;
                    if (block_size > 0u) {
                        s = (uint64_t)b * block_size;
                        e = s + block_size;
                    } else {
                        const uint64_t m = map_shared ? 0u : r;
                        s = ranges[(m * nb + b) * 2];
                        e = ranges[(m * nb + b) * 2 + 1];
                    }
                    if (e > len) e = len;
                    if (s < e) w = (s << 32) | e;
                }
            }
            sel_iv[i] = w;
        }
        __syncthreads();
        ntkv::block_bitonic_sort(sel_iv, kbpad, false);
        if (threadIdx.x == 0) {
            uint32_t m = 0, total = 0;
            uint64_t cs = 0, ce = 0;
            bool open = false;
            for (uint32_t i = 0; i < kb; ++i) {
                const unsigned long long w = sel_iv[i];
                if (w == kEmpty) break;
                const uint64_t s = w >> 32, e = w & 0xffffffffull;
                if (open && s <= ce) {
                    if (e > ce) ce = e;
                    continue;
                }
                if (open) {
                    iv[(uint64_t)r * kb + m] = (cs << 32) | ce;
                    off[(uint64_t)r * kb + m] = total;
                    total += (uint32_t)(ce - cs);
                    ++m;
                }
                cs = s;
                ce = e;
                open = true;
            }
            if (open) {
                iv[(uint64_t)r * kb + m] = (cs << 32) | ce;
                off[(uint64_t)r * kb + m] = total;
                total += (uint32_t)(ce - cs);
                ++m;
            }
            n_iv[r] = m;
            counts[r] = total;
        }
        __syncthreads();  // sel_iv is reused by the next row
    }
}

// Pass 2: indptr[0] = 0, indptr[r + 1] = indptr[r] + counts[r], by one block: each thread
// sums a contiguous chunk of rows, thread 0 scans the chunk sums, each thread writes its chunk.
extern "C" __global__ void ntkv_select_expand_scan(const NtkvSelectExpandParams p,
                                                   const uint32_t* __restrict__ counts,
                                                   uint32_t* __restrict__ indptr) {
    const uint32_t rows = p.rows;
    __shared__ uint32_t chunk_base[1024];
    const uint32_t nt = blockDim.x < 1024u ? blockDim.x : 1024u;
    const uint32_t per = (rows + nt - 1u) / nt;
    const uint32_t lo = threadIdx.x * per;
    const uint32_t hi = lo + per < rows ? lo + per : rows;
    uint32_t sum = 0;
    if (threadIdx.x < nt)
        for (uint32_t r = lo; r < hi; ++r) sum += counts[r];
    if (threadIdx.x < nt) chunk_base[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t run = 0;
        for (uint32_t i = 0; i < nt; ++i) {
            const uint32_t c = chunk_base[i];
            chunk_base[i] = run;
            run += c;
        }
        indptr[0] = 0u;
    }
    __syncthreads();
    if (threadIdx.x < nt) {
        uint32_t run = chunk_base[threadIdx.x];
        for (uint32_t r = lo; r < hi; ++r) {
            run += counts[r];
            indptr[r + 1] = run;
        }
    }
}

// Pass 3, one block per row (grid-stride): writes the tokens of the row's merged intervals,
// ascending, at indices[indptr[r] + off ..]. The launcher sized indices for the largest
// possible total, so every write is in range.
extern "C" __global__ void ntkv_select_expand_write(const NtkvSelectExpandParams p,
                                                    const unsigned long long* __restrict__ iv,
                                                    const uint32_t* __restrict__ off,
                                                    const uint32_t* __restrict__ n_iv,
                                                    const uint32_t* __restrict__ indptr,
                                                    uint32_t* __restrict__ indices) {
    const uint32_t rows = p.rows, kb = p.kb;
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint64_t base = indptr[r];
        const uint32_t m = n_iv[r] < kb ? n_iv[r] : kb;
        for (uint32_t i = 0; i < m; ++i) {
            const unsigned long long w = iv[(uint64_t)r * kb + i];
            const uint32_t s = (uint32_t)(w >> 32), e = (uint32_t)w;
            const uint64_t o = base + off[(uint64_t)r * kb + i];
            for (uint32_t j = threadIdx.x; j < e - s; j += blockDim.x) indices[o + j] = s + j;
        }
    }
}
