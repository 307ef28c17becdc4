#!/usr/bin/env bash
# Builds and runs tools/emu-quant/quant_emu.cpp: the kernels of cuda/quant.cu executed on the
# CPU, one std::thread per CUDA thread, under AddressSanitizer and UBSan, compared bit for bit
# with a scalar reference. Needs g++ >= 12 (C++20 <barrier>, _Float16); no GPU, no CUDA.
# Usage: tools/emu-quant/run.sh [random cases per dtype, default 40]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${TMPDIR:-/tmp}/ntkv-quant-emu"
g++ -std=c++20 -O1 -g -ffp-contract=off -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -pthread \
  -I"$root/tools/emu/include" -I"$root/cuda/include" \
  -o "$out" "$root/tools/emu-quant/quant_emu.cpp"
"$out" "$@"
