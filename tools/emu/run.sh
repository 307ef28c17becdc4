#!/usr/bin/env bash
# Builds and runs tools/emu/decode_emu.cpp: cuda/decode.cu executed on the CPU with one
# thread per CUDA thread, under AddressSanitizer, against an f64 reference. Needs g++ >= 12
# (C++20 <barrier>, _Float16). No GPU, no CUDA toolkit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${TMPDIR:-/tmp}/ntkv-decode-emu"
g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -pthread \
  -I"$root/tools/emu/include" -I"$root/cuda/include" \
  -o "$out" "$root/tools/emu/decode_emu.cpp"
"$out"
