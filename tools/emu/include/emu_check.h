// tools/emu/include/emu_check.h: small helpers the family harnesses share for comparing a
// kernel's output with a reference (not part of the CUDA stand-in).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
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

}  // namespace ntkv_emu
