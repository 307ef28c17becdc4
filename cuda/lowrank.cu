// lowrank.cu: ShadowKV low-rank keys (src/lowrank).
//
//   ntkv_lowrank_rope_<T>_d<D>  fused reconstruction: for each selected position of a kv head,
//                               gathers the row of U, multiplies it by the head's slice of SV
//                               (rank streamed through shared memory in chunks of RK) and
//                               applies rotate-half RoPE in registers before the only store,
//                               in the cache dtype, to compact CSR rows or a gathered cache;
//   ntkv_lowrank_gather_<T>     copies the value rows of the same lists into the gathered
//                               layout, so that sparse decode reads both caches by 0..len;
//   ntkv_lowrank_widen_<T>      K [B, Tcap, N] -> f32 working copy, rows past seq_lens zeroed
//                               (the split-K GEMM of the factorization reads f32);
//   ntkv_lowrank_narrow_<T>     the f32 factors -> the storage dtype of U and SV.
#include "ntkv_common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int RK = 32;           // rank per shared-memory chunk
constexpr int GATHER_ROWS = 16;  // value rows per gather block

// Each thread owns PPT rotation pairs (columns c and c + D/2) of TPT tokens, so RoPE needs no
// data from another thread. Consecutive threads take consecutive pair columns: the stores of
// a warp are contiguous and its reads of the SV chunk hit distinct banks.
template <int D>
struct Tile {
    static constexpr int PAIRS = D / 2;
    static constexpr int PPT = 4;
    static constexpr int CG = PAIRS / PPT;  // column groups
    static constexpr int TG = THREADS / CG; // token groups
    static constexpr int TPT = 4;
    static constexpr int TT = TG * TPT;     // tokens per block
    static_assert(PAIRS % PPT == 0 && THREADS % CG == 0, "tile does not divide");
};

// sin and cos of an f32 angle without the library's large-argument path (which needs a
// local stack array): the angle (|ang| < 2^25 for positions below 2^24) is reduced by pi/2
// in f64 with a two-part Cody-Waite constant and fma, exact to ~1e-19 at 2^25, then the
// reduced |r| <= pi/4 goes through Taylor polynomials in f32 (truncation below 2e-9).
__device__ __forceinline__ void rope_sincos(float ang, float& sn, float& cs) {
    const double x = (double)ang;
    const double k = rint(x * 0.63661977236758134308);
    double rd = fma(-k, 1.57079632673412561417e+00, x);
    rd = fma(-k, 6.07710050650619224932e-11, rd);
    const float r = (float)rd;
    const float r2 = r * r;
    const float s = r * (1.f + r2 * (-1.f / 6 + r2 * (1.f / 120 + r2 * (-1.f / 5040 + r2 * (1.f / 362880)))));
    const float c =
        1.f + r2 * (-0.5f + r2 * (1.f / 24 + r2 * (-1.f / 720 + r2 * (1.f / 40320 + r2 * (-1.f / 3628800)))));
    switch ((int)((long long)k & 3)) {
        case 0: sn = s; cs = c; break;
        case 1: sn = c; cs = -s; break;
        case 2: sn = -s; cs = -c; break;
        default: sn = -c; cs = s; break;
    }
}

template <typename T, int D>
__device__ __forceinline__ void lowrank_rope(const NtkvLowrankRopeParams& p, const T* __restrict__ u,
                                             const T* __restrict__ sv, const float* __restrict__ inv_freq,
                                             const uint32_t* __restrict__ indptr,
                                             const uint32_t* __restrict__ indices, T* __restrict__ out) {
    using L = Tile<D>;
    __shared__ float u_s[L::TT][RK + 1];  // +1: the token groups of a warp read distinct banks
    __shared__ float sv_s[RK][D];
    __shared__ uint32_t pos_s[L::TT];
    __shared__ float inv_s[L::PAIRS];

    const uint32_t n_lists = p.batch * p.kv_heads;
    const uint32_t list = blockIdx.x / p.tiles_per_list;
    const uint32_t tile = blockIdx.x % p.tiles_per_list;
    if (list >= n_lists) return;
    uint64_t begin, end;
    ntkv::csr_bounds(indptr, list, p.n_indices, begin, end);
    const uint64_t t0 = (uint64_t)tile * L::TT;
    if (begin + t0 >= end) return;  // uniform over the block: no barrier is skipped by some
    const uint32_t cnt = (uint32_t)((end - begin - t0) < (uint64_t)L::TT ? (end - begin - t0) : L::TT);
    const uint32_t b = list / p.kv_heads;
    const uint32_t h = list % p.kv_heads;
    const int tid = threadIdx.x;

    for (int i = tid; i < L::TT; i += THREADS) {
        uint32_t pos = i < (int)cnt ? indices[begin + t0 + i] : 0u;
        pos_s[i] = pos < p.capacity ? pos : p.capacity - 1;  // validated; clamped so no read escapes U
    }
    for (int i = tid; i < L::PAIRS; i += THREADS) inv_s[i] = inv_freq[i];

    const int cg = tid % L::CG;
    const int tg = tid / L::CG;
    float acc[L::TPT][2 * L::PPT];
#pragma unroll
    for (int i = 0; i < L::TPT; ++i)
#pragma unroll
        for (int k = 0; k < 2 * L::PPT; ++k) acc[i][k] = 0.f;

    const uint64_t sv_ld = (uint64_t)p.kv_heads * D;
    const T* __restrict__ ub = u + (uint64_t)b * p.u_batch_stride;
    const T* __restrict__ svb = sv + (uint64_t)b * p.sv_batch_stride + (uint64_t)h * D;
    for (uint32_t r0 = 0; r0 < p.rank; r0 += RK) {
        __syncthreads();  // pos_s is ready (first chunk); the previous chunk is consumed
        for (int e = tid; e < L::TT * RK; e += THREADS) {
            const int i = e / RK, j = e % RK;
            const bool live = i < (int)cnt && r0 + j < p.rank;
            u_s[i][j] = live ? ntkv::to_f32(ub[(uint64_t)pos_s[i] * p.rank + r0 + j]) : 0.f;
        }
        for (int e = tid; e < RK * D; e += THREADS) {
            const int j = e / D, c = e % D;
            sv_s[j][c] = r0 + j < p.rank ? ntkv::to_f32(svb[(uint64_t)(r0 + j) * sv_ld + c]) : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < RK; ++j) {
            float lo[L::PPT], hi[L::PPT];
#pragma unroll
            for (int k = 0; k < L::PPT; ++k) {
                lo[k] = sv_s[j][cg + L::CG * k];
                hi[k] = sv_s[j][L::PAIRS + cg + L::CG * k];
            }
#pragma unroll
            for (int i = 0; i < L::TPT; ++i) {
                const float x = u_s[tg + L::TG * i][j];
#pragma unroll
                for (int k = 0; k < L::PPT; ++k) {
                    acc[i][k] = fmaf(x, lo[k], acc[i][k]);
                    acc[i][L::PPT + k] = fmaf(x, hi[k], acc[i][L::PPT + k]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < L::TPT; ++i) {
        const int row = tg + L::TG * i;
        if (row >= (int)cnt) continue;
        const uint32_t pos = pos_s[row];
        const uint64_t orow = p.budget ? (uint64_t)list * p.budget + t0 + row : begin + t0 + row;
        T* __restrict__ o = out + orow * D;
        const float fpos = (float)pos;  // exact: positions are below 2^24
#pragma unroll
        for (int k = 0; k < L::PPT; ++k) {
            const int c = cg + L::CG * k;
            // The angle is rounded to f32 once, as HF transformers computes it; its sin and cos
            // are then accurate for any position (see rope_sincos).
            const float ang = __fmul_rn(fpos, inv_s[c]);
            float sn, cs;
            rope_sincos(ang, sn, cs);
            const float x = acc[i][k], y = acc[i][L::PPT + k];
            o[c] = ntkv::from_f32<T>(x * cs - y * sn);
            o[c + L::PAIRS] = ntkv::from_f32<T>(y * cs + x * sn);
        }
    }
}

template <typename T>
__device__ __forceinline__ void lowrank_gather(const NtkvLowrankGatherParams& p, const uint32_t* __restrict__ indptr,
                                               const uint32_t* __restrict__ indices, const T* __restrict__ v,
                                               T* __restrict__ out) {
    const uint32_t list = blockIdx.x / p.tiles_per_list;
    const uint32_t tile = blockIdx.x % p.tiles_per_list;
    if (list >= p.n_lists) return;
    uint64_t begin, end;
    ntkv::csr_bounds(indptr, list, p.n_indices, begin, end);
    const uint64_t t0 = (uint64_t)tile * GATHER_ROWS;
    if (begin + t0 >= end) return;
    const uint64_t left = end - begin - t0;
    const uint32_t cnt = left < (uint64_t)GATHER_ROWS ? (uint32_t)left : GATHER_ROWS;
    for (uint32_t e = threadIdx.x; e < cnt * p.head_dim; e += THREADS) {
        const uint32_t r = e / p.head_dim, d = e % p.head_dim;
        uint32_t pos = indices[begin + t0 + r];
        pos = pos < p.capacity ? pos : p.capacity - 1;
        out[((uint64_t)list * p.budget + t0 + r) * p.head_dim + d] =
            v[((uint64_t)list * p.capacity + pos) * p.head_dim + d];
    }
}

__device__ __forceinline__ bool live_row(const NtkvLowrankCastParams& p, const uint32_t* __restrict__ seq_lens,
                                         uint64_t i) {
    if (!p.masked) return true;
    const uint64_t per = (uint64_t)p.rows * p.cols;
    const uint32_t b = (uint32_t)(i / per);
    const uint32_t t = (uint32_t)((i % per) / p.cols);
    return t < seq_lens[b];
}

template <typename T>
__device__ __forceinline__ void lowrank_widen(const NtkvLowrankCastParams& p, const uint32_t* __restrict__ seq_lens,
                                              const T* __restrict__ x, float* __restrict__ y) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.total; i += stride)
        y[i] = live_row(p, seq_lens, i) ? ntkv::to_f32(x[i]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void lowrank_narrow(const NtkvLowrankCastParams& p, const uint32_t* __restrict__ seq_lens,
                                               const float* __restrict__ x, T* __restrict__ y) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.total; i += stride)
        y[i] = ntkv::from_f32<T>(live_row(p, seq_lens, i) ? x[i] : 0.f);
}

}  // namespace

#define NTKV_LOWRANK_ROPE(NAME, T, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        NAME(const NtkvLowrankRopeParams p, const T* __restrict__ u, const T* __restrict__ sv,                \
             const float* __restrict__ inv_freq, const uint32_t* __restrict__ indptr,                         \
             const uint32_t* __restrict__ indices, T* __restrict__ out) {                                     \
        lowrank_rope<T, D>(p, u, sv, inv_freq, indptr, indices, out);                                          \
    }

#define NTKV_LOWRANK_ELEMENTWISE(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        ntkv_lowrank_gather_##SUFFIX(const NtkvLowrankGatherParams p, const uint32_t* __restrict__ indptr,    \
                                     const uint32_t* __restrict__ indices, const T* __restrict__ v,           \
                                     T* __restrict__ out) {                                                   \
        lowrank_gather<T>(p, indptr, indices, v, out);                                                         \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        ntkv_lowrank_widen_##SUFFIX(const NtkvLowrankCastParams p, const uint32_t* __restrict__ seq_lens,     \
                                    const T* __restrict__ x, float* __restrict__ y) {                         \
        lowrank_widen<T>(p, seq_lens, x, y);                                                                   \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        ntkv_lowrank_narrow_##SUFFIX(const NtkvLowrankCastParams p, const uint32_t* __restrict__ seq_lens,    \
                                     const float* __restrict__ x, T* __restrict__ y) {                        \
        lowrank_narrow<T>(p, seq_lens, x, y);                                                                  \
    }

// One RoPE kernel per dtype and head dimension; the elementwise casts per dtype.
#define NTKV_LOWRANK_DTYPE(S, T)                                                                              \
    NTKV_LOWRANK_ROPE(ntkv_lowrank_rope_##S##_d64, T, 64)                                                     \
    NTKV_LOWRANK_ROPE(ntkv_lowrank_rope_##S##_d128, T, 128)                                                   \
    NTKV_LOWRANK_ROPE(ntkv_lowrank_rope_##S##_d256, T, 256)                                                   \
    NTKV_LOWRANK_ELEMENTWISE(S, T)
NTKV_LOWRANK_DTYPE(f16, __half)
NTKV_LOWRANK_DTYPE(bf16, __nv_bfloat16)
NTKV_LOWRANK_DTYPE(f32, float)
