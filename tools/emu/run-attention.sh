#!/usr/bin/env bash
# Builds and runs tools/emu/attention_emu.cpp: cuda/attention.cu executed on the CPU with one
# thread per CUDA thread and the tensor-core PTX (mma.sync m16n8k16, ldmatrix, cp.async)
# emulated, under AddressSanitizer and UBSan, against an f64 reference. Needs g++ >= 12.
# Optional argument: run only the cases whose name contains it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${TMPDIR:-/tmp}/ntkv-attention-emu"
g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-strict-aliasing -pthread \
  -Wno-unknown-pragmas -I"$root/tools/emu/include" -I"$root/cuda/include" \
  -o "$out" "$root/tools/emu/attention_emu.cpp"
"$out" "$@"
