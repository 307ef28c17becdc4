// tools/emu/include/ntkv_ptx.cuh: the CPU stand-in for cuda/include/ntkv_ptx.cuh. The same
// names and signatures, implemented by emu_ptx.h from the PTX ISA's semantics (not from the
// kernel header), so that an unmodified cuda/<family>.cu runs on the CPU. Keep the list of
// functions in step with cuda/include/ntkv_ptx.cuh.
#pragma once

#include "emu_ptx.h"
#include "emu_runtime.h"

namespace ntkv {

inline uint32_t smem_u32(const void* p) { return ntkv_emu::shared_offset(p); }
inline uint32_t dynamic_smem_size() { return ntkv_emu::dynamic_smem_bytes; }

inline void cp_async_cg16(uint32_t dst, const void* src, uint32_t src_bytes) { ntkv_emu::cp_async(dst, src, 16, src_bytes); }
template <int kBytes>
inline void cp_async_ca(uint32_t dst, const void* src, uint32_t src_bytes) {
    static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    ntkv_emu::cp_async(dst, src, kBytes, src_bytes);
}
inline void cp_async_commit() { ntkv_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    ntkv_emu::cp_async_wait((uint32_t)N);
}

template <bool kTrans = false> inline void ldmatrix_x1(uint32_t& r, uint32_t addr) {
    uint32_t a[1];
    ntkv_emu::ldmatrix<1>(a, addr, kTrans);
    r = a[0];
}
template <bool kTrans = false> inline void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) { ntkv_emu::ldmatrix<2>(r, addr, kTrans); }
template <bool kTrans = false> inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ntkv_emu::ldmatrix<4>(r, addr, kTrans); }

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "m16n8k16 takes f16 or bf16");
    ntkv_emu::mma_sync(std::is_same_v<T, __half> ? ntkv_emu::OP_MMA_F16 : ntkv_emu::OP_MMA_BF16, d, a, b0, b1);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ntkv_emu::mma_sync(ntkv_emu::OP_MMA_TF32, d, a, b0, b1);
}

inline void st_global_v4(uint4* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ntkv_emu::die("st.global.v4: address not 16-byte aligned");
    *p = make_uint4(a, b, c, d);
}
inline void st_global_v2(uint2* p, uint32_t a, uint32_t b) {
    if (reinterpret_cast<uintptr_t>(p) % 8 != 0) ntkv_emu::die("st.global.v2: address not 8-byte aligned");
    *p = make_uint2(a, b);
}

// lop3.b32 with the table 0xEA: (a & b) | c.
inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }

}  // namespace ntkv
