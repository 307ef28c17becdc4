// ntkv_ptx.cuh: every inline-asm PTX wrapper the kernels use, written once (sm_80+).
//
// This is the one platform layer of the kernel sources: no cuda/*.cu contains an `asm` block.
// The CPU emulator (tools/emu/include/ntkv_ptx.cuh) provides the same names with the PTX ISA's
// semantics, so the kernel sources compile unmodified for the CPU; keep the two in step.
//
// Fragment layouts of mma.sync (PTX ISA), lane = 4 g + t (g = lane >> 2, t = lane & 3); the
// lower-numbered element of a 16-bit pair is the lower half of its 32-bit register:
//   m16n8k16 f16/bf16  A (16x16 row): a0 = A[g][2t..2t+1],  a1 = A[g+8][2t..2t+1],
//                                     a2 = A[g][2t+8..+9],  a3 = A[g+8][2t+8..+9]
//                      B (16x8 col):  b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   m16n8k8 tf32       A (16x8 row):  a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
//                      B (8x8 col):   b0 (k = t, n = g),     b1 (k = t+4, n = g)
//   C/D (16x8 f32):    c0, c1 = C[g][2t..2t+1],  c2, c3 = C[g+8][2t..2t+1]
#pragma once

#if defined(NTKV_EMULATE)
#error "cuda/include/ntkv_ptx.cuh reached in an emulator build: include it as <ntkv_ptx.cuh> so tools/emu/include's stand-in is found first"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The CTA's dynamic shared memory, as `type name[]` with 16-byte alignment. (The emulator
// defines it as a pointer to its per-CTA buffer.)
#define NTKV_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]

namespace ntkv {

// ---- Addresses ------------------------------------------------------------------------------

// The 32-bit shared-window address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Bytes of dynamic shared memory this launch was given (%dynamic_smem_size).
__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// ---- cp.async -------------------------------------------------------------------------------
// Asynchronous global -> shared copies. `src_bytes` (0 ..= copy size) bytes are read and the
// rest of the destination is zero-filled; 0 reads nothing (rows past the end become zeros,
// never garbage that could be NaN). A copy is complete, for the issuing thread, only when a
// cp_async_wait<N> returns with at most N of its committed groups still pending; other
// threads see it after a barrier that follows that wait.

// cp.async.cg (L2 only, 16 bytes): dst and src 16-byte aligned.
__device__ __forceinline__ void cp_async_cg16(uint32_t dst, const void* src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// cp.async.ca (L1 and L2), kBytes = 4, 8 or 16: dst and src kBytes-aligned.
template <int kBytes>
__device__ __forceinline__ void cp_async_ca(uint32_t dst, const void* src, uint32_t src_bytes) {
    static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(kBytes), "r"(src_bytes)
                 : "memory");
}
// Closes the thread's open group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of the thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- ldmatrix -------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lane 8 m + r gives the 16-byte
// aligned shared address of row r of matrix m (lanes past the matrix count are ignored);
// register m of lane l receives row l >> 2, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m
// (with .trans: column l >> 2, rows 2 (l % 4) and 2 (l % 4) + 1). For 32-bit elements that is
// word l % 4 of row l >> 2, so the same load serves tf32 fragments.
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, uint32_t addr) {
    if constexpr (kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(addr) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(addr) : "memory");
}
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
    if constexpr (kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr)
                     : "memory");
}
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    if constexpr (kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
}

// ---- mma.sync -------------------------------------------------------------------------------

// d += a * b for one 16x8x16 tile, f32 accumulators; T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// d += a * b for one 16x8x8 tile of tf32 operands (already rounded: ntkv::to_tf32).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- Vector stores --------------------------------------------------------------------------
// 16- and 8-byte global stores with the width spelled out (plain uint4/uint2 assignments were
// split by nvcc into 4-byte stores for some instantiations). `p` must be a global address
// (the driver's allocations are) aligned to the store size.
__device__ __forceinline__ void st_global_v4(uint4* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void st_global_v2(uint2* p, uint32_t a, uint32_t b) {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}

// ---- Bit operations -------------------------------------------------------------------------
// (a & b) | c as one LOP3. Written in C, with b and c both constants, ptxas emits two LOP3s
// (one immediate per instruction); here c stays in a register that the loop shares.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

}  // namespace ntkv
