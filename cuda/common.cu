// common.cu: kernels every family and the bench runner share.
#include "ntkv_common.cuh"

// Device-to-device copy in 16-byte vectors, grid-stride: the bandwidth ceiling that every
// memory-bound figure in the bench runner is reported against.
extern "C" __global__ void ntkv_copy_vec16(const NtkvCopyParams p, const uint4* __restrict__ src,
                                           uint4* __restrict__ dst) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n_vec16; i += stride) {
        dst[i] = src[i];
    }
}

template <typename T>
__device__ __forceinline__ void finite_scan(const NtkvFiniteCheckParams& p, const T* __restrict__ x,
                                            unsigned long long* first_bad) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        if (!isfinite(ntkv::to_f32(x[i]))) {
            // atomicMin is order-independent, so the reported index is deterministic.
            atomicMin(first_bad, (unsigned long long)i);
        }
    }
}

// Writes the lowest flat index of a NaN/Inf element into *first_bad, which the caller
// initialises to UINT64_MAX. `x` is reinterpreted according to p.dtype.
extern "C" __global__ void ntkv_find_nonfinite(const NtkvFiniteCheckParams p, const void* __restrict__ x,
                                               unsigned long long* __restrict__ first_bad) {
    switch (p.dtype) {
        case 0: finite_scan(p, static_cast<const float*>(x), first_bad); break;
        case 1: finite_scan(p, static_cast<const __half*>(x), first_bad); break;
        default: finite_scan(p, static_cast<const __nv_bfloat16*>(x), first_bad); break;
    }
}
