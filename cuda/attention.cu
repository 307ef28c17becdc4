// attention.cu: block-sparse flash attention prefill.
//
// FA2-style: one CTA per work item (BR query rows of one query head of one batch entry),
// BR/16 warps, each warp owning 16 query rows. The CPU plan (src/attention/plan.rs) lists,
// per item, exactly the column blocks to visit, so skipped blocks cost nothing and the kernel
// only walks a list. Per listed block:
//   1. cp.async the K and V tiles (BC keys x D) into shared memory, double-buffered: tile i+1
//      is in flight while tile i is computed;
//   2. S = Q K^T with mma.m16n8k16 (Q fragments live in registers for the whole CTA);
//   3. mask S when the plan flagged the block (causal diagonal, partial last key block,
//      token-exact graph mask), in log2-scaled units;
//   4. online softmax in f32 with exp2f; a row that has seen no visible key keeps m = -inf and
//      uses 0 as its exponent base, so (-inf) - (-inf) never happens;
//   5. P is rounded to the storage dtype in registers (the accumulator layout of S is the
//      A-operand layout of the next mma) and O += P V with ldmatrix.trans on V.
// Output rows are normalised by the quad-reduced row sum; rows with no visible key write 0 and
// lse = -inf. The reduction order is fixed, so results are bit-reproducible.
//
// Shared memory rows are padded by 8 elements (16 bytes): a row stride of D+8 elements puts
// the 8 rows an ldmatrix phase reads in 8 different 16-byte bank groups, so neither the
// cp.async stores nor the ldmatrix loads conflict.
//
// mma.m16n8k16 fragment layouts (PTX ISA), lane = 4*g + t (g = lane>>2, t = lane&3):
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1],
//                         a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g],   b1 = B[2t+8..2t+9][g]
//   C (16x8, f32):        c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// (the lower-numbered element is the lower half of each 32-bit register).
#include "ntkv_common.cuh"

namespace {

// Rounds two f32 to the storage dtype and packs them, `lo` in the lower half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// The two bf16 halves of a packed pair, widened exactly to f32 (bf16 is the top half of f32).
__device__ __forceinline__ float lo_half(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float hi_half(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

template <typename T, int D, int BR, int BC>
struct PrefillConfig {
    static constexpr int kWarps = BR / 16;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRowStride = D + 8;            // elements per padded smem row
    static constexpr int kTileElems = BC * kRowStride;  // one K or V tile
    static constexpr int kChunksPerRow = D / 8;         // 16-byte chunks per row
    static constexpr int kTileChunks = BC * kChunksPerRow;
    static constexpr int kChunksPerThread = kTileChunks / kThreads;
    static constexpr int kSub = 64;         // keys per softmax step: a BC tile is walked in 64-key halves
    static constexpr int kSubTiles = BC / kSub;
    static constexpr int kSTiles = kSub / 8;  // n-tiles of S (keys) per step
    static constexpr int kQkSteps = D / 16; // k-steps of Q K^T (head dim)
    static constexpr int kOTiles = D / 8;   // n-tiles of O (head dim)
    static constexpr int kPvSteps = kSub / 16; // k-steps of P V (keys) per step
    static_assert(BR == 64 || BR == 128, "BR");
    static_assert(BC == 64 || BC == 128, "BC");
    static_assert(D == 64 || D == 128, "D");
    static_assert(kTileChunks % kThreads == 0, "tile chunks must split evenly");
    static_assert(kQkSteps % 2 == 0 && kOTiles % 2 == 0, "x4 ldmatrix pairs");
};

template <typename T, int D, int BR, int BC, bool SPLIT>
__device__ __forceinline__ void prefill(const NtkvAttnPrefillParams& p, const uint32_t* __restrict__ items,
                                        const uint32_t* __restrict__ blocks, const uint32_t* __restrict__ tmask,
                                        const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse) {
    using C = PrefillConfig<T, D, BR, BC>;
    NTKV_DYNAMIC_SMEM(unsigned char, smem_raw);
    T* s_k = reinterpret_cast<T*>(smem_raw);  // [2][BC][D+8]
    T* s_v = s_k + 2 * C::kTileElems;         // [2][BC][D+8]

    const uint32_t item_idx = blockIdx.x;
    if (item_idx >= p.n_items) return;  // uniform over the CTA
    const uint32_t* it = items + (size_t)item_idx * NTKV_ATTN_ITEM_WORDS;
    const uint32_t q_row0 = it[0];
    const uint32_t n_rows = it[1];
    const uint32_t k_tok0 = it[2];
    const uint32_t tk = it[3];
    const int causal_off = static_cast<int>(it[4]);
    const uint32_t list_begin = it[5];
    const uint32_t list_end = it[6];
    const uint32_t q_head = it[7];
    const uint32_t kv_head = q_head / (p.num_q_heads / p.num_kv_heads);

    const size_t q_stride = (size_t)p.num_q_heads * D;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const T* k_base = k + (size_t)k_tok0 * kv_stride + (size_t)kv_head * D;
    const T* v_base = v + (size_t)k_tok0 * kv_stride + (size_t)kv_head * D;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int row0 = warp * 16 + g;  // this thread's two rows in the block: row0, row0 + 8
    const int row1 = row0 + 8;
    const bool ok0 = row0 < (int)n_rows;
    const bool ok1 = row1 < (int)n_rows;

    // Copies the K and V tiles of column block `col` into buffer `buf`; keys >= tk zero-fill.
    auto load_tile = [&](uint32_t col, int buf) {
        const uint32_t key0 = col * BC;
        T* dk = s_k + buf * C::kTileElems;
        T* dv = s_v + buf * C::kTileElems;
#pragma unroll
        for (int i = 0; i < C::kChunksPerThread; ++i) {
            const int c = tid + i * C::kThreads;
            const int r = c / C::kChunksPerRow;
            const int ch = c % C::kChunksPerRow;
            const uint32_t key = key0 + (uint32_t)r;
            const bool in = key < tk;
            // Out-of-range rows point at the entry's first key (always valid: tk > 0 whenever a
            // block is listed) and copy 0 bytes.
            const size_t goff = in ? (size_t)key * kv_stride + (size_t)ch * 8 : 0;
            const uint32_t bytes = in ? 16u : 0u;
            const int soff = r * C::kRowStride + ch * 8;
            ntkv::cp_async_cg16(ntkv::smem_u32(dk + soff), k_base + goff, bytes);
            ntkv::cp_async_cg16(ntkv::smem_u32(dv + soff), v_base + goff, bytes);
        }
    };

    const uint32_t n_blocks = list_end - list_begin;
    if (n_blocks > 0) {
        load_tile(blocks[(size_t)list_begin * NTKV_ATTN_BLOCK_WORDS], 0);
        ntkv::cp_async_commit();
    }

    // Q fragments (A operand), straight from global memory: 32-bit loads of element pairs.
    uint32_t qf[C::kQkSteps][4];
    {
        const uint32_t* q0 =
            ok0 ? reinterpret_cast<const uint32_t*>(q + (size_t)(q_row0 + row0) * q_stride + (size_t)q_head * D) : nullptr;
        const uint32_t* q1 =
            ok1 ? reinterpret_cast<const uint32_t*>(q + (size_t)(q_row0 + row1) * q_stride + (size_t)q_head * D) : nullptr;
#pragma unroll
        for (int kk = 0; kk < C::kQkSteps; ++kk) {
            qf[kk][0] = ok0 ? __ldg(q0 + kk * 8 + t) : 0u;
            qf[kk][1] = ok1 ? __ldg(q1 + kk * 8 + t) : 0u;
            qf[kk][2] = ok0 ? __ldg(q0 + kk * 8 + 4 + t) : 0u;
            qf[kk][3] = ok1 ? __ldg(q1 + kk * 8 + 4 + t) : 0u;
        }
    }

    float o_acc[C::kOTiles][4];
#pragma unroll
    for (int dn = 0; dn < C::kOTiles; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[dn][e] = 0.f;
    }
    float m0 = -INFINITY, m1 = -INFINITY;  // running max, log2-scaled units
    float l0 = 0.f, l1 = 0.f;              // this thread's share of the running row sums
    const float scale_log2 = p.scale_log2;

    for (uint32_t i = 0; i < n_blocks; ++i) {
        const int buf = (int)(i & 1u);
        // Tile i has landed for this thread's copies; the barrier makes every thread's copies
        // visible and guarantees all threads finished reading buffer buf^1 (iteration i-1)
        // before it is overwritten below.
        ntkv::cp_async_wait<0>();
        __syncthreads();
        if (i + 1 < n_blocks) {
            load_tile(blocks[(size_t)(list_begin + i + 1) * NTKV_ATTN_BLOCK_WORDS], buf ^ 1);
            ntkv::cp_async_commit();
        }
        const uint32_t* entry = blocks + (size_t)(list_begin + i) * NTKV_ATTN_BLOCK_WORDS;
        const uint32_t col = entry[0];
        const bool elem_check = entry[1] != 0u;
        const uint32_t tmask_id = entry[2];

        const bool has_tmask = tmask_id != NTKV_ATTN_NO_TOKEN_MASK;
        const T* tile_k = s_k + buf * C::kTileElems;
        const T* tile_v = s_v + buf * C::kTileElems;
        // Not unrolled: the two 64-key halves of a BC = 128 tile share nothing, and unrolling
        // them pushed the D = 128, BC = 128 kernels to 255 registers with spills.
#pragma unroll 1
        for (int sub = 0; sub < C::kSubTiles; ++sub) {
            // ---- S = Q K^T (16 rows x 64 keys per warp) ----
            float s[C::kSTiles][4];
#pragma unroll
            for (int j = 0; j < C::kSTiles; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
            }
#pragma unroll
            for (int j = 0; j < C::kSTiles; ++j) {
#pragma unroll
                for (int kk2 = 0; kk2 < C::kQkSteps / 2; ++kk2) {
                    // Matrix m = lane>>3 covers keys 64sub + 8j .. +7 and head dims 32*kk2 + 8m .. +7, so
                    // the four registers are b0, b1 of k-step 2*kk2 and b0, b1 of k-step 2*kk2+1.
                    uint32_t b[4];
                    const int key = sub * C::kSub + 8 * j + (lane & 7);
                    const int d = 32 * kk2 + 8 * (lane >> 3);
                    ntkv::ldmatrix_x4(b, ntkv::smem_u32(tile_k + key * C::kRowStride + d));
                    ntkv::mma_m16n8k16<T>(s[j], qf[2 * kk2], b[0], b[1]);
                    ntkv::mma_m16n8k16<T>(s[j], qf[2 * kk2 + 1], b[2], b[3]);
                }
            }

            // ---- scale to log2 units, mask ----
#pragma unroll
            for (int j = 0; j < C::kSTiles; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
            }
            if (elem_check || has_tmask) {
                const uint32_t* tm0 = has_tmask ? tmask + ((size_t)tmask_id * BR + row0) * (BC / 32) : nullptr;
                const uint32_t* tm1 = has_tmask ? tmask + ((size_t)tmask_id * BR + row1) * (BC / 32) : nullptr;
#pragma unroll
                for (int j = 0; j < C::kSTiles; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = (e < 2) ? row0 : row1;
                        const int kc = sub * C::kSub + 8 * j + 2 * t + (e & 1);  // key within the block
                        const uint32_t key = col * BC + (uint32_t)kc;
                        bool vis = key < tk;
                        if (p.causal) vis = vis && (long long)key <= (long long)row + causal_off;
                        if (has_tmask) {
                            const uint32_t w = __ldg(((e < 2) ? tm0 : tm1) + (kc >> 5));
                            vis = vis && ((w >> (kc & 31)) & 1u);
                        }
                        if (!vis) s[j][e] = -INFINITY;
                    }
                }
            }

            // ---- online softmax ----
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < C::kSTiles; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            // A row with nothing visible so far keeps m = -inf; its exponent base is 0 so that
            // exp2(-inf - 0) = 0 everywhere and no (-inf) - (-inf) NaN appears.
            const float base0 = (mx0 == -INFINITY) ? 0.f : mx0;
            const float base1 = (mx1 == -INFINITY) ? 0.f : mx1;
            const float alpha0 = exp2f(m0 - base0);
            const float alpha1 = exp2f(m1 - base1);
            m0 = mx0;
            m1 = mx1;
            l0 *= alpha0;
            l1 *= alpha1;
#pragma unroll
            for (int dn = 0; dn < C::kOTiles; ++dn) {
                o_acc[dn][0] *= alpha0;
                o_acc[dn][1] *= alpha0;
                o_acc[dn][2] *= alpha1;
                o_acc[dn][3] *= alpha1;
            }
#pragma unroll
            for (int j = 0; j < C::kSTiles; ++j) {
                s[j][0] = exp2f(s[j][0] - base0);
                s[j][1] = exp2f(s[j][1] - base0);
                s[j][2] = exp2f(s[j][2] - base1);
                s[j][3] = exp2f(s[j][3] - base1);
                l0 += s[j][0] + s[j][1];
                l1 += s[j][2] + s[j][3];
            }

            // ---- O += P V ----
#pragma unroll
            for (int kk = 0; kk < C::kPvSteps; ++kk) {
                // The C layout of S n-tiles 2kk and 2kk+1 is the A layout of keys 16kk..16kk+15.
                const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                       pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                       pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
                // SPLIT (bf16): the rounding residual of P, P - hi, as a second operand; it shares the V
                // fragments, so P V = hi V + lo V costs one more mma and no more loads.
                uint32_t a_lo[4] = {0u, 0u, 0u, 0u};
                if constexpr (SPLIT) {
                    a_lo[0] = pack2<T>(s[2 * kk][0] - lo_half(a[0]), s[2 * kk][1] - hi_half(a[0]));
                    a_lo[1] = pack2<T>(s[2 * kk][2] - lo_half(a[1]), s[2 * kk][3] - hi_half(a[1]));
                    a_lo[2] = pack2<T>(s[2 * kk + 1][0] - lo_half(a[2]), s[2 * kk + 1][1] - hi_half(a[2]));
                    a_lo[3] = pack2<T>(s[2 * kk + 1][2] - lo_half(a[3]), s[2 * kk + 1][3] - hi_half(a[3]));
                }
#pragma unroll
                for (int dn2 = 0; dn2 < C::kOTiles / 2; ++dn2) {
                    // Matrix m = lane>>3 covers keys 16kk + 8(m&1) .. +7 and head dims
                    // 16dn2 + 8(m>>1) .. +7; transposed, the registers are b0, b1 of n-tile 2dn2 and
                    // b0, b1 of n-tile 2dn2+1.
                    uint32_t b[4];
                    const int key = sub * C::kSub + 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
                    const int d = 16 * dn2 + 8 * (lane >> 4);
                    ntkv::ldmatrix_x4<true>(b, ntkv::smem_u32(tile_v + key * C::kRowStride + d));
                    ntkv::mma_m16n8k16<T>(o_acc[2 * dn2], a, b[0], b[1]);
                    ntkv::mma_m16n8k16<T>(o_acc[2 * dn2 + 1], a, b[2], b[3]);
                    if constexpr (SPLIT) {
                        ntkv::mma_m16n8k16<T>(o_acc[2 * dn2], a_lo, b[0], b[1]);
                        ntkv::mma_m16n8k16<T>(o_acc[2 * dn2 + 1], a_lo, b[2], b[3]);
                    }
                }
            }
        }
    }

    // ---- finalize: quad-reduce the row sums, normalise, store ----
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // l == 0 exactly when the row saw no visible key (otherwise its max term adds exp2(0) = 1).
    // A NaN l (a NaN in q, or in k or v of a visible key) must stay NaN in o and lse like the
    // reference, not pass for an empty row: hence == 0, not > 0.
    const float inv0 = l0 == 0.f ? 0.f : 1.f / l0;
    const float inv1 = l1 == 0.f ? 0.f : 1.f / l1;
    constexpr float kLn2 = 0.69314718055994530942f;
    if (ok0) {
        uint32_t* orow = reinterpret_cast<uint32_t*>(o + (size_t)(q_row0 + row0) * q_stride + (size_t)q_head * D);
#pragma unroll
        for (int dn = 0; dn < C::kOTiles; ++dn) orow[dn * 4 + t] = pack2<T>(o_acc[dn][0] * inv0, o_acc[dn][1] * inv0);
        if (t == 0) lse[(size_t)q_head * p.tq_total + q_row0 + row0] = l0 == 0.f ? -INFINITY : (m0 + log2f(l0)) * kLn2;
    }
    if (ok1) {
        uint32_t* orow = reinterpret_cast<uint32_t*>(o + (size_t)(q_row0 + row1) * q_stride + (size_t)q_head * D);
#pragma unroll
        for (int dn = 0; dn < C::kOTiles; ++dn) orow[dn * 4 + t] = pack2<T>(o_acc[dn][2] * inv1, o_acc[dn][3] * inv1);
        if (t == 0) lse[(size_t)q_head * p.tq_total + q_row0 + row1] = l1 == 0.f ? -INFINITY : (m1 + log2f(l1)) * kLn2;
    }
}

}  // namespace

// One extern "C" entry per (dtype, D, BR, BC), plus bf16 `_split` entries that send P as
// hi + lo (PvPrecision::Split on the Rust side). Signature of every entry:
//   (NtkvAttnPrefillParams p, const u32* items, const u32* blocks, const u32* tmask,
//    const T* q, const T* k, const T* v, T* o, float* lse)
// Dynamic shared memory: 4 * BC * (D + 8) * 2 bytes. Block: BR / 16 warps.
#define NTKV_ATTN_PREFILL(NAME, T, D, BR, BC, SPLIT)                                                                     \
    extern "C" __global__ void __launch_bounds__(BR * 2, 1)                                                      \
        NAME(const NtkvAttnPrefillParams p, const uint32_t* __restrict__ items,                                 \
             const uint32_t* __restrict__ blocks, const uint32_t* __restrict__ tmask, const T* __restrict__ q, \
             const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse) {     \
        prefill<T, D, BR, BC, SPLIT>(p, items, blocks, tmask, q, k, v, o, lse);                                        \
    }

NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d64_br64_bc64, __half, 64, 64, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d64_br64_bc128, __half, 64, 64, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d64_br128_bc64, __half, 64, 128, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d64_br128_bc128, __half, 64, 128, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d128_br64_bc64, __half, 128, 64, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d128_br64_bc128, __half, 128, 64, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d128_br128_bc64, __half, 128, 128, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_f16_d128_br128_bc128, __half, 128, 128, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br64_bc64, __nv_bfloat16, 64, 64, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br64_bc64_split, __nv_bfloat16, 64, 64, 64, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br64_bc128, __nv_bfloat16, 64, 64, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br64_bc128_split, __nv_bfloat16, 64, 64, 128, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br128_bc64, __nv_bfloat16, 64, 128, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br128_bc64_split, __nv_bfloat16, 64, 128, 64, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br128_bc128, __nv_bfloat16, 64, 128, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d64_br128_bc128_split, __nv_bfloat16, 64, 128, 128, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br64_bc64, __nv_bfloat16, 128, 64, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br64_bc64_split, __nv_bfloat16, 128, 64, 64, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br64_bc128, __nv_bfloat16, 128, 64, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br64_bc128_split, __nv_bfloat16, 128, 64, 128, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br128_bc64, __nv_bfloat16, 128, 128, 64, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br128_bc64_split, __nv_bfloat16, 128, 128, 64, true)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br128_bc128, __nv_bfloat16, 128, 128, 128, false)
NTKV_ATTN_PREFILL(ntkv_attention_prefill_bf16_d128_br128_bc128_split, __nv_bfloat16, 128, 128, 128, true)

