// ntkv_common.cuh: device helpers shared by every kernel family. Plain CUDA C++ (no asm: the
// PTX wrappers are in ntkv_ptx.cuh), so the CPU emulator (tools/emu) compiles this very file.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "ntkv_params.h"
// Angle brackets: found on the include path, so the CPU emulator's stand-in (tools/emu/include,
// first on its path) replaces this directory's PTX layer.
#include <ntkv_ptx.cuh>

namespace ntkv {

// Storage dtypes load to and store from f32; arithmetic happens in f32 (SPEC §0).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Order-preserving unsigned key of an f32: larger float -> larger key, every NaN (either
// sign) maps to 0, strictly below the key of -inf, so NaN ranks below every number (SPEC §0).
__device__ __forceinline__ uint32_t order_key(float x) {
    uint32_t u = __float_as_uint(x);
    if (x != x) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A pair of 16-bit elements widened to f32.
__device__ __forceinline__ float2 to_f32x2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 to_f32x2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
template <typename T> struct Pair2;
template <> struct Pair2<__half> { using type = __half2; };
template <> struct Pair2<__nv_bfloat16> { using type = __nv_bfloat162; };

// Two consecutive 16-bit elements (4-byte aligned) widened to f32.
template <typename T>
__device__ __forceinline__ float2 load2(const T* p) {
    return to_f32x2(*reinterpret_cast<const typename Pair2<T>::type*>(p));
}
// Eight consecutive 16-bit elements (one 16-byte load, 16-byte aligned) widened to f32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const typename Pair2<T>::type* h = reinterpret_cast<const typename Pair2<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = to_f32x2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Inclusive suffix sum over the lanes of a warp: lane l gets the sum of v over lanes >= l.
// Every lane of the warp must call it.
__device__ __forceinline__ uint32_t warp_suffix_sum(uint32_t v) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_down_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) + o < 32) v += y;
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ bool is_finite_f32(float x) { return isfinite(x); }

// Bitonic sort of n (a power of two) 64-bit words in shared memory, by the whole block, in
// descending or ascending order. Equal words are never swapped. Every thread of the block must
// call it; it ends with a __syncthreads(), so the sorted words are visible to every thread.
__device__ __forceinline__ void block_bitonic_sort(unsigned long long* buf, uint32_t n, bool descending) {
    for (uint32_t size = 2; size <= n; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (uint32_t t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
                const uint32_t i = 2u * t - (t & (stride - 1u));
                const uint32_t j = i + stride;
                const bool ascending_run = ((i & size) == 0u) != descending;
                const unsigned long long a = buf[i];
                const unsigned long long c = buf[j];
                if (ascending_run ? (a > c) : (a < c)) {
                    buf[i] = c;
                    buf[j] = a;
                }
            }
            __syncthreads();
        }
    }
}

// The bounds of CSR list `list` in an index buffer of n_indices entries, clamped to that
// buffer so that a corrupted indptr can never make a kernel read outside it (plans validate
// indptr before any launch; this is the device-side guard).
__device__ __forceinline__ void csr_bounds(const uint32_t* __restrict__ indptr, uint32_t list, uint64_t n_indices,
                                           uint64_t& begin, uint64_t& end) {
    uint64_t e = indptr[list + 1];
    uint64_t s = indptr[list];
    e = e < n_indices ? e : n_indices;
    s = s < e ? s : e;
    begin = s;
    end = e;
}

// f32 -> tf32 bits, rounding the 13 dropped mantissa bits to nearest with ties away from zero:
// the rule of cvt.rna.tf32.f32, done with an integer add and mask (it runs once per fragment
// element, so it is kept to plain integer ops). Adding half an ulp of tf32 to
// the sign-magnitude bits carries into the exponent exactly when rounding should; infinities
// and NaNs pass through unchanged.
__device__ __forceinline__ uint32_t to_tf32(float x) {
    const uint32_t u = __float_as_uint(x);
    const bool special = (u & 0x7f800000u) == 0x7f800000u;
    return special ? u : ((u + 0x1000u) & 0xffffe000u);
}

}  // namespace ntkv
