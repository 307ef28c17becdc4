// ntk.cu: NTK Jacobian contractions, and the split-K GEMM the gemm module launches.
//
// The core is one split-K GEMM C_z = A_z · B_zᵀ (both operands row-major with the contraction
// axis contiguous, as per-sample Jacobians J[N, O, P] are), tiled 128 x 128 x 32, in three
// arithmetic flavours:
//   - ffma: fp32 FMA with an 8x8 register tile per thread (the F32 precision);
//   - tf32: mma.sync.m16n8k8 tf32 tensor cores, inputs rounded to tf32 as cvt.rna does;
//   - bf16: mma.sync.m16n8k16 bf16 tensor cores.
// All accumulate in fp32. Two ways to feed shared memory:
//   - register staging with two shared buffers (every flavour, any alignment): the next k
//     tile's global loads are in flight while the current one is multiplied, and values are
//     converted on the way (f32 -> bf16 round-to-nearest-even, f32 -> tf32 as cvt.rna);
//   - a 3-4 stage cp.async pipeline (tf32 from f32, bf16 from bf16) when rows, batches and
//     depth are whole 16-byte chunks; out-of-range chunks are zero-filled. These kernels run
//     4 warps of 64 x 64 (half the shared-memory reads per mma of 8 warps of 64 x 32), two
//     blocks per SM.
// The register-staged kernels run 256 threads (FFMA: 16 x 16 threads of 8 x 8; mma: 8 warps
// of 64 x 32).
// Each (split, batch) writes its own f32 partial tile, and a second kernel sums the splits in
// a fixed order, so results are bit-identical run to run. In the symmetric case only
// tiles with row tile <= column tile are computed and the reduction mirrors the rest.
#include "ntkv_common.cuh"

#include <type_traits>

namespace {

constexpr int kTile = 128;  // rows and columns of C per block
constexpr int kDepth = 32;  // k per shared-memory stage
constexpr int kThreads = 256;

// ---- tile scheduling ------------------------------------------------------------------

__device__ __forceinline__ void tile_coords(const NtkvNtkGemmParams& p, uint32_t& tr, uint32_t& tc) {
    uint32_t x = blockIdx.x;
    if (p.symmetric) {
        // Row r of the upper triangle holds (T - r) tiles, starting at column r.
        const uint32_t T = p.col_tiles;
        uint32_t r = 0;
        while (r + 1 < T && x >= T - r) {
            x -= T - r;
            ++r;
        }
        tr = r;
        tc = r + x;
    } else {
        tr = x / p.col_tiles;
        tc = x % p.col_tiles;
    }
}

// ---- global loads: 4 consecutive k of one row, zero outside [.., kend) and rows ---------

// Four consecutive values (one 16- or 8-byte load, aligned to it) as f32.
__device__ __forceinline__ void load4_vec(const float* src, float v[4]) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(src));
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
}
__device__ __forceinline__ void load4_vec(const __nv_bfloat16* src, float v[4]) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(src));
    // bf16 -> f32 is a 16-bit shift: exact.
    v[0] = __uint_as_float(q.x << 16);
    v[1] = __uint_as_float(q.x & 0xffff0000u);
    v[2] = __uint_as_float(q.y << 16);
    v[3] = __uint_as_float(q.y & 0xffff0000u);
}
__device__ __forceinline__ float load1(const float* src) { return __ldg(src); }
__device__ __forceinline__ float load1(const __nv_bfloat16* src) { return __bfloat162float(*src); }

// `kmajor`: the operand is stored k-major, element (row, q) at q * row_stride + row (the
// strided ntkv_gemm_* kernels): scalar loads, coalesced across rows.
template <typename Tin>
__device__ __forceinline__ void load4(const Tin* __restrict__ base, uint64_t row_stride, uint32_t rows, uint32_t row,
                                      uint64_t k, uint64_t kend, bool vec_ok, bool kmajor, float v[4]) {
    v[0] = v[1] = v[2] = v[3] = 0.f;
    if (row >= rows) return;
    if (kmajor) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (k + e < kend) v[e] = load1(base + (k + e) * row_stride + row);
        return;
    }
    const Tin* src = base + (uint64_t)row * row_stride + k;
    if (vec_ok && k + 4 <= kend) {
        load4_vec(src, v);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (k + e < kend) v[e] = load1(src + e);
    }
}


__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat16 l = __float2bfloat16_rn(lo);
    const __nv_bfloat16 h = __float2bfloat16_rn(hi);
    return (uint32_t)__bfloat16_as_ushort(l) | ((uint32_t)__bfloat16_as_ushort(h) << 16);
}

struct GemmCtx {
    uint32_t tr, tc, z, split;
    uint64_t kbeg, kend;
    int ktiles;
};

__device__ __forceinline__ GemmCtx gemm_ctx(const NtkvNtkGemmParams& p) {
    GemmCtx c;
    tile_coords(p, c.tr, c.tc);
    c.split = blockIdx.y;
    c.z = blockIdx.z;
    c.kbeg = (uint64_t)c.split * p.k_chunk;
    const uint64_t e = c.kbeg + p.k_chunk;
    c.kend = e < p.k ? e : p.k;
    c.ktiles = c.kbeg < c.kend ? (int)((c.kend - c.kbeg + kDepth - 1) / kDepth) : 0;
    return c;
}

__device__ __forceinline__ float* partial_plane(const NtkvNtkGemmParams& p, float* part, const GemmCtx& c) {
    return part + ((uint64_t)c.z * p.splits + c.split) * (uint64_t)p.m1 * p.m2;
}

// The register-staged load of the two-buffer kernels: a thread's 4 x 4 values of A and of B for
// one k tile (rows lrow + 32 it of the block tile, k = lk .. lk + 3), zero outside the operands.
template <typename Tin, bool kStrided>
struct RegTileLoad {
    const Tin* abase;
    const Tin* bbase;
    uint32_t row0, col0;
    int lrow, lk;
    bool vec;
    // kStrided (the ntkv_gemm_* kernels): an operand may be k-major (p.layout bit 0: A, bit 1:
    // B); the ntkv_ntk_gemm_* kernels compile with both flags constant false.
    bool a_km, b_km;
    float ra[4][4], rb[4][4];

    __device__ __forceinline__ RegTileLoad(const NtkvNtkGemmParams& p, const GemmCtx& c, const Tin* a, const Tin* b,
                                           int lrow_, int lk_)
        : abase(a + (uint64_t)c.z * p.a_batch_stride),
          bbase(b + (uint64_t)c.z * p.b_batch_stride),
          row0(c.tr * kTile),
          col0(c.tc * kTile),
          lrow(lrow_),
          lk(lk_),
          vec(p.vec_ok != 0),
          a_km(kStrided && (p.layout & 1u) != 0),
          b_km(kStrided && (p.layout & 2u) != 0) {}

    __device__ __forceinline__ void load(const NtkvNtkGemmParams& p, const GemmCtx& c, int kt) {
        const uint64_t k = c.kbeg + (uint64_t)kt * kDepth + lk;
#pragma unroll
        for (int it = 0; it < 4; ++it) {
            load4(abase, p.a_row_stride, p.m1, row0 + lrow + 32 * it, k, c.kend, vec, a_km, ra[it]);
            load4(bbase, p.b_row_stride, p.m2, col0 + lrow + 32 * it, k, c.kend, vec, b_km, rb[it]);
        }
    }
};

// The two-buffer pipeline of the register-staged kernels: tile kt + 1 is loaded into registers
// while tile kt is computed from shared buffer kt & 1, then stored to the other buffer.
template <typename Load, typename Store, typename Compute>
__device__ __forceinline__ void two_buffer_pipeline(int ktiles, Load&& gload, Store&& sstore, Compute&& compute) {
    if (ktiles > 0) {
        gload(0);
        sstore(0);
    }
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ktiles) gload(kt + 1);
        compute(buf);
        if (kt + 1 < ktiles) sstore(buf ^ 1);
        __syncthreads();
    }
}

// ---- FFMA flavour ------------------------------------------------------------------------
// Shared: As[stage][k][row] (k-major, rows contiguous) so a thread's 8 rows at one k are two
// float4 reads. Thread (tx, ty) of a 16 x 16 grid owns rows {ty*4 + i, 64 + ty*4 + i} and
// columns {tx*4 + j, 64 + tx*4 + j}. Loads: lane = row within a 32-row slab (conflict-free
// transposed stores), warp = which 4-wide k group.
constexpr int kFfmaLd = kTile + 4;
constexpr size_t kFfmaSmem = 2ull * 2 * kDepth * kFfmaLd * sizeof(float);
// The Rust launcher (src/ntk/gpu.rs) requests exactly this much dynamic shared memory.
static_assert(kFfmaSmem == 67584, "FFMA shared memory must match SMEM_FFMA in gpu.rs");

template <typename Tin, bool kStrided>
__device__ void gemm_ffma(const NtkvNtkGemmParams& p, const Tin* __restrict__ a, const Tin* __restrict__ b,
                          float* __restrict__ part) {
    NTKV_DYNAMIC_SMEM(unsigned char, smem_raw);
    float* sA = reinterpret_cast<float*>(smem_raw);          // [2][kDepth][kFfmaLd]
    float* sB = sA + 2 * kDepth * kFfmaLd;                    // [2][kDepth][kFfmaLd]
    const GemmCtx c = gemm_ctx(p);
    const int tid = threadIdx.x;
    const int lrow = tid & 31, lk = (tid >> 5) * 4;
    RegTileLoad<Tin, kStrided> ld(p, c, a, b, lrow, lk);
    const uint32_t row0 = ld.row0, col0 = ld.col0;
    auto sstore = [&](int buf) {
        float* da = sA + buf * kDepth * kFfmaLd;
        float* db = sB + buf * kDepth * kFfmaLd;
#pragma unroll
        for (int it = 0; it < 4; ++it)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                da[(lk + e) * kFfmaLd + lrow + 32 * it] = ld.ra[it][e];
                db[(lk + e) * kFfmaLd + lrow + 32 * it] = ld.rb[it][e];
            }
    };

    const int tx = tid & 15, ty = tid >> 4;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    auto gload = [&](int kt) { ld.load(p, c, kt); };
    two_buffer_pipeline(c.ktiles, gload, sstore, [&](int buf) {
        const float* ca = sA + buf * kDepth * kFfmaLd;
        const float* cb = sB + buf * kDepth * kFfmaLd;
#pragma unroll 4
        for (int kk = 0; kk < kDepth; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(ca + kk * kFfmaLd + ty * 4);
            const float4 a1 = *reinterpret_cast<const float4*>(ca + kk * kFfmaLd + 64 + ty * 4);
            const float4 b0 = *reinterpret_cast<const float4*>(cb + kk * kFfmaLd + tx * 4);
            const float4 b1 = *reinterpret_cast<const float4*>(cb + kk * kFfmaLd + 64 + tx * 4);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    });

    float* out = partial_plane(p, part, c);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint32_t r = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (r >= p.m1) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint32_t col = col0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
            if (col < p.m2) out[(uint64_t)r * p.m2 + col] = acc[i][j];
        }
    }
}


// One 32-deep k tile of a warp's 64 x (8·NI) block of C, whose top-left is (wr, wc) within the
// block tile, from shared memory rows of `ld` u32 words (k contiguous; ld·4 bytes is a
// multiple of 16 and rows land on distinct banks for 8 consecutive rows, so every ldmatrix
// phase is conflict-free). One mma step covers 8 k (tf32) or 16 k (bf16): 8 words per row
// either way. Fragments come from ldmatrix.x4: per step 4 loads for A (one per 16-row tile)
// and NI/2 for B (two 8-column tiles each), i.e. 4·NI mma per 4 + NI/2 loads. kCvt: the
// words are f32 values still to be rounded to tf32.
template <bool kBf16, bool kCvt, int NI>
__device__ __forceinline__ void mma_stage(float (&acc)[4][NI][4], const uint32_t* __restrict__ ca,
                                          const uint32_t* __restrict__ cb, int ld, int wr, int wc, int g,
                                          int t) {
    static_assert(NI % 2 == 0, "B fragments load two 8-column tiles at a time");
    const int lane = g * 4 + t;
    // A (16 x 8 words): matrices (rows 0-7, words 0-3), (rows 8-15, words 0-3), (rows 0-7,
    // words 4-7), (rows 8-15, words 4-7) are the fragment registers a0..a3 of both
    // m16n8k8.tf32 (a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)) and m16n8k16.bf16
    // (a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)).
    const uint32_t* a_lane = ca + (wr + (lane & 15)) * ld + (lane >> 4) * 4;
    // B (Bs[n][k] = B[k][n], n rows): matrices (n 0-7, words 0-3), (n 0-7, words 4-7),
    // (n 8-15, words 0-3), (n 8-15, words 4-7) are b0, b1 of column tile ni, then of ni + 1.
    const uint32_t* b_lane = cb + (wc + (lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 4;
#pragma unroll
    for (int ks = 0; ks < (kBf16 ? 2 : 4); ++ks) {
        const int w0 = ks * 8;
        uint32_t af[4][4], bfr[NI][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) ntkv::ldmatrix_x4(af[mi], ntkv::smem_u32(a_lane + mi * 16 * ld + w0));
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
            uint32_t r[4];
            ntkv::ldmatrix_x4(r, ntkv::smem_u32(b_lane + ni * 8 * ld + w0));
            bfr[ni][0] = r[0];
            bfr[ni][1] = r[1];
            bfr[ni + 1][0] = r[2];
            bfr[ni + 1][1] = r[3];
        }
        if (kCvt) {
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int e = 0; e < 4; ++e) af[mi][e] = ntkv::to_tf32(__uint_as_float(af[mi][e]));
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) bfr[ni][e] = ntkv::to_tf32(__uint_as_float(bfr[ni][e]));
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                if (kBf16)
                    ntkv::mma_m16n8k16<__nv_bfloat16>(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
                else
                    ntkv::mma_m16n8k8_tf32(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
            }
    }
}

template <int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[4][NI][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// Writes a warp's accumulators (c0, c1: (g, 2t + e); c2, c3: (g + 8, 2t + e - 2)) to the
// block's partial plane; (r0, c0) is the warp tile's top-left in C. Rows >= m1 and columns
// >= m2 are dropped.
template <int NI>
__device__ __forceinline__ void store_mma_acc(const NtkvNtkGemmParams& p, float* part, const GemmCtx& c,
                                              const float (&acc)[4][NI][4], uint32_t r0, uint32_t c0, int g,
                                              int t) {
    float* out = partial_plane(p, part, c);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t r = r0 + mi * 16 + g + (e >= 2 ? 8 : 0);
                const uint32_t col = c0 + ni * 8 + 2 * t + (e & 1);
                if (r < p.m1 && col < p.m2) out[(uint64_t)r * p.m2 + col] = acc[mi][ni][e];
            }
}

// ---- tensor-core flavours ------------------------------------------------------------------
// Shared: As[stage][row][k] (k contiguous, padded) holding tf32 bit patterns (u32) or bf16
// pairs. 8 warps as 2 (rows) x 4 (columns); each warp owns 64 x 32 of C as 4 x 4 mma tiles.
// Padding: tf32 rows are 36 words, bf16 rows 40 halves (20 words), which makes every
// fragment read below hit 32 distinct banks.
constexpr int kTf32Ld = kDepth + 4;   // u32 per row
constexpr int kBf16Ld = kDepth + 8;   // bf16 per row
constexpr size_t kTf32Smem = 2ull * 2 * kTile * kTf32Ld * sizeof(uint32_t);
constexpr size_t kBf16Smem = 2ull * 2 * kTile * kBf16Ld * sizeof(__nv_bfloat16);
static_assert(kTf32Smem == 73728, "TF32 shared memory must match SMEM_TF32 in gpu.rs");
static_assert(kBf16Smem == 40960, "BF16 shared memory must match SMEM_BF16 in gpu.rs");

template <typename Tin, bool kBf16, bool kStrided>
__device__ void gemm_mma(const NtkvNtkGemmParams& p, const Tin* __restrict__ a, const Tin* __restrict__ b,
                         float* __restrict__ part) {
    NTKV_DYNAMIC_SMEM(unsigned char, smem_raw);
    // Element counts per stage and operand, in u32 words.
    constexpr int kWordsLd = kBf16 ? kBf16Ld / 2 : kTf32Ld;
    constexpr int kStageWords = kTile * kWordsLd;
    uint32_t* sA = reinterpret_cast<uint32_t*>(smem_raw);  // [2][kTile][kWordsLd]
    uint32_t* sB = sA + 2 * kStageWords;

    const GemmCtx c = gemm_ctx(p);
    const int tid = threadIdx.x;
    // Loads: 8 lanes cover one row's 32 k (coalesced), 32 rows per pass, 4 passes.
    const int lrow = tid >> 3, lk = (tid & 7) * 4;
    RegTileLoad<Tin, kStrided> ld(p, c, a, b, lrow, lk);
    const uint32_t row0 = ld.row0, col0 = ld.col0;
    const auto& ra = ld.ra;
    const auto& rb = ld.rb;
    auto sstore = [&](int buf) {
        uint32_t* da = sA + buf * kStageWords;
        uint32_t* db = sB + buf * kStageWords;
#pragma unroll
        for (int it = 0; it < 4; ++it) {
            const int r = lrow + 32 * it;
            if (kBf16) {
                uint2 va = make_uint2(pack_bf16(ra[it][0], ra[it][1]), pack_bf16(ra[it][2], ra[it][3]));
                uint2 vb = make_uint2(pack_bf16(rb[it][0], rb[it][1]), pack_bf16(rb[it][2], rb[it][3]));
                *reinterpret_cast<uint2*>(da + r * kWordsLd + lk / 2) = va;
                *reinterpret_cast<uint2*>(db + r * kWordsLd + lk / 2) = vb;
            } else {
                uint4 va = make_uint4(ntkv::to_tf32(ra[it][0]), ntkv::to_tf32(ra[it][1]), ntkv::to_tf32(ra[it][2]), ntkv::to_tf32(ra[it][3]));
                uint4 vb = make_uint4(ntkv::to_tf32(rb[it][0]), ntkv::to_tf32(rb[it][1]), ntkv::to_tf32(rb[it][2]), ntkv::to_tf32(rb[it][3]));
                *reinterpret_cast<uint4*>(da + r * kWordsLd + lk) = va;
                *reinterpret_cast<uint4*>(db + r * kWordsLd + lk) = vb;
            }
        }
    };

    const int warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3;
    const int g = lane >> 2, t = lane & 3;
    float acc[4][4][4];
    zero_acc(acc);

    auto gload = [&](int kt) { ld.load(p, c, kt); };
    two_buffer_pipeline(c.ktiles, gload, sstore, [&](int buf) {
        mma_stage<kBf16, false, 4>(acc, sA + buf * kStageWords, sB + buf * kStageWords, kWordsLd, wm * 64, wn * 32,
                                   g, t);
    });

    store_mma_acc<4>(p, part, c, acc, row0 + wm * 64, col0 + wn * 32, g, t);
}


// ---- tensor-core flavours, cp.async multi-stage pipeline ----------------------------------------
// For inputs already in the mma's storage type (f32 for tf32, rounded at fragment load; bf16
// for bf16) whose rows, batches and depth are multiples of 16 bytes: every 16-byte chunk of a
// tile is then wholly inside or wholly outside the operand, and cp.async (zero-filling the
// outside ones) streams kStages tiles ahead, which hides global latency that the two-buffer
// register pipeline cannot at tensor-core rates.
constexpr int kAsyncThreads = 128;  // 4 warps, each 64 x 64 of C: half the shared reads per mma
constexpr int kAsyncStagesTf32 = 3;
constexpr int kAsyncStagesBf16 = 4;
constexpr size_t kTf32AsyncSmem = (size_t)kAsyncStagesTf32 * 2 * kTile * kTf32Ld * sizeof(float);
constexpr size_t kBf16AsyncSmem = (size_t)kAsyncStagesBf16 * 2 * kTile * kBf16Ld * sizeof(__nv_bfloat16);
static_assert(kTf32AsyncSmem == 110592, "must match SMEM_TF32_ASYNC in gpu.rs");
static_assert(kBf16AsyncSmem == 81920, "must match SMEM_BF16_ASYNC in gpu.rs");

template <bool kBf16>
__device__ void gemm_mma_async(const NtkvNtkGemmParams& p, const void* __restrict__ a_raw,
                               const void* __restrict__ b_raw, float* __restrict__ part) {
    using Tin = typename std::conditional<kBf16, __nv_bfloat16, float>::type;
    constexpr int kStages = kBf16 ? kAsyncStagesBf16 : kAsyncStagesTf32;
    constexpr int kLd = kBf16 ? kBf16Ld : kTf32Ld;        // elements per shared row
    constexpr int kElems = 16 / (int)sizeof(Tin);        // elements per 16-byte chunk
    constexpr int kChunksPerRow = kDepth / kElems;
    constexpr int kPerThread = kTile * kChunksPerRow / kAsyncThreads;
    constexpr int kStageElems = kTile * kLd;
    NTKV_DYNAMIC_SMEM(unsigned char, smem_raw);
    Tin* sA = reinterpret_cast<Tin*>(smem_raw);
    Tin* sB = sA + kStages * kStageElems;

    const GemmCtx c = gemm_ctx(p);
    const int tid = threadIdx.x;
    const Tin* abase = static_cast<const Tin*>(a_raw) + (uint64_t)c.z * p.a_batch_stride;
    const Tin* bbase = static_cast<const Tin*>(b_raw) + (uint64_t)c.z * p.b_batch_stride;
    const uint32_t row0 = c.tr * kTile, col0 = c.tc * kTile;

    auto issue = [&](int kt, int stage) {
        const uint64_t k0 = c.kbeg + (uint64_t)kt * kDepth;
#pragma unroll
        for (int it = 0; it < kPerThread; ++it) {
            const int chunk = tid + it * kAsyncThreads;
            const int r = chunk / kChunksPerRow;
            const int kc = (chunk % kChunksPerRow) * kElems;
            const uint64_t k = k0 + kc;
            const bool kin = k < c.kend;
            const bool va = kin && row0 + r < p.m1;
            const bool vb = kin && col0 + r < p.m2;
            const Tin* ga = va ? abase + (uint64_t)(row0 + r) * p.a_row_stride + k : abase;
            const Tin* gb = vb ? bbase + (uint64_t)(col0 + r) * p.b_row_stride + k : bbase;
            // src-size 0: nothing is read, the 16 bytes are zero-filled.
            ntkv::cp_async_cg16(ntkv::smem_u32(sA + stage * kStageElems + r * kLd + kc), ga, va ? 16u : 0u);
            ntkv::cp_async_cg16(ntkv::smem_u32(sB + stage * kStageElems + r * kLd + kc), gb, vb ? 16u : 0u);
        }
    };

    // 4 warps as 2 x 2, each owning 64 x 64 of C (4 x 8 mma tiles).
    const int warp = tid >> 5, lane = tid & 31;
    const int wr = (warp >> 1) * 64, wc = (warp & 1) * 64;
    const int g = lane >> 2, t = lane & 3;
    float acc[4][8][4];
    zero_acc(acc);

    // One commit group per k tile (empty past the end) keeps wait_group's count exact.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < c.ktiles) issue(s, s);
        ntkv::cp_async_commit();
    }
    for (int kt = 0; kt < c.ktiles; ++kt) {
        ntkv::cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread) ...
        __syncthreads();               // ... for every thread, and tile kt-1's stage is free
        const int next = kt + kStages - 1;
        if (next < c.ktiles) issue(next, next % kStages);
        ntkv::cp_async_commit();
        const int stage = kt % kStages;
        mma_stage<kBf16, !kBf16, 8>(acc, reinterpret_cast<const uint32_t*>(sA + stage * kStageElems),
                                    reinterpret_cast<const uint32_t*>(sB + stage * kStageElems),
                                    kLd * (int)sizeof(Tin) / 4, wr, wc, g, t);
    }
    ntkv::cp_async_wait<0>();
    store_mma_acc<8>(p, part, c, acc, row0 + wr, col0 + wc, g, t);
}

}  // namespace

// ---- GEMM entry points: ntkv_ntk_gemm_<input dtype>_<arithmetic> -----------------------------
// Signature: (NtkvNtkGemmParams, const T* a, const T* b, float* partials). Grid: x = tiles
// (all, or the upper triangle when symmetric), y = splits, z = batch; 256 threads; dynamic
// shared memory kFfmaSmem / kTf32Smem / kBf16Smem (67584 / 73728 / 40960 bytes).
#define NTKV_NTK_GEMM(NAME, T, MIN_BLOCKS, BODY)                                                       \
    extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS)                                \
        NAME(const NtkvNtkGemmParams p, const T* __restrict__ a, const T* __restrict__ b,            \
             float* __restrict__ part) {                                                              \
        BODY;                                                                                         \
    }

// The six (input dtype × arithmetic) entry points of one operand layout: PREFIX_<dtype>_<arith>,
// kStrided = STRIDED; BF16_FFMA_MIN_BLOCKS is the bf16 FFMA tile's __launch_bounds__ minimum.
#define NTKV_NTK_GEMM_SET(PREFIX, STRIDED, BF16_FFMA_MIN_BLOCKS)                                          \
    NTKV_NTK_GEMM(PREFIX##_f32_ffma, float, 1, (gemm_ffma<float, STRIDED>(p, a, b, part)))                    \
    NTKV_NTK_GEMM(PREFIX##_bf16_ffma, __nv_bfloat16, BF16_FFMA_MIN_BLOCKS,                                 \
                  (gemm_ffma<__nv_bfloat16, STRIDED>(p, a, b, part)))                                      \
    NTKV_NTK_GEMM(PREFIX##_f32_tf32, float, 1, (gemm_mma<float, false, STRIDED>(p, a, b, part)))             \
    NTKV_NTK_GEMM(PREFIX##_bf16_tf32, __nv_bfloat16, 1, (gemm_mma<__nv_bfloat16, false, STRIDED>(p, a, b, part))) \
    NTKV_NTK_GEMM(PREFIX##_f32_bf16, float, 1, (gemm_mma<float, true, STRIDED>(p, a, b, part)))              \
    NTKV_NTK_GEMM(PREFIX##_bf16_bf16, __nv_bfloat16, 1, (gemm_mma<__nv_bfloat16, true, STRIDED>(p, a, b, part)))

NTKV_NTK_GEMM_SET(ntkv_ntk_gemm, false, 2)
// cp.async pipelines (host picks them when rows, batches and k are multiples of 16 bytes);
// dynamic shared memory kTf32AsyncSmem / kBf16AsyncSmem (110592 / 81920 bytes);
// 128 threads per block.
extern "C" __global__ void __launch_bounds__(kAsyncThreads, 2)
    ntkv_ntk_gemm_f32_tf32_async(const NtkvNtkGemmParams p, const float* __restrict__ a,
                                 const float* __restrict__ b, float* __restrict__ part) {
    gemm_mma_async<false>(p, a, b, part);
}
extern "C" __global__ void __launch_bounds__(kAsyncThreads, 2)
    ntkv_ntk_gemm_bf16_bf16_async(const NtkvNtkGemmParams p, const __nv_bfloat16* __restrict__ a,
                                  const __nv_bfloat16* __restrict__ b, float* __restrict__ part) {
    gemm_mma_async<true>(p, a, b, part);
}

// ---- split-K reduction with the contraction's output layout -----------------------------------
// Shared by ntkv_ntk_reduce (kinds 0-2) and ntkv_gemm_reduce (kind 3). Output element idx is
// decoded to (z, r, c) of the product; the partials of (z, r, c) are added in split order
// s = 0, 1, ..., splits - 1 starting from +0, then multiplied by scale. kind 3 writes
// out[z * c_batch_stride + r * ldc + c]; the other kinds write out[idx].
__device__ __forceinline__ void split_reduce(const NtkvNtkReduceParams& p, const float* __restrict__ part,
                                             float* __restrict__ out) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.n_out; idx += stride) {
        uint32_t z, r, c;
        if (p.kind == 1) {
            uint64_t q = idx;
            const uint32_t bb = (uint32_t)(q % p.o);
            q /= p.o;
            const uint32_t aa = (uint32_t)(q % p.o);
            q /= p.o;
            const uint32_t j = (uint32_t)(q % p.n2);
            const uint32_t i = (uint32_t)(q / p.n2);
            z = 0;
            r = i * p.o + aa;
            c = j * p.o + bb;
        } else if (p.kind == 2) {
            uint64_t q = idx;
            const uint32_t aa = (uint32_t)(q % p.o);
            q /= p.o;
            z = aa;
            c = (uint32_t)(q % p.n2);
            r = (uint32_t)(q / p.n2);
        } else {
            z = (uint32_t)(idx / p.plane);
            const uint64_t rem = idx % p.plane;
            r = (uint32_t)(rem / p.m2);
            c = (uint32_t)(rem % p.m2);
        }
        const uint64_t dst = p.kind == 3 ? (uint64_t)z * p.c_batch_stride + (uint64_t)r * p.ldc + c : idx;
        if (p.symmetric && r / kTile > c / kTile) {
            const uint32_t tmp = r;
            r = c;
            c = tmp;
        }
        const float* src = part + (uint64_t)z * p.splits * p.plane + (uint64_t)r * p.m2 + c;
        float s = 0.f;
        for (uint32_t k = 0; k < p.splits; ++k) s += src[(uint64_t)k * p.plane];
        out[dst] = s * p.scale;
    }
}

extern "C" __global__ void ntkv_ntk_reduce(const NtkvNtkReduceParams p, const float* __restrict__ part,
                                           float* __restrict__ out) {
    split_reduce(p, part, out);
}

// ==== ntkv_gemm_*: the gemm module's strided kernels =============================================
// The same tiles as ntkv_ntk_gemm_* (the templates above, kStrided = true), for operands that
// may be k-major: with p.layout bit 0 (A) or bit 1 (B) set, element (row, q) of that operand is
// at z * batch_stride + q * row_stride + row instead of z * batch_stride + row * row_stride + q.
// Register-staged loaders only (256 threads, shared memory as the ntkv_ntk_gemm_* flavour of the
// same arithmetic); the host uses ntkv_ntk_gemm_* whenever both operands are k-contiguous. The
// strided bf16 FFMA tile asks for one block per SM, not two: at two (128 registers) the
// run-time k-major branch spills.
NTKV_NTK_GEMM_SET(ntkv_gemm, true, 1)

// The gemm module's split-K reduction into a row-major C with leading dimension ldc and batch
// stride c_batch_stride (kind 3 of split_reduce).
extern "C" __global__ void ntkv_gemm_reduce(const NtkvNtkReduceParams p, const float* __restrict__ part,
                                            float* __restrict__ out) {
    split_reduce(p, part, out);
}
// ==== end of ntkv_gemm_* ========================================================================

// ---- Pseudo-NTK pre-sum over outputs ------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void presum(const NtkvNtkPresumParams& p, const T* __restrict__ j, float* __restrict__ out) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.n_out; idx += stride) {
        const uint64_t i = idx / p.p, q = idx % p.p;
        const T* src = j + i * p.o * p.p + q;
        float s = 0.f;
        for (uint32_t a = 0; a < p.o; ++a) s += ntkv::to_f32(src[(uint64_t)a * p.p]);
        out[idx] = s;
    }
}
extern "C" __global__ void ntkv_ntk_presum_f32(const NtkvNtkPresumParams p, const float* __restrict__ j,
                                               float* __restrict__ out) {
    presum(p, j, out);
}
extern "C" __global__ void ntkv_ntk_presum_bf16(const NtkvNtkPresumParams p, const __nv_bfloat16* __restrict__ j,
                                                float* __restrict__ out) {
    presum(p, j, out);
}

// ---- factored NTK: combine one layer's A-Gram and G-Gram ---------------------------------------
extern "C" __global__ void ntkv_ntk_combine(const NtkvNtkCombineParams p, const float* __restrict__ aa,
                                            const float* __restrict__ gg, float* __restrict__ out) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t aa_cols = (uint64_t)p.n2 * p.t;
    const uint64_t gg_cols = aa_cols * p.e;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.n_out; idx += stride) {
        uint64_t q = idx;
        uint32_t oa, ob;
        if (p.kind == 1) {
            oa = ob = (uint32_t)(q % p.e);
            q /= p.e;
        } else {
            ob = (uint32_t)(q % p.e);
            q /= p.e;
            oa = (uint32_t)(q % p.e);
            q /= p.e;
        }
        const uint64_t j = q % p.n2, i = q / p.n2;
        float s = 0.f;
        for (uint32_t ti = 0; ti < p.t; ++ti) {
            const uint64_t ar = i * p.t + ti;
            const uint64_t gr = ar * p.e + oa;
            for (uint32_t si = 0; si < p.t; ++si) {
                const uint64_t ac = j * p.t + si;
                const uint64_t gc = ac * p.e + ob;
                s = fmaf(aa[ar * aa_cols + ac] + p.beta, gg[gr * gg_cols + gc], s);
            }
        }
        s *= p.scale;
        out[idx] = p.accumulate ? out[idx] + s : s;
    }
}

// ---- MLP helper ---------------------------------------------------------------------------------
__device__ __forceinline__ float act_f(uint32_t act, float x) {
    switch (act) {
        case 0: return x > 0.f ? x : 0.f;
        case 1: return tanhf(x);
        default: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    }
}
__device__ __forceinline__ float act_grad(uint32_t act, float x) {
    switch (act) {
        case 0: return x > 0.f ? 1.f : 0.f;
        case 1: {
            const float th = tanhf(x);
            return 1.f - th * th;
        }
        default: {
            const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
            const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
            return cdf + x * pdf;
        }
    }
}

extern "C" __global__ void ntkv_ntk_bias_act(const NtkvNtkBiasActParams p, const float* __restrict__ pre,
                                             const float* __restrict__ bias, float* __restrict__ z,
                                             float* __restrict__ act_out) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.total; idx += stride) {
        float v = pre[idx];
        if (p.has_bias) v += bias[idx % p.cols];
        z[idx] = v;
        act_out[idx] = p.apply_act ? act_f(p.act, v) : v;
    }
}

extern "C" __global__ void ntkv_ntk_cotangent(const NtkvNtkCotangentParams p, const float* __restrict__ pre,
                                              const float* __restrict__ z, float* __restrict__ g) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.total; idx += stride) {
        const uint64_t col = idx % p.cols;
        const uint64_t row = idx / p.cols;  // (n, a)
        if (p.mode == 0) {
            g[idx] = (row % p.o) == col ? 1.f : 0.f;
        } else {
            const uint64_t n = row / p.o;
            g[idx] = pre[idx] * act_grad(p.act, z[n * p.cols + col]);
        }
    }
}

extern "C" __global__ void ntkv_ntk_jvp(const NtkvNtkJvpParams p, const float* __restrict__ pre,
                                        const float* __restrict__ t1, const float* __restrict__ t2,
                                        const float* __restrict__ bias, const float* __restrict__ dbias,
                                        float* __restrict__ a_out, float* __restrict__ da_out) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.total; idx += stride) {
        const uint64_t col = idx % p.cols;
        float zv = pre[idx];
        float dz = t1[idx];
        if (p.has_t2) dz += t2[idx];
        if (p.has_bias) {
            zv += bias[col];
            dz += dbias[col];
        }
        if (p.is_last) {
            a_out[idx] = zv + dz;
        } else {
            a_out[idx] = act_f(p.act, zv);
            da_out[idx] = act_grad(p.act, zv) * dz;
        }
    }
}

// ---- metrics ----------------------------------------------------------------------------------
constexpr int kStats = 6;

__device__ __forceinline__ double block_sum(double v, double* red) {
    // Fixed-shape tree over 256 threads: deterministic.
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    const double r = red[0];
    __syncthreads();
    return r;
}

// Per-block partial sums (see NtkvNtkStatsParams); launch with 256 threads and p.blocks blocks.
extern "C" __global__ void __launch_bounds__(256) ntkv_ntk_stats(const NtkvNtkStatsParams p, const float* __restrict__ k,
                                                                 const float* __restrict__ m,
                                                                 const uint32_t* __restrict__ labels,
                                                                 const double* __restrict__ cent,
                                                                 double* __restrict__ partials) {
    __shared__ double red[256];
    double s[kStats] = {0, 0, 0, 0, 0, 0};
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint32_t n = p.n;
    for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < p.total; idx += stride) {
        const uint32_t i = (uint32_t)(idx / n), j = (uint32_t)(idx % n);
        double kv = (double)k[idx];
        if (p.center) kv = kv - cent[i] - cent[n + j] + cent[2 * n];
        s[0] += kv;
        s[1] += kv * kv;
        if (i == j) s[2] += kv;
        if (p.m_kind != 0) {
            double mv;
            if (p.m_kind == 1) {
                mv = labels[i] == labels[j] ? 1.0 : -1.0;
            } else {
                mv = (double)m[idx];
                if (p.center) mv = mv - cent[2 * n + 1 + i] - cent[3 * n + 1 + j] + cent[4 * n + 1];
            }
            s[3] += mv;
            s[4] += mv * mv;
            s[5] += kv * mv;
        }
    }
    for (int q = 0; q < kStats; ++q) {
        const double t = block_sum(s[q], red);
        if (threadIdx.x == 0) partials[(uint64_t)blockIdx.x * kStats + q] = t;
    }
}

// One block of 256 threads: out[q] = sum over blocks (fixed order) of partials[b][q].
extern "C" __global__ void __launch_bounds__(256) ntkv_ntk_stats_finish(const NtkvNtkStatsParams p,
                                                                        const double* __restrict__ partials,
                                                                        double* __restrict__ out) {
    __shared__ double red[256];
    for (int q = 0; q < kStats; ++q) {
        double s = 0;
        for (uint32_t b = threadIdx.x; b < p.blocks; b += blockDim.x) s += partials[(uint64_t)b * kStats + q];
        const double t = block_sum(s, red);
        if (threadIdx.x == 0) out[q] = t;
    }
}

// Row means (blocks 0..n-1, one row each), column means (thread per column, grid-stride over
// blocks n..), written to out = [row n][col n]; the grand mean is ntkv_ntk_grand_mean's.
extern "C" __global__ void __launch_bounds__(256) ntkv_ntk_means(const NtkvNtkMeansParams p, const float* __restrict__ x,
                                                                 double* __restrict__ out) {
    __shared__ double red[256];
    const uint32_t n = p.n;
    if (blockIdx.x < n) {
        const uint32_t i = blockIdx.x;
        double s = 0;
        for (uint32_t j = threadIdx.x; j < n; j += blockDim.x) s += (double)x[(uint64_t)i * n + j];
        const double t = block_sum(s, red);
        if (threadIdx.x == 0) out[i] = t / n;
    } else {
        const uint32_t col = (blockIdx.x - n) * blockDim.x + threadIdx.x;
        if (col < n) {
            double s = 0;
            for (uint32_t i = 0; i < n; ++i) s += (double)x[(uint64_t)i * n + col];
            out[n + col] = s / n;
        }
    }
}

// One block: out[2n] = mean of the row means out[0..n).
extern "C" __global__ void __launch_bounds__(256) ntkv_ntk_grand_mean(const NtkvNtkMeansParams p, double* __restrict__ out) {
    __shared__ double red[256];
    double s = 0;
    for (uint32_t i = threadIdx.x; i < p.n; i += blockDim.x) s += out[i];
    const double t = block_sum(s, red);
    if (threadIdx.x == 0) out[2 * p.n] = t / p.n;
}
