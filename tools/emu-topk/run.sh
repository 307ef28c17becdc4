#!/usr/bin/env bash
# Builds and runs tools/emu-topk/topk_emu.cpp: the kernels of cuda/topk.cu executed on the
# CPU (one std::thread per CUDA thread, one process per CTA with several CTAs at once) under
# AddressSanitizer and UBSan, against scalar references. Needs g++ >= 12 (C++20 <barrier>,
# std::atomic_ref, _Float16); no GPU, no CUDA toolkit.
# Usage: tools/emu-topk/run.sh [topk|select|h2o|evict|snapkv]   (default: all)
#        tools/emu-topk/run.sh sweep [count] [seed]            (random top-k shapes)
# NTKV_TOPK_SRC=path runs another copy of the source (mutation checks); NTKV_EMU_STOP=1 stops
# at the first failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${TMPDIR:-/tmp}/ntkv-topk-emu"
mkdir -p "$work"
# The one textual change: a block-scope `extern __shared__` array becomes a plain extern
# declaration (the harness defines it), since `__shared__` expands to `static`.
sed 's/extern __shared__/extern/' "${NTKV_TOPK_SRC:-$root/cuda/topk.cu}" > "$work/topk_emu_src.cu"
g++ -std=c++20 -O1 -g -ffp-contract=off -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -pthread \
  -I"$work" -I"$root/tools/emu-topk/include" -I"$root/cuda/include" \
  -o "$work/topk-emu" "$root/tools/emu-topk/topk_emu.cpp"
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}" "$work/topk-emu" "$@"
