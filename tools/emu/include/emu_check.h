// tools/emu/include/emu_check.h: small helpers the family harnesses share for comparing a
// kernel's output with a reference (not part of the CUDA stand-in).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace ntkv_emu {

// Relative L2 error ||got - want|| / ||want|| (the absolute norm when want is all zero), summed
// one element at a time; a NaN anywhere makes it NaN.
struct RelL2 {
    double num = 0, den = 0;
    void add(double got, double want) {
        num += (got - want) * (got - want);
        den += want * want;
    }
    double value() const { return den > 0 ? std::sqrt(num / den) : std::sqrt(num); }
};

// A heap copy of exactly x's size (at least one element), so AddressSanitizer sees every
// overrun of a kernel's buffer.
template <typename T>
std::unique_ptr<T[]> dup(const std::vector<T>& x) {
    std::unique_ptr<T[]> p(new T[std::max<size_t>(x.size(), 1)]);
    std::copy(x.begin(), x.end(), p.get());
    return p;
}

// The f64 attention of one query row over its scored keys s = {(key, logit)} (not empty):
// out[d] += Σ softmax(logit) · value(key, d) for d < D, in the order of s, then out /= the sum;
// returns the natural-log lse.
template <typename Value>
double softmax_row(const std::vector<std::pair<uint32_t, double>>& s, uint32_t D, Value&& value, double* out) {
    double m = -INFINITY, z = 0;
    for (auto& x : s) m = std::max(m, x.second);
    for (auto& x : s) {
        const double w = std::exp(x.second - m);
        z += w;
        for (uint32_t d = 0; d < D; ++d) out[d] += w * value(x.first, d);
    }
    for (uint32_t d = 0; d < D; ++d) out[d] /= z;
    return m + std::log(z);
}

}  // namespace ntkv_emu

// The extern "C" entry point `name##_<suffix>` of dtype T (float, __half or __nv_bfloat16), so a
// harness templated on T reaches the right instantiation without a per-dtype table.
template <typename T, typename F32, typename F16, typename BF16>
constexpr auto emu_pick_dtype(F32 f32, F16 f16, BF16 bf16) {
    if constexpr (std::is_same_v<T, float>) {
        return f32;
    } else if constexpr (std::is_same_v<T, __half>) {
        return f16;
    } else {
        static_assert(std::is_same_v<T, __nv_bfloat16>, "kernels come in f32, f16 and bf16");
        return bf16;
    }
}
#define EMU_KERNEL(T, name) emu_pick_dtype<T>(name##_f32, name##_f16, name##_bf16)
