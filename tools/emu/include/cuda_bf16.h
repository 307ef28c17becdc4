// tools/emu: stand-in for CUDA's cuda_bf16.h when a kernel source is compiled for the CPU.
#pragma once
#include "emu_runtime.h"
