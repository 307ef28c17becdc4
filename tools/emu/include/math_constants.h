// tools/emu: stand-in for CUDA's math_constants.h when a kernel source is compiled for the CPU.
#pragma once
#include <cmath>
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
