// tools/emu/include/emu_check.h: small helpers the family harnesses share for comparing a
// kernel's output with a reference (not part of the CUDA stand-in).
#pragma once

#include <cmath>

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

}  // namespace ntkv_emu
