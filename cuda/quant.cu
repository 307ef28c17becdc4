// quant.cu: group-wise quantization and the MiKV cache (SPEC §1).
#include "ntkv_common.cuh"
