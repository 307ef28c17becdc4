// tools/emu/include/ntkv_common.cuh: the CPU stand-in for cuda/include/ntkv_common.cuh used by
// every kernel emulation (tools/emu, tools/emu-quant, tools/emu-ntk). The runner scripts put
// this directory before cuda/include, so an unmodified cuda/<family>.cu compiles as C++20
// against the emulated runtime (emu_runtime.h: types, intrinsics, CTA runner, barriers,
// shared memory, atomics) and PTX (emu_ptx.h: warp collectives, mma, ldmatrix, cp.async).
// The ntkv:: helpers below mirror cuda/include/ntkv_common.cuh; keep them in step with it.
#pragma once

#include "emu_runtime.h"
#include "emu_ptx.h"
#include "ntkv_params.h"

namespace ntkv {
inline float to_f32(float x) { return x; }
inline float to_f32(__half x) { return __half2float(x); }
inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
inline uint32_t order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    if (x != x) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline bool is_finite_f32(float x) { return std::isfinite(x); }
}  // namespace ntkv
